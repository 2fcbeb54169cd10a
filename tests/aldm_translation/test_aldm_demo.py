"""The demo overlay (configs/demo.json) and its driver (benchmarks/aldm_translation_demo.py).

- The overlay composes with every stage config and with inference.json / evaluate.json: the networks build at the
  demo width on the demo grid, the per-stage keys resolve, and the shipped weights are sha256-checked exactly
  when they are read from ``models/demo``.
- The driver's ``train`` / ``baseline`` / ``export`` / ``evaluate`` run on the tiny overlay stacked over the demo
  overlay, on the small demo cohort of the suite, with budgets of seconds: every stage stops at the first epoch
  end after its share, the exported files are where (and what) the inference configs load, and the evaluation
  covers the six directions of both sets with finite metrics, the baselines scored by the evaluation's own
  function.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "aldm_translation"
CONFIGS = BUNDLE / "configs"
CONFIG_FILES = ("train_autoencoder.json", "train_spade.json", "train_diffusion.json", "inference.json", "evaluate.json")
DIRECTIONS = {"t12t2", "t12pd", "t22t1", "t22pd", "pd2t1", "pd2t2"}


@pytest.fixture(autouse=True)
def bundle_path(monkeypatch):
    """The bundle's ``scripts`` package importable (the suite's conftest forgets every bundle's ``scripts``, and
    takes bundle roots off ``sys.path``, around each test)."""
    monkeypatch.syspath_prepend(str(BUNDLE))
    return BUNDLE


def _parser(config: str, *overlays: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / config)] + [str(CONFIGS / o) for o in overlays])
    parser["bundle_root"] = str(BUNDLE)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _driver():
    sys.modules.pop("benchmarks.aldm_translation_demo", None)
    from benchmarks import aldm_translation_demo

    return aldm_translation_demo


# ----------------------------------------------------------------------------------------------- the overlay
@pytest.mark.parametrize("config", CONFIG_FILES)
def test_demo_overlay_composes_with_every_config(config):
    """Every config with demo.json: T1/T2/PD at 2 mm on a 96 x 112 x 96 grid (divisible by 16: f = 4 and two UNet
    downsamplings), the demo networks built (VQ-GAN f = 4 with its codebook, MS-SPADE, the conditional latent UNet
    with EMA), checkpoints in models/demo."""
    p = _parser(config, "demo.json")
    assert p.get_parsed_content("modalities") == ["t1", "t2", "pd"]
    assert p.get_parsed_content("pixdim") == [2.0, 2.0, 2.0]
    roi = p.get_parsed_content("roi_size")
    assert all(s % 16 == 0 for s in roi) and all(s >= n for s, n in zip(roi, (91, 109, 91)))  # a whole 2 mm MNI volume
    assert Path(p.get_parsed_content("ckpt_dir")) == BUNDLE / "models" / "demo"
    demo = json.loads((CONFIGS / "demo.json").read_text())
    if config == "train_autoencoder.json":
        ae = p.get_parsed_content("network_def")
        crop = p.get_parsed_content("ae_train_roi_size")
        assert all(c % 4 == 0 and c <= r for c, r in zip(crop, roi))
    else:
        ae = p.get_parsed_content("autoencoder_def")
    assert ae.encoder.conv_in.conv.out_channels == demo["scale"]["channels"]
    assert ae.downsample_factor == 4 and ae.quantizer.num_embeddings == demo["scale"]["num_embeddings"]
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert ae.encode_quantized(x).shape == (1, 3, 8, 8, 8) and ae(x)[0].shape == x.shape
    if config.startswith("train_"):
        stage = config[len("train_"):-len(".json")]
        assert p.get_parsed_content("batch_size") == demo["batch_size"]
        assert p.config["train"]["dataloader"]["batch_size"] == "@batch_size"  # the training loader's batch
        assert p.get_parsed_content("max_epochs") >= 1 and p.get_parsed_content("val_interval") >= 1
        assert p.get_parsed_content("checkpoint_saver#final_filename") == f"{stage}.pt"
    if config in ("train_spade.json", "train_diffusion.json", "inference.json", "evaluate.json"):
        spade = p.get_parsed_content("network_def" if config == "train_spade.json" else "spade_def")
        assert spade.modalities == ["t1", "t2", "pd"]
        z = torch.rand(1, 3, 24, 28, 24)
        with torch.no_grad():
            assert spade(z, "pd").shape == z.shape
    if config in ("train_diffusion.json", "inference.json", "evaluate.json"):
        unet = p.get_parsed_content("network_def" if config == "train_diffusion.json" else "diffusion_def")
        assert list(unet.block_out_channels) == demo["ldm_scale"]["channels"]
        latent = [s // 4 for s in roi]
        x = torch.rand(1, 9, *latent)
        with torch.no_grad():
            eps = unet(x, torch.tensor([10]), context=torch.eye(3)[None, :1])
        assert eps.shape == (1, 3, *latent)
        if config == "train_diffusion.json":
            assert p.get_parsed_content("train#step").scale_factor is None  # "auto": estimated on the first batch
            assert p.get_parsed_content("ema").module is not None
        else:
            inferer = p.get_parsed_content("inferer")
            assert math.isnan(inferer.scale_factor)  # "auto": the diffusion checkpoint's value
            inferer.load_state_dict({"scale_factor": torch.tensor(0.5)})
            assert inferer.scale_factor == 0.5
            assert p.get_parsed_content("num_inference_steps") == 200  # the overlay keeps the sampler's default


def test_the_overlay_keeps_the_default_configs_meaning():
    """demo.json only changes what it names: without it every config keeps the paper scale and its own paths."""
    for config in CONFIG_FILES:
        p = _parser(config)
        assert p.get_parsed_content("scale") == "paper" and p.get_parsed_content("modalities") == ["t1", "t1ce", "t2", "flair"]
        assert Path(p.get_parsed_content("ckpt_dir")) == BUNDLE / "models"
        if config.startswith("train_"):
            assert p.get_parsed_content("batch_size") == 1


@pytest.mark.parametrize("config", ["train_spade.json", "train_diffusion.json", "inference.json", "evaluate.json"])
def test_demo_sha256_is_checked_exactly_when_loading_from_the_demo_folder(config, tmp_path):
    digests = {"autoencoder.pt": "a" * 64, "spade.pt": "b" * 64, "diffusion.pt": "c" * 64}
    keys = {"autoencoder": "autoencoder.pt", "spade": "spade.pt", "diffusion": "diffusion.pt"}
    present = [k for k in keys if f"{k}_ckpt" in _parser(config, "demo.json").config]
    p = _parser(config, "demo.json", demo_sha256=digests)
    for k in present:  # the default: the shipped files in models/demo, checked
        assert p.get_parsed_content(f"{k}_sha256") == digests[keys[k]], k
    p = _parser(config, "demo.json", demo_sha256=digests, ckpt_dir=str(tmp_path))
    for k in present:  # weights of another folder (a retraining, the driver's run): not the shipped files
        assert p.get_parsed_content(f"{k}_sha256") is None, k
    p = _parser(config, "demo.json", demo_sha256=digests, ckpt_dir=str(tmp_path),
                autoencoder_ckpt=str(BUNDLE / "models" / "demo" / "autoencoder.pt"))
    assert p.get_parsed_content("autoencoder_sha256") == digests["autoencoder.pt"]  # the shipped file by another path


def test_a_demo_file_that_differs_from_its_digest_is_refused(tmp_path):
    """Through the overlay's keys: the digest of demo_sha256 is what load_entry / the loaders check."""
    from common.data.fetch import HashMismatchError, sha256sum
    from scripts.networks import load_entry

    p = _parser("train_spade.json", "demo.json", "tiny.json", demo_ckpt_dir=str(tmp_path))
    ae = p.get_parsed_content("autoencoder")
    torch.save(ae.state_dict(), tmp_path / "autoencoder.pt")
    good = sha256sum(tmp_path / "autoencoder.pt")
    for digest, ok in ((good, True), ("0" * 64, False)):
        p = _parser("train_spade.json", "demo.json", "tiny.json", demo_ckpt_dir=str(tmp_path),
                    demo_sha256={"autoencoder.pt": digest})
        assert p.get_parsed_content("autoencoder_sha256") == digest
        args = (p.get_parsed_content("autoencoder"), p.get_parsed_content("autoencoder_ckpt"), "autoencoder")
        if ok:
            load_entry(*args, sha256=p.get_parsed_content("autoencoder_sha256"))
        else:
            with pytest.raises(HashMismatchError):
                load_entry(*args, sha256=p.get_parsed_content("autoencoder_sha256"))


