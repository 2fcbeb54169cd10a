"""The three maisi_ct training stages, tiny overlay, on the real demo CT cohort (two iterations each)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from common.networks.maisi import read_scale_factor


def _train(make_workflow, config, **overrides):
    wf = make_workflow(config, **overrides)
    wf.run()
    assert not wf.check_properties()
    return wf


def test_autoencoder_stage_through_bundle_run(maisi_bundle, bundle_env, ct_demo, tmp_path):
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", "['configs/train_autoencoder.json','configs/tiny.json']",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
        "--bundle_root", str(maisi_bundle), "--datalist", str(ct_demo),
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "runs"),
    ]
    proc = subprocess.run(cmd, cwd=maisi_bundle, env=bundle_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "models" / "autoencoder_checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"autoencoder", "discriminator", "optimizer_g", "optimizer_d", "lr_scheduler_g", "trainer"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 2
    assert "loss_adv_g" in proc.stdout + proc.stderr and "val_psnr" in proc.stdout + proc.stderr


def test_diffusion_resume_and_controlnet(tiny_train_workflow, ct_demo, tiny_ckpt_dir, tmp_path):
    ckpt_dir = tmp_path / "models"
    shutil.copytree(tiny_ckpt_dir, ckpt_dir)
    common = {"datalist": str(ct_demo), "ckpt_dir": str(ckpt_dir), "latent_dir": str(tmp_path / "latents")}

    wf = _train(tiny_train_workflow, "train_diffusion.json", output_dir=str(tmp_path / "dm"), **common)
    out = wf.parser.get_parsed_content("train#trainer").state.output
    assert {"loss", "loss_l1"} <= set(out)
    saved = ckpt_dir / "diffusion_unet_checkpoint.pt"
    scale = read_scale_factor(saved)
    # scale factor = 1 / std(first batch): one of the precomputed latents (batch size 1)
    latents = sorted((tmp_path / "latents").glob("*_emb.nii.gz"))
    demo = json.loads(ct_demo.read_text())
    assert len(latents) == len(demo["training"]) + len(demo["validation"])
    assert nib.load(str(latents[0])).shape == (16, 16, 16, 4)  # resampled to 6 mm, padded to 64^3, / 4
    candidates = [1.0 / float(torch.as_tensor(np.asarray(nib.load(str(p)).dataobj)).float().std()) for p in latents]
    assert min(abs(scale - c) for c in candidates) < 1e-4 * scale

    # resume: epoch, iteration, LR schedule and scale factor continue from the checkpoint
    wf2 = _train(tiny_train_workflow, "train_diffusion.json", output_dir=str(tmp_path / "dm2"), resume=True, max_epochs=2, **common)
    state = wf2.parser.get_parsed_content("train#trainer").state
    assert state.epoch == 2 and state.iteration == 4
    assert wf2.parser.get_parsed_content("lr_scheduler").last_epoch == 4
    assert read_scale_factor(saved) == pytest.approx(scale)

    # ControlNet on the trained UNet: the UNet stays bit-identical, the loss weights liver voxels
    unet_before = {k: v.clone() for k, v in torch.load(saved, map_location="cpu", weights_only=True)["unet"].items()}
    wf3 = _train(tiny_train_workflow, "train_controlnet.json", output_dir=str(tmp_path / "cn"), diffusion_unet_path=str(saved),
                 weighted_loss_label=[1], **common)
    unet_after = wf3.parser.get_parsed_content("unet").state_dict()
    assert all(torch.equal(unet_before[k], unet_after[k].cpu()) for k in unet_before)
    assert wf3.parser.get_parsed_content("train#step").scale_factor.value.item() == pytest.approx(scale)
    out = wf3.parser.get_parsed_content("train#trainer").state.output
    assert {"loss", "loss_weighted_l1"} <= set(out) and np.isfinite(out["loss"])
    cn = torch.load(ckpt_dir / "controlnet_checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"controlnet", "optimizer", "lr_scheduler", "trainer"} <= set(cn)


@pytest.mark.parametrize("config", ["train_autoencoder.json", "train_diffusion.json", "train_controlnet.json"])
def test_multi_gpu_overlay_wraps_trained_network(maisi_bundle, config):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(maisi_bundle / "configs" / config), str(maisi_bundle / "configs" / "multi_gpu_train.json")])
    assert parser["network"]["_target_"].endswith("DistributedDataParallel") and parser["network"]["module"] == "@trained_network"
    run = parser["run"]
    # data preparation once (rank 0), weights on every rank, then the trainer
    assert run[0].startswith("$@prepare_data") and "barrier" in run[1] and run[2] == "$@load_weights"
    assert any("gloo" in expr for expr in parser["initialize"])


def test_latents_are_named_by_case_and_one_name_twice_is_refused(tmp_path):
    """Latents carry common.bundle.case_name (the id, else the image's stem); two cases that would write the same
    latent are refused before any image is read or encoded (the autoencoder is never used)."""
    from scripts.latents import precompute_latents

    from common.utils.errors import InvalidInputError

    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [{"image": "a/ct.nii.gz"}], "validation": [{"image": "b/ct.nii.gz"}]}))
    with pytest.raises(InvalidInputError, match=r"'ct' \(#0\) and 'ct' \(#1\) would both write .*ct_emb\.nii\.gz"):
        precompute_latents(None, str(dl), str(tmp_path / "latents"))
    assert not [p for p in (tmp_path / "latents").rglob("*") if p.is_file()]
