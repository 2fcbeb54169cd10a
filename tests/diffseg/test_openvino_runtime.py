"""The OpenVINO runtime of the network passes: the same outputs as eager PyTorch, never stale weights.

``runtime: auto`` (diffseg's inference.json) runs the sampler's network passes through OpenVINO on the CPU.
These tests hold it to the plain path on the real demo CT: float32 logits within 1e-4 of PyTorch (relative
to their range) and the same labels; a change of weights is picked up; the choice of runtime is explicit.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.inferers import DiffSegInferer
from common.inferers import openvino as ov_runtime
from common.inferers.openvino import OpenVINONetwork, resolve_runtime
from common.networks.diffseg_unet import DiffSegUNet

C = 7


@pytest.fixture(scope="module")
def ct_volume(ct_demo) -> torch.Tensor:
    """The held-out example CT at 6 mm (AMOS window, [0, 1]): ``(1, 1, X, Y, Z)``."""
    case = json.loads(Path(ct_demo).read_text())["test"][0]
    hu = np.asarray(nib.load(str(Path(ct_demo).parent / case["image"])).dataobj, dtype=np.float32)
    image = torch.from_numpy(np.clip((hu + 991.0) / (362.0 + 991.0), 0.0, 1.0))[None, None]
    return F.interpolate(image, scale_factor=0.5, mode="trilinear", align_corners=False)


def _net(seed: int, diffusion: bool = True) -> DiffSegUNet:
    torch.manual_seed(seed)
    return DiffSegUNet(1 + C if diffusion else 1, C, channels=(8, 16, 16, 32), time_conditioning=diffusion).eval()


def test_network_pass_matches_pytorch_for_int_and_tensor_steps(ct_volume):
    net = _net(0)
    x = torch.cat([ct_volume[..., :32, :32, :32].expand(2, -1, -1, -1, -1), torch.randn(2, C, 32, 32, 32)], 1)
    wrapped = OpenVINONetwork(net)
    with torch.no_grad():
        for t in (3, torch.tensor([0, 4])):
            ref = net(x, t)
            got = wrapped(x, t)
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert wrapped.conversions == 1  # one input shape, one conversion


class _StepScaled(torch.nn.Module):
    """``conv(x) * (1 + t)``: a network whose output depends strongly on the step (a random DiffSegUNet barely does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (1.0 + t.float()).view(-1, 1, 1, 1, 1)


def test_the_step_is_an_input_of_the_compiled_graph_not_a_constant_of_its_trace(ct_volume):
    torch.manual_seed(0)
    net = _StepScaled().eval()
    x = ct_volume[..., :16, :16, :16].expand(2, 2, -1, -1, -1).contiguous()
    wrapped = OpenVINONetwork(net)
    with torch.no_grad():
        for t in (0, 5, torch.tensor([1, 9])):
            ref = net(x, torch.as_tensor(t).reshape(-1).expand(2))
            assert float((wrapped(x, t) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert wrapped.conversions == 1


def test_changed_weights_are_converted_again_never_stale(ct_volume):
    net, other = _net(0), _net(1)
    x = torch.cat([ct_volume[..., :32, :32, :32], torch.randn(1, C, 32, 32, 32)], 1)
    wrapped = OpenVINONetwork(net)
    with torch.no_grad():
        before = wrapped(x, 2)
        net.load_state_dict(other.state_dict())  # in-place copies: same tensors, new values
        after = wrapped(x, 2)
        ref = other(x, 2)
    assert wrapped.conversions == 2
    assert float((after - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert float((after - before).abs().max()) > 1e-2


def test_sampler_and_baseline_through_openvino_equal_the_plain_path_on_the_real_ct(ct_volume):
    """The whole 5-step chain over sliding windows (12 windows in batches of 5, 5 and 2), and the baseline's windows."""
    image = ct_volume[..., :40]
    out = {}
    for runtime in ("torch", "openvino"):
        inferer = DiffSegInferer(C, roi_size=(32, 32, 32), sw_batch_size=5, overlap=0.25, padding_mode="replicate",
                                 runtime=runtime)
        baseline = DiffSegInferer(C, roi_size=(32, 32, 32), sw_batch_size=2, diffusion=False, runtime=runtime)
        with torch.no_grad():
            out[runtime] = (inferer(image, _net(0)), baseline(image, _net(0, diffusion=False)))
        if runtime == "openvino":  # one trace per window shape, whatever the batch sizes of the windows
            assert inferer._compiled.conversions == 1 and len(inferer._compiled._compiled) == 2
    for ref, got in zip(out["torch"], out["openvino"]):
        assert got.shape == ref.shape == (1, C, *image.shape[2:])
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
        assert float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.9999


def test_runtime_choice_is_explicit(monkeypatch):
    net = _net(0)
    assert resolve_runtime("auto", net) == "openvino"  # the test environment installs OpenVINO
    assert resolve_runtime("torch", net) == "torch"
    with pytest.raises(ValueError, match="runtime must be one of"):
        resolve_runtime("onnx", net)
    with pytest.raises(ValueError, match="runtime must be one of"):
        DiffSegInferer(C, runtime="onnx")
    with pytest.raises(ValueError, match="runtime_precision"):
        DiffSegInferer(C, runtime_precision="fp16")
    # auto never computes without autograd when a gradient is being recorded; openvino refuses
    x = torch.rand(1, 1, 16, 16, 16)
    assert DiffSegInferer(C, runtime="auto")._network_for_runtime(net) is net
    with pytest.raises(RuntimeError, match="no gradients"):
        DiffSegInferer(C, runtime="openvino")(x, net)
    monkeypatch.setattr(ov_runtime, "openvino_available", lambda: False)
    assert resolve_runtime("auto", net) == "torch"
    with pytest.raises(RuntimeError, match="requirements-openvino.txt"):
        resolve_runtime("openvino", net)


def test_a_small_trace_serves_every_window_whose_size_is_a_multiple_of_the_divisor(ct_volume):
    """``shape_multiple``: traced once at 32^3, reshaped to 48x32x64 and 32x48x32 windows, every output equal to
    PyTorch's (the network itself takes sizes divisible by 16 only)."""
    net = _net(0)
    wrapped = OpenVINONetwork(net, shape_multiple=net.divisor)
    with torch.no_grad():
        for spatial in ((48, 32, 64), (32, 48, 32)):
            x = torch.cat([ct_volume[..., :spatial[0], :spatial[1], :1].expand(2, 1, -1, -1, spatial[2]),
                           torch.randn(2, C, *spatial)], 1)
            ref = net(x, 2)
            assert float((wrapped(x, 2) - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), spatial
            assert wrapped.conversions == 1


_OFFLINE_CHILD = r"""
import json, os, sys, threading
import torch
from common.inferers.openvino import OpenVINONetwork
before = {t.name for t in threading.enumerate()}
net = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
with torch.no_grad():
    out = OpenVINONetwork(net)(torch.randn(1, 2, 8, 8, 8))
print(json.dumps({"new_threads": sorted({t.name for t in threading.enumerate()} - before),
                  "home": sorted(os.listdir(os.environ["HOME"])), "shape": list(out.shape)}))
"""


def test_openvino_is_used_offline_no_telemetry_thread_and_no_client_id_written(tmp_path):
    """OpenVINO's PyPI package sends usage events from a thread pool at import and at each conversion, and writes a
    client id under ``~/intel``, unless the user opted out; through our wrapper a fresh process converts and runs a
    network with no thread left behind and no OpenVINO file in its home folder."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _OFFLINE_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 3, 8, 8, 8]
    assert report["new_threads"] == [], f"threads left running by OpenVINO: {report['new_threads']}"
    assert "intel" not in report["home"], f"OpenVINO wrote its telemetry client id: {report['home']}"


def test_precision_used_is_what_openvino_compiled_and_a_silent_bf16_fallback_is_reported(ct_volume, caplog):
    # OpenVINO drops a bf16 hint on a CPU without bfloat16 units and compiles in float32; the wrapper must say so
    # instead of letting a run or a benchmark present float32 numbers as bfloat16 ones
    ov = ov_runtime.import_openvino()
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    net = _net(0)
    x = torch.cat([ct_volume[..., :32, :32, :32], torch.randn(1, C, 32, 32, 32)], 1)
    f32 = OpenVINONetwork(net, precision="f32")
    bf16 = OpenVINONetwork(net, precision="bf16")
    with torch.no_grad(), caplog.at_level("WARNING", logger=ov_runtime.logger.name):
        ref, got = f32(x, 2), bf16(x, 2)
    assert f32.precision_used == "f32"
    assert bf16.precision_used == ("bf16" if has_bf16 else "f32")
    fallback = [r for r in caplog.records if "although bf16 was requested" in r.getMessage()]
    assert len(fallback) == (0 if has_bf16 else 1)
    if not has_bf16:
        assert torch.equal(got, ref)  # it really ran float32: the very same compiled arithmetic


def test_precision_auto_is_bf16_exactly_where_the_cpu_has_bfloat16_units(ct_volume, caplog):
    # diffseg's inference.json asks for "auto": bfloat16 passes where the CPU computes them (0.47 of float32's time
    # on an AVX-512 BF16 CPU, the model card), float32 elsewhere, and no fallback warning in either case
    has_bf16 = ov_runtime.cpu_has_bf16()
    ov = ov_runtime.import_openvino()
    assert has_bf16 == ("BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    net = _net(0)
    x = torch.cat([ct_volume[..., :32, :32, :32], torch.randn(1, C, 32, 32, 32)], 1)
    auto, f32 = OpenVINONetwork(net, precision="auto"), OpenVINONetwork(net, precision="f32")
    with torch.no_grad(), caplog.at_level("WARNING", logger=ov_runtime.logger.name):
        got, ref = auto(x, 2), f32(x, 2)
    assert auto.precision_used == ("bf16" if has_bf16 else "f32")
    assert not [r for r in caplog.records if "although" in r.getMessage()]
    if has_bf16:  # inexact, but the same network: within a few per cent of the logits' range
        assert not torch.equal(got, ref)
        assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    else:
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="precision"):
        OpenVINONetwork(net, precision="fp16")
