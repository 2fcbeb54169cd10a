"""End to end: the three training stages, resume, inference and evaluation of the aldm_translation bundle.

Tiny configuration on the demo cohort (simulated subjects for training, the real avg152 T1/T2/PD
triple for inference and evaluation). Stage 1 runs through ``python -m monai.bundle run`` in a
subprocess, the other workflows in-process through ``monai.bundle.ConfigWorkflow``.
"""

from __future__ import annotations

import copy

import csv
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

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "aldm_translation"
CONFIGS = BUNDLE / "configs"
TINY = str(CONFIGS / "tiny.json")


def _purge_scripts():
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def bundle_path():
    """The bundle's ``scripts`` package importable in this test (other bundles have one too).

    Function-scoped: the suite's conftest forgets every bundle's ``scripts`` around each test.
    """
    _purge_scripts()
    sys.path.insert(0, str(BUNDLE))
    yield BUNDLE
    if str(BUNDLE) in sys.path:
        sys.path.remove(str(BUNDLE))
    _purge_scripts()


def _workflow(config: str, workflow_type: str, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / config), TINY],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module")
def trained(brain_demo, tmp_path_factory):
    """Run stage 1 (subprocess), stage 2 and stage 3 (in-process), two iterations each."""
    root = tmp_path_factory.mktemp("aldm")
    ckpt, runs = root / "models", root / "runs"
    common = {"dataset_dir": str(brain_demo.parent), "ckpt_dir": str(ckpt), "output_dir": str(runs)}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/train_autoencoder.json','configs/tiny.json']"]
    for k, v in common.items():
        cmd += [f"--{k}", v]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {"autoencoder": proc.stdout + proc.stderr}
    _purge_scripts()  # module-scoped: runs before the per-test ``bundle_path``
    sys.path.insert(0, str(BUNDLE))
    try:
        stages["spade"] = _workflow("train_spade.json", "train", **common)
        stages["diffusion"] = _workflow("train_diffusion.json", "train", **common)
    finally:
        if str(BUNDLE) in sys.path:
            sys.path.remove(str(BUNDLE))
        _purge_scripts()
    return {"root": root, "ckpt": ckpt, "common": common, "stages": stages, "demo": brain_demo}


def test_each_stage_writes_a_resumable_checkpoint(trained):
    keys = {
        "autoencoder": {"autoencoder", "image_discriminator", "optimizer_g", "optimizer_d", "trainer"},
        "spade": {"spade", "latent_discriminator", "optimizer_g", "optimizer_d", "trainer"},
        "diffusion": {"diffusion", "ema", "optimizer", "step", "trainer"},
    }
    for stage, expected in keys.items():
        ckpt = torch.load(trained["ckpt"] / f"{stage}.pt", map_location="cpu", weights_only=True)
        assert set(ckpt) == expected, stage
        assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["epoch_length"] == 2, stage
    # the in-process stages logged every loss term, all finite
    out = trained["stages"]["spade"].parser.get_parsed_content("train#trainer").state.output
    assert {"loss", "l1_latent", "adv_latent", "cycle", "loss_d"} <= set(out)
    assert all(np.isfinite(v) for v in out.values())
    # stages 2 and 3 validated after their epoch (spade_only / EMA + DDIM translation PSNR)
    for stage in ("spade", "diffusion"):
        metrics = trained["stages"][stage].parser.get_parsed_content("validate#evaluator").state.metrics
        assert np.isfinite(metrics["val_psnr"]) and metrics["val_psnr"] > 0, stage
    ema = torch.load(trained["ckpt"] / "diffusion.pt", map_location="cpu", weights_only=True)["ema"]
    assert int(ema["num_updates"]) == 2


