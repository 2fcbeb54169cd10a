"""Check 7 exports by torch.jit.script as the model zoo does; tracing only where a bundle declares why.

The zoo's ci/verify_bundle.py ``verify_torchscript`` calls ``ckpt_export`` with its defaults (scripting)
for every bundle not in ``exclude_verify_torchscript_list`` (ci/bundle_custom_data.py). Here the networks
made scriptable (DiffSeg UNet, iVAN) must give the eager outputs once scripted, the checker must fail an
unscriptable network that declares no reason, and a declared reason must stay true.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ci"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import verify_bundle as vb  # noqa: E402
from minimal_bundle import write_minimal_bundle  # noqa: E402

from common.networks.diffseg_unet import DiffSegUNet  # noqa: E402
from common.networks.ivan import IVAN, IVANPredictor  # noqa: E402

TINY = (4, 8, 8, 16)


def _roundtrip(module: torch.nn.Module, tmp_path: Path) -> torch.jit.ScriptModule:
    """Script, save and reload, as ckpt_export + torch.jit.load do."""
    f = tmp_path / "net.ts"
    torch.jit.script(module).save(str(f))
    return torch.jit.load(str(f), map_location="cpu")


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_diffseg_unet_scripts_to_the_eager_outputs(tmp_path, time_conditioning):
    torch.manual_seed(0)
    n_in = 1 + 3 if time_conditioning else 1
    net = DiffSegUNet(n_in, 3, TINY, time_conditioning=time_conditioning).eval()
    ts = _roundtrip(net, tmp_path)
    # 16^3 reaches the bottom as 1x1x1 (the single-voxel instance norm branch); 32x16x48 does not
    for shape in [(1, n_in, 16, 16, 16), (2, n_in, 32, 16, 48)]:
        x = torch.randn(shape)
        steps = [None, 0, 3, torch.tensor(2), torch.tensor([1, 4][: shape[0]])]
        with torch.no_grad():
            for t in steps:
                torch.testing.assert_close(ts(x, t), net(x, t), rtol=0, atol=0, msg=f"{shape} t={t}")
    with pytest.raises(Exception, match="input channels"):
        ts(torch.randn(1, n_in + 1, 16, 16, 16))


def test_diffseg_unet_checkpointing_still_runs_in_eager_training():
    torch.manual_seed(0)
    ref = DiffSegUNet(2, 2, TINY).train()
    net = DiffSegUNet(2, 2, TINY, use_checkpointing=True).train()
    net.load_state_dict(ref.state_dict())
    torch.jit.script(net)  # the training-only checkpoint path is left out of the scripted module
    x = torch.randn(1, 2, 16, 32, 16)
    ref(x, 1).square().mean().backward()
    net(x, 1).square().mean().backward()
    for (n, a), b in zip(ref.named_parameters(), net.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_ivan_scripts_to_the_eager_outputs_both_ways(tmp_path):
    torch.manual_seed(0)
    net = IVAN(channels=4, num_blocks=3, growth=8, seed=1).eval()
    ts = _roundtrip(net, tmp_path)
    x = torch.rand(2, 4, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), rtol=0, atol=0)
        torch.testing.assert_close(ts(x, True), net(x, rev=True), rtol=0, atol=0)
        torch.testing.assert_close(ts(ts(x), True), x, rtol=0, atol=1e-5)  # still invertible once scripted
    pred = IVANPredictor(net, n_in=2, n_out=2, direction="both")
    ts_pred = _roundtrip(pred, tmp_path)
    x[:, :, :2] = 0  # outside the field of view
    with torch.no_grad():
        torch.testing.assert_close(ts_pred(x), pred(x), rtol=0, atol=0)


def test_ivan_eager_forward_still_leaves_autocast():
    net = IVAN(channels=2, num_blocks=2, growth=8, seed=0).eval()
    x = torch.rand(1, 2, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        z = net.inverse(y)
    assert y.dtype == torch.float32 and z.dtype == torch.float32
    torch.testing.assert_close(z, x, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ the checker
UNSCRIPTABLE = '''import torch
from monai.networks.nets import UNet


class SuperUNet(UNet):
    """A UNet that torch.jit.script rejects (super() call) but torch.jit.trace exports."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)
'''


def _bundle(tmp_path: Path, name: str, unscriptable: bool) -> Path:
    b = write_minimal_bundle(tmp_path, name=name)
    if unscriptable:
        (b / "scripts").mkdir()
        (b / "scripts" / "__init__.py").write_text("")
        (b / "scripts" / "nets.py").write_text(UNSCRIPTABLE)
        inf = json.loads((b / "configs" / "inference.json").read_text())
        inf["network_def"]["_target_"] = "scripts.nets.SuperUNet"
        (b / "configs" / "inference.json").write_text(json.dumps(inf))
    return b


def _check7(bundle: Path):
    checks = [c for c in vb.verify_bundle(bundle) if c.name.startswith("7 ")]
    assert len(checks) == 1, checks
    return checks[0]


def test_scriptable_network_is_scripted(tmp_path, monkeypatch):
    monkeypatch.setattr(vb, "torchscript_exclusions", lambda: {})
    c = _check7(_bundle(tmp_path, "mini_script", unscriptable=False))
    assert c.ok and c.name == "7 ckpt_export (script)", str(c)


def test_unscriptable_network_without_a_declared_reason_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(vb, "torchscript_exclusions", lambda: {})
    c = _check7(_bundle(tmp_path, "mini_unscriptable", unscriptable=True))
    assert not c.ok and c.name == "7 ckpt_export (script)", str(c)
    assert "torch.jit.script failed" in c.detail and "ci/bundle_custom_data.py" in c.detail


def test_unscriptable_network_with_a_declared_reason_is_traced(tmp_path, monkeypatch):
    monkeypatch.setattr(vb, "torchscript_exclusions", lambda: {"mini_unscriptable": "calls super().forward"})
    c = _check7(_bundle(tmp_path, "mini_unscriptable", unscriptable=True))
    assert c.ok and c.name == "7 ckpt_export (trace)", str(c)
    assert "calls super().forward" in c.detail


def test_declared_reason_of_a_scriptable_network_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(vb, "torchscript_exclusions", lambda: {"mini_script": "outdated"})
    c = _check7(_bundle(tmp_path, "mini_script", unscriptable=False))
    assert not c.ok and "remove the entry" in c.detail, str(c)


def test_declared_exclusions_name_real_bundles_with_reasons():
    excl = vb.torchscript_exclusions()
    bundles = {p.name for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir()}
    assert set(excl) <= bundles
    assert all(len(reason) > 40 for reason in excl.values())
    # these two are made scriptable; they must not fall back to tracing
    assert not {"diffseg", "ivan_fusion"} & set(excl)
