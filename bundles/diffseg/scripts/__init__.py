"""Glue of the diffseg bundle: validation metric, evaluation writer, datalist loading, label remapping,
input and output checks, the model-info file beside the checkpoints."""

from .checks import (
    MODEL_INFO_NAME,
    check_model_info,
    check_outputs,
    check_resume,
    check_train_outputs,
    drop_last_batch,
    model_info_path,
    require_cases,
    write_model_info,
)
from .evaluation import SegmentationMetricsWriter, class_names, load_datalist
from .labels import RemapLabelsd, parse_label_mapping
from .metrics import DiceNoBackgroundMetric

__all__ = [
    "DiceNoBackgroundMetric",
    "MODEL_INFO_NAME",
    "RemapLabelsd",
    "SegmentationMetricsWriter",
    "check_model_info",
    "check_outputs",
    "check_resume",
    "check_train_outputs",
    "class_names",
    "drop_last_batch",
    "load_datalist",
    "model_info_path",
    "parse_label_mapping",
    "require_cases",
    "write_model_info",
]
