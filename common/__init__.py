"""Shared code of the MONAI bundles in this collection.

Subpackages: ``networks``, ``losses``, ``engines`` (Ignite trainers/evaluators and handlers),
``transforms``, ``metrics``, ``data`` (demo data, datalist builders) and ``utils``.
A packaged bundle carries a copy of this package next to its ``configs/`` folder, so
``import common`` works from the bundle root without this repository.
"""

__version__ = "0.1.0"
