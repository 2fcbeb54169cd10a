"""The shipped demo model on the held-out real CT and its reframings (issue bars of the model card).

``models/demo/model.pt`` with ``configs/demo.json`` through the default ``inference.json`` +
``evaluate.json`` and nothing else (no hand-set framing), as a user runs them: the original
TotalSegmentator example CT (never trained on: the cohort holds deformed copies of it), the CT in a
1.5x field of view padded with air, a 60 mm slab, that slab in a 1.5x field of view, and
TotalSegmentator's own 30-slice crop with its own labels (``common.data.demo.build_ct_framings``).
The weights are loaded with the overlay's sha256 check, so a changed file fails here too.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

from common.data.demo import build_ct_framings

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "diffseg"
CONFIGS = BUNDLE / "configs"

# the bars of the diffseg issue: mean Dice over the reference's organs per case, and every organ of the original CT
BARS = {"example": 0.90, "example_fov150": 0.85, "example_slab60": 0.85, "example_slab60_fov150": 0.85, "example_ct_sm": 0.85}
ORGAN_BAR = 0.80


@pytest.fixture(scope="module")
def framings(tmp_path_factory) -> Path:
    return build_ct_framings(tmp_path_factory.mktemp("ct_framings"))


def _evaluate(framings: Path, out: Path, baseline: bool = False, **overrides) -> dict[str, dict[str, float]]:
    """Per case, per organ present in the reference (or predicted: a stray class scores 0) -> Dice."""
    from monai.bundle import ConfigWorkflow

    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    files = ["inference.json", "evaluate.json"] + (["train_baseline.json"] if baseline else []) + ["demo.json"]
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        dataset_dir=str(framings.parent),
        datalist_file=str(framings),
        output_dir=str(out),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    cases: dict[str, dict[str, float]] = {}
    with open(out / "metrics_per_case.csv") as fh:
        for row in csv.DictReader(fh):
            value = float(row["dice"])
            if not math.isnan(value):  # NaN: the organ is neither in the reference nor predicted
                cases.setdefault(row["case"], {})[row["name"]] = value
    return cases


def _mean_dice(cases: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per case, the mean Dice over its organs."""
    return {case: sum(organs.values()) / len(organs) for case, organs in cases.items()}


def _mean_dice_change(cases: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per case of ``BARS``, the change of mean Dice from ``reference`` to ``cases`` (4 decimals)."""
    mean, ref = _mean_dice(cases), _mean_dice(reference)
    return {case: round(mean[case] - ref[case], 4) for case in BARS}


@pytest.fixture(scope="module")
def default_cases(framings, tmp_path_factory) -> dict[str, dict[str, float]]:
    """The diffusion model through the defaults (on this CPU: windows fitted to the volume)."""
    return _evaluate(framings, tmp_path_factory.mktemp("eval"))


def test_shipped_diffusion_model_meets_the_bars_on_the_real_ct_and_its_reframings(default_cases):
    cases = default_cases
    assert set(cases) == set(BARS)
    means = _mean_dice(cases)
    failed = {case: round(means[case], 4) for case, bar in BARS.items() if means[case] < bar}
    assert not failed, f"mean Dice below the bar: {failed} (all: {means})"
    low = {organ: round(d, 4) for organ, d in cases["example"].items() if d < ORGAN_BAR}
    assert not low, f"organs of the original CT below {ORGAN_BAR}: {low}"


def test_shipped_baseline_segments_the_original_ct(framings, tmp_path):
    # the non-diffusion twin of the card's table, trained at the same wall-clock budget
    cases = _evaluate(framings, tmp_path / "eval_baseline", baseline=True)
    organs = cases["example"]
    assert sum(organs.values()) / len(organs) >= BARS["example"] and min(organs.values()) >= ORGAN_BAR, organs


def test_windows_fitted_to_thin_framings_keep_the_dice_of_training_size_windows(framings, default_cases, tmp_path):
    # fit_window (the CPU default) is not exact: the three thin framings (12, 12 and 18 slices at 5 mm) run in
    # 32-slice windows instead of 48-slice ones. Issue #20 allows a faster default where the shipped model's Dice
    # changes by < 0.005; the two framings longer than a window keep their windows and their labels.
    import torch

    from common.engines import get_device

    assert torch.device(get_device()).type == "cpu"  # where inference.json fits the windows
    padded = _evaluate(framings, tmp_path / "eval_padded", fit_window=False)
    for case in ("example", "example_fov150"):
        assert default_cases[case] == padded[case], case
    changes = _mean_dice_change(default_cases, padded)
    assert all(abs(v) < 0.005 for v in changes.values()), changes
    assert any(v != 0 for v in changes.values()), "the thin framings ran in the same windows: nothing was fitted"


def test_default_precision_keeps_the_dice_of_float32(framings, default_cases, tmp_path):
    # inference.json's runtime_precision "auto" runs the passes in bfloat16 where the CPU has bfloat16 units (float32
    # elsewhere, where this compares float32 with itself). Issue #20 allows bf16 where the shipped model's Dice
    # changes by < 0.005; measured on an AVX-512 BF16 CPU: at most 0.0010 (the model card)
    from common.inferers.openvino import cpu_has_bf16

    f32 = _evaluate(framings, tmp_path / "eval_f32", runtime_precision="f32")
    changes = _mean_dice_change(default_cases, f32)
    assert all(abs(v) < 0.005 for v in changes.values()), changes
    if not cpu_has_bf16():
        assert default_cases == f32  # float32 both: the same labels
