"""Training checkpoints: one policy for starting, resuming, overwriting and fine-tuning a run.

Every training config has the same keys:

==================  =========================================================================
``resume``          continue the run saved in ``resume_ckpt`` (model, optimiser, schedule, trainer)
``resume_ckpt``     the checkpoint to continue from (``resume_ckpt_sha256``: its digest, optional)
``finetune``        start a new run from the weights of ``finetune_ckpt`` (``finetune_ckpt_sha256``),
                    with a fresh optimiser and schedule; replaces the checkpoints of ``ckpt_dir``
``overwrite``       start a new run from scratch and replace the checkpoints of ``ckpt_dir``
==================  =========================================================================

With none of them set, a run whose ``ckpt_dir`` already holds this stage's checkpoints is refused before
anything is written (they would be replaced). ``resume`` and ``finetune`` together are refused. The
checkpoint a run resumes or fine-tunes from is checked before the trainer is built: it exists, has its
digest, holds the entries the run loads and fits the network.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.data.fetch import HashMismatchError
from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError
from common.utils.io import CheckpointError, check_state_fits, check_writable_dir, load_checkpoint

__all__ = [
    "check_run_mode",
    "refuse_existing_checkpoints",
    "check_training_outputs",
    "check_checkpoint",
    "latest_checkpoint",
]


def check_run_mode(resume: bool = False, finetune: bool = False) -> None:
    """``resume`` continues a run, ``finetune`` starts a new one from a model's weights: not both."""
    if resume and finetune:
        raise InvalidInputError(
            "'resume' and 'finetune' are both true; 'resume' continues a run (its optimiser, schedule and "
            "trainer state), 'finetune' starts a new run from a model's weights: set only one"
        )


def refuse_existing_checkpoints(ckpt_dir: str | os.PathLike, patterns: Sequence[str] = ("*.pt",), allowed: bool = False) -> None:
    """Refuse to start a new run over the checkpoints of an earlier one: files of ``ckpt_dir`` (config key
    ``ckpt_dir``) matching ``patterns`` (this stage's file names) raise :class:`OutputExistsError` naming them
    and the keys that let the run go on, unless ``allowed`` (``resume``, ``finetune`` or ``overwrite``)."""
    if allowed or not os.path.isdir(ckpt_dir):
        return
    found = sorted({p for pattern in patterns for p in Path(ckpt_dir).glob(pattern) if p.is_file()})
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise OutputExistsError(
            f"checkpoint folder '{ckpt_dir}' (config key 'ckpt_dir') already holds {len(found)} checkpoint(s) of an "
            f"earlier run: '{found[0]}'{more} already exists; set 'overwrite' to true to start again and replace "
            "them, 'resume' to true to continue that run, 'finetune' to true to train on from its model, or choose "
            "another ckpt_dir"
        )


def check_training_outputs(
    ckpt_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    patterns: Sequence[str] = ("*.pt",),
    resume: bool = False,
    overwrite: bool = False,
    finetune: bool = False,
) -> None:
    """Before training: ``resume``/``finetune`` agree (:func:`check_run_mode`), the checkpoint (``ckpt_dir``) and
    log (``output_dir``) folders can be written, and a new run does not replace an earlier run's checkpoints
    (:func:`refuse_existing_checkpoints`)."""
    check_run_mode(resume, finetune)
    refuse_existing_checkpoints(ckpt_dir, patterns, allowed=bool(resume or overwrite or finetune))
    check_writable_dir(ckpt_dir, "checkpoint folder (config key 'ckpt_dir')")
    if output_dir is not None:
        check_writable_dir(output_dir, "output folder (config key 'output_dir')")


def check_checkpoint(
    path: str | os.PathLike,
    sha256: str | None = None,
    key: str = "resume_ckpt",
    entries: Sequence[str] = (),
    network: torch.nn.Module | None = None,
    network_entry: str | None = None,
) -> dict[str, Any]:
    """The checkpoint a run will load (config key ``key``), checked before the trainer is built: it exists,
    has the digest ``sha256`` (when given), holds every entry of ``entries`` and, with ``network``, its
    ``network_entry`` (or the whole file, for a plain state dict) fits the network. Returns the checkpoint.

    Raises:
        InputNotFoundError, HashMismatchError, CheckpointError: naming the file and the key.
    """
    if not path or not Path(path).is_file():
        raise InputNotFoundError(f"checkpoint '{path}' (config key '{key}') does not exist; expected the checkpoint to load")
    try:
        ckpt = load_checkpoint(path, sha256=sha256 or None)
    except HashMismatchError as e:
        raise HashMismatchError(f"{e} (config key '{key}_sha256')") from e
    missing = [e for e in entries if e not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' (config key '{key}') has no entries {missing} (it has {sorted(ckpt)[:8]}); expected "
            "a training checkpoint of this bundle and stage: is it a checkpoint of another bundle or stage?"
        )
    if network is not None:
        state = ckpt[network_entry] if network_entry and network_entry in ckpt else ckpt
        where = f" entry '{network_entry}'" if network_entry and network_entry in ckpt else ""
        check_state_fits(network, state, f"checkpoint '{path}' (config key '{key}'){where}")
    return ckpt


def latest_checkpoint(ckpt_dir: str | os.PathLike, default: str, pattern: str = "checkpoint_epoch=*.pt") -> str:
    """The newest interval checkpoint of ``ckpt_dir`` (``pattern`` with ``*`` an integer: the largest), else
    ``<ckpt_dir>/<default>``."""
    regex = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
    best, best_n = os.path.join(ckpt_dir, default), -1
    for f in glob.glob(os.path.join(glob.escape(os.fspath(ckpt_dir)), pattern)):
        m = regex.search(os.path.basename(f))
        if m and int(m.group(1)) > best_n:
            best, best_n = f, int(m.group(1))
    return best
