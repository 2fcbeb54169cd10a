"""Variable augmentation, Laplacian fusion target, the iVAN loss and the learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data.fetch import demo_file
from common.engines.ivan_step import IVANStep, ivan_losses
from common.networks.ivan import IVAN
from common.transforms.ivan import (
    FusionTargetd,
    ScaleCTWindowd,
    VariableAugmentd,
    VariableDeaugmentd,
    augment_sources,
    augmented_channels,
    collapse_pyramid,
    deaugment,
    laplacian_levels,
    laplacian_maxabs_fusion,
    laplacian_pyramid,
)

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "ivan_fusion"


@pytest.fixture(scope="module")
def avg152():
    """The real avg152 T1, T2, PD volumes scaled to [0, 1] (91, 109, 91) each."""
    out = {}
    for k in ("T1", "T2", "PD"):
        v = np.asarray(nib.load(str(demo_file(f"spm/avg152{k}.nii"))).dataobj, dtype=np.float32)
        out[k.lower()] = torch.from_numpy(np.clip(v / np.percentile(v, 99.5), 0, 1))
    return out


def _d(vols, keys, z=slice(40, 43)):
    return {k: vols[k][None, 20:60, 30:70, z] for k in keys}


def test_channel_count_rule():
    assert augmented_channels(1, 1) == 2
    assert augmented_channels(2, 1) == 2
    assert augmented_channels(3, 1) == 4
    assert augmented_channels(1, 2, channels=6) == 6
    with pytest.raises(ValueError):
        augmented_channels(2, 1, channels=3)
    with pytest.raises(ValueError):
        augmented_channels(3, 1, channels=2)


def test_replicate_builds_the_code_stacks(avg152):
    d = _d(avg152, ("t1", "pd", "t2"))
    out = VariableAugmentd(["t1", "pd"], ["t2"], mode="replicate")(d)
    torch.testing.assert_close(out["image"], torch.cat([d["t1"], d["pd"]]))
    torch.testing.assert_close(out["label"], torch.cat([d["t2"], d["t2"]]))
    out = VariableAugmentd(["t1"], ["t2"], mode="replicate")(d)
    torch.testing.assert_close(out["image"], torch.cat([d["t1"], d["t1"]]))
    torch.testing.assert_close(out["label"], torch.cat([d["t2"], d["t2"]]))
    rev = VariableAugmentd(["t1", "pd"], ["t2"], reverse=True)({"t2": d["t2"]})
    torch.testing.assert_close(rev["image"], torch.cat([d["t2"], d["t2"]]))
    assert "label" not in rev


def test_dummy_copy_and_zeros(avg152):
    d = _d(avg152, ("t1", "pd", "t2"))
    out = VariableAugmentd(["t1", "pd"], ["t2"], mode="dummy_copy")(d)
    torch.testing.assert_close(out["image"], torch.cat([d["t1"], d["pd"]]))
    torch.testing.assert_close(out["label"], torch.cat([d["t2"], d["pd"]]))  # the paper's [T2, PD]
    out = VariableAugmentd(["t1"], ["t2"], mode="zeros")(d)
    torch.testing.assert_close(out["image"], torch.cat([d["t1"], torch.zeros_like(d["t1"])]))
    torch.testing.assert_close(out["label"], torch.cat([d["t2"], torch.zeros_like(d["t2"])]))
    out = VariableAugmentd(["t1"], ["t2", "pd"], mode="zeros", channels=4)(d)
    assert out["image"].shape[0] == 4 and out["image"][1:].abs().max() == 0
    with pytest.raises(ValueError):
        VariableAugmentd(["t1"], ["t2"], mode="mirror")


def test_deaugmentation_matches_each_mode():
    y = torch.rand(2, 6, 5, 7)
    torch.testing.assert_close(deaugment(y, 3, "replicate")[:, 1], (y[:, 1] + y[:, 4]) / 2)
    torch.testing.assert_close(deaugment(y, 2, "replicate")[:, 0], (y[:, 0] + y[:, 2] + y[:, 4]) / 3)
    torch.testing.assert_close(deaugment(y, 2, "dummy_copy"), y[:, :2])
    torch.testing.assert_close(deaugment(y, 2, "zeros"), y[:, :2])
    x = torch.rand(2, 5, 7)
    torch.testing.assert_close(deaugment(augment_sources(x, 6, "replicate")[None], 2)[0], x)
    out = VariableDeaugmentd("pred", n=1)({"pred": torch.stack([x[0], x[1]])})
    torch.testing.assert_close(out["pred"], x.mean(0, keepdim=True))


def test_channel_mean_loss_and_loss_options(avg152):
    torch.manual_seed(0)
    net = IVAN(channels=2, num_blocks=2, growth=8, seed=0)
    d = VariableAugmentd(["t1", "pd"], ["t2"])(_d(avg152, ("t1", "pd", "t2"), z=41))
    x, y = d["image"][None], d["label"][None]
    base = ivan_losses(net, x, y, n_out=1)
    with torch.no_grad():
        y_hat = torch.clamp(net(x), 0, 1)
        x_hat = torch.clamp(net.inverse(y_hat), 0, 1)
    torch.testing.assert_close(base["loss_fwd"], F.mse_loss(y_hat.mean(1, keepdim=True), y[:, :1]))
    torch.testing.assert_close(base["loss_rev"], F.mse_loss(x_hat, x))
    torch.testing.assert_close(base["loss"], base["loss_fwd"] + base["loss_rev"])
    lam = ivan_losses(net, x, y, n_out=1, lam=3.0)
    torch.testing.assert_close(lam["loss_fwd"], base["loss_fwd"])
    torch.testing.assert_close(lam["loss_rev"], base["loss_rev"])
    torch.testing.assert_close(lam["loss"], 3 * base["loss_fwd"] + base["loss_rev"])
    tgt = ivan_losses(net, x, y, n_out=1, reverse_input="target")
    torch.testing.assert_close(tgt["loss_fwd"], base["loss_fwd"])
    with torch.no_grad():
        torch.testing.assert_close(tgt["loss_rev"], F.mse_loss(torch.clamp(net.inverse(y), 0, 1), x))
    assert abs(tgt["loss_rev"].item() - base["loss_rev"].item()) > 1e-6
    l1 = ivan_losses(net, x, y, n_out=1, loss="l1")
    torch.testing.assert_close(l1["loss_fwd"], F.l1_loss(y_hat.mean(1, keepdim=True), y[:, :1]))
    assert abs(l1["loss"].item() - base["loss"].item()) > 1e-4
    full = ivan_losses(net, x, y, n_out=1, forward_loss="full")
    torch.testing.assert_close(full["loss_fwd"], F.mse_loss(y_hat, y))
    with pytest.raises(ValueError):
        ivan_losses(net, x, y, n_out=1, loss="huber")


class _Saturated(torch.nn.Module):
    """A stand-in for a collapsed iVAN: its two output channels sit at +3 and -2 (clamped mean 0.5), shifted by
    one learnable offset per channel; the inverse is the exact inverse of that shift."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor([3.0, -2.0]).view(1, 2, 1, 1))

    def forward(self, x, rev=False):
        return x - self.offset if rev else x + self.offset


