"""The workflow vocabulary every bundle shares: datalists, case names, outputs and training checkpoints.

One policy, written once (see CONTRIBUTING.md, "Runs, outputs and checkpoints"):

- :mod:`.datalists`: a Decathlon-style datalist is read the same way in every bundle; a missing file
  gives ``[]`` while a config is only parsed (MONAI Label, ``check_properties``) and one clear error
  when a run starts (:func:`require_cases`);
- :mod:`.cases`: the name a case's outputs carry (its ``id``, else its image file's stem);
- :mod:`.outputs`: a run never writes over an earlier output unless ``overwrite`` is true, and two
  cases never write the same file;
- :mod:`.checkpoints`: a training run is *new*, *resumed* (``resume``), *overwriting* (``overwrite``)
  or *fine-tuned* from a model (``finetune``), with the same config keys in every bundle.
"""

from common.bundle.cases import case_name, describe_case, file_stem
from common.bundle.checkpoints import (
    check_checkpoint,
    check_run_mode,
    check_training_outputs,
    latest_checkpoint,
    refuse_existing_checkpoints,
)
from common.bundle.datalists import datalist_field, load_datalist, require_cases, require_file
from common.bundle.outputs import check_outputs, planned_outputs

__all__ = [
    "case_name",
    "describe_case",
    "file_stem",
    "check_checkpoint",
    "check_run_mode",
    "check_training_outputs",
    "latest_checkpoint",
    "refuse_existing_checkpoints",
    "datalist_field",
    "load_datalist",
    "require_cases",
    "require_file",
    "check_outputs",
    "planned_outputs",
]