def test_shipped_demo_files_match_their_digests():
    """Every file named in demo_sha256 is in models/demo with that digest, and models/demo holds no weights the
    overlay does not pin (none are shipped until a demo model meets its bars)."""
    from common.data.fetch import sha256sum

    digests = json.loads((CONFIGS / "demo.json").read_text())["demo_sha256"]
    shipped = {p.name for p in (BUNDLE / "models" / "demo").glob("*.pt")} if (BUNDLE / "models" / "demo").is_dir() else set()
    assert shipped == set(digests)
    for name, digest in digests.items():
        path = BUNDLE / "models" / "demo" / name
        assert path.is_file() and sha256sum(path) == digest, name
        assert path.stat().st_size < 25 * 2**20, name
        torch.load(path, map_location="cpu", weights_only=True)


def test_stage_budgets_share_what_the_earlier_stages_left():
    D = _driver()
    shares = {"autoencoder": 40.0, "spade": 15.0, "diffusion": 45.0}
    assert D.stage_budgets(100.0, shares, {}, "autoencoder") == pytest.approx(40.0)
    # stage 1 overran by 10 s: the two others share the 50 s left in proportion 15 : 45
    assert D.stage_budgets(100.0, shares, {"autoencoder": 50.0}, "spade") == pytest.approx(12.5)
    assert D.stage_budgets(100.0, shares, {"autoencoder": 50.0, "spade": 10.0}, "diffusion") == pytest.approx(40.0)
    assert D.stage_budgets(100.0, shares, {"autoencoder": 120.0}, "spade") == 0.0


