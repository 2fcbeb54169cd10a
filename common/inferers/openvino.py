"""Network passes through OpenVINO on the CPU: the same weights, compiled for the window shape.

A sampler spends almost all of its time in the forward passes of one network on windows of one shape
(diffseg: 5 steps x windows). On a CPU, OpenVINO's compiled graph runs those passes several times
faster than eager PyTorch at the same precision (measured for the diffseg paper network on one
17 x 192 x 128 x 128 window, two threads: 13.2 s eager, 3.7 s OpenVINO f32; the model card and
``benchmarks/cpu_inference.py`` give the medians). :class:`OpenVINONetwork` wraps a ``torch.nn.Module``
so that a sampler calls it exactly like the module: torch tensors in, a float32 torch tensor out.

- It converts (traces) the module with its **current** weights on one sample when it first meets a window
  shape, and compiles one static-shape model per batch size (a sliding window has at most two: full and
  last batch). When the weights change (an optimiser step, ``load_state_dict``), the next call converts
  again, so a wrapper never runs stale weights.
- ``precision="f32"`` keeps float32 arithmetic (OpenVINO's own default on CPUs with bfloat16 units is
  bfloat16, which it would otherwise pick silently); ``"bf16"`` is the faster, inexact option; ``"auto"`` takes
  bfloat16 where the CPU has bfloat16 units (AVX-512 BF16 or AMX: :func:`cpu_has_bf16`) and float32 elsewhere, as
  a GPU run takes mixed precision (diffseg's ``amp`` on CUDA). On the diffseg paper network's CT window, bfloat16
  passes took 0.47 of float32's on an AMD EPYC with AVX-512 BF16 (the diffseg model card).
- It runs only what eager PyTorch would run without autograd: use it for inference, not training.
- Nothing leaves the machine: OpenVINO's PyPI package sends usage telemetry from background threads when it is
  imported and when it converts a model (``openvino-telemetry``, on unless the user opted out). This module
  imports OpenVINO with that package hidden, so OpenVINO takes its own no-op fallback for the process
  (:func:`import_openvino`); where the application imported OpenVINO before, its own telemetry setting holds.
- The compiled model holds no Python object: the weights are copied at conversion (``share_weights=False``)
  and the inputs are copied into OpenVINO's own tensors at each call (``share_inputs=False``; a copy of a
  window costs milliseconds against seconds for the pass).

OpenVINO is optional (``requirements-openvino.txt``); :func:`openvino_available` says whether it is
installed, and :func:`resolve_runtime` turns a config's ``"auto"`` into ``"openvino"`` or ``"torch"``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from importlib.util import find_spec
from typing import Any

import numpy as np
import torch

__all__ = ["OpenVINONetwork", "cpu_has_bf16", "import_openvino", "openvino_available", "resolve_runtime", "RUNTIMES",
           "PRECISIONS"]

RUNTIMES = ("torch", "openvino", "auto")
PRECISIONS = ("f32", "bf16", "auto")
logger = logging.getLogger(__name__)


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    return find_spec("openvino") is not None


def import_openvino():
    """The ``openvino`` module, imported (if this process has not imported it yet) with its telemetry off.

    ``import openvino`` sends a usage event to Intel's analytics from a thread pool, and every
    ``convert_model`` call more, unless the user ran OpenVINO's opt-out (a consent file in the home folder).
    A bundle must not reach the network on its own (a hospital workstation, an offline CI), so the telemetry
    package is hidden while OpenVINO is imported: OpenVINO's conversion tools then bind their built-in no-op
    stub (their documented fallback when ``openvino-telemetry`` is not installed) for the rest of the process.
    """
    hide = "openvino" not in sys.modules and "openvino_telemetry" not in sys.modules
    if hide:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import openvino
    finally:
        if hide:
            del sys.modules["openvino_telemetry"]
    return openvino


def cpu_has_bf16() -> bool:
    """Whether OpenVINO can compute in bfloat16 on this CPU (it lists ``BF16`` among the CPU's optimisation
    capabilities where the CPU has AVX-512 BF16 or AMX units)."""
    return "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_runtime(runtime: str, network: torch.nn.Module) -> str:
    """``"torch"`` or ``"openvino"`` for ``runtime`` (one of :data:`RUNTIMES`) and this network.

    ``"auto"`` means OpenVINO when it is installed and the network's weights are on the CPU, PyTorch
    otherwise (a GPU, or no OpenVINO). ``"openvino"`` with OpenVINO missing or a network off the CPU
    is an error, not a silent fallback.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    on_cpu = all(p.device.type == "cpu" for p in network.parameters())
    if runtime == "auto":
        return "openvino" if on_cpu and openvino_available() else "torch"
    if runtime == "openvino":
        if not openvino_available():
            raise RuntimeError(
                "runtime 'openvino' needs the openvino package: pip install -r requirements-openvino.txt "
                "(or set runtime to 'torch' or 'auto')"
            )
        if not on_cpu:
            raise RuntimeError("runtime 'openvino' runs on the CPU; the network's weights are on another device")
    return runtime


def _precision_name(element_type) -> str:
    """``"f32"`` / ``"bf16"`` / ... for an OpenVINO element type (``<Type: 'float32'>``) or its name."""
    name = str(getattr(element_type, "get_type_name", lambda: element_type)())
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


