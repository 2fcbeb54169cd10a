"""The diffseg cases of ``benchmarks/cpu_inference.py`` (issue #20): each lever pins the inference.json keys it names,
and an OpenVINO case reports the arithmetic OpenVINO compiled with, so a float32 run on a CPU without bfloat16 units
is never reported as a bfloat16 one. The card's tables come from the paper CT at the paper configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from benchmarks import cpu_inference as bench
from common.inferers import DiffSegInferer
from common.inferers.openvino import cpu_has_bf16

REPO = Path(__file__).resolve().parents[2]


def test_each_lever_pins_runtime_precision_and_windows():
    plain = {"runtime": "torch", "runtime_precision": "f32", "fit_window": False, "max_window_fraction": 1.0}
    for lever in ("fp32", "im", "cl", "bf16", "cl_bf16"):  # PyTorch levers: bf16 is autocast there, not OpenVINO's
        assert bench.lever_settings(lever) == plain, lever
    assert bench.lever_settings("ov") == {**plain, "runtime": "openvino"}
    assert bench.lever_settings("ov_bf16") == {**plain, "runtime": "openvino", "runtime_precision": "bf16"}
    assert bench.lever_settings("ov_fit") == {**plain, "runtime": "openvino", "fit_window": True}
    assert bench.lever_settings("ov_fit_bf16") == {**plain, "runtime": "openvino", "runtime_precision": "bf16",
                                                   "fit_window": True}
    grow = bench.lever_settings("ov_grow")
    assert grow == {**plain, "runtime": "openvino", "fit_window": True, "max_window_fraction": bench.GROW_FRACTION}
    # what the grow lever means on the paper CT (243 x 198 x 68 after preprocessing): one window, not four
    inferer = DiffSegInferer(16, roi_size=(192, 128, 128), fit_window=True,
                             max_window_fraction=grow["max_window_fraction"])
    assert inferer.window_size((243, 198, 68), SimpleNamespace(divisor=16)) == (256, 208, 80)
    assert set(bench.LEVERS) >= {"ov_fit_bf16", "ov_grow"}


def test_bf16_floor_case_reports_the_precision_openvino_used(tmp_path):
    # the paper network on the paper CT's fitted window, one pass after a warm-up (about 10-20 s on two cores)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cpu_inference.py"), "--case", "floor_ov_fit_bf16", "--threads", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["case"] == "floor_ov_fit_bf16" and run["window"] == [192, 128, 80] and run["windows"] == 4
    assert run["precision_used"] == ("bf16" if cpu_has_bf16() else "f32")
    assert run["seconds"] > 0 and run["convert_s"] > 0
