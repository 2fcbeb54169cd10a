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


def test_models_model_pt_is_required_and_exported_as_the_zoo_does(tmp_path):
    """The zoo's verify_torchscript exports models/model.pt: a bundle without it fails (unless listed in
    large_files.yml); a nested {"model": ...} file fails (ckpt_export would copy none of its weights); the shipped
    weights are what check 7 exports."""
    import torch

    b = write_minimal_bundle(tmp_path / "a")
    checks = {c.name: c for c in verify_bundle(b)}
    assert checks["1 models/model.pt"].ok and "shipped" in checks["1 models/model.pt"].detail
    assert checks["7 ckpt_export (script)"].ok and "(models/model.pt)" in checks["7 ckpt_export (script)"].detail

    b = write_minimal_bundle(tmp_path / "b", with_model=False)
    failed = " | ".join(_failed(verify_bundle(b, skip_network=True)))
    assert "1 models/model.pt" in failed and "missing" in failed
    (b / "large_files.yml").write_text("large_files:\n  - path: models/model.pt\n    url: http://127.0.0.1:9/model.pt\n"
                                       "    hash_val: '" + "a" * 64 + "'\n    hash_type: sha256\n")
    assert not _failed(verify_bundle(b, skip_network=True))

    b = write_minimal_bundle(tmp_path / "c")
    torch.save({"model": torch.load(b / "models" / "model.pt", weights_only=True)}, b / "models" / "model.pt")
    failed = " | ".join(_failed(verify_bundle(b)))
    assert "7 ckpt_export" in failed and "not the bare state dict" in failed


@pytest.mark.parametrize("name", _real_bundles())
def test_every_bundle_passes_verify_bundle(name):
    """Every check passes on the repository's bundle folders, but one: a bundle the zoo exports (not on the
    TorchScript exclusion list) ships no models/model.pt in the source tree, and the checker says so (its
    deployable variant carries the weights there)."""
    from verify_bundle import torchscript_exclusions

    bundle = REPO / "bundles" / name
    overlays = [o for o in ["configs/tiny.json"] if (bundle / o).is_file()]
    failed = _failed(verify_bundle(bundle, overlays))
    expected = [] if (bundle / "models" / "model.pt").is_file() or name in torchscript_exclusions() else ["1 models/model.pt"]
    assert [f.split(":")[0].removeprefix("[FAIL] ") for f in failed] == expected, "\n".join(failed)


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


def _requirement_pins() -> dict:
    """``name==version`` lines of the runtime requirement files setup installs (names lower-cased)."""
    pins = {}
    for f in ("requirements.txt", "requirements-amico.txt"):
        for line in (REPO / f).read_text().splitlines():
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pins[name.split("[")[0].strip().lower()] = version.strip()
    return pins


@pytest.mark.parametrize("name", _real_bundles())
def test_requirement_files_pin_every_metadata_package_to_its_version(name):
    """A range in the requirements lets a new upstream release install something else than the metadata records
    (CI's fresh install got mlflow 3.18.0 against the pinned 3.17.2); every pinned package is pinned alike."""
    meta = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
    pins = _requirement_pins()
    differ = {pkg: (pin, pins.get(pkg.lower())) for pkg, pin in meta["required_packages_version"].items()
              if pins.get(pkg.lower()) != pin}
    assert not differ, f"{name}: metadata pin and requirement files differ (metadata, requirements): {differ}"