# ------------------------------------------------------------------------------------------------ the driver
@pytest.fixture(scope="module")
def demo_run(brain_demo, tmp_path_factory):
    """train (three stages), baseline, export and evaluate of the driver, tiny overlay over demo.json."""
    root = tmp_path_factory.mktemp("aldm_demo")
    run, dest, data = root / "run", root / "shipped", str(brain_demo.parent)
    common = ["--data", data, "--overlay", "tiny.json"]
    sys.path.insert(0, str(BUNDLE))
    try:
        D = _driver()
        # max_epochs far beyond the budget: only the budget can stop the stages (tiny.json: 2-iteration epochs);
        # 10 ms per stage, which every first epoch outlasts (with 1 s per stage the noddi twin of this test once ran
        # a fast stage for 3 epochs)
        D.main(["train", *common, "--out", str(run), "--budget-s", "0.03", "--shares", "1,1,1", "--set", "max_epochs=50"])
        D.main(["baseline", *common, "--out", str(run), "--budget-s", "1", "--val-every", "1"])
        D.main(["export", "--run", str(run), "--dest", str(dest)])
        from scripts import evaluate as bundle_evaluate

        calls = []
        scores = bundle_evaluate.translation_scores

        def spy(pred, target, mask):
            calls.append(np.asarray(pred).shape)
            return scores(pred, target, mask)

        bundle_evaluate.translation_scores = spy
        try:
            D.main(["evaluate", *common, "--out", str(root / "eval"), "--models", str(dest), "--unet", str(run / "unet.pt"),
                    "--curves", str(run), "--steps", "2", "1", "--in-domain-steps", "2", "--framing-steps", "1", "--no-spade-only",
                    "--no-montage"])
        finally:
            bundle_evaluate.translation_scores = scores
        D.main(["diagnose", *common, "--out", str(root / "diagnose"), "--models", str(dest), "--case", "test:0",
                "--directions", "t12t2", "t22pd", "--t", "0", "999", "--start", "1", "--steps", "2"])
    finally:  # the next test's conftest purge forgets this bundle's ``scripts`` as well
        while str(BUNDLE) in sys.path:
            sys.path.remove(str(BUNDLE))
    results = json.loads((root / "eval" / "results.json").read_text())
    return {"root": root, "run": run, "dest": dest, "results": results, "calls": calls, "demo": brain_demo}


