"""The demo command reruns into its own folders and never deletes anything it did not make."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ci"))

from run_demo import WORK_MARKER, fresh_work_dir  # noqa: E402


def test_previous_demo_folder_is_rebuilt(tmp_path):
    work = fresh_work_dir(tmp_path / "diffseg")
    (work / "models").mkdir()
    (work / "models" / "model.pt").write_bytes(b"old")
    again = fresh_work_dir(tmp_path / "diffseg")
    assert again == work and sorted(p.name for p in work.iterdir()) == [WORK_MARKER]


def test_foreign_folder_is_refused_and_kept(tmp_path):
    mine = tmp_path / "diffseg"
    mine.mkdir()
    (mine / "results.csv").write_text("precious\n")
    with pytest.raises(SystemExit, match="diffseg' exists and was not made by the demo"):
        fresh_work_dir(mine)
    assert (mine / "results.csv").read_text() == "precious\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fresh_work_dir(empty) == empty


def test_headline_reads_the_metric_it_names(tmp_path):
    from run_demo import headline

    csv_path = tmp_path / "eval" / "metrics_per_case.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "case,class,name,dice\n"
        "a,1,liver,0.9\na,2,spleen,0.7\na,3,kidney,nan\n"
        "b,1,liver,0.5\nb,2,spleen,0.3\n"
    )
    spec = {"name": "a", "csv": "{work}/eval/metrics_per_case.csv", "where": {"case": "a"}, "column": "dice"}
    ctx = {"work": str(tmp_path)}
    assert headline({**spec, "threshold": 0.8}, ctx) == {"name": "a", "value": 0.8, "threshold": 0.8, "meets_threshold": True}
    low = headline({**spec, "reduce": "min", "threshold": 0.75}, ctx)
    assert low["value"] == 0.7 and low["meets_threshold"] is False
    assert headline({**spec, "where": {"case": "b"}}, ctx)["value"] == 0.4
    missing = headline({**spec, "csv": "{work}/none.csv", "threshold": 0.1}, ctx)
    assert missing["value"] is None and missing["meets_threshold"] is False


def test_train_flag_selects_the_demo_training_steps():
    import json

    from run_demo import RECIPES, recipe_steps

    recipes = json.loads(RECIPES.read_text())
    diffseg = recipes["diffseg"]
    # by default the shipped demo models run: the overlay's own ckpt_path (models/demo/, sha256-checked)
    shipped = recipe_steps(diffseg, train=False)
    assert [s["name"] for s in shipped] == ["inference", "evaluate", "evaluate_baseline"]
    assert all("configs/demo.json" in s["config"] and "ckpt_path" not in s["args"] for s in shipped)
    trained = recipe_steps(diffseg, train=True)
    assert [s["name"] for s in trained][:2] == ["train", "train_baseline"]
    assert all("configs/demo.json" in s["config"] for s in trained)
    # the evaluation reads the weights this run trained, not the shipped ones
    assert all(s["args"]["ckpt_path"].startswith("{work}/") for s in trained if s["name"].startswith(("inference", "evaluate")))
    tiny_only = next(r for n, r in recipes.items() if "train_steps" not in r)
    assert recipe_steps(tiny_only, train=True) == recipe_steps(tiny_only, train=False) == tiny_only["steps"]



def test_report_opens_with_one_row_per_bundle():
    """The opening table: the first non-baseline headline with its bar, the baselines right after it, a
    bundle without headlines said to be a pipeline check, failed steps named."""
    from run_demo import summary_table

    summary = {
        "diffseg": {"task": "CT segmentation", "test_image": "example CT", "wall_seconds": 181.4, "steps": {"evaluate": 0},
                    "headline": [
                        {"name": "diffusion: Dice", "value": 0.9123, "threshold": 0.9, "meets_threshold": True},
                        {"name": "baseline: Dice", "value": 0.925, "baseline": True},
                        {"name": "diffusion: Dice, slab", "value": 0.84, "threshold": 0.85, "meets_threshold": False},
                        {"name": "baseline: Dice, slab", "value": 0.88, "baseline": True},
                    ]},
        "noddi_sr": {"task": "NODDI SR", "test_image": "phantom", "wall_seconds": 60.0, "steps": {"train": 0, "evaluate": 2},
                     "headline": []},
    }
    table = summary_table(summary)
    assert table[0].startswith("| bundle | task | test image | headline metric | baselines | wall time (s) |")
    assert len(table) == 4
    assert table[2] == ("| diffseg | CT segmentation | example CT | diffusion: Dice: **0.912** (bar >= 0.9: met) | "
                        "baseline: Dice: 0.925 | 181 |")
    assert "pipeline check only" in table[3] and "steps failed: evaluate" in table[3] and table[3].endswith("| 60 |")


def test_step_arguments_reach_the_bundle_as_their_values():
    """What fire (the parser of ``monai.bundle run``) reads back from each argument is the recipe's value: a JSON
    ``false`` written as ``false`` would arrive as the truthy string "false"."""
    from fire.parser import DefaultParseValue
    from run_demo import cli_args

    args = {"overwrite": False, "progress": True, "targets": ["t2", "pd"], "max_epochs": 2, "lr": 1e-4,
            "roi": {"a": [1, 2]}, "output_dir": "/tmp/out dir", "none": None}
    flat = cli_args(args)
    assert flat[::2] == [f"--{k}" for k in args]
    parsed = dict(zip(args, (DefaultParseValue(v) if not isinstance(args[k], str) else v
                             for k, v in zip(args, flat[1::2]))))
    assert parsed == args and parsed["overwrite"] is False
