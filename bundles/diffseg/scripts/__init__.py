"""Glue of the diffseg bundle: validation metric, evaluation writer, datalist loading, input and output checks."""

from .checks import check_outputs, check_resume, check_train_outputs, require_cases
from .evaluation import SegmentationMetricsWriter, class_names, load_datalist
from .metrics import DiceNoBackgroundMetric

__all__ = [
    "DiceNoBackgroundMetric",
    "SegmentationMetricsWriter",
    "check_outputs",
    "check_resume",
    "check_train_outputs",
    "class_names",
    "load_datalist",
    "require_cases",
]
