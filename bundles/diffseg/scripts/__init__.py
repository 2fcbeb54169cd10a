"""Glue of the diffseg bundle: validation metric, evaluation writer, label remapping, the checks this
bundle adds to ``common.bundle`` (MONAI Label fine-tuning, the model-info file beside the checkpoints,
images matching a glob pattern, small training lists)."""

from .checks import (
    MODEL_INFO_NAME,
    check_model_info,
    check_resume,
    check_train_outputs,
    drop_last_batch,
    model_info_path,
    require_images,
    write_model_info,
)
from .evaluation import SegmentationMetricsWriter
from .labels import RemapLabelsd, parse_label_mapping
from .metrics import DiceNoBackgroundMetric

__all__ = [
    "DiceNoBackgroundMetric",
    "MODEL_INFO_NAME",
    "RemapLabelsd",
    "SegmentationMetricsWriter",
    "check_model_info",
    "check_resume",
    "check_train_outputs",
    "drop_last_batch",
    "model_info_path",
    "parse_label_mapping",
    "require_images",
    "write_model_info",
]
