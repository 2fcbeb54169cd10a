"""Glue of the noddi_sr bundle: datalists, checkpoint loading across the three stages, outputs and evaluation."""

from .checks import (
    MatchGridd,
    case_stem,
    check_cases,
    check_output_dir,
    check_resume,
    montage_names,
    refuse_existing_checkpoints,
    refuse_existing_outputs,
)
from .data import load_datalist, require_data
from .evaluation import NODDIEvaluationHandler, write_montage
from .outputs import AttachStdd, RefuseExistingOutputsd, output_stem
from .weights import load_inference_weights, load_weights

__all__ = [
    "MatchGridd",
    "case_stem",
    "check_cases",
    "check_output_dir",
    "check_resume",
    "montage_names",
    "refuse_existing_checkpoints",
    "refuse_existing_outputs",
    "load_datalist",
    "require_data",
    "NODDIEvaluationHandler",
    "write_montage",
    "AttachStdd",
    "RefuseExistingOutputsd",
    "output_stem",
    "load_inference_weights",
    "load_weights",
]