def test_stage1_validates_and_keeps_its_best_checkpoint(trained):
    """Stage 1 reconstructs every modality of the validation subjects after its epoch (whole volumes, one
    autoencoder for all modalities) and keeps the best-PSNR weights as autoencoder_best.pt: after one epoch
    with one validation, those are the final weights."""
    import re

    psnr = [float(v) for v in re.findall(r"val_psnr: ([-0-9.eE+]+)", trained["stages"]["autoencoder"])]
    # one validation (ignite logs it twice: the new best, then the epoch's metrics)
    assert psnr and max(psnr) - min(psnr) < 1e-3 and np.isfinite(psnr[0]) and psnr[0] > 0
    best = torch.load(trained["ckpt"] / "autoencoder_best.pt", map_location="cpu", weights_only=True)
    final = torch.load(trained["ckpt"] / "autoencoder.pt", map_location="cpu", weights_only=True)["autoencoder"]
    assert best.keys() == final.keys()  # a plain state dict of the autoencoder
    assert all(torch.equal(best[k], final[k]) for k in final)
    # and stage 2 can start from it (--autoencoder_ckpt models/autoencoder_best.pt)
    sys.path.insert(0, str(BUNDLE))
    try:
        from scripts.networks import load_entry

        from common.networks.vqgan import VQGAN

        net = copy.deepcopy(trained["stages"]["spade"].parser.get_parsed_content("autoencoder"))
        for p in net.parameters():
            p.data.zero_()
        load_entry(net, str(trained["ckpt"] / "autoencoder_best.pt"), "autoencoder")
        assert all(torch.equal(v.cpu(), best[k]) for k, v in net.state_dict().items())
        with pytest.raises(Exception, match="autoencoder_best.pt"):
            load_entry(VQGAN.cldm("tiny"), str(trained["ckpt"] / "autoencoder_best.pt"), "autoencoder")
    finally:
        sys.path.remove(str(BUNDLE))
        _purge_scripts()


def test_stage2_loaded_the_stage1_autoencoder(trained):
    """The frozen autoencoder of stage 2 (and 3) equals the stage-1 checkpoint bit for bit."""
    stage1 = torch.load(trained["ckpt"] / "autoencoder.pt", map_location="cpu", weights_only=True)["autoencoder"]
    for stage in ("spade", "diffusion"):
        ae = trained["stages"][stage].parser.get_parsed_content("autoencoder").state_dict()
        assert all(torch.equal(stage1[k], v.cpu()) for k, v in ae.items()), stage
    spade2 = torch.load(trained["ckpt"] / "spade.pt", map_location="cpu", weights_only=True)["spade"]
    spade3 = trained["stages"]["diffusion"].parser.get_parsed_content("spade").state_dict()
    assert all(torch.equal(spade2[k], v.cpu()) for k, v in spade3.items())


def test_resume_continues_at_the_right_iteration(trained, tmp_path):
    ckpt = tmp_path / "models"
    shutil.copytree(trained["ckpt"], ckpt)
    wf = _workflow("train_diffusion.json", "train", **{**trained["common"], "ckpt_dir": str(ckpt)}, resume=True, max_epochs=2, val_interval=100)
    state = wf.parser.get_parsed_content("train#trainer").state
    assert state.epoch == 2 and state.iteration == 4
    saved = torch.load(ckpt / "diffusion.pt", map_location="cpu", weights_only=True)
    assert saved["trainer"]["iteration"] == 4 and int(saved["ema"]["num_updates"]) == 4


def _error_chain(fn) -> list[BaseException]:
    """The exception ``fn`` raises and its causes (MONAI wraps errors of config expressions)."""
    with pytest.raises(Exception) as err:
        fn()
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


_OPTIMIZER = {"autoencoder": "optimizer_g", "spade": "optimizer_g", "diffusion": "optimizer"}


