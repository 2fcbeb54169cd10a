"""The ALDM cases of ``benchmarks/cpu_inference.py`` (issue #20): the bundle's own translation inferer (encode,
SPADE, the DDIM loop, decode) timed against the network-pass floor. Run in this process on the tiny overlay with
two steps; the paper-scale numbers come from the command line of the module docstring."""

from __future__ import annotations

import sys

import pytest

from benchmarks import cpu_inference as bench

CASES = ("aldm_floor", "aldm_sampler")


# demo.json's scale_factor "auto" has no checkpoint to read it from with random weights: the cases set a number
@pytest.mark.parametrize("overlays", [("tiny.json",), ("demo.json", "tiny.json")])
def test_aldm_cases_time_the_bundle_sampler_against_its_floor(monkeypatch, overlays):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the case puts the bundle root first: for this test only
    steps, volume = 2, (32, 24, 16)  # tiny.json samples 3 steps on 32^3: both overridden
    runs = [{**bench.run_case(case, aldm_volume=volume, steps=steps, overlays=overlays),
             "load_average_1min_after": 0.0} for case in CASES]  # the field the parent adds to every run
    floor, sampler = runs
    # tiny.json: modalities t1, t2, pd; the source translated into both targets t2 and pd
    assert sampler["volume"] == floor["volume"] == list(volume) and sampler["steps"] == floor["steps"] == steps
    assert sampler["targets"] == floor["targets"] == 2 and floor["latent"] == [3, 8, 6, 4]
    # one UNet pass per step and target, the source encoded once, SPADE and a decode per target; nothing more
    assert sampler["network_calls"] == steps * 2
    assert sampler["passes"] == {"unet": 4, "encoder": 1, "quant_conv": 1, "quantizer": 1, "spade": 2,
                                 "post_quant_conv": 2, "decoder": 2}
    assert 0 < sampler["in_network_s"] <= sampler["seconds"]
    assert sampler["in_network_s"] == pytest.approx(sum(sampler["passes_s"].values()), abs=1e-3)
    parts = floor["parts_s"]
    assert floor["once_s"] == pytest.approx(parts["encode"] + 2 * (parts["spade"] + parts["decode"]), abs=1e-3)
    table = {r["case"]: r for r in bench.summarise(CASES, runs)}
    floor_s = round(floor["seconds"] * steps * 2 + floor["once_s"], 4)
    assert table["aldm_floor"]["floor_s"] == floor_s > 0
    assert table["aldm_sampler"]["ratio_to_floor"] == round(sampler["seconds"] / floor_s, 3)
    assert table["aldm_sampler"]["ratio_to_in_network"] == round(sampler["seconds"] / sampler["in_network_s"], 3)


def test_aldm_cases_default_to_the_configured_steps(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    parser = bench._bundle_parser(bench.ALDM_BUNDLE, (), {"num_inference_steps": None})
    assert parser.get_parsed_content("sampler").num_inference_steps == 200  # inference.json: DDIM 200
    assert parser.get_parsed_content("roi_size") == [192, 192, 144]
