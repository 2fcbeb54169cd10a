"""The noddi_sr demo driver (``benchmarks/noddi_sr_demo.py``) on the tiny overlay over ``demo.json``.

``train`` (three stages), ``baseline`` (B2) and ``evaluate`` run on a tiny phantom cohort with budgets of seconds:
every stage stops at the first epoch end after its share of the budget, the weights land where the inference
configs read them, B2 keeps its best validation, and the evaluation runs the bundle's own ``evaluate.json`` at each
requested DDIM step count and scores B2 with the same metric function, on every held-out phantom.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.noddi_phantom import PhantomConfig, build_phantom_cohort

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "noddi_sr"
TINY_PHANTOM = PhantomConfig(hr_spacing=5.0, hr_shape=(32, 32, 32), scheme="dipy_small_101D")
STAGES = ("vqgan", "cond_encoder", "diffusion")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("noddi_demo")
    data = root / "data"
    build_phantom_cohort(data, n_train=2, n_val=1, n_test=1, seed=0, cfg=TINY_PHANTOM)
    run = root / "run"
    common = ["--data", str(data), "--overlay", "tiny.json"]
    sys.path.insert(0, str(BUNDLE))
    try:
        sys.modules.pop("benchmarks.noddi_sr_demo", None)
        from benchmarks import noddi_sr_demo as D

        # max_epochs far beyond the budget: only the budget can stop the stages (tiny.json: 2-iteration epochs);
        # 10 ms per stage, which every first epoch outlasts (a tiny epoch can take less than a second)
        D.main(["train", *common, "--out", str(run), "--budget-s", "0.03", "--shares", "1,1,1", "--set", "max_epochs=50"])
        D.main(["baseline", *common, "--out", str(run), "--budget-s", "1", "--val-every", "1"])
        D.main(["evaluate", *common, "--out", str(root / "eval"), "--models", str(run / "models"), "--unet",
                str(run / "unet_b2.pt"), "--curves", str(run), "--steps", "2", "1", "--no_amico"])
    finally:  # the next test's conftest purge forgets this bundle's ``scripts`` as well
        while str(BUNDLE) in sys.path:
            sys.path.remove(str(BUNDLE))
    results = json.loads((root / "eval" / "results.json").read_text())
    return {"root": root, "run": run, "data": data, "results": results}


def test_train_stops_every_stage_at_its_budget(demo_run):
    run = demo_run["run"]
    for stage in STAGES:
        curve = json.loads((run / f"curves_{stage}.json").read_text())
        # the first epoch end after the budget: one 2-iteration epoch, not the 50 epochs of max_epochs
        assert curve["iterations"] == 2, stage
        assert curve["val_psnr"] and all(np.isfinite(curve["val_psnr"])), stage
    # the files the inference configs read from ckpt_dir
    assert {"vqgan.pt", "encoder.pt", "diffusion.pt"} <= {p.name for p in (run / "models").glob("*.pt")}


def test_baseline_saves_b2_at_a_validated_iteration(demo_run):
    """B2 on the overlay's features (the loop itself: tests/common/test_demo_training.py)."""
    run = demo_run["run"]
    curve = json.loads((run / "curves_b2.json").read_text())
    assert all(np.isfinite(curve["val_psnr"])) and curve["val_iteration"][-1] == curve["iterations"]
    ck = torch.load(run / "unet_b2.pt", map_location="cpu", weights_only=True)
    assert ck["n_feat"] == 4  # tiny.json: two shells, 4 features
    assert curve["val_psnr"][curve["val_iteration"].index(ck["iteration"])] == curve["best_val_psnr"]


def test_evaluate_runs_each_step_count_and_scores_b2_with_the_same_function(demo_run):
    res = demo_run["results"]
    assert sorted(int(s) for s in res["ddim"]) == [1, 2]
    for steps, d in res["ddim"].items():
        assert d["wall_s"] > 0
        assert (demo_run["root"] / "eval" / f"ddim{steps}" / "summary.json").is_file()
        maps = {r["map"] for r in d["summary"] if r["mask"] == "brain"}
        assert {"NDI", "ODI", "FWF"} <= maps, steps
    test_ids = [e["id"] for e in json.loads((demo_run["data"] / "datalist.json").read_text())["test"]]
    b2 = [r for r in res["rows"] if r["method"] == "b2_unet"]
    assert sorted({r["case"] for r in b2}) == sorted(test_ids)
    assert {r["map"] for r in b2} >= {"NDI", "ODI", "FWF", "all"} and all(np.isfinite(r["psnr"]) for r in b2)
    # the same metric rows as the bundle's evaluation writes (method, map, mask, psnr/ssim/mae)
    summary_keys = set(res["ddim"]["2"]["summary"][0])
    assert {"map", "mask", "psnr_mean", "ssim_mean"} <= summary_keys
    assert {r["method"] for r in res["baselines"]} == {"b2_unet"}
    assert "| ours, DDIM 2 |" in (demo_run["root"] / "eval" / "results.md").read_text()
    assert (demo_run["root"] / "eval" / "learning_curves.png").stat().st_size > 1000
