"""Cheap commands of the model cards, run as the card writes them with demo sizes substituted.

Registered in ``doc_commands.json``; ``test_doc_commands.py`` checks that each registration names a test here
that exists and mentions the command's module and files.
"""

from __future__ import annotations

import json
import runpy
import shlex
import sys
from pathlib import Path

import nibabel as nib

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from doc_commands import ROOT, commands  # noqa: E402


def _card_command(bundle: str, prefix: str) -> list[str]:
    found = [c for c in commands(ROOT / "bundles" / bundle / "docs" / "README.md") if c.text.startswith(prefix)]
    assert len(found) == 1, f"expected one `{prefix} ...` command in the {bundle} card, found {len(found)}"
    return shlex.split(found[0].text)


def _with(args: list[str], **values) -> list[str]:
    """``args`` with the value of each ``--key`` in ``values`` replaced (appended when absent)."""
    args = list(args)
    for key, value in values.items():
        value = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if f"--{key}" in args:
            i = args.index(f"--{key}")
            args[i + 1 : i + 2] = value
        else:
            args += [f"--{key}", *value]
    return args


def test_noddi_phantom_command(tmp_path, monkeypatch):
    """noddi_sr card: ``python -m common.data.noddi_phantom <out> ... --scheme hcp`` writes a phantom cohort with
    its datalist; one training and one test subject on a 32^3 grid at 5 mm instead of 30 / 3 / 10 subjects."""
    words = _card_command("noddi_sr", "python -m common.data.noddi_phantom")
    module, out_dir, args = words[2], words[3], words[4:]
    assert module == "common.data.noddi_phantom" and out_dir.startswith("/data/") and "--scheme" in args
    args = _with(args, n_train=1, n_val=0, n_test=1, hr_spacing=5.0, hr_shape=(32, 32, 32))
    monkeypatch.setattr(sys, "argv", [module, str(tmp_path / "phantom"), *args])
    runpy.run_module(module, run_name="__main__", alter_sys=False)
    datalist = json.loads((tmp_path / "phantom" / "datalist.json").read_text())
    assert len(datalist["training"]) == 1 and len(datalist["test"]) == 1
    dwi = nib.load(tmp_path / "phantom" / datalist["training"][0]["dwi"])
    assert dwi.shape[:3] == (16, 16, 16) and dwi.shape[3] == 288  # HCP's scheme: 18 b0 + 3 x 90
