"""The model-zoo checks of ci/verify_bundle.py pass for noddi_sr (network checks with the tiny overlay)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_verify_bundle_tiny():
    sys.path.insert(0, str(REPO / "ci"))
    try:
        from verify_bundle import verify_bundle
    finally:
        sys.path.remove(str(REPO / "ci"))
    checks = verify_bundle(REPO / "bundles" / "noddi_sr", overlays=["configs/tiny.json"])
    failed = [str(c) for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    names = " ".join(c.name for c in checks)
    assert "check_properties train train_diffusion.json" in names and "ckpt_export" in names
