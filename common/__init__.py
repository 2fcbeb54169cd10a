"""Shared code of the MONAI bundles in this collection.

Subpackages: ``bundle`` (datalists, case names, output and checkpoint policies), ``networks``, ``losses``, ``engines`` (Ignite trainers/evaluators and handlers),
``inferers`` (samplers), ``schedulers``, ``transforms``, ``metrics``, ``data`` (demo data,
datalist builders) and ``utils``. A packaged bundle carries a copy of this package next to its
``configs/`` folder, so ``import common`` works from the bundle root without this repository.

Subpackages are imported on first attribute access. MONAI's config parser binds
``$import common.engines`` to the name ``common.engines`` only, so bundle configs write
``"$import common"`` and then ``"$common.engines.get_device()"``; the lazy access keeps that
cheap (no network or metric code is imported unless a config uses it).
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("bundle", "data", "engines", "export", "inferers", "losses", "metrics", "networks", "schedulers", "transforms", "utils")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
