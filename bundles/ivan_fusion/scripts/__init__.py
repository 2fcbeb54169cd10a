"""Glue of the ivan_fusion bundle: slice serving, output writing, evaluation, demo data."""

from . import data, evaluate, io  # noqa: F401