def test_range_penalty_gives_gradient_where_the_clamp_gives_none(avg152):
    net = IVAN(channels=2, num_blocks=2, growth=8, seed=0)
    d = VariableAugmentd(["t1"], ["t2"])(_d(avg152, ("t1", "t2"), z=41))
    x, y = d["image"][None], d["label"][None]
    official = ivan_losses(net, x, y, n_out=1)
    with_range = ivan_losses(net, x, y, n_out=1, range_weight=2.0)
    with torch.no_grad():
        raw = net(x)
    expected = (F.relu(-raw) ** 2 + F.relu(raw - 1) ** 2).mean()
    torch.testing.assert_close(with_range["loss_range"], expected)
    torch.testing.assert_close(official["loss_range"], expected)  # logged either way
    torch.testing.assert_close(official["loss"], official["loss_fwd"] + official["loss_rev"])
    torch.testing.assert_close(with_range["loss"], official["loss"] + 2.0 * expected)
    with pytest.raises(ValueError):
        ivan_losses(net, x, y, n_out=1, range_weight=-1.0)

    # a collapsed network: both channels outside [0, 1], so the official loss has no gradient at all
    sat = _Saturated()
    ivan_losses(sat, x, y, n_out=1)["loss"].backward()
    assert sat.offset.grad is None or float(sat.offset.grad.abs().max()) == 0.0
    sat.offset.grad = None
    ivan_losses(sat, x, y, n_out=1, range_weight=1.0)["loss"].backward()
    g = sat.offset.grad.flatten()
    assert g[0] > 0 and g[1] < 0  # gradient descent moves the +3 channel down and the -2 channel up
    opt = torch.optim.SGD(sat.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        ivan_losses(sat, x, y, n_out=1, range_weight=1.0)["loss"].backward()
        opt.step()
    with torch.no_grad():
        out = sat(x)
    assert float(out.min()) > -0.5 and float(out.max()) < 1.5  # back where the clamp passes gradient


def test_training_step_outputs_and_updates(avg152):
    from types import SimpleNamespace

    net = IVAN(channels=2, num_blocks=2, growth=8, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    step = IVANStep(net, opt, n_out=1)
    d = VariableAugmentd(["t1"], ["t2"])(_d(avg152, ("t1", "t2"), z=41))
    engine = SimpleNamespace(state=SimpleNamespace(device=torch.device("cpu")), amp=False, scaler=None)
    before = [p.detach().clone() for p in net.parameters()]
    out = step(engine, {"image": d["image"][None], "label": d["label"][None]})
    assert set(out) == {"loss", "loss_fwd", "loss_rev", "loss_range", "lr"} and out["lr"] == 1e-4
    assert all(isinstance(v, float) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError):
        IVANStep(net, opt, reverse_input="noise")


def test_lr_schedule_of_the_train_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "tiny.json")])
    parser["bundle_root"] = str(BUNDLE)
    parser["device"] = "$torch.device('cpu')"
    opt = parser.get_parsed_content("optimizer")
    sched = parser.get_parsed_content("lr_scheduler")
    assert parser.get_parsed_content("max_epochs") == 2  # tiny overlay; the default is 300
    lrs = []
    for _ in range(251):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lrs[e] for e in (0, 49, 50, 100, 250)] == pytest.approx([1e-4, 1e-4, 5e-5, 2.5e-5, 3.125e-6])


