"""Checks run before any work: outputs that exist or cannot be written, missing cases, a resume or
fine-tuning checkpoint that does not fit or was trained for another modality or class set. Each raises a ``common.utils.errors`` user error naming the file and
the config key, so the command line ends with one ``ERROR: ...`` line and nothing is written."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError
from common.utils.io import atomic_write, check_state_fits, check_writable_dir, load_checkpoint

__all__ = [
    "MODEL_INFO_NAME",
    "check_model_info",
    "check_outputs",
    "check_resume",
    "check_train_outputs",
    "drop_last_batch",
    "model_info_path",
    "require_cases",
    "write_model_info",
]

logger = logging.getLogger(__name__)


def check_outputs(output_dir: str, overwrite: bool, patterns: str | list[str] = "*_seg.nii.gz") -> str:
    """Refuse, before any work, an ``output_dir`` that cannot be written or that already holds
    outputs matching ``patterns`` (predictions, metric tables), unless ``overwrite``."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if os.path.isdir(output_dir):
        found = sorted({p for pattern in patterns for p in Path(output_dir).rglob(pattern)})
        if found and not overwrite:
            raise OutputExistsError(
                f"output folder '{output_dir}' (key 'output_dir') already holds {len(found)} output(s), e.g. "
                f"'{found[0]}'; set 'overwrite' to true (--overwrite true) to replace them, "
                "or choose another output_dir"
            )
    check_writable_dir(output_dir, "output folder (key 'output_dir')")
    return output_dir


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
    """Refuse, before training starts, a checkpoint or log folder that cannot be written, and a
    ``ckpt_dir`` that already holds checkpoints of another run (they would be replaced), unless
    ``overwrite``, ``resume`` (continuing a run updates its own checkpoints) or fine-tuning.

    Fine-tuning trains on from an existing model with a fresh optimiser, schedule and trainer
    state, and replaces the checkpoints of ``ckpt_dir`` with the new run's. It is asked for in
    one of two explicit ways:

    - ``finetune`` true (command line): the weights of ``finetune_ckpt`` (default
      ``<ckpt_dir>/model.pt``) are loaded by the config's ``finetune_loader``;
    - a ``monai.handlers.CheckpointLoader`` as the first training handler (``first_handler``,
      the config's ``train#handlers#0``): what MONAI Label's bundle train task inserts there,
      with ``load_path`` = ``models/<model_filename>``, when its option ``pretrained`` is true
      (its default) and that file exists.

    The model fine-tuned from must fit ``network`` and, when its folder records what it was
    trained for (``model_info.json``), the same ``modality``, ``n_img``, ``num_classes`` and
    ``diffusion`` as this run (``model_info``); :func:`check_resume` checks a resumed run likewise.
    """
    from monai.handlers import CheckpointLoader

    if finetune and resume:
        raise InvalidInputError(
            "'finetune' and 'resume' are both true; 'resume' continues a run (its optimiser, schedule and "
            "trainer state), 'finetune' starts a new run from a model's weights: set only one"
        )
    sources: list[tuple[str, str | None, str]] = []  # (checkpoint, sha256, what sets it)
    if finetune:
        sources.append((str(finetune_ckpt or Path(ckpt_dir) / "model.pt"), finetune_ckpt_sha256, "key 'finetune_ckpt'"))
    if isinstance(first_handler, CheckpointLoader) and not finetune:
        sources.append((str(first_handler.load_path), getattr(first_handler, "sha256", None),
                        "the CheckpointLoader of 'train#handlers' (MONAI Label's train task, option 'pretrained')"))
    if os.path.isdir(ckpt_dir) and not (overwrite or resume or sources):
        found = sorted(p for p in Path(ckpt_dir).glob("*.pt") if p.is_file())
        if found:
            raise OutputExistsError(
                f"checkpoint folder '{ckpt_dir}' (key 'ckpt_dir') already holds {len(found)} checkpoint(s), e.g. "
                f"'{found[0]}'; set 'overwrite' to true to replace them, 'resume' to true to continue that run, "
                "'finetune' to true to train on from its model.pt (replacing the checkpoints), "
                "or choose another ckpt_dir"
            )
    for path, sha256, where in sources:
        ckpt = load_checkpoint(path, sha256=sha256)
        state = ckpt.get("model", ckpt)  # models/model.pt is a plain state dict, checkpoint.pt has 'model'
        if network is not None:
            check_state_fits(network, state, f"checkpoint '{path}' ({where}) to fine-tune from")
        if model_info is not None:
            check_model_info(path, model_info, where)
    check_writable_dir(ckpt_dir, "checkpoint folder (key 'ckpt_dir')")
    check_writable_dir(output_dir, "output folder (key 'output_dir')")


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


def check_model_info(ckpt_path: str, info: Mapping[str, Any], key: str = "key 'ckpt_path'") -> dict | None:
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


def require_cases(data: list, source: str, key: str, split: str | None = None) -> list:
    """Refuse an empty case list at run time, naming where the cases were looked for.

    ``source`` is a datalist JSON (``split`` names its section) or a glob pattern of images;
    ``key`` is the config key that sets it. Static checks (MONAI Label, ``check_properties``)
    build the dataset without data, so this runs as the first item of ``run``, not when parsing.
    """
    if data:
        return data
    if split is not None:
        if not os.path.isfile(source):
            raise InputNotFoundError(
                f"datalist '{source}' (key '{key}') does not exist; expected a Decathlon datalist JSON with a "
                f"'{split}' list (build it with common.data.seg_datalists, see the model card)"
            )
        raise InvalidInputError(f"datalist '{source}' (key '{key}') has no '{split}' cases; expected at least one")
    raise InputNotFoundError(
        f"no input images: nothing matches '{source}' (key '{key}'); expected NIfTI images there, or a list "
        "of cases in 'data' ([{\"image\": <path>}, ...])"
    )


def check_resume(
    resume_ckpt: str, sha256: str | None, network: torch.nn.Module, model_info: Mapping[str, Any] | None = None
) -> None:
    """Before the trainer is built: the resume checkpoint exists, matches ``sha256`` (key
    ``resume_ckpt_sha256``) and its ``model`` entry fits ``network`` (a checkpoint of another
    bundle or configuration is refused here, before any log or checkpoint is written; the
    trainer's ``SafeCheckpointLoader`` checks every entry again when it loads them). With
    ``model_info``, the run must also be for the modality and class set recorded beside it."""
    ckpt = load_checkpoint(resume_ckpt, sha256=sha256)
    if "model" not in ckpt:
        raise InvalidInputError(
            f"checkpoint '{resume_ckpt}' (key 'resume_ckpt') has no 'model' entry (it has {sorted(ckpt)[:8]}); "
            "expected a training checkpoint of this bundle (checkpoint.pt with model, optimizer, lr_scheduler, "
            "step and trainer)"
        )
    check_state_fits(network, ckpt["model"], f"checkpoint '{resume_ckpt}' (key 'resume_ckpt') entry 'model'")
    if model_info is not None:
        check_model_info(resume_ckpt, model_info, "key 'resume_ckpt'")
