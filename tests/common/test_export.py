"""TorchScript and ONNX export, each file reloaded and compared with eager PyTorch."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from monai.networks.nets import UNet

from common.export import ExportError, ExportReport, export_onnx, export_torchscript, try_export

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


def _unet():
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)


class _TwoInputs(torch.nn.Module):
    """A denoising-step-like module: image and a per-sample timestep."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)
        self.emb = torch.nn.Linear(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.sigmoid(self.emb(t[:, None].float()))[:, :, None, None, None]


class _Noisy(torch.nn.Module):
    """Random output: tracing freezes nothing useful, eager and exported runs disagree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_torchscript_unet_matches_eager(tmp_path):
    net = _unet().train()
    x = torch.randn(1, 1, 16, 16, 16)
    diff = export_torchscript(net, x, tmp_path / "unet.ts")
    assert diff is not None and diff <= 1e-4
    assert net.training  # mode restored
    loaded = torch.jit.load(str(tmp_path / "unet.ts"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x), atol=1e-4, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["unet.ts"]  # no temporary left


def test_torchscript_two_inputs(tmp_path):
    net = _TwoInputs()
    diff = export_torchscript(net, (torch.randn(2, 2, 8, 8, 8), torch.tensor([3, 700])), tmp_path / "step.ts")
    assert diff <= 1e-4


def test_onnx_unet_and_two_inputs(tmp_path):
    rep = export_onnx(_unet(), torch.randn(1, 1, 16, 16, 16), tmp_path / "unet.onnx")
    assert rep["ok"] and rep["opset"] == 17 and (tmp_path / "unet.onnx").is_file()
    assert rep["checked_with"] == ("onnxruntime" if HAS_ORT else "onnx.checker")
    if HAS_ORT:
        assert rep["max_abs_diff"] <= 1e-4
    rep2 = export_onnx(
        _TwoInputs(),
        (torch.randn(2, 2, 8, 8, 8), torch.tensor([3, 700])),
        tmp_path / "step.onnx",
        input_names=["x", "t"],
    )
    assert rep2["ok"]
    import onnx

    assert [i.name for i in onnx.load(str(tmp_path / "step.onnx")).graph.input] == ["x", "t"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.onnx", "unet.onnx"]


def test_mismatch_is_an_error_and_leaves_no_file(tmp_path):
    x = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ExportError, match=r"_Noisy differs from eager by .* > atol"):
        export_torchscript(_Noisy(), x, tmp_path / "noisy.ts")
    assert list(tmp_path.iterdir()) == []
    reports = try_export(_Noisy(), x, tmp_path, "noisy", formats=("torchscript",))
    assert reports == [ExportReport("torchscript", None, False, atol=1e-4, error=reports[0].error)]
    assert "differs from eager" in reports[0].error and list(tmp_path.iterdir()) == []
    if HAS_ORT:  # onnxruntime runs the exported graph: its random numbers differ too
        with pytest.raises(ExportError, match=r"ONNX export of _Noisy differs from eager"):
            export_onnx(_Noisy(), x, tmp_path / "noisy.onnx")
        assert list(tmp_path.iterdir()) == []


def test_untraceable_module_reports_why(tmp_path):
    class _DictIn(torch.nn.Module):
        def forward(self, x):
            return {"a": x, "n": int(x.shape[0])}  # a Python int in the output cannot be traced

    with pytest.raises(ExportError, match=r"cannot trace _DictIn for TorchScript: .+"):
        export_torchscript(_DictIn(), torch.zeros(2, 1), tmp_path / "d.ts")
    with pytest.raises(ExportError, match=r"cannot export _DictIn to ONNX \(opset 17\): .+"):
        export_onnx(_DictIn(), torch.zeros(2, 1), tmp_path / "d.onnx")
    assert list(tmp_path.iterdir()) == []
