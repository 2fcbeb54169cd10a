"""Glue of the diffseg bundle: validation metric, evaluation writer, datalist loading, output checks."""

from .evaluation import SegmentationMetricsWriter, check_outputs, class_names, load_datalist
from .metrics import DiceNoBackgroundMetric

__all__ = ["DiceNoBackgroundMetric", "SegmentationMetricsWriter", "check_outputs", "class_names", "load_datalist"]
