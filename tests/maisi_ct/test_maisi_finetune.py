"""Fine-tuning (``finetune``) in each maisi_ct training stage, tiny overlay, in-process.

A first run writes the stage's checkpoints; a second run without ``resume``/``finetune``/``overwrite`` is refused
before anything is replaced; a fine-tune run starts from the network of ``finetune_ckpt`` (its weights at the first
iteration equal the checkpoint's, not the fresh or the ``load_weights`` initialisation the first run started from)
with a fresh trainer state. The diffusion and ControlNet stages read a small prepared latent set (one latent and
its label map), so no CT is encoded.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events

from common.utils.errors import OutputExistsError, find_user_error

STAGES = {  # config, the network's entry in the stage's checkpoint, the final checkpoint file
    "autoencoder": ("train_autoencoder.json", "autoencoder", "autoencoder_checkpoint.pt"),
    "diffusion": ("train_diffusion.json", "unet", "diffusion_unet_checkpoint.pt"),
    "controlnet": ("train_controlnet.json", "controlnet", "controlnet_checkpoint.pt"),
}


def _latents(folder):
    """One 16^3 latent (4 channels) and its 64^3 MAISI label map (body 200, liver 1), as the latent datalist."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 16, 4)).astype(np.float32), np.diag([6.0, 6.0, 6.0, 1.0])),
             str(folder / "case_emb.nii.gz"))
    label = np.zeros((64, 64, 64), np.uint8)
    label[8:56, 8:56, 8:56] = 200
    label[20:40, 20:40, 20:40] = 1
    nib.save(nib.Nifti1Image(label, np.diag([1.5, 1.5, 1.5, 1.0])), str(folder / "case_label.nii.gz"))
    entry = {"image": "case_emb.nii.gz", "label": "case_label.nii.gz", "spacing": [1.5, 1.5, 1.5], "modality": 1,
             "dim": [64, 64, 64], "top_region_index": [0, 0, 1, 0], "bottom_region_index": [0, 0, 1, 0]}
    (folder / "datalist_latents.json").write_text(json.dumps({"training": [entry], "validation": []}))


def _run(make_workflow, config, **overrides):
    """Run a stage; returns (its network's weights at the first iteration, the trainer's final state)."""
    wf = make_workflow(config, **overrides)
    trainer = wf.parser.get_parsed_content("train#trainer")
    net = wf.parser.get_parsed_content("trained_network")
    start: dict[str, torch.Tensor] = {}

    @trainer.on(Events.ITERATION_STARTED(once=1))
    def _first_iteration(engine):  # after every STARTED handler (the checkpoint loaders)
        start.update({k: v.detach().cpu().clone() for k, v in net.state_dict().items()})

    wf.run()
    return start, trainer.state


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k].cpu()) for k in a)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_finetune_starts_from_the_checkpoint_and_existing_runs_are_refused(stage, tiny_train_workflow, ct_demo,
                                                                           tiny_ckpt_dir, tmp_path):
    config, entry, final = STAGES[stage]
    ckpt_dir = tmp_path / "models"
    shutil.copytree(tiny_ckpt_dir, ckpt_dir)
    common = {"datalist": str(ct_demo), "ckpt_dir": str(ckpt_dir)}
    if stage == "autoencoder":
        common["val_interval"] = 10  # one epoch per run: no validation pass (it plays no part here)
    else:
        _latents(tmp_path / "latents")
        common["latent_dir"] = str(tmp_path / "latents")

    start_new, _ = _run(tiny_train_workflow, config, output_dir=str(tmp_path / "run1"), **common)
    saved = ckpt_dir / final
    assert saved.is_file() and sorted(ckpt_dir.glob("*_checkpoint_epoch=*.pt"))  # final and interval checkpoints
    before = saved.read_bytes()
    trained = torch.load(saved, map_location="cpu", weights_only=True)[entry]
    assert not _equal(start_new, trained)  # training changed the network: the comparison below can fail

    # a new run over this stage's checkpoints is refused before anything is written
    with pytest.raises(Exception) as err:
        tiny_train_workflow(config, output_dir=str(tmp_path / "run2"), **common).run()
    user = find_user_error(err.value)
    assert isinstance(user, OutputExistsError), err.value
    assert str(ckpt_dir) in str(user) and "'finetune'" in str(user) and "'resume'" in str(user) and "'overwrite'" in str(user)
    assert saved.read_bytes() == before and not (tmp_path / "run2").exists()

    # fine-tuning: the network starts from finetune_ckpt (default: the stage's final checkpoint), the trainer anew
    start_ft, state = _run(tiny_train_workflow, config, output_dir=str(tmp_path / "run3"), finetune=True, **common)
    assert _equal(start_ft, trained)
    assert state.epoch == 1 and state.iteration == 2  # a new run (resume would continue at iteration 2)
    assert saved.read_bytes() != before  # the stage's checkpoint is replaced by the fine-tuned run's

    if stage == "autoencoder":  # a plain state dict (the official autoencoder_v1.pt layout) fine-tunes too
        official = ckpt_dir / "autoencoder_v1.pt"
        start_off, _ = _run(tiny_train_workflow, config, output_dir=str(tmp_path / "run4"), finetune=True,
                            finetune_ckpt=str(official), **common)
        assert _equal(start_off, torch.load(official, map_location="cpu", weights_only=True))


def test_finetune_checkpoint_is_checked_before_training(tiny_train_workflow, ct_demo, tiny_ckpt_dir, tmp_path):
    """A finetune_ckpt of another stage (the diffusion UNet for the VAE) is refused naming the key, nothing written."""
    from common.utils.io import CheckpointError

    ckpt_dir = tmp_path / "models"
    shutil.copytree(tiny_ckpt_dir, ckpt_dir)
    wrong = ckpt_dir / "diff_unet_3d_rflow-ct.pt"
    with pytest.raises(Exception) as err:
        tiny_train_workflow("train_autoencoder.json", datalist=str(ct_demo), ckpt_dir=str(ckpt_dir),
                  output_dir=str(tmp_path / "runs"), finetune=True, finetune_ckpt=str(wrong)).run()
    user = find_user_error(err.value)
    assert isinstance(user, CheckpointError) and "'finetune_ckpt'" in str(user) and wrong.name in str(user), err.value
    assert not [p for p in tmp_path.joinpath("runs").rglob("*") if p.is_file()]  # no log, no checkpoint
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(p.name for p in tiny_ckpt_dir.iterdir())
