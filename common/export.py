"""Export a network part to TorchScript or ONNX and check the file against eager PyTorch.

A deployment needs the deterministic parts of each method as standalone files (autoencoder
encode/decode, one denoising step, a segmentation network, an invertible network in each
direction). Both exporters here write atomically (temporary name, then rename), reload what they
wrote and compare it with the eager module on the same inputs, so a file that exists is a file
that was checked.

* :func:`export_torchscript`: ``torch.jit.trace``, returns the largest absolute difference.
* :func:`export_onnx`: ``torch.onnx.export`` (weights inside the ``.onnx`` file, no external
  data), ``onnx.checker``, and an output comparison when ``onnxruntime`` is installed; returns a
  report dict.
* :func:`try_export`: both, for a model card table: failures are recorded with their reason
  instead of raised (:class:`ExportReport`).

Tracing records one path through the network: data-dependent control flow (loops over a
sampled number of steps, random sampling) is frozen at the example's values. Export the
deterministic parts, not a sampler.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.utils.io import atomic_write

__all__ = ["ExportError", "ExportReport", "export_onnx", "export_torchscript", "try_export"]


class ExportError(RuntimeError):
    """A module could not be exported, or the exported file disagrees with eager PyTorch."""


@dataclasses.dataclass
class ExportReport:
    """Outcome of one export, as recorded for a model card.

    Attributes:
        format: ``"torchscript"`` or ``"onnx"``.
        path: file written (``None`` if the export failed).
        ok: the file was written and, when checked, matched eager outputs within ``atol``.
        max_abs_diff: largest absolute difference to eager outputs (``None`` if not compared).
        atol: tolerance used.
        checked_with: what ran the exported file for the comparison (``"torch.jit"``,
            ``"onnxruntime"``) or ``None``.
        opset: ONNX opset (ONNX only).
        error: why the export failed (``None`` if it succeeded).
    """

    format: str
    path: str | None
    ok: bool
    max_abs_diff: float | None = None
    atol: float | None = None
    checked_with: str | None = None
    opset: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _reason(error: BaseException, limit: int = 400) -> str:
    """An exporter's error on one line (they embed tensors and graphs over many lines)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{' ...' if len(text) > limit else ''}"


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _flatten(out: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) output in a fixed order: tuples, lists and dicts (by sorted key)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def _max_abs_diff(ref: Sequence[torch.Tensor], got: Sequence[Any], what: str) -> float:
    if len(ref) != len(got):
        raise ExportError(f"{what} returns {len(got)} outputs, the eager module {len(ref)}")
    diff = 0.0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        g = torch.as_tensor(g)
        if tuple(r.shape) != tuple(g.shape):
            raise ExportError(f"{what} output {i} has shape {tuple(g.shape)}, eager {tuple(r.shape)}")
        if r.numel():
            diff = max(diff, float((r.detach().double().cpu() - g.detach().double().cpu()).abs().max()))
    return diff


@torch.no_grad()
def export_torchscript(
    module: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, check: bool = True, atol: float = 1e-4
) -> float | None:
    """Trace ``module`` on ``example_inputs``, save it atomically to ``path`` and check it.

    Args:
        module: network (put in ``eval`` mode for the trace; its mode is restored afterwards).
        example_inputs: one tensor or a tuple of tensors (one per ``forward`` argument).
        path: output ``.pt`` / ``.ts`` file.
        check: reload the saved file and compare its outputs with eager outputs.
        atol: largest accepted absolute difference.

    Returns:
        The largest absolute difference between reloaded and eager outputs (``None`` if
        ``check`` is false).

    Raises:
        ExportError: tracing fails (the message says why), or the reloaded module's outputs
            differ by more than ``atol`` (then ``path`` is removed: no unchecked file is left).
    """
    inputs = _as_tuple(example_inputs)
    path = Path(path)
    was_training = module.training
    module.eval()
    try:
        try:
            traced = torch.jit.trace(module, inputs, check_trace=False)
        except Exception as e:
            raise ExportError(f"cannot trace {type(module).__name__} for TorchScript: {_reason(e)}") from e
        with atomic_write(path, "wb") as fh:
            torch.jit.save(traced, fh)
        if not check:
            return None
        ref = _flatten(module(*inputs))
        loaded = torch.jit.load(str(path), map_location="cpu")
        got = _flatten(loaded(*[x.cpu() for x in inputs]))
        diff = _max_abs_diff([r.cpu() for r in ref], got, f"TorchScript file '{path}'")
        if diff > atol:
            path.unlink(missing_ok=True)
            raise ExportError(
                f"TorchScript export of {type(module).__name__} differs from eager by {diff:.3g} > atol {atol:g} "
                "(data-dependent control flow frozen by tracing?); the file was removed"
            )
        return diff
    finally:
        module.train(was_training)


