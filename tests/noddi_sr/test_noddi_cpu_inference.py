"""The NODDI-SR cases of ``benchmarks/cpu_inference.py`` (issue #20): the bundle's own sliding-window DDIM inferer
timed against the network-pass floor. Run in this process on the tiny overlay with two steps and a small
``sw_batch_size``, so that the windows take several batches; the paper-scale numbers come from the command line of
the module docstring."""

from __future__ import annotations

import json
import math
import sys

import pytest

from benchmarks import cpu_inference as bench

CASES = ("noddi_floor", "noddi_sampler")


def test_noddi_cases_time_the_bundle_sampler_against_its_floor(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the case puts the bundle root first: for this test only
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"sw_batch_size": 3}))  # tiny.json batches 32 windows: all of them in one pass
    steps, volume = 2, (14, 12, 10)  # LR windows of 8^3 (tiny hr_patch 16^3, scale 2), overlap 0.4375: 3 x 2 x 2
    overlays = ("tiny.json", str(batch))
    runs = [{**bench.run_case(case, noddi_volume=volume, steps=steps, overlays=overlays),
             "load_average_1min_after": 0.0} for case in CASES]  # the field the parent adds to every run
    floor, sampler = runs
    assert sampler["volume"] == floor["volume"] == list(volume) and sampler["roi"] == [8, 8, 8]
    assert sampler["steps"] == floor["steps"] == steps and sampler["channels"] == 4  # tiny: 2 shells
    assert sampler["windows"] == floor["windows"] == 12 and sampler["batch"] == floor["batch"] == 3
    batches = math.ceil(12 / 3)
    # per batch of windows: the encoder once, one UNet pass per step, the nearest-code lookup and the decoder once
    assert sampler["network_calls"] == steps * batches
    assert sampler["passes"] == {"unet": steps * batches, "encoder": batches, "post_quant_conv": batches,
                                 "decoder": batches, "lookup": batches}
    assert 0 < sampler["in_network_s"] <= sampler["seconds"]
    assert sampler["in_network_s"] == pytest.approx(sum(sampler["passes_s"].values()), abs=1e-3)
    parts = floor["parts_s"]
    assert floor["once_s"] == pytest.approx(parts["encode"] + parts["decode"], abs=1e-3)
    table = {r["case"]: r for r in bench.summarise(CASES, runs)}
    floor_s = round((floor["seconds"] * steps + floor["once_s"]) * 12 / 3, 4)
    assert table["noddi_floor"]["floor_s"] == floor_s > 0
    assert table["noddi_sampler"]["ratio_to_floor"] == round(sampler["seconds"] / floor_s, 3)
    assert table["noddi_sampler"]["ratio_to_in_network"] == round(sampler["seconds"] / sampler["in_network_s"], 3)


def test_noddi_cases_default_to_the_configured_steps(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    parser = bench._bundle_parser(bench.NODDI_BUNDLE, (), {"ddim_steps": None})
    assert parser.get_parsed_content("sampler").num_inference_steps == 100  # inference.json: DDIM 100
    assert parser.get_parsed_content("lr_patch") == [32, 32, 32]
