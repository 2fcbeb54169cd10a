"""Glue of the noddi_sr bundle: NODDI case checks, weights across the three stages, output naming and evaluation.

Datalists, case names, output and checkpoint policy come from :mod:`common.bundle` (the configs call it directly).
"""

from .checks import MatchGridd, check_cases
from .data import COHORT_HINT, ENTRY_MEANING, PATH_KEYS
from .evaluation import NODDIEvaluationHandler, montage_names, write_montage
from .outputs import AttachStdd, RefuseExistingOutputsd, planned_files
from .weights import EMAFromNetwork, load_inference_weights, load_weights

__all__ = [
    "MatchGridd",
    "check_cases",
    "COHORT_HINT",
    "ENTRY_MEANING",
    "PATH_KEYS",
    "NODDIEvaluationHandler",
    "montage_names",
    "write_montage",
    "AttachStdd",
    "RefuseExistingOutputsd",
    "planned_files",
    "EMAFromNetwork",
    "load_inference_weights",
    "load_weights",
]
