"""End-to-end runs of the noddi_sr bundle on a tiny phantom cohort: three stages, resume, inference, evaluation."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from common.data.fetch import demo_file
from common.data.noddi_phantom import PhantomConfig, build_phantom_cohort, hr_affine
from common.utils.errors import InvalidInputError, OutputExistsError
from common.utils.io import CheckpointError

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "noddi_sr"
CONFIGS = BUNDLE / "configs"
TINY_PHANTOM = PhantomConfig(hr_spacing=5.0, hr_shape=(32, 32, 32), scheme="dipy_small_101D")


def _workflow(files, wtype, **overrides):
    sys.path.insert(0, str(BUNDLE))
    try:
        wf = ConfigWorkflow(
            config_file=[str(CONFIGS / f) for f in files] + [str(CONFIGS / "tiny.json")],
            meta_file=str(CONFIGS / "metadata.json"),
            workflow_type=wtype,
            bundle_root=str(BUNDLE),
            **overrides,
        )
        wf.initialize()
        assert wf.check_properties() == []
        wf.run()
        wf.finalize()
        return wf
    finally:
        sys.path.remove(str(BUNDLE))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("noddi_phantom")
    build_phantom_cohort(root, n_train=2, n_val=1, n_test=1, seed=0, cfg=TINY_PHANTOM)
    return root


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """Stage 1 through ``python -m monai.bundle run`` (subprocess), stages 2 and 3 in-process."""
    work = tmp_path_factory.mktemp("noddi_run")
    ckpt = work / "models"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", "['configs/train_vqgan.json','configs/tiny.json']",
        "--meta_file", "configs/metadata.json",
        "--logging_file", "configs/logging.conf",
        "--dataset_dir", str(cohort), "--ckpt_dir", str(ckpt), "--output_dir", str(work / "out_vqgan"),
    ]
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    it1 = next(line for line in log.splitlines() if "Iter: 1/2" in line)
    it2 = next(line for line in log.splitlines() if "Iter: 2/2" in line)
    # tiny disc_start = 1: no adversarial term at the first iteration, both discriminators at the second
    assert "loss_adv_g: 0.0000" in it1 and "loss_d: 0.0000" in it1
    assert "loss_adv_g_slice" in it2 and "loss_adv_g_volume" in it2 and "loss_d: 0.0000" not in it2
    stage2 = _workflow(["train_cond_encoder.json"], "train", dataset_dir=str(cohort), ckpt_dir=str(ckpt), output_dir=str(work / "out_enc"))
    stage3 = _workflow(["train_diffusion.json"], "train", dataset_dir=str(cohort), ckpt_dir=str(ckpt), output_dir=str(work / "out_diff"))
    return {"ckpt": ckpt, "work": work, "stage2": stage2, "stage3": stage3}


def test_stage_outputs_and_frozen_networks(trained):
    ckpt = trained["ckpt"]
    for name in ("vqgan.pt", "checkpoint_vqgan.pt", "encoder.pt", "checkpoint_encoder.pt", "diffusion.pt", "checkpoint_diffusion.pt"):
        assert (ckpt / name).is_file(), name
    vq_file = torch.load(ckpt / "vqgan.pt", weights_only=True)
    vq_file = vq_file.get("vqgan", vq_file)
    for stage in ("stage2", "stage3"):
        vq = trained[stage].parser.get_parsed_content("vqgan").state_dict()
        assert all(torch.equal(vq[k].cpu(), vq_file[k]) for k in vq_file), f"VQ-GAN changed during {stage}"
    enc_file = torch.load(ckpt / "encoder.pt", weights_only=True)
    enc_file = enc_file.get("encoder", enc_file)
    enc = trained["stage3"].parser.get_parsed_content("encoder").state_dict()
    assert all(torch.equal(enc[k].cpu(), enc_file[k]) for k in enc_file), "encoder changed during stage 3"
    trainer3 = trained["stage3"].parser.get_parsed_content("train#trainer")
    assert trainer3.state.iteration == 2
    diff = torch.load(ckpt / "checkpoint_diffusion.pt", weights_only=True)
    assert {"unet", "ema", "latent_norm", "optimizer", "trainer"} <= set(diff)
    norm = trained["stage3"].parser.get_parsed_content("latent_norm")
    assert torch.equal(diff["latent_norm"]["std"], norm.std.cpu())


def test_stage2_resumes_from_its_checkpoint(trained, cohort):
    wf = _workflow(
        ["train_cond_encoder.json"], "train", dataset_dir=str(cohort), ckpt_dir=str(trained["ckpt"]),
        output_dir=str(trained["work"] / "out_enc_resume"), resume=True, max_epochs=2, val_interval=5,
    )
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4  # continued after the 2 saved iterations


def _chain(err: BaseException) -> list[BaseException]:
    chain, e = [], err
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _raises(exc_type, fragment, run):
    with pytest.raises(Exception) as err:
        run()
    assert any(isinstance(x, exc_type) and fragment in str(x) for x in _chain(err.value)), repr(err.value)


#: stage config -> (its best-weights file, the file's entry and the config id of the network it trains)
STAGES = {
    "train_vqgan.json": ("vqgan.pt", "vqgan", "network"),
    "train_cond_encoder.json": ("encoder.pt", "encoder", "network"),
    "train_diffusion.json": ("diffusion.pt", "unet", "network"),
}


def _state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_finetune_starts_from_the_stage_model(stage, trained, cohort, tmp_path):
    """A stage whose checkpoints exist is refused without 'resume'/'finetune'/'overwrite'; with 'finetune' it trains a
    new run (fresh trainer) whose network starts from the weights of <ckpt_dir>/<stage>.pt, not from its initialisation
    (stage 3: its EMA too)."""
    fname, entry, net_id = STAGES[stage]
    ckpt = tmp_path / "models"
    shutil.copytree(trained["ckpt"], ckpt)
    kw = dict(dataset_dir=str(cohort), ckpt_dir=str(ckpt), output_dir=str(tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    _raises(OutputExistsError, "'finetune' to true", lambda: _workflow([stage], "train", **kw))
    _raises(InvalidInputError, "set only one", lambda: _workflow([stage], "train", resume=True, finetune=True, **kw))
    other = "encoder.pt" if fname != "encoder.pt" else "vqgan.pt"  # another stage's model: refused by name
    _raises(CheckpointError, "config key 'finetune_ckpt'",
            lambda: _workflow([stage], "train", finetune=True, finetune_ckpt=str(ckpt / other), **kw))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # refused runs wrote nothing

    saved = torch.load(ckpt / fname, weights_only=True)
    saved = saved.get(entry, saved)  # a single-network file is a bare state dict
    sys.path.insert(0, str(BUNDLE))
    try:
        wf = ConfigWorkflow(config_file=[str(CONFIGS / stage), str(CONFIGS / "tiny.json")], meta_file=str(CONFIGS / "metadata.json"),
                            workflow_type="train", bundle_root=str(BUNDLE), finetune=True, **kw)
        wf.initialize()
        network, trainer = wf.parser.get_parsed_content(net_id), wf.parser.get_parsed_content("train#trainer")
        init, start = _state(network), {}
        ema = wf.parser.get_parsed_content("ema") if stage == "train_diffusion.json" else None

        def snapshot(engine):
            start["net"] = _state(network)
            start["ema"] = _state(ema.module) if ema is not None else None

        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_STARTED(once=1), snapshot)
        wf.run()
        wf.finalize()
    finally:
        sys.path.remove(str(BUNDLE))
    assert set(start["net"]) == set(saved)
    assert all(torch.equal(start["net"][k], saved[k].cpu()) for k in saved), "network did not start from the finetune checkpoint"
    assert any(not torch.equal(init[k], saved[k].cpu()) for k in saved)  # a fresh initialisation would have failed
    if ema is not None:
        assert all(torch.equal(start["ema"][k], saved[k].cpu()) for k in saved), "EMA did not start from the finetune checkpoint"
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2  # a new run, not the saved run continued
    final = f"checkpoint_{fname}"
    assert (ckpt / final).read_bytes() != before[final]  # the fine-tune run replaced the stage's checkpoint


def test_inference_on_real_dwi_and_phantom(trained, cohort, tmp_path):
    dwi = demo_file("dipy/small_101D.nii.gz")
    data = [{"dwi": str(dwi), "bval": str(demo_file("dipy/small_101D.bval")), "bvec": str(demo_file("dipy/small_101D.bvec"))}]
    out = tmp_path / "infer"
    _workflow(["inference.json"], "infer", dataset_dir=str(cohort), ckpt_dir=str(trained["ckpt"]), output_dir=str(out), data=data, progress=False)
    lr = nib.load(dwi)
    maps = nib.load(out / "small_101D_noddi.nii.gz")
    assert maps.shape == (12, 20, 20, 3)
    np.testing.assert_allclose(maps.affine, hr_affine(lr.affine), atol=1e-4)
    arr = maps.get_fdata()
    assert arr.min() >= 0 and arr.max() <= 1 and arr.max() > 0
    for name in ("NDI", "ODI", "FWF"):
        single = nib.load(out / f"small_101D_{name}.nii.gz")
        np.testing.assert_allclose(single.get_fdata()[..., 0] if single.ndim == 4 else single.get_fdata(), arr[..., ("NDI", "ODI", "FWF").index(name)], atol=1e-6)
    # a given LR mask: zero outside its nearest-neighbour upsampling
    test = json.loads((cohort / "datalist.json").read_text())["testing"]
    out2 = tmp_path / "infer_phantom"
    _workflow(["inference.json"], "infer", dataset_dir=str(cohort), ckpt_dir=str(trained["ckpt"]), output_dir=str(out2), progress=False, save_per_map=False)
    case = test[0]["id"]
    pred = nib.load(out2 / f"{case}_noddi.nii.gz").get_fdata()
    mask_lr = nib.load(cohort / test[0]["mask"]).get_fdata() > 0
    mask_hr = mask_lr.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    assert pred.shape == (32, 32, 32, 3) and np.all(pred[~mask_hr] == 0)
    # existing outputs are refused unless overwrite is true
    with pytest.raises(Exception) as err:
        _workflow(["inference.json"], "infer", dataset_dir=str(cohort), ckpt_dir=str(trained["ckpt"]), output_dir=str(out2), progress=False, save_per_map=False)
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, FileExistsError) and "already exists" in str(x) for x in chain)


def test_evaluate_writes_metrics(trained, cohort, tmp_path):
    out = tmp_path / "eval"
    _workflow(["inference.json", "evaluate.json"], "infer", dataset_dir=str(cohort), ckpt_dir=str(trained["ckpt"]), output_dir=str(out), progress=False)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "case,method,map,mask,psnr,ssim,mae,n_voxels"
    body = [r.split(",") for r in rows[1:]]
    assert {r[2] for r in body} == {"NDI", "ODI", "FWF", "all"} and {"brain", "wm", "gm"} <= {r[3] for r in body}
    assert all(np.isfinite(float(r[4])) for r in body)
    summary = json.loads((out / "summary.json").read_text())
    assert any(s["map"] == "NDI" and s["mask"] == "brain" for s in summary)
    assert (out / "montage_phantom_003.png").stat().st_size > 1000
