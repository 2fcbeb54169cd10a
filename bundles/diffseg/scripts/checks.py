"""What this bundle adds to the run policy of ``common.bundle`` (datalists, outputs, checkpoints; see
CONTRIBUTING.md, "Runs, outputs and checkpoints"): MONAI Label's ``CheckpointLoader`` counted as
fine-tuning, the ``model_info.json`` beside the checkpoints (a model trained for another modality or
class set is refused), inference on a glob pattern that matches nothing, and the batch of a small
training list. Each raises a ``common.utils.errors`` user error naming the file and the config key, so
the command line ends with one ``ERROR: ...`` line and nothing is written."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.bundle import check_checkpoint, check_run_mode, check_training_outputs
from common.utils.errors import InputNotFoundError, InvalidInputError
from common.utils.io import atomic_write

__all__ = [
    "CHECKPOINT_PATTERNS",
    "MODEL_INFO_NAME",
    "check_model_info",
    "check_resume",
    "check_train_outputs",
    "drop_last_batch",
    "model_info_path",
    "require_images",
    "write_model_info",
]

#: the checkpoints of a training run in ``ckpt_dir`` (model.pt, checkpoint.pt, interval checkpoints)
CHECKPOINT_PATTERNS = ("*.pt",)

logger = logging.getLogger(__name__)


def check_train_outputs(
    ckpt_dir: str,
    output_dir: str,
    overwrite: bool,
    resume: bool = False,
    finetune: bool = False,
    finetune_ckpt: str | None = None,
    finetune_ckpt_sha256: str | None = None,
    first_handler: Any = None,
    network: torch.nn.Module | None = None,
    model_info: Mapping[str, Any] | None = None,
) -> None:
    """Before training: the run policy of :mod:`common.bundle.checkpoints` (``resume``, ``finetune``,
    ``overwrite``; checkpoints ``*.pt`` of ``ckpt_dir``), plus what MONAI Label and this bundle add.

    Fine-tuning is asked for in one of two explicit ways:

    - ``finetune`` true (command line): the weights of ``finetune_ckpt`` (default
      ``<ckpt_dir>/model.pt``) are loaded by the config's ``finetune_loader``;
    - a ``monai.handlers.CheckpointLoader`` as the first training handler (``first_handler``,
      the config's ``train#handlers#0``): what MONAI Label's bundle train task inserts there,
      with ``load_path`` = ``models/<model_filename>``, when its option ``pretrained`` is true
      (its default) and that file exists. It counts as fine-tuning: the checkpoints may be replaced.

    The model fine-tuned from must fit ``network`` (:func:`common.bundle.check_checkpoint`) and, when
    its folder records what it was trained for (``model_info.json``), the same ``modality``, ``n_img``,
    ``num_classes`` and ``diffusion`` as this run (``model_info``); :func:`check_resume` checks a
    resumed run likewise.
    """
    from monai.handlers import CheckpointLoader

    check_run_mode(resume, finetune)
    monailabel = isinstance(first_handler, CheckpointLoader) and not finetune
    sources: list[tuple[str, str | None, str, str]] = []  # (checkpoint, sha256, config key, what sets it)
    if finetune:
        sources.append((str(finetune_ckpt or Path(ckpt_dir) / "model.pt"), finetune_ckpt_sha256, "finetune_ckpt",
                        "config key 'finetune_ckpt'"))
    if monailabel:
        sources.append((str(first_handler.load_path), getattr(first_handler, "sha256", None), "train#handlers#0",
                        "the CheckpointLoader of 'train#handlers' (MONAI Label's train task, option 'pretrained')"))
    for path, sha256, key, where in sources:
        # models/model.pt is a plain state dict, checkpoint.pt has 'model': either fits
        check_checkpoint(path, sha256, key, network=network, network_entry="model")
        if model_info is not None:
            check_model_info(path, model_info, where)
    # after the models (a refused one leaves no folder behind); MONAI Label's loader replaces the checkpoints
    # as 'finetune' does
    check_training_outputs(ckpt_dir, output_dir, CHECKPOINT_PATTERNS, resume, overwrite or monailabel, finetune)


def check_resume(
    resume_ckpt: str, sha256: str | None, network: torch.nn.Module, model_info: Mapping[str, Any] | None = None
) -> None:
    """Before the trainer is built: the resume checkpoint exists, matches ``sha256`` (key
    ``resume_ckpt_sha256``) and its ``model`` entry fits ``network``
    (:func:`common.bundle.check_checkpoint`; the trainer's ``SafeCheckpointLoader`` checks every entry
    again when it loads them). With ``model_info``, the run must also be for the modality and class set
    recorded beside it."""
    check_checkpoint(resume_ckpt, sha256, "resume_ckpt", entries=("model",), network=network, network_entry="model")
    if model_info is not None:
        check_model_info(resume_ckpt, model_info, "config key 'resume_ckpt'")


def require_images(data: list, pattern: str, key: str) -> list:
    """Inference on a glob pattern of images (``data_source``) that matches nothing: refused at run time
    naming the pattern and its config key (a datalist's cases: :func:`common.bundle.require_cases`)."""
    if data:
        return data
    raise InputNotFoundError(
        f"no input images: nothing matches '{pattern}' (key '{key}'); expected NIfTI images there, or a list "
        "of cases in 'data' ([{\"image\": <path>}, ...])"
    )


def drop_last_batch(n_cases: int, batch_size: int) -> bool:
    """``drop_last`` of the training loader: true unless a process has fewer cases than one batch.

    With ``drop_last`` an epoch of fewer cases than ``batch_size`` has no batch at all and the
    run would end having trained nothing. Then the epoch is one smaller batch of every case
    instead (a warning says so). ``n_cases`` is the whole training list; under
    ``torch.distributed`` each process gets ``ceil(n_cases / world_size)`` of them.
    """
    import math

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    per_process = math.ceil(int(n_cases) / world)
    if per_process == 0 or per_process >= int(batch_size):
        return True
    msg = (
        f"the training list has {n_cases} case(s) ({per_process} per process), fewer than one batch "
        f"(batch size {batch_size} per process): each epoch is one batch of {per_process} case(s) instead "
        "(a smaller effective batch); set 'batch_size' to at most that to silence this warning"
    )
    logger.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=2)
    return False


# ------------------------------------------------------------------------------ model info sidecar

#: what a checkpoint folder's models were trained for, written beside them by train.json
MODEL_INFO_NAME = "model_info.json"
#: entries that must match between the checkpoint and the run (an error otherwise)
_MUST_MATCH = ("modality", "n_img", "num_classes", "diffusion")
#: entries that change what the model sees without changing its shapes (a warning otherwise)
_SHOULD_MATCH = ("pixdim", "hu_window")


def model_info_path(ckpt_path: str) -> Path:
    """The ``model_info.json`` that describes the checkpoint file ``ckpt_path`` (same folder)."""
    return Path(ckpt_path).parent / MODEL_INFO_NAME


def _norm(key: str, value: Any) -> Any:
    if key == "modality":
        v = str(value).upper()
        return "MR" if v == "MRI" else v
    if key == "diffusion":
        return bool(value)
    if key in ("n_img", "num_classes"):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [round(float(v), 6) for v in value]
    return value


def write_model_info(ckpt_dir: str, info: Mapping[str, Any]) -> Path:
    """Write ``<ckpt_dir>/model_info.json`` (atomically): modality, n_img, num_classes, diffusion,
    pixdim and hu_window of the run whose checkpoints go there. ``models/model.pt`` stays a plain
    state dict (what MONAI Label loads); inference and fine-tuning read this file beside it."""
    path = Path(ckpt_dir) / MODEL_INFO_NAME
    content = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(info).items()}
    with atomic_write(path, "w") as fh:
        json.dump(content, fh, indent=2)
        fh.write("\n")
    return path


