"""The README's bad-input table says what the robustness suite tries: one row per bundle with the
number of kinds and their names, matching each test module's ``KINDS``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from faults import ALL_KINDS

HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
BUNDLES = ("aldm_translation", "maisi_ct", "diffseg", "ivan_fusion", "noddi_sr")


def _kinds(name: str) -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location(f"robustness_{name}", HERE / f"test_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.KINDS)


def test_readme_table_matches_the_suite():
    text = README.read_text()
    for name in BUNDLES:
        kinds = _kinds(name)
        assert kinds and len(set(kinds)) == len(kinds), name
        assert set(kinds) <= set(ALL_KINDS), f"{name}: unknown kinds {set(kinds) - set(ALL_KINDS)}"
        row = re.search(rf"^\| `{name}` \| (\d+) \| ([^|]*)\|", text, re.MULTILINE)
        assert row, f"README has no bad-input row for {name}"
        assert int(row.group(1)) == len(kinds), f"{name}: README says {row.group(1)}, the suite tries {len(kinds)}"
        listed = {k.strip(" `") for k in row.group(2).split(",") if k.strip()}
        assert listed == set(kinds), f"{name}: README lists {sorted(listed)}, the suite tries {sorted(kinds)}"
