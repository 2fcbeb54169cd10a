"""Errors that are the user's to fix, and how they reach the user as one clear message.

Bad input is caught by the guards in ``common`` (loading, validation, saving, checkpoints) and by
each bundle's own checks, which raise the classes below. Each message names the file or config key
and says what was expected. Their types also derive from the built-in exception a caller would
catch (``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps working.

On the way out, MONAI and PyTorch wrap them: a transform failure becomes ``RuntimeError: applying
transform <...>`` (twice, Compose and Dataset), a DataLoader worker re-raises a new exception with
the original traceback as text, and Ignite logs the engine's failure. :func:`find_user_error` digs
the original error out of any of these; :func:`install_excepthook` (called in every bundle config's
``initialize``) makes the command line end with that one message instead of a wrapped traceback::

    ERROR: InvalidInputError: input file 'sub-01_T1w.nii.gz' (key 'image') has 2 spatial axes ...
    (set MEDGEN_TRACEBACK=1 to see the full traceback)

and a non-zero exit status. Errors that are not the user's (bugs) keep Python's full traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from types import TracebackType

__all__ = [
    "UserInputError",
    "InvalidInputError",
    "InputNotFoundError",
    "OutputExistsError",
    "OutputNotWritableError",
    "find_user_error",
    "install_excepthook",
    "format_user_error",
]

#: environment variable that restores Python's full traceback for user errors
TRACEBACK_ENV = "MEDGEN_TRACEBACK"


class UserInputError(Exception):
    """Marker base class: the input data, a config value or the environment is wrong, and the
    message says which file or key and what was expected."""


class InvalidInputError(UserInputError, ValueError):
    """An input file or config value has the wrong content, shape, type or range."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A required input file or folder does not exist."""


class OutputExistsError(UserInputError, FileExistsError):
    """An output already exists and the user did not ask to replace it."""


class OutputNotWritableError(UserInputError, PermissionError):
    """An output folder cannot be created or written."""


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during, outermost first (cycle-safe)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__


# "common.utils.errors.InvalidInputError: message" or "common.utils.io.CheckpointError: message" as a
# traceback prints them; the message runs until the blank line before the next traceback section.
_TEXT_ERROR = re.compile(
    r"^(?P<cls>(?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*): (?P<msg>.*?)(?=\n\s*\n|\Z)",
    re.MULTILINE | re.DOTALL,
)


def _from_text(text: str) -> BaseException | None:
    """Rebuild a user error printed inside another exception's message (a DataLoader worker's
    traceback text): the last one printed is the innermost."""
    found = None
    for m in _TEXT_ERROR.finditer(text):
        module, _, name = m.group("cls").rpartition(".")
        if not module.startswith("common.") and not module.startswith("scripts"):
            continue
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, UserInputError):
            try:
                found = cls(m.group("msg").strip())
            except Exception:  # a class with a different constructor: keep the message
                found = InvalidInputError(m.group("msg").strip())
    return found


def find_user_error(exc: BaseException | None) -> BaseException | None:
    """The innermost :class:`UserInputError` behind ``exc`` (itself, its cause chain, or an error
    printed in a DataLoader worker's re-raised message); ``None`` when there is none."""
    if exc is None:
        return None
    found = None
    for e in _chain(exc):
        if isinstance(e, UserInputError):
            found = e
        elif found is None:
            rebuilt = _from_text(str(e))
            if rebuilt is not None:
                found = rebuilt
    return found


def format_user_error(err: BaseException) -> str:
    """The one message printed for a user error."""
    return f"ERROR: {type(err).__name__}: {err}"


def _remove_refused_run_folders() -> None:
    """The output folders this refused run created and left empty (``common.utils.io.check_writable_dir``)."""
    io = sys.modules.get("common.utils.io")
    if io is not None:
        io._remove_empty_created_dirs()


def _hook(previous):
    def excepthook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        err = find_user_error(value)
        if err is None or _tracebacks_wanted():
            previous(etype, value, tb)
            return
        sys.stderr.write(f"\n{format_user_error(err)}\n(set {TRACEBACK_ENV}=1 to see the full traceback)\n")
        sys.stderr.flush()
        _remove_refused_run_folders()

    excepthook._medgen = True  # type: ignore[attr-defined]
    return excepthook


def _tracebacks_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


#: whether log records about a user error are dropped from terminal streams (``install_excepthook``)
_DROP_ON_TERMINAL = {"on": False}


def _is_bundle_command_line() -> bool:
    """True in ``python -m monai.bundle ...``, where the excepthook prints the one message at exit."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return str(getattr(spec, "name", "") or "").startswith("monai.bundle")


class _UserErrorRecords(logging.Filter):
    """On the bundle command line and a terminal stream (a ``StreamHandler`` that is not a file), drop the log
    records about a user error: Ignite's "Engine run is terminating due to exception", MONAI ``StatsHandler``'s
    "Exception: ..." and the like. The excepthook prints the one message; a log file keeps a one-line record. In
    other processes (a server such as MONAI Label, a notebook, a test) nothing prints that message at exit, so
    the records stay, one line each, without traceback."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.terminal = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.terminal and _DROP_ON_TERMINAL["on"] and getattr(record, "medgen_user_error", False))


def _filter_all_handlers() -> None:
    """Attach :class:`_UserErrorRecords` to every handler of every logger that exists now (handlers appear while a
    workflow is built: the engines' loggers, MONAI's ``StatsHandler``)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, _UserErrorRecords) for f in handler.filters):
                handler.addFilter(_UserErrorRecords(handler))


def _record_factory(previous):
    """Log records about a user error lose their traceback and are marked ``medgen_user_error``, so terminal handlers
    drop them. "About a user error": the record's ``exc_info``, or, for an ERROR record without one, the exception
    being handled where it was logged (Ignite logs the failure inside its ``except`` block). Every handler is checked
    for the filter at that moment, whenever it was created."""

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        if record.levelno < logging.ERROR or _tracebacks_wanted():
            return record
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if exc is not None and find_user_error(exc) is not None:
            record.exc_info, record.exc_text, record.medgen_user_error = None, None, True
            _filter_all_handlers()
        return record

    factory._medgen = True  # type: ignore[attr-defined]
    return factory


def install_excepthook(command_line: bool | None = None) -> None:
    """Make an uncaught user error end the process with one clear message (exit status 1), and the only one on the
    terminal: log records about it (engines, ``StatsHandler``) lose their traceback everywhere and, on the command
    line, are dropped from terminal streams (log files keep them, one line each). ``command_line``: None detects
    ``python -m monai.bundle``. ``MEDGEN_TRACEBACK=1`` restores every traceback and record. Idempotent; other
    exceptions go to the previous hook (Python's full traceback) and keep their logged tracebacks."""
    _DROP_ON_TERMINAL["on"] = _is_bundle_command_line() if command_line is None else bool(command_line)
    if not getattr(sys.excepthook, "_medgen", False):
        sys.excepthook = _hook(sys.excepthook)
    if not getattr(logging.getLogRecordFactory(), "_medgen", False):
        logging.setLogRecordFactory(_record_factory(logging.getLogRecordFactory()))
    _filter_all_handlers()
