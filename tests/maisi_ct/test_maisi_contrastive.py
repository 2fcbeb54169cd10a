"""MAISI-v2 region-specific contrastive ControlNet loss: the terms by hand, the weight-0 identity and a tiny
bundle run (two iterations, term on, MLflow tracking) on the real demo CT cohort."""

from __future__ import annotations

import copy
import shutil
import sqlite3
from types import SimpleNamespace

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.networks.schedulers import RFlowScheduler
from monai.networks.utils import copy_model_state

from common.engines.maisi_steps import (
    MaisiControlNetStep,
    label_weight_map,
    region_contrastive_loss,
    region_contrastive_masks,
    remove_roi,
    weighted_l1,
)
from common.networks.maisi import maisi_controlnet, maisi_diffusion_unet
from common.transforms.maisi import binarize_labels


def test_terms_equal_hand_computed_values():
    # latent (1, 2, 2, 2, 2): ROI = voxel (0, 0, 0); background = the four voxels with x = 1
    roi = torch.zeros(1, 1, 2, 2, 2)
    roi[0, 0, 0, 0, 0] = 1
    bg = torch.zeros(1, 1, 2, 2, 2)
    bg[0, 0, 1] = 1
    pred = torch.zeros(1, 2, 2, 2, 2)
    pred_free = torch.full((1, 2, 2, 2, 2), 0.5)
    pred_free[0, 0, 0, 0, 0], pred_free[0, 1, 0, 0, 0] = 1.0, 2.0  # |pred - pred_free| in the ROI: 1 and 2
    target = torch.zeros(1, 2, 2, 2, 2)
    target[0, 0, 1] = 1.5  # |pred_free - target| on the background: 1.0 (channel 0), 0.5 (channel 1)
    fg, bgl = region_contrastive_loss(pred, pred_free, target, roi, bg, margin=2.0)
    assert fg.item() == pytest.approx(-(1.0 + 2.0) / 2)  # -1.5, inside the margin
    assert bgl.item() == pytest.approx((4 * 1.0 + 4 * 0.5) / 8)  # 0.75
    fg_bounded, _ = region_contrastive_loss(pred, pred_free, target, roi, bg, margin=1.0)
    assert fg_bounded.item() == pytest.approx(-1.0)  # max(-1.5, -delta)
    # empty masks give 0, not NaN
    fg0, bg0 = region_contrastive_loss(pred, pred_free, target, torch.zeros_like(roi), torch.zeros_like(bg))
    assert fg0.item() == 0.0 and bg0.item() == 0.0


def test_roi_removal_and_masks_by_hand():
    # image-resolution label 8^3: liver with a 2^3 hepatic tumour (26) at [2:4]^3
    label = torch.ones(1, 1, 8, 8, 8, dtype=torch.uint8)
    label[0, 0, 2:4, 2:4, 2:4] = 26
    free = remove_roi(label)
    assert torch.equal(free, torch.ones_like(free, dtype=torch.long))  # tumour -> host organ (liver), not background
    roi, bg = region_contrastive_masks(label, free, (4, 4, 4), dilation=3)
    # nearest downsampling 8 -> 4 keeps image voxels 0, 2, 4, 6: ROI [2:4] -> latent index 1;
    # the dilated ROI [1:5] covers image voxels 2 and 4 -> latent indices 1 and 2 are not background
    expected_roi = torch.zeros(1, 1, 4, 4, 4)
    expected_roi[0, 0, 1, 1, 1] = 1
    expected_bg = torch.ones(1, 1, 4, 4, 4)
    expected_bg[0, 0, 1:3, 1:3, 1:3] = 0
    assert torch.equal(roi, expected_roi) and torch.equal(bg, expected_bg)
    _, bg_no_dilation = region_contrastive_masks(label, free, (4, 4, 4), dilation=1)
    assert torch.equal(bg_no_dilation, 1 - expected_roi)

    # lung tumour (23): majority lobe of the one-voxel ring (56 ring voxels: 40 of lobe 31, 16 of lobe 30)
    lung = torch.full((1, 1, 8, 8, 8), 30, dtype=torch.uint8)
    lung[0, 0, :, :, 4:] = 31
    lung[0, 0, 3:5, 3:5, 4:6] = 23
    free = remove_roi(lung)
    assert set(free[lung == 23].tolist()) == {31}
    assert torch.equal(free[lung != 23], lung[lung != 23].long())
    # a user map: liver -> body (200)
    assert set(remove_roi(label, {"1": 200}).unique().tolist()) == {26, 200}