@torch.no_grad()
def export_onnx(
    module: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    opset: int = 17,
    check: bool = True,
    atol: float = 1e-4,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamo: bool = False,
) -> dict[str, Any]:
    """Export ``module`` to ONNX at ``path`` (atomically), validate it, and compare outputs if possible.

    Args:
        module: network (exported in ``eval`` mode; its mode is restored afterwards).
        example_inputs: one tensor or a tuple of tensors (one per ``forward`` argument).
        path: output ``.onnx`` file; the weights are stored inside it (models < 2 GB).
        opset: ONNX opset version.
        check: run ``onnx.checker`` and, when ``onnxruntime`` is installed, compare its outputs
            with eager outputs (CPU execution provider).
        atol: largest accepted absolute difference.
        input_names, output_names: graph names (default ``input0, ...`` and ``output0, ...``).
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript-based one
            (the latter handles the MONAI networks of this collection with fixed shapes).

    Returns:
        ``ExportReport.to_dict()``: ``format, path, ok, max_abs_diff, atol, checked_with, opset,
        error``; ``checked_with`` is ``"onnx.checker"`` when ``onnxruntime`` is not installed.

    Raises:
        ExportError: the exporter fails (the message keeps its reason: an unsupported operator,
            dynamic control flow, ...), the checker rejects the graph, or outputs differ by more
            than ``atol``. No file is left at ``path`` then.
    """
    import onnx

    inputs = _as_tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    in_names = list(input_names or [f"input{i}" for i in range(len(inputs))])
    was_training = module.training
    module.eval()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part.onnx", dir=path.parent)
    os.close(fd)
    try:
        ref = [r.cpu() for r in _flatten(module(*inputs))]
        out_names = list(output_names or [f"output{i}" for i in range(len(ref))])
        try:
            kwargs: dict[str, Any] = {"opset_version": int(opset), "input_names": in_names, "output_names": out_names}
            if dynamo:
                kwargs["external_data"] = False
            torch.onnx.export(module, inputs, tmp, dynamo=dynamo, **kwargs)
        except Exception as e:
            raise ExportError(f"cannot export {type(module).__name__} to ONNX (opset {opset}): {_reason(e)}") from e
        report = ExportReport(format="onnx", path=str(path), ok=True, atol=atol, opset=int(opset))
        if check:
            try:
                onnx.checker.check_model(tmp, full_check=True)
            except Exception as e:
                raise ExportError(f"ONNX export of {type(module).__name__} fails onnx.checker: {e}") from e
            report.checked_with = "onnx.checker"
            try:
                import onnxruntime as ort
            except ImportError:
                ort = None
            if ort is not None:
                sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
                feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
                got = sess.run(None, feeds)
                diff = _max_abs_diff(ref, [torch.from_numpy(g) for g in got], f"ONNX file '{path}'")
                if diff > atol:
                    raise ExportError(
                        f"ONNX export of {type(module).__name__} differs from eager by {diff:.3g} > atol {atol:g}"
                    )
                report.max_abs_diff = diff
                report.checked_with = "onnxruntime"
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return report.to_dict()
    finally:
        module.train(was_training)
        if os.path.exists(tmp):
            os.remove(tmp)


def try_export(
    module: torch.nn.Module,
    example_inputs: Any,
    out_dir: str | os.PathLike,
    name: str,
    formats: Sequence[str] = ("torchscript", "onnx"),
    atol: float = 1e-4,
    opset: int = 17,
) -> list[ExportReport]:
    """Export ``module`` as ``<out_dir>/<name>.ts`` and ``<out_dir>/<name>.onnx``, recording failures.

    Returns one :class:`ExportReport` per format; a failed export has ``ok=False`` and its reason
    in ``error`` (for the "what exports and what does not, and why" table of a model card).
    """
    reports = []
    for fmt in formats:
        try:
            if fmt == "torchscript":
                p = Path(out_dir) / f"{name}.ts"
                diff = export_torchscript(module, example_inputs, p, check=True, atol=atol)
                reports.append(ExportReport("torchscript", str(p), True, diff, atol, "torch.jit"))
            elif fmt == "onnx":
                reports.append(
                    ExportReport(
                        **export_onnx(module, example_inputs, Path(out_dir) / f"{name}.onnx", opset, True, atol)
                    )
                )
            else:
                raise ValueError(f"unknown export format '{fmt}' (expected 'torchscript' or 'onnx')")
        except ExportError as e:
            reports.append(
                ExportReport(fmt, None, False, atol=atol, opset=opset if fmt == "onnx" else None, error=str(e))
            )
    return reports
