"""The MAISI sampler cases of ``benchmarks/cpu_inference.py`` (issue #20): the bundle's own reverse process
(``MaisiInferer.sample_latent`` of ``inference.json``) timed against its ControlNet + UNet floor. Run in this
process on the tiny overlay with a few steps; the paper-scale numbers come from the command line of the module
docstring."""

from __future__ import annotations

import sys

import pytest

from benchmarks import cpu_inference as bench

CASES = ("maisi_floor", "maisi_sampler")


@pytest.mark.parametrize("version", ["rflow", "ddpm"])
def test_maisi_cases_time_the_bundle_sampler_against_its_floor(monkeypatch, version):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the case puts the bundle root first: for this test only
    steps, output = 3, (64, 32, 32)
    runs = [{**bench.run_case(case, steps=steps, overlays=("tiny.json",), maisi_output=output, maisi_version=version),
             "load_average_1min_after": 0.0} for case in CASES]  # the field the parent adds to every run
    floor, sampler = runs
    assert sampler["volume"] == floor["volume"] == list(output)
    assert sampler["steps"] == floor["steps"] == steps and sampler["version"] == version
    # one ControlNet and one UNet evaluation per step, nothing else in the loop runs a network
    assert sampler["passes"] == {"unet": steps, "controlnet": steps} and sampler["network_calls"] == steps
    assert 0 < sampler["in_network_s"] <= sampler["seconds"]
    assert sampler["in_network_s"] == pytest.approx(sum(sampler["passes_s"].values()), abs=1e-3)
    table = {r["case"]: r for r in bench.summarise(CASES, runs)}
    floor_s = round(floor["seconds"] * steps, 4)
    assert table["maisi_floor"]["floor_s"] == floor_s > 0
    assert table["maisi_sampler"]["ratio_to_floor"] == round(sampler["seconds"] / floor_s, 3)
    assert table["maisi_sampler"]["ratio_to_in_network"] == round(sampler["seconds"] / sampler["in_network_s"], 3)


def test_maisi_cases_default_to_the_configured_steps_and_output(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    for version, steps in (("rflow", 30), ("ddpm", 1000)):
        parser = bench._bundle_parser(bench.MAISI_BUNDLE, (), {"version": version, "num_inference_steps": None})
        assert parser.get_parsed_content("num_inference_steps") == steps
    assert parser.get_parsed_content("output_size") == [256, 256, 256]
