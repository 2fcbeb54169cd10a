"""Checks run before any work: outputs that exist or cannot be written, missing cases, a resume
checkpoint that does not fit. Each raises a ``common.utils.errors`` user error naming the file and
the config key, so the command line ends with one ``ERROR: ...`` line and nothing is written."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError
from common.utils.io import check_state_fits, check_writable_dir, load_checkpoint

__all__ = ["check_outputs", "check_resume", "check_train_outputs", "require_cases"]


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


def check_train_outputs(ckpt_dir: str, output_dir: str, overwrite: bool, resume: bool = False) -> None:
    """Refuse, before training starts, a checkpoint or log folder that cannot be written, and a
    ``ckpt_dir`` that already holds checkpoints of another run (they would be replaced), unless
    ``overwrite`` or ``resume`` (continuing a run updates its own checkpoints)."""
    if os.path.isdir(ckpt_dir) and not (overwrite or resume):
        found = sorted(p for p in Path(ckpt_dir).glob("*.pt") if p.is_file())
        if found:
            raise OutputExistsError(
                f"checkpoint folder '{ckpt_dir}' (key 'ckpt_dir') already holds {len(found)} checkpoint(s), e.g. "
                f"'{found[0]}'; set 'overwrite' to true to replace them, 'resume' to true to continue that run, "
                "or choose another ckpt_dir"
            )
    check_writable_dir(ckpt_dir, "checkpoint folder (key 'ckpt_dir')")
    check_writable_dir(output_dir, "output folder (key 'output_dir')")


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


def check_resume(resume_ckpt: str, sha256: str | None, network: torch.nn.Module) -> None:
    """Before the trainer is built: the resume checkpoint exists, matches ``sha256`` (key
    ``resume_ckpt_sha256``) and its ``model`` entry fits ``network`` (a checkpoint of another
    bundle or configuration is refused here, before any log or checkpoint is written; the
    trainer's ``SafeCheckpointLoader`` checks every entry again when it loads them)."""
    ckpt = load_checkpoint(resume_ckpt, sha256=sha256)
    if "model" not in ckpt:
        raise InvalidInputError(
            f"checkpoint '{resume_ckpt}' (key 'resume_ckpt') has no 'model' entry (it has {sorted(ckpt)[:8]}); "
            "expected a training checkpoint of this bundle (checkpoint.pt with model, optimizer, lr_scheduler, "
            "step and trainer)"
        )
    check_state_fits(network, ckpt["model"], f"checkpoint '{resume_ckpt}' (key 'resume_ckpt') entry 'model'")