@pytest.mark.parametrize(
    "stage, source", [("autoencoder", "autoencoder_best.pt"), ("spade", "spade.pt"), ("diffusion", "diffusion.pt")]
)
def test_finetune_starts_a_new_run_from_the_trained_model(stage, source, trained, tmp_path):
    """A ckpt_dir that holds this stage's checkpoints: a run without flags is refused, resume + finetune is
    refused, and finetune starts a new run (iteration 0, fresh optimiser) whose network, when the first
    iteration starts, holds the weights of finetune_ckpt (a training checkpoint's entry, or the plain state
    dict autoencoder_best.pt), not the fresh initialisation; stage 3's EMA restarts from them too."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from common.utils.errors import InvalidInputError, OutputExistsError
    from common.utils.io import CheckpointError

    ckpt = tmp_path / "models"
    shutil.copytree(trained["ckpt"], ckpt)
    kw = {**trained["common"], "ckpt_dir": str(ckpt), "output_dir": str(tmp_path / "runs")}
    config = f"train_{stage}.json"
    before = {p.name: p.read_bytes() for p in ckpt.glob("*.pt")}

    chain = _error_chain(lambda: _workflow(config, "train", **kw))
    assert any(isinstance(e, OutputExistsError) and "'finetune'" in str(e) and f"{stage}" in str(e) for e in chain)
    chain = _error_chain(lambda: _workflow(config, "train", **kw, resume=True, finetune=True))
    assert any(isinstance(e, InvalidInputError) and "'finetune'" in str(e) for e in chain)
    other = "spade.pt" if stage == "autoencoder" else "autoencoder.pt"  # another stage's model
    chain = _error_chain(lambda: _workflow(config, "train", **kw, finetune=True, finetune_ckpt=str(ckpt / other)))
    assert any(isinstance(e, CheckpointError) and other in str(e) and "'finetune_ckpt'" in str(e) for e in chain)
    assert {p.name: p.read_bytes() for p in ckpt.glob("*.pt")} == before  # nothing replaced

    trained_ckpt = torch.load(ckpt / source, map_location="cpu", weights_only=True)
    expected = trained_ckpt.get(stage, trained_ckpt)
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / config), TINY],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        **kw,
        finetune=True,
        finetune_ckpt=str(ckpt / source),
    )
    wf.initialize()
    net = wf.parser.get_parsed_content("network_def")
    fresh = _state(net)
    assert any(not torch.equal(fresh[k], expected[k].cpu()) for k in expected)  # the check below can fail
    seen = {}

    def _first_iteration(engine):
        seen["net"] = _state(net)
        if stage == "diffusion":
            ema = wf.parser.get_parsed_content("ema")
            seen["ema"], seen["ema_updates"] = _state(ema.module), int(ema.num_updates)

    wf.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_STARTED(once=1), _first_iteration)
    wf.run()
    wf.finalize()

    assert seen["net"].keys() == expected.keys()
    assert all(torch.equal(seen["net"][k], expected[k].cpu()) for k in expected)
    if stage == "diffusion":
        assert all(torch.equal(seen["ema"][k], expected[k].cpu()) for k in expected) and seen["ema_updates"] == 0
    saved = torch.load(ckpt / f"{stage}.pt", map_location="cpu", weights_only=True)
    assert saved["trainer"]["iteration"] == 2  # a new run of 2 iterations, not the earlier run resumed (4)
    # a fresh optimiser: no parameter has more than this run's 2 steps (a resumed one counts the earlier run's too)
    assert max(int(s["step"]) for s in saved[_OPTIMIZER[stage]]["state"].values()) <= 2
    assert any(not torch.equal(saved[stage][k], expected[k].cpu()) for k in expected)  # and it trained


def _test_case(demo: Path) -> dict:
    entry = json.loads(demo.read_text())["test"][0]
    return {k: str(demo.parent / v) for k, v in entry.items() if k != "id"}


def test_inference_writes_one_nifti_per_target_in_input_geometry(trained, tmp_path):
    case = _test_case(trained["demo"])
    kw = {"input_image": case["t1"], "source": "t1", "targets": ["t2", "pd"], "ckpt_dir": str(trained["ckpt"])}
    _workflow("inference.json", "infer", output_dir=str(tmp_path / "a"), **kw)
    src = nib.load(case["t1"])
    stem = Path(case["t1"]).name.split(".")[0]
    for tgt in ("t2", "pd"):
        out = nib.load(tmp_path / "a" / f"{stem}_t12{tgt}.nii.gz")
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
        data = out.get_fdata(dtype=np.float32)
        assert out.get_data_dtype() == np.float32 and data.min() >= 0.0 and data.max() <= 1.0 and data.max() > 0
    assert len(list((tmp_path / "a").glob("*.nii.gz"))) == 2
    # a fixed seed gives bit-identical outputs; existing outputs are refused without overwrite
    _workflow("inference.json", "infer", output_dir=str(tmp_path / "b"), **kw)
    for tgt in ("t2", "pd"):
        a = nib.load(tmp_path / "a" / f"{stem}_t12{tgt}.nii.gz").get_fdata()
        b = nib.load(tmp_path / "b" / f"{stem}_t12{tgt}.nii.gz").get_fdata()
        assert np.array_equal(a, b)
    with pytest.raises(Exception) as err:
        _workflow("inference.json", "infer", output_dir=str(tmp_path / "a"), **kw)
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(e, FileExistsError) and "already exists" in str(e) for e in chain)
    # spade_only: no diffusion checkpoint needed, a different (deterministic) output; one target
    # given as a plain string on the command line
    kw_c = {**kw, "targets": "t2"}
    _workflow("inference.json", "infer", output_dir=str(tmp_path / "c"), mode="spade_only", diffusion_ckpt="missing.pt", **kw_c)
    assert [p.name for p in (tmp_path / "c").glob("*.nii.gz")] == [f"{stem}_t12t2.nii.gz"]
    c = nib.load(tmp_path / "c" / f"{stem}_t12t2.nii.gz")
    np.testing.assert_allclose(c.affine, src.affine, atol=1e-6)
    assert not np.array_equal(c.get_fdata(), nib.load(tmp_path / "a" / f"{stem}_t12t2.nii.gz").get_fdata())


def test_evaluate_writes_metrics_for_every_direction(trained, tmp_path):
    out = tmp_path / "metrics"
    wf = _workflow("evaluate.json", "infer", dataset_dir=str(trained["demo"].parent), ckpt_dir=str(trained["ckpt"]),
                   output_dir=str(out))
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    directions = {(r["source"], r["target"]) for r in rows}
    assert len(rows) == 6 and len(directions) == 6 and all(s != t for s, t in directions)
    assert {r["id"] for r in rows} == {"avg152"}
    for r in rows:
        for m in ("psnr", "nmse", "ssim", "psnr_mask", "nmse_mask", "ssim_mask"):
            assert np.isfinite(float(r[m])), m
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {f"{s}2{t}" for s, t in directions} | {"all"}
    assert summary["all"]["psnr"]["n"] == 6
    # ALDM's table (2 header lines, 6 directions and "all"), then the baseline's (text, header, the same 7 rows)
    assert (out / "summary.csv").is_file() and (out / "directions.md").read_text().count("\n") == 2 + 7 + 5 + 7
    assert len(list((out / "montage").glob("avg152_*2*.png"))) == 6
    # beside every row, the in-run baseline: the source histogram-matched to the target on the same model grid,
    # inside the same mask, scored by the same function (recomputed here from the evaluation's own dataset)
    from scripts.evaluate import translation_scores

    from common.transforms.intensity import histogram_matched

    dataset = wf.parser.get_parsed_content("dataset")
    assert len(dataset) == 6
    for i in range(len(dataset)):
        d = dataset[i]
        x, y, mask = (d[k][0].numpy() for k in ("image", "target", "mask"))
        row = next(r for r in rows if (r["source"], r["target"]) == (d["source"], d["targets"][0]))
        expected = translation_scores(histogram_matched(x, y, mask > 0), y, mask > 0)
        for m, v in expected.items():
            assert float(row[f"histmatch_{m}"]) == pytest.approx(v, rel=1e-5), (row["source"], row["target"], m)
        # the baseline keeps the source's anatomy (a monotone map of its intensities) with the target's intensity
        # distribution inside the mask, and nothing outside
        matched = histogram_matched(x, y, mask > 0)
        inside = mask > 0
        assert np.all(np.diff(matched[inside][np.argsort(x[inside], kind="stable")]) >= -1e-6)
        assert abs(matched[inside].mean() - y[inside].mean()) < 0.01 and not matched[~inside].any()


def test_evaluation_refuses_test_subjects_seen_in_training(tmp_path, bundle_path):
    from scripts.evaluate import direction_datalist

    dl = {"training": [{"id": "a", "t1": "a/t1.nii.gz", "t2": "a/t2.nii.gz"}], "test": [{"id": "a", "t1": "a/t1.nii.gz", "t2": "a/t2.nii.gz"}]}
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    with pytest.raises(ValueError, match="also used"):
        direction_datalist(str(tmp_path / "dl.json"), ["t1", "t2"], str(tmp_path))
    dl["training"][0]["id"] = "b"
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    items = direction_datalist(str(tmp_path / "dl.json"), ["t1", "t2", "flair"], str(tmp_path))
    assert [(i["source"], i["targets"]) for i in items] == [("t1", ["t2"]), ("t2", ["t1"])]


@pytest.mark.parametrize("overlay", [None, "tiny.json", "light.json"])
def test_every_config_parses(overlay, bundle_path):
    from monai.bundle import ConfigParser

    for cfg in ("train_autoencoder.json", "train_spade.json", "train_diffusion.json", "inference.json", "evaluate.json"):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / cfg)] + ([str(CONFIGS / overlay)] if overlay else []))
        parser["bundle_root"] = str(BUNDLE)
        assert parser.get_parsed_content("modalities")
        if cfg.startswith("train"):
            assert parser.get_parsed_content("max_epochs") >= 1 and "checkpoint_saver" in parser.config
            # the run policy's keys (CONTRIBUTING.md), and the resume check asks for every entry the saver writes
            keys = ("resume", "resume_ckpt", "resume_ckpt_sha256", "finetune", "finetune_ckpt", "finetune_ckpt_sha256", "overwrite")
            assert all(k in parser.config for k in keys) and "finetune_loader" in parser.config
            assert repr(list(parser.config["checkpoint_saver"]["save_dict"])) in " ".join(parser.config["run"])
    # the sampler of inference/evaluation: official DDIM discretisation (996, 991, ..., 1; alpha_bar_0 last)
    from common.inferers import set_sampling_timesteps

    for cfg in ("inference.json", "evaluate.json"):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / cfg)] + ([str(CONFIGS / overlay)] if overlay else []))
        sched = parser.get_parsed_content("noise_scheduler")
        assert sched.steps_offset == 1 and sched.clip_sample is False
        assert float(sched.final_alpha_cumprod) == float(sched.alphas_cumprod[0])
        ts = set_sampling_timesteps(sched, 200)
        assert int(ts[-1]) == 1 and torch.all(ts[:-1] - ts[1:] == 5)
        assert parser.get_parsed_content("sampler").eta == 1.0
        parser["sampler_type"] = "ddpm"
        assert type(parser.get_parsed_content("noise_scheduler", lazy=False)).__name__ == "DDPMScheduler"
    multi = ConfigParser()
    multi.read_config([str(CONFIGS / "train_spade.json"), str(CONFIGS / "multi_gpu_train.json")])
    assert multi["train"]["dataloader"]["shuffle"] is False


def test_translation_inferer_modes(bundle_path):
    """One encode, one output channel per target, [0, 1]; spade_only equals the exported network."""
    from monai.networks.schedulers import DDIMScheduler
    from scripts.inferer import ALDMTranslationInferer
    from scripts.networks import ALDMFirstStage

    from common.engines.ema import EMA
    from common.inferers import LatentDiffusionSampler
    from common.networks.aldm_ldm import aldm_diffusion_unet
    from common.networks.spade import MSSPADEGenerator
    from common.networks.vqgan import VQGAN

    torch.manual_seed(0)
    mods = ["t1", "t2", "pd"]
    net = ALDMFirstStage(VQGAN.aldm("tiny"), MSSPADEGenerator(mods, nf=8, hidden_channels=8), default_target="t2").eval()
    sched = DDIMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sampler = LatentDiffusionSampler(sched, num_inference_steps=2, latent_channels=3, progress=False)
    unet = EMA(aldm_diffusion_unet(len(mods), scale="tiny"))
    x = torch.rand(2, 1, 32, 32, 32)
    spade_only = ALDMTranslationInferer(None, None, mods, mode="spade_only")
    out = spade_only(x, net, targets=["t2", "pd"])
    assert out.shape == (2, 2, 32, 32, 32) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[:, :1], net(x).clamp(0, 1))
    diff = ALDMTranslationInferer(sampler, unet, mods, mode="diffusion", requantize=True, seed=1)
    a = diff(x, net, targets=[("t2", "pd"), ("pd", "t2")])  # collated per-sample targets
    assert a.shape == (2, 2, 32, 32, 32)
    torch.testing.assert_close(a[1, 0], diff(x[1:], net, targets=["pd"])[0, 0])
    diff.load_state_dict({"scale_factor": torch.tensor(0.5)})
    assert diff.scale_factor == 0.5
    with pytest.raises(ValueError):
        ALDMTranslationInferer(None, None, mods, mode="diffusion")


def test_test_preprocessing_is_deterministic(brain_demo, bundle_path):
    """The evaluation crop (foreground of the source, centre pad/crop) is the same twice."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "evaluate.json"), TINY])
    parser["bundle_root"] = str(BUNDLE)
    parser["dataset_dir"] = str(brain_demo.parent)
    ds = parser.get_parsed_content("dataset")
    a, b = ds[0], ds[0]
    assert a["image"].shape == (1, 32, 32, 32) and torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    ops = [d["image"].applied_operations for d in (a, b)]
    assert len(ops[0]) == len(ops[1]) >= 3
    for op_a, op_b in zip(*ops):
        assert op_a["class"] == op_b["class"]
        assert repr(op_a.get("extra_info")) == repr(op_b.get("extra_info"))
    assert float(a["image"].min()) >= 0.0 and float(a["image"].max()) <= 1.0


