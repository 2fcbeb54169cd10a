"""The iVAN cases of ``benchmarks/cpu_inference.py`` (issue #20): the slice loop of the bundle's own inferer and
predictor timed against the network-pass floor. Run here on a small volume; the card's table comes from the
181 x 217 x 181 default."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ivan_cases_time_the_bundle_slice_loop_against_its_floor(tmp_path):
    out = tmp_path / "bench"
    volume = (24, 28, 19)  # 19 axial slices: two full batches of 8 and one of 3
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cpu_inference.py"), "--out", str(out), "--repeats", "1",
         "--threads", "1", "--cases", "ivan_floor", "ivan_sampler", "--ivan-volume", *map(str, volume)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["case"]: r for r in results["runs"]}
    sampler, floor = runs["ivan_sampler"], runs["ivan_floor"]
    # the bundle's inference.json: paper network (T1 -> T2: 2 channels), sw_batch_size 8 along axis 2
    assert sampler["volume"] == list(volume) and sampler["slices"] == 19 and sampler["batch"] == 8
    assert sampler["channels"] == 2 and sampler["threads"] == 1
    assert sampler["network_calls"] == math.ceil(19 / 8)  # one network pass per batch of slices, no more
    assert 0 < sampler["in_network_s"] <= sampler["seconds"]
    table = {r["case"]: r for r in results["table"]}
    assert table["ivan_floor"]["floor_s"] == round(floor["seconds"] * 19 / 8, 2)
    assert table["ivan_sampler"]["ratio_to_floor"] == round(sampler["seconds"] / table["ivan_floor"]["floor_s"], 3)
    assert table["ivan_sampler"]["ratio_to_in_network"] == round(sampler["seconds"] / sampler["in_network_s"], 3)