def test_train_stops_every_stage_at_its_budget(demo_run):
    run = demo_run["run"]
    summary = json.loads((run / "train_summary.json").read_text())
    for stage in ("autoencoder", "spade", "diffusion"):
        curve = json.loads((run / f"curves_{stage}.json").read_text())
        s = summary["stages"][stage]
        # the first epoch end after the budget: one 2-iteration epoch here, not the 50 epochs of max_epochs
        assert curve["iterations"] == s["iterations"] == 2, stage
        assert s["budget_s"] <= 0.03 and curve["val_psnr"] and all(np.isfinite(curve["val_psnr"])), stage
        ckpt = torch.load(run / "models" / f"{stage}.pt", map_location="cpu", weights_only=True)
        assert ckpt["trainer"]["iteration"] == 2, stage  # the final checkpoint is the budget-stopped model
    assert summary["autoencoder_used"] == "autoencoder_best.pt"
    # stage 2 was trained on the best stage-1 weights, which export ships
    best = torch.load(run / "models" / "autoencoder_best.pt", map_location="cpu", weights_only=True)
    shipped = torch.load(demo_run["dest"] / "autoencoder.pt", map_location="cpu", weights_only=True)
    assert best.keys() == shipped.keys() and all(torch.equal(best[k], shipped[k]) for k in best)


def test_baseline_trains_the_unet_for_its_budget_and_keeps_the_best(demo_run):
    run = demo_run["run"]
    curve = json.loads((run / "curves_unet.json").read_text())
    assert curve["iterations"] >= 1 and curve["val_psnr"] and np.isfinite(curve["best_val_psnr"])
    assert curve["best_val_psnr"] == max(curve["val_psnr"])
    ck = torch.load(run / "unet.pt", map_location="cpu", weights_only=True)
    assert ck["modalities"] == ["t1", "t2", "pd"] and ck["iteration"] in curve["val_iteration"]


def test_exported_weights_are_what_the_inference_configs_load(demo_run):
    """Plain state dicts (weights_only) with the names of the overlay's *_ckpt keys; inference.json + demo.json +
    tiny.json loads them from the export folder (ckpt_dir) and translates."""
    from monai.bundle import ConfigWorkflow

    dest = demo_run["dest"]
    assert {p.name for p in dest.glob("*.pt")} == {"autoencoder.pt", "spade.pt", "diffusion.pt"}
    for name in ("autoencoder.pt", "spade.pt", "diffusion.pt"):  # what the demo variant of a package requires
        state = torch.load(dest / name, map_location="cpu", weights_only=True)
        assert state and all(torch.is_tensor(v) for v in state.values()), name
    diffusion = torch.load(dest / "diffusion.pt", map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in diffusion} == {"ema", "step"} and np.isfinite(float(diffusion["step.scale_factor"]))
    trained = torch.load(demo_run["run"] / "models" / "diffusion.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(trained["ema"][k], diffusion[f"ema.{k}"]) for k in trained["ema"])
    p = _parser("inference.json", "demo.json", "tiny.json", ckpt_dir=str(dest))
    for k in ("autoencoder", "spade", "diffusion"):
        assert Path(p.get_parsed_content(f"{k}_ckpt")) == dest / f"{k}.pt"
        assert p.get_parsed_content(f"{k}_sha256") is None  # not the shipped folder

    avg152 = json.loads(demo_run["demo"].read_text())["test"][0]
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ("inference.json", "demo.json", "tiny.json")],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="infer", bundle_root=str(BUNDLE), ckpt_dir=str(dest), output_dir=str(demo_run["root"] / "infer"),
        input_image=str(demo_run["demo"].parent / avg152["t1"]), num_inference_steps=2, progress=False,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    inferer = wf.parser.get_parsed_content("inferer")
    assert inferer.scale_factor == pytest.approx(float(diffusion["step.scale_factor"]))
    ema = wf.parser.get_parsed_content("diffusion_model")
    assert all(torch.equal(v, diffusion[f"ema.{k}"]) for k, v in ema.state_dict().items())
    assert len(list((demo_run["root"] / "infer").glob("*_t12*.nii.gz"))) == 2