class _WithStep(torch.nn.Module):
    """``(x, t) -> network(x, t)`` with ``t`` a ``(B,)`` int64 tensor, the signature the converter traces."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x, t)


class OpenVINONetwork:
    """``wrapper(x, t=None)`` returns ``network(x, t)`` computed by OpenVINO on the CPU.

    Args:
        network: the module (eval mode is set for the conversion); its weights are read at conversion.
        precision: ``"f32"`` (default), ``"bf16"`` (OpenVINO's ``INFERENCE_PRECISION_HINT``) or ``"auto"`` (``bf16``
            where :func:`cpu_has_bf16`, ``f32`` elsewhere).
        num_threads: OpenVINO inference threads; ``None`` uses ``torch.get_num_threads()`` at conversion,
            so ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` bound both runtimes alike.
        shape_multiple: for a network whose traced graph is the same for every spatial size divisible by this
            (``DiffSegUNet``: ``network.divisor``): such inputs are traced at twice this size per axis, not at
            their own (the trace runs one eager forward: 17 s for the paper network's 192 x 128 x 128 window,
            a fraction of a second at 32^3), and the model is reshaped to the input. Other sizes are traced at
            their own shape.

    ``x``: ``(B, C_in, *S)``; ``t``: ``None`` (a network without a step input), an int or a ``(B,)``
    tensor of step indices. Returns ``(B, C_out, *S)`` float32 on the CPU.

    ``precision_used`` is the arithmetic OpenVINO compiled the last model with (``None`` before the first call).
    On a CPU without bfloat16 units (no AVX-512 BF16 or AMX) OpenVINO ignores a ``"bf16"`` hint and compiles in
    float32 without a word; the wrapper then logs one warning, so a run (or a benchmark) never reports float32
    numbers as bfloat16 ones (``"auto"`` asks for float32 there, and warns about nothing).
    """

    def __init__(self, network: torch.nn.Module, precision: str = "f32", num_threads: int | None = None,
                 shape_multiple: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.network, self.precision, self.num_threads = network, precision, num_threads
        self.shape_multiple = shape_multiple
        self._converted: dict[tuple, Any] = {}  # traced models by per-sample shape
        self._compiled: dict[tuple, Any] = {}  # compiled models by input shape
        self._weights_key: tuple | None = None
        self.conversions = 0  # how many times the network was traced (tests, logs)
        self.precision_used: str | None = None

    def _current_weights_key(self) -> tuple:
        # data_ptr changes when a tensor is replaced, _version when it is modified in place
        return tuple((v.data_ptr(), v._version) for v in self.network.state_dict(keep_vars=True).values())

    def _convert(self, x: torch.Tensor, t: torch.Tensor | None):
        """The network traced on one sample of ``x``'s spatial shape (tracing runs one eager forward: one sample,
        not the whole batch). The trace is valid for this spatial shape only (the UNet's skip crops become
        constants of it); its batch dimension stays free."""
        ov = import_openvino()
        was_training = self.network.training
        self.network.eval()
        try:
            # shape checks in the network become constants of the trace, which is what a per-shape model means,
            # so their tracer warnings say nothing here
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # share_weights=False: the model owns a copy of the weights (no pointer into torch's memory)
                if t is None:
                    return ov.convert_model(self.network, example_input=(x[:1],), share_weights=False)
                return ov.convert_model(_WithStep(self.network), example_input=(x[:1], t[:1]), share_weights=False)
        finally:
            self.network.train(was_training)

    def _compile(self, x: torch.Tensor, t: torch.Tensor | None):
        """A model compiled for exactly ``x``'s shape (static shapes: OpenVINO's fastest CPU kernels)."""
        ov = import_openvino()
        m = self.shape_multiple
        if m and all(int(s) % m == 0 for s in x.shape[2:]):
            spatial = (x.shape[1], "any multiple", t is None)
            example = x.new_zeros((1, x.shape[1], *[2 * m] * (x.dim() - 2)))
        else:
            spatial = (tuple(x.shape[1:]), t is None)
            example = x
        if spatial not in self._converted:
            self._converted[spatial] = self._convert(example, t)
            self.conversions += 1
        model = self._converted[spatial].clone()
        shapes = {model.inputs[0]: ov.PartialShape(list(x.shape))}
        if t is not None:
            shapes[model.inputs[1]] = ov.PartialShape([x.shape[0]])
        model.reshape(shapes)
        threads = self.num_threads if self.num_threads is not None else torch.get_num_threads()
        requested = self.precision if self.precision != "auto" else ("bf16" if cpu_has_bf16() else "f32")
        config = {"INFERENCE_PRECISION_HINT": requested, "INFERENCE_NUM_THREADS": int(threads)}
        compiled = ov.Core().compile_model(model, "CPU", config)
        used = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if used != requested and self.precision_used != used:
            logger.warning(
                "OpenVINO compiled the network in %s although %s was requested: this CPU has no %s units "
                "(OpenVINO's CPU capabilities: %s)", used, requested, requested,
                ", ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            )
        self.precision_used = used
        logger.info(
            "OpenVINO %s: network compiled for input %s (%s%s, %d threads)", ov.__version__, tuple(x.shape), used,
            ", chosen by precision 'auto'" if self.precision == "auto" else "", threads,
        )
        return compiled

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int | None = None) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"OpenVINONetwork runs on the CPU; the input is on {x.device}")
        steps = None
        if t is not None:
            steps = torch.as_tensor(t, dtype=torch.long).reshape(-1)
            if steps.numel() == 1 and x.shape[0] > 1:
                steps = steps.expand(x.shape[0]).contiguous()
        key = self._current_weights_key()
        if key != self._weights_key:
            self._converted.clear()
            self._compiled.clear()
            self._weights_key = key
        shape = (tuple(x.shape), x.dtype, steps is None)
        if shape not in self._compiled:
            self._compiled[shape] = self._compile(x.float(), steps)
        inputs = [np.ascontiguousarray(x.detach().float().numpy())]
        if steps is not None:
            inputs.append(steps.numpy())
        # share_inputs=False: copied into OpenVINO's tensors, so the request keeps no reference to our arrays
        out = self._compiled[shape](inputs, share_inputs=False)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
