"""utils of the shared package: atomic I/O and safe checkpoint loading (``io``), user-facing errors
(``errors``), PNG previews (``preview``).

Modules are imported on first attribute access, so a config can write ``$common.utils.errors...``
after ``$import common`` (see the package docstring)."""

import importlib

_MODULES = ("errors", "io", "preview")


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
