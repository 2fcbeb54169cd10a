"""Import AMICO (PyPI ``dmri-amico``, an optional dependency) without its side effect on Python logging.

dmri-dicelib, which AMICO imports, calls ``logging.setLoggerClass`` with a logger whose ``error()`` ends the process
with ``sys.exit(1)`` (dicelib 1.x ``ui.setup_logger``). Every logger created afterwards in the same process inherits
it: an ignite engine that logs a failing transform then exits instead of raising, so a user's bad input stops the run
without its clear error, and a caller (a test, a benchmark, MONAI Label) cannot catch anything. Importing AMICO here,
and running its fits inside :func:`keep_logger_class`, restores the process-wide logger class every time.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["import_amico", "keep_logger_class"]

_HINT = "AMICO is needed here: pip install dmri-amico==2.1.1 (or -r requirements-amico.txt; the PyPI 'amico' is unrelated)"


@contextmanager
def keep_logger_class() -> Iterator[None]:
    """Restore ``logging``'s logger class on exit (AMICO/dicelib replace it when they import or set up logging)."""
    cls = logging.getLoggerClass()
    try:
        yield
    finally:
        logging.setLoggerClass(cls)


def import_amico(*submodules: str) -> ModuleType:
    """``import amico`` (and ``amico.<name>`` for each of ``submodules``) with the logger class kept; returns ``amico``.

    Raises:
        ImportError: naming the package to install when AMICO is missing.
    """
    with keep_logger_class():
        try:
            amico = importlib.import_module("amico")
            for name in submodules:
                importlib.import_module(f"amico.{name}")
        except ImportError as e:
            raise ImportError(_HINT) from e
    return amico
