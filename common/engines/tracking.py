"""Helpers for the bundles' MLflow tracking settings (``configs/mlflow.json``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["executed_config"]


def executed_config(output_dir: str | os.PathLike) -> str | None:
    """The executed config MONAI exported for this run: the newest ``config_*.json`` in ``output_dir``.

    MONAI 1.6.1 builds that path by appending ``" + '/config_<time>.json'"`` to the raw
    ``output_dir`` config string, which only yields a valid path when ``output_dir`` is an
    expression; with a plain path from the command line (``--output_dir /runs/x``) the artifact
    path is garbage and MLflow silently logs nothing. The file itself is written correctly before
    the workflow starts, so the tracking settings point the handlers' ``artifacts`` here instead.
    """
    found = sorted(Path(output_dir).glob("config_*.json"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None