def test_laplacian_pyramid_reconstructs_and_fuses(avg152):
    a = avg152["t2"][None, :, :, 45].double()
    pyr = laplacian_pyramid(a, laplacian_levels(a.shape[-2:], 4))
    assert len(pyr) == 4  # 91x109: the coarsest side of 4 levels would be < 8, so 3 levels
    assert (collapse_pyramid(pyr) - a).abs().max() < 1e-6
    img = avg152["t2"][None, 10:74, 10:74, 45]
    assert laplacian_levels((64, 64), 4) == 3 and laplacian_levels((256, 256), 4) == 4
    assert (laplacian_maxabs_fusion(torch.stack([img, img])) - img).abs().max() < 1e-6
    b = avg152["pd"][None, 10:74, 10:74, 45]
    fused = laplacian_maxabs_fusion(torch.stack([img, b]))
    assert fused.min() >= 0 and fused.max() <= 1 and fused.shape == img.shape
    # detail is taken from the source with the stronger edge: the fused image keeps both sources' edges
    assert not torch.allclose(fused, (img + b) / 2, atol=1e-3)


def test_fusion_target_transform_is_slice_wise(avg152):
    d = {"t2": avg152["t2"][None, 20:60, 30:70, 40:44], "ct": avg152["t1"][None, 20:60, 30:70, 40:44]}
    out = FusionTargetd(["t2", "ct"], levels=2)(d)
    assert out["fused"].shape == (1, 40, 40, 4)
    z = 2
    ref = laplacian_maxabs_fusion(torch.stack([d["t2"][:, :, :, z], d["ct"][:, :, :, z]]), levels=2)
    torch.testing.assert_close(out["fused"][..., z], ref)
    avg = FusionTargetd(["t2", "ct"], method="average")(d)
    torch.testing.assert_close(avg["fused"], (d["t2"] + d["ct"]) / 2)
    with pytest.raises(KeyError):
        FusionTargetd(["t2", "ct"], method="datalist")(d)


def test_ct_window_scales_only_the_loaded_ct_keys(avg152):
    """A datalist entry may list images the task does not load (the demo cohort's ``ct`` next to the MR of a
    T1 -> T2 task): their paths pass untouched, the loaded CT is windowed, MR keys are left to their own scaling."""
    hu = avg152["t1"][None, :, :, 40:43] * 3000.0 - 1000.0  # a real image on [-1000, 2000]
    data = {"t1": avg152["t1"][None, :, :, 40:43], "ct": hu, "pd": "/data/sim_000/pd.nii.gz"}
    out = ScaleCTWindowd(["t1", "ct"], ct_keys=["ct"], window=[-1000, 2000])(data)
    torch.testing.assert_close(out["ct"], avg152["t1"][None, :, :, 40:43], atol=1e-5, rtol=0)
    assert out["t1"] is data["t1"] and out["pd"] == data["pd"]
    narrow = ScaleCTWindowd(["ct"], ct_keys=["ct"], window=[0, 1000])(data)["ct"]
    assert narrow.min() == 0.0 and narrow.max() == 1.0 and 0 < (narrow == 1.0).float().mean() < 1  # clipped
    unloaded = {"t1": data["t1"], "ct": "/data/sim_000/ct.nii.gz"}
    assert ScaleCTWindowd(["t1"], ct_keys=["ct"], window=[-1000, 2000])(unloaded)["ct"] == "/data/sim_000/ct.nii.gz"
    with pytest.raises(ValueError, match="low < high"):
        ScaleCTWindowd(["ct"], ct_keys=["ct"], window=[2000, -1000])
