"""ci/verify_bundle.py: it passes a valid bundle, catches broken ones, and passes every real bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ci"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from minimal_bundle import write_minimal_bundle  # noqa: E402
from verify_bundle import verify_bundle  # noqa: E402


def _failed(checks):
    return [str(c) for c in checks if not c.ok]


def test_minimal_bundle_passes_every_check(tmp_path):
    b = write_minimal_bundle(tmp_path)
    checks = verify_bundle(b)
    names = {c.name.split(" ")[0] for c in checks}
    assert {"1", "3", "4", "5", "6", "7"} <= names
    assert not _failed(checks), _failed(checks)


def test_checker_catches_broken_bundles(tmp_path):
    b = write_minimal_bundle(tmp_path)
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    meta["version"] = "0.2"  # not X.Y.Z and not in the changelog
    del meta["copyright"]  # schema-required key
    meta["network_data_format"]["outputs"] = {"seg": meta["network_data_format"]["outputs"]["pred"]}
    (b / "configs" / "metadata.json").write_text(json.dumps(meta))
    (b / "LICENSE").unlink()
    train = json.loads((b / "configs" / "train.json").read_text())
    del train["train"]["trainer"]  # train workflow property 'trainer' is required
    (b / "configs" / "train.json").write_text(json.dumps(train))
    (b / "models" / "big.bin").write_bytes(b"\0" * (25 * 1024 * 1024 + 1))
    failed = " | ".join(_failed(verify_bundle(b, skip_network=True)))
    assert "LICENSE" in failed
    assert "not X.Y.Z" in failed and "not in changelog" in failed
    assert "4 verify_metadata" in failed
    assert "4 zoo I/O names" in failed
    assert "check_properties train" in failed
    assert "big.bin" in failed


def test_checker_catches_untraceable_or_wrong_network(tmp_path):
    b = write_minimal_bundle(tmp_path)
    inf = json.loads((b / "configs" / "inference.json").read_text())
    inf["network_def"]["out_channels"] = 3  # metadata says 2 output channels
    (b / "configs" / "inference.json").write_text(json.dumps(inf))
    failed = " | ".join(_failed(verify_bundle(b)))
    assert "6 verify_net_in_out" in failed


def _real_bundles():
    root = REPO / "bundles"
    return sorted(p.name for p in root.iterdir() if (p / "configs" / "metadata.json").is_file()) if root.is_dir() else []


@pytest.mark.parametrize("name", _real_bundles())
def test_every_bundle_passes_verify_bundle(name):
    bundle = REPO / "bundles" / name
    overlays = [o for o in ["configs/tiny.json"] if (bundle / o).is_file()]
    failed = _failed(verify_bundle(bundle, overlays))
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("name", _real_bundles())
def test_package_pins_are_one_list_monai_keeps_and_match_the_installed_versions(name):
    # MONAI 1.6.1 renames the deprecated optional_packages_version to required_packages_version, replacing the
    # required list with it; the pins must be what setup installs, or `monai.bundle` warns about every run.
    import importlib.metadata as md

    from monai.bundle.config_parser import ConfigParser

    meta_file = REPO / "bundles" / name / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    assert "optional_packages_version" not in meta
    parsed = ConfigParser(meta).get_parsed_content("required_packages_version")  # as MONAI reads it
    assert parsed == meta["required_packages_version"]
    wrong = {}
    for pkg, pin in meta["required_packages_version"].items():
        installed = md.version(pkg)
        if installed != pin:
            wrong[pkg] = (pin, installed)
    assert not wrong, f"{meta_file}: pins differ from the installed versions (pin, installed): {wrong}"