def _engine():
    return SimpleNamespace(state=SimpleNamespace(device="cpu"), device="cpu", amp=False)


def _step(weight, unet, controlnet, **kw):
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-4)
    sched = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True,
                           sample_method="uniform", scale=1.4)
    return MaisiControlNetStep(controlnet, unet, opt, sched, scale_factor=1.25, weighted_loss=100.0,
                               weighted_loss_label=[26], contrastive_loss_weight=weight, **kw)


def _perturb(net: torch.nn.Module, seed: int = 3) -> None:
    """Trained-looking weights: MONAI zero-initialises the UNet's output convolution and the ControlNet's condition
    output and residual convolutions, so fresh networks ignore the label (out == out_free, fg = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny_nets():
    torch.manual_seed(0)
    unet = maisi_diffusion_unet(tiny=True, device="cpu")
    controlnet = maisi_controlnet(tiny=True, device="cpu")
    _perturb(unet, seed=2)
    copy_model_state(controlnet, unet.state_dict())
    _perturb(controlnet)
    label = torch.ones(1, 1, 32, 32, 32, dtype=torch.uint8)
    label[..., :4] = 0
    label[0, 0, 10:18, 10:18, 10:18] = 26  # hepatic tumour inside the liver
    batch = {"image": torch.randn(1, 4, 8, 8, 8), "label": label, "spacing": torch.tensor([[1.5, 1.5, 1.5]]),
             "modality": torch.tensor([1])}
    return unet, controlnet, batch


def test_weight_zero_is_exactly_the_weighted_l1(tiny_nets):
    unet, controlnet, batch = tiny_nets
    ref_unet, ref_cn = copy.deepcopy(unet), copy.deepcopy(controlnet)
    step = _step(0.0, copy.deepcopy(unet), copy.deepcopy(controlnet))
    torch.manual_seed(1)
    out = step(_engine(), batch)
    assert set(out) == {"loss", "loss_weighted_l1"}

    # the region-weighted L1 of the step before the contrastive term, recomputed with the same draws
    ref = _step(0.0, ref_unet, ref_cn)
    torch.manual_seed(1)
    x_t, t, target = ref.noisy_input(batch, torch.device("cpu"))
    cls = {"class_labels": torch.tensor([1])}
    with torch.no_grad():
        down, mid = ref_cn(x=x_t, timesteps=t, controlnet_cond=binarize_labels(batch["label"]), **cls)
        pred = ref_unet(x=x_t, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        spacing_tensor=batch["spacing"] * 100.0, **cls)
    expected = weighted_l1(pred, target, label_weight_map(batch["label"], x_t.shape[2:], [26], 100.0)).item()
    assert out["loss"] == expected and out["loss_weighted_l1"] == expected


def test_contrastive_step_adds_both_terms_and_keeps_unet(tiny_nets):
    unet, controlnet, batch = tiny_nets
    unet_copy = copy.deepcopy(unet)
    before = {k: v.clone() for k, v in unet_copy.state_dict().items()}
    cn = copy.deepcopy(controlnet)
    cn_before = {k: v.clone() for k, v in cn.state_dict().items()}
    step = _step(0.01, unet_copy, cn, contrastive_margin=2.0)
    torch.manual_seed(1)
    out = step(_engine(), batch)
    assert {"loss", "loss_weighted_l1", "loss_contrastive_fg", "loss_contrastive_bg"} <= set(out)
    assert -2.0 <= out["loss_contrastive_fg"] < 0.0 and out["loss_contrastive_bg"] > 0
    assert out["contrastive_roi_voxels"] == 8  # the 8^3 tumour -> 2^3 latent voxels
    assert out["loss"] == pytest.approx(out["loss_weighted_l1"] + 0.01 * (out["loss_contrastive_fg"] + out["loss_contrastive_bg"]))
    assert all(torch.equal(before[k], v) for k, v in unet_copy.state_dict().items())
    assert any(not torch.equal(cn_before[k], v) for k, v in cn.state_dict().items())

    # without an ROI in the batch the second forward is skipped: fg = 0, bg = the unweighted L1 of the one forward
    plain = dict(batch, label=torch.ones_like(batch["label"]))
    out2 = _step(0.01, copy.deepcopy(unet), copy.deepcopy(controlnet))(_engine(), plain)
    assert out2["loss_contrastive_fg"] == 0.0 and out2["contrastive_roi_voxels"] == 0
    assert out2["loss"] == pytest.approx(1.01 * out2["loss_weighted_l1"])  # weights are 1 everywhere (no id 26)


def test_bundle_two_iterations_log_contrastive_terms(maisi_bundle, ct_demo, tiny_ckpt_dir, tmp_path):
    ckpt_dir = tmp_path / "models"
    shutil.copytree(tiny_ckpt_dir, ckpt_dir)
    # networks whose zero-initialised layers are no longer zero, so the ROI-free forward differs
    unet_path = ckpt_dir / "diff_unet_3d_rflow-ct.pt"
    ckpt = torch.load(unet_path, map_location="cpu", weights_only=True)
    unet = maisi_diffusion_unet(tiny=True, device="cpu")
    unet.load_state_dict(ckpt["unet_state_dict"])
    _perturb(unet, seed=2)
    torch.save(dict(ckpt, unet_state_dict=unet.state_dict()), unet_path)
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    cn = maisi_controlnet(tiny=True, device="cpu")
    copy_model_state(cn, unet_before)
    _perturb(cn)
    torch.save({"controlnet_state_dict": cn.state_dict()}, ckpt_dir / "controlnet_init.pt")
    out_dir = tmp_path / "cn"
    wf = ConfigWorkflow(
        config_file=[str(maisi_bundle / "configs" / "train_controlnet.json"), str(maisi_bundle / "configs" / "tiny.json")],
        meta_file=str(maisi_bundle / "configs" / "metadata.json"),
        logging_file=str(maisi_bundle / "configs" / "logging.conf"),
        tracking=str(maisi_bundle / "configs" / "mlflow.json"),
        workflow_type="train",
        bundle_root=str(maisi_bundle),
        datalist=str(ct_demo), ckpt_dir=str(ckpt_dir), latent_dir=str(tmp_path / "latents"), output_dir=str(out_dir),
        # the demo cohort has no tumour: make the liver the ROI (liver -> body when removed)
        weighted_loss_label=[1], contrastive_roi_replacement={"1": 200}, controlnet_init_path=str(ckpt_dir / "controlnet_init.pt"),
    )
    wf.initialize()
    assert wf.parser.get_parsed_content("train#step").contrastive_loss_weight == 0.01  # rflow default
    wf.run()
    wf.finalize()
    state = wf.parser.get_parsed_content("train#trainer").state
    assert state.iteration == 2
    out = state.output
    assert {"loss_contrastive_fg", "loss_contrastive_bg"} <= set(out) and out["contrastive_roi_voxels"] > 0
    assert -2.0 <= out["loss_contrastive_fg"] < 0.0
    unet_after = wf.parser.get_parsed_content("unet").state_dict()
    assert all(torch.equal(unet_before[k], unet_after[k].cpu()) for k in unet_before)

    con = sqlite3.connect(str(out_dir / "mlruns.db"))
    try:
        keys = {r[0] for r in con.execute("select distinct key from metrics")}
        steps = {r[0] for r in con.execute("select step from metrics where key = 'loss_contrastive_fg'")}
    finally:
        con.close()
    assert {"loss", "loss_weighted_l1", "loss_contrastive_fg", "loss_contrastive_bg"} <= keys, sorted(keys)
    assert steps == {1, 2}