def check_model_info(ckpt_path: str, info: Mapping[str, Any], key: str = "config key 'ckpt_path'") -> dict | None:
    """Refuse a checkpoint trained for another modality, channel count, class set or method than
    this run's ``info``, as recorded in ``model_info.json`` beside it (a CT model used on MR gives a
    plausible-looking but wrong segmentation). Other spacing or HU window: a warning. Without a
    ``model_info.json`` (weights from elsewhere) nothing can be checked and ``None`` is returned."""
    path = model_info_path(ckpt_path)
    if not path.is_file():
        logger.info("no %s beside '%s': its modality and class set cannot be checked", MODEL_INFO_NAME, ckpt_path)
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"'{path}' (beside checkpoint '{ckpt_path}') cannot be read as JSON: {e}") from e
    if not isinstance(saved, dict):
        raise InvalidInputError(f"'{path}' (beside checkpoint '{ckpt_path}') holds no JSON object")
    wrong = [
        f"{k} {saved[k]!r} (this run: {info[k]!r}, config key '{k}')"
        for k in _MUST_MATCH
        if k in saved and k in info and info[k] is not None and _norm(k, saved[k]) != _norm(k, info[k])
    ]
    if wrong:
        raise InvalidInputError(
            f"checkpoint '{ckpt_path}' ({key}) was trained with " + ", ".join(wrong)
            + f", as recorded in '{path}'; expected a model trained for this run's data: set those keys to match "
            "the model, or use a model trained for this modality and class set"
        )
    modality = str(saved.get("modality", "")).upper()
    for k in _SHOULD_MATCH:
        if k == "hu_window" and modality != "CT":
            continue
        if k in saved and k in info and info[k] is not None and _norm(k, saved[k]) != _norm(k, info[k]):
            msg = (
                f"checkpoint '{ckpt_path}' was trained with {k} {saved[k]} (recorded in '{path}'), "
                f"this run uses {info[k]} (config key '{k}'): the model sees its inputs differently"
            )
            logger.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
    return saved