def test_evaluate_covers_six_directions_and_scores_baselines_with_the_same_function(demo_run):
    res = demo_run["results"]
    for name, runs in (("in_domain", {"ddim2"}), ("avg152", {"ddim2", "ddim1"})):
        split = res["splits"][name]
        assert set(split["aldm"]) == runs and set(split["baselines"]) == {"histmatch", "unet"}
        for method in [*split["aldm"].values(), *split["baselines"].values()]:
            assert set(method["per_direction"]) == DIRECTIONS
            assert all(np.isfinite(v) for row in method["per_direction"].values() for v in row.values())
            assert all(np.isfinite(v) for v in method["mean"].values())
        for r in split["aldm"].values():
            assert r["n"] == (12 if name == "in_domain" else 6) and r["seconds_per_volume"] > 0
    # avg152 re-framed: the three cases, each against the baselines on the same framing
    framed = res["splits"]["framings"]
    cases = {"avg152", "avg152_fov150", "avg152_slab40"}
    assert set(framed["aldm"]) == {"ddim1"} and framed["aldm"]["ddim1"]["n"] == 3 * 6
    for method in [framed["aldm"]["ddim1"], *framed["baselines"].values()]:
        assert set(method["per_case"]) == cases
        assert all(np.isfinite(v) for row in method["per_case"].values() for v in row.values())
    # the as-given case scores as on the avg152 set (same files, same steps would give the same numbers; here
    # the histogram baseline, which has no sampling noise, is compared)
    assert framed["baselines"]["histmatch"]["per_case"]["avg152"]["psnr_mask"] == pytest.approx(
        res["splits"]["avg152"]["baselines"]["histmatch"]["mean"]["psnr_mask"], abs=1e-6)
    # every number (ALDM rows and their histogram-matching columns written by the evaluation, baselines by the
    # driver) came from translation_scores: 12 in-domain items (2 subjects) + 2 x 6 on avg152 + 3 x 6 re-framed,
    # twice each in the evaluation, and the driver's 2 baselines on each of the 12 + 6 + 18 items
    assert len(demo_run["calls"]) == 2 * (12 + 2 * 6 + 18) + 2 * (12 + 6 + 18)
    assert set(res["bars"]) == {"in_domain", "avg152", *cases}
    assert res["bars"]["avg152"]["psnr_mask"]["run"] == "ddim2"
    assert set(res["curves"]) == {"autoencoder", "spade", "diffusion", "unet"}
    out = demo_run["root"] / "eval"
    assert (out / "learning_curves.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "DDIM steps on avg152" in md and "| ddim1 |" in md and "baseline unet" in md and "avg152 re-framed" in md


def test_diagnose_separates_the_stages_of_a_trained_model(demo_run):
    """diagnose on avg152: per direction the VQ-GAN ceiling, SPADE only, the one-step estimate from the true
    noised target and the samplers. Whatever the weights, the estimate at t = 0 (noise std 0.04) stays next to the
    reconstruction it is computed from, nearer than the one at t = 999 (its error amplified 15x), and a DDIM start
    at t = 1 from the noised SPADE latent stays next to SPADE only."""
    res = json.loads((demo_run["root"] / "diagnose" / "diagnosis.json").read_text())
    assert res["case"] == "avg152" and set(res["psnr"]) == {"t12t2", "t22pd", "mean"}
    for d in ("t12t2", "t22pd"):
        row = res["psnr"][d]
        assert set(row) == {"reconstruction", "spade_only", "x0_t0", "x0_t999", "ddim2_eta0", "ddim2_eta1", "start1"}
        assert all(np.isfinite(v) for v in row.values())
        assert abs(row["x0_t0"] - row["reconstruction"]) < min(0.1, abs(row["x0_t999"] - row["reconstruction"])), row
        assert abs(row["start1"] - row["spade_only"]) < 0.5, row
    assert res["psnr"]["mean"]["spade_only"] == pytest.approx(np.mean([res["psnr"][d]["spade_only"] for d in ("t12t2", "t22pd")]))
    assert "| t12t2 |" in (demo_run["root"] / "diagnose" / "diagnosis.md").read_text()