def test_inference_resamples_real_inputs_to_the_model_spacing_and_back(trained, tmp_path, caplog):
    """A clinical-like series (the real avg152 T1 resampled to 0.86 x 0.86 x 7 mm) reaches the network at the
    model's spacing (``pixdim``; 2 mm for the tiny model of the 2 mm demo cohort), the translations are written
    back on the series' own grid, and the tissue the centre crop to the model grid drops is logged."""
    import logging

    from monai.bundle import ConfigParser
    from scipy import ndimage

    case = _test_case(trained["demo"])
    src = nib.load(case["t1"])
    zoom = np.array(src.header.get_zooms()[:3]) / np.array([0.86, 0.86, 7.0])
    data = ndimage.zoom(src.get_fdata(dtype=np.float32), zoom, order=1)
    affine = src.affine.copy()
    affine[:3, :3] = src.affine[:3, :3] @ np.diag(1.0 / zoom)
    clinical = tmp_path / "t1_7mm.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(clinical))

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), TINY])
    parser["bundle_root"] = str(BUNDLE)
    sys.path.insert(0, str(BUNDLE))
    try:
        with caplog.at_level(logging.WARNING):
            item = parser.get_parsed_content("preprocessing")({"image": str(clinical)})
    finally:
        sys.path.remove(str(BUNDLE))
        _purge_scripts()
    spacing = np.linalg.norm(np.asarray(item["image"].affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, parser.get_parsed_content("pixdim"), atol=1e-4)
    assert any("t1_7mm.nii.gz" in r.getMessage() and "drops" in r.getMessage() and "tissue voxels" in r.getMessage()
               for r in caplog.records)

    _workflow("inference.json", "infer", output_dir=str(tmp_path / "out"), input_image=str(clinical), source="t1",
              targets="t2", mode="spade_only", diffusion_ckpt="missing.pt", ckpt_dir=str(trained["ckpt"]))
    out = nib.load(tmp_path / "out" / "t1_7mm_t12t2.nii.gz")
    assert out.shape == data.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert float(out.get_fdata().max()) > 0


def test_crop_report_counts_the_dropped_tissue(caplog):
    """ReportCroppedTissued: the count and share of tissue outside MONAI's centre crop, nothing for a fit."""
    import logging

    from monai.transforms import ResizeWithPadOrCrop

    from common.transforms.validation import ReportCroppedTissued

    x = torch.zeros(1, 40, 20, 10)
    x[0, 2:38, 5:15, 2:8] = 1.0  # 36 x 10 x 6 = 2,160 tissue voxels
    kept = int((ResizeWithPadOrCrop([32, 32, 32])(x) > 0).sum())
    with caplog.at_level(logging.WARNING):
        ReportCroppedTissued("image", [32, 32, 32])({"image": x})
        ReportCroppedTissued("image", [40, 32, 32])({"image": x})
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert f"drops {2160 - kept} of 2160 tissue voxels" in messages[0] and "axes [0]" in messages[0]
