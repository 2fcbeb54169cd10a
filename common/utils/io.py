"""I/O that never leaves half-written files and never trusts a file blindly.

- :func:`atomic_write` writes to a temporary file in the destination folder and renames it into
  place, so a crash leaves either the old file or the new one, never a truncated one.
- :func:`refuse_overwrite` makes "existing outputs are kept unless the user asks" one line.
- :func:`load_checkpoint` loads with ``weights_only=True``, optionally checks a sha256 first, and
  turns the usual mistakes (a checkpoint of another bundle, mismatched shapes) into one clear
  error that names the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from common.utils.errors import InputNotFoundError, OutputExistsError, OutputNotWritableError, UserInputError

__all__ = [
    "atomic_path",
    "atomic_write",
    "check_writable_dir",
    "refuse_overwrite",
    "load_checkpoint",
    "load_state_into",
    "check_state_fits",
    "CheckpointError",
]


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint file cannot be used for the requested network."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` (same extension, for writers that pick the format from
    it); on success it is renamed to ``path``, on any exception it is removed and ``path`` is left
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


#: folders this process created for outputs (``check_writable_dir``); a refused run removes those still empty
_CREATED_DIRS: set[Path] = set()


def _remove_empty_created_dirs() -> None:
    """When a user error ends the process (the excepthook of :mod:`common.utils.errors`): remove the output folders
    this process created and left empty, deepest first; a folder that holds anything, or that existed before, is
    never touched. Not at every exit: under multi-GPU training one rank may finish while another still writes
    checkpoints into a folder that is empty at that moment."""
    for folder in sorted(_CREATED_DIRS, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # fails unless empty
        except OSError:
            pass
    _CREATED_DIRS.clear()



def check_writable_dir(path: str | os.PathLike, what: str = "output folder", create: bool = True) -> Path:
    """Create ``path`` if needed and check that files can be written there; raise a clear error if not.

    Folders created here that are still empty when a user error ends the process (a run refused before its
    first output) are removed then, so a refused command-line run leaves no folder behind.

    With ``create=False`` nothing is created: an existing ``path`` must be a writable folder, a missing
    one must have a writable folder as its nearest existing ancestor (so that it can be created when
    the first output is written). Used where a config is only parsed, e.g. by property checks."""
    path = Path(path)
    if not create:
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise OutputNotWritableError(f"{what} '{path}' cannot be written: '{probe}' is not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise OutputNotWritableError(f"{what} '{path}' cannot be written: '{probe}' is not writable")
        return path
    missing, probe_dir = [], path.absolute()
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        missing.append(probe_dir)
        probe_dir = probe_dir.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        _CREATED_DIRS.update(missing)  # removed at exit if the run leaves them empty (refused before any output)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputNotWritableError(f"{what} '{path}' cannot be written: {e.strerror or e}") from e
    return path


def refuse_overwrite(path: str | os.PathLike, overwrite: bool, key: str = "overwrite") -> Path:
    """Raise ``FileExistsError`` naming ``path`` if it exists and ``overwrite`` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output '{path}' already exists; set '{key}' to true to replace it")
    return path


def load_checkpoint(
    path: str | os.PathLike, sha256: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` after an optional sha256 check."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint '{path}' does not exist")
    if sha256 is not None:
        from common.data.fetch import HashMismatchError, sha256sum

        got = sha256sum(path)
        if got.lower() != sha256.lower():
            raise HashMismatchError(f"checkpoint '{path}' has sha256 {got}, expected {sha256}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip archives, foreign formats
        raise CheckpointError(f"checkpoint '{path}' cannot be read as a PyTorch weights file: {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict of state dicts")
    return dict(obj)


def check_state_fits(module: torch.nn.Module, state: Mapping[str, Any], source: str = "checkpoint", strict: bool = True) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and shape-mismatched keys when
    ``state`` does not fit ``module`` (nothing is loaded; a DataParallel/DDP wrapper is looked through)."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, expected a state dict")
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        module = module.module  # checkpoints hold the wrapped network's keys (as Ignite loads them)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} in file vs {tuple(v.shape)} in network"
        for k, v in own.items()
        if k in state and torch.is_tensor(state[k]) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
        if strict and missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if strict and unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__}: " + ", ".join(parts)
            + ". Is it a checkpoint of another bundle or of another configuration (tiny/light/paper)?"
        )


def load_state_into(module: torch.nn.Module, state: Mapping[str, Any], source: str = "checkpoint", strict: bool = True) -> None:
    """``module.load_state_dict`` with an error that lists missing, unexpected and mismatched keys."""
    check_state_fits(module, state, source, strict)
    module.load_state_dict(state, strict=strict)
