"""Sampler of ImgX-DiffSeg as a MONAI ``Inferer``: the whole T-step reverse process in one call.

Paper A (Fu et al., arXiv 2303.06040) samples with the same 5 steps it trains on. Starting from
``x_{T-1} ~ N(0, I)`` in mask space, each step predicts the mask ``x0_hat = 2 softmax(logits) - 1``
from ``[image, x_k]`` and moves to ``x_{k-1}`` with the DDPM posterior (or DDIM); the returned
value is the logits of the last step (k = 0), so ``AsDiscreted(argmax=True)`` gives the labels.

Volumes larger than the training patch are handled with ``sliding_window_inference``. By default
the windows are stitched after **every** step on the full-volume ``x_k`` (ours): all windows see
the same noise and the same previous prediction, at T network passes per window. With
``stitching="per_patch"`` each window runs its own chain and the final logits are averaged.

A volume smaller than the window along some axis (a thin slab, a tight field of view) is padded
to the window **before** the noise is drawn, and the logits are cropped back: the padded voxels
then carry noise in their mask channels, as every voxel of a training patch does, instead of the
zero mask channels that ``sliding_window_inference``'s own padding would give them. The image is
padded with ``padding_mode``: ``"constant"`` (zeros: air / background after the intensity rules)
or ``"replicate"`` (the edge slices repeated). The bundles' inference configs use
``"replicate"`` after cropping the volume to the body (``CropForegroundd``): a slab then looks
to the network like anatomy that continues past the cut, not like a body that ends there (a
model trained on scans whose body always ends in the pelvis otherwise predicts pelvic organs at
the cut of an abdominal slab; measured in the diffseg model card).

With ``fit_window=True`` the window instead shrinks, along each axis where the volume is smaller than it, to the
volume's size rounded up to ``window_multiple`` (the network's ``divisor`` by default, so the UNet's skips align),
but not below ``min_window_fraction`` of the configured window: the network passes then cost in proportion to
the real voxels (the paper CT's 68 slices at 5 mm run in 80-slice windows instead of 128). The network sees a
shorter window than it was trained on; a window cut to a third lost more Dice on a thin slab than one cut to two
thirds (the diffseg model card), hence the lower bound. With ``max_window_fraction`` above 1 the window also grows,
along each axis where the volume is longer than it but no longer than that many windows, to the volume rounded up
to ``window_multiple``: one window then covers that axis, where sliding windows would pass every voxel of their
overlap twice (the paper CT's 243 x 198 in-plane voxels: one 256 x 208 window instead of four of 192 x 128, 0.54 of
the voxels). Larger windows cost memory in proportion, hence the upper bound. Off by default (1): the network then
sees windows larger than it was trained on, its instance norms see more of the body, and no overlapping windows are
averaged; on the shipped diffseg demo model this cost more Dice than the 0.005 issue #20 allows (the model card).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer, sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.utils import convert_to_dst_type, ensure_tuple_rep, fall_back_tuple

from common.inferers.openvino import PRECISIONS, RUNTIMES, OpenVINONetwork, resolve_runtime
from common.schedulers.diffseg import DiffSegScheduler

__all__ = ["DiffSegInferer"]


class _StepWindows:
    """The fixed window grid of the per-step chain: one set of windows, buffers and counts for all T steps.

    ``sliding_window_inference`` on ``cat([image, x_k])`` rebuilds per step what does not change between steps
    (the joint volume, the count map, the window list) and copies every window twice (the joint ``cat``, then the
    ``cat`` of a batch of windows). Here the grid and the count map are made once per volume; each step copies the
    image and ``x_k`` windows straight into one reused batch buffer and adds the logits into one reused output.
    Same windows, same batches, same order of additions and the same division as ``sliding_window_inference``
    with ``mode="constant"`` on an input at least one window large (which ``DiffSegInferer`` pads to), so the
    logits are bitwise equal to it (tested).
    """

    def __init__(self, spatial: Sequence[int], roi_size: Sequence[int], overlap, sw_batch_size: int, batch: int) -> None:
        nd = len(spatial)
        roi = fall_back_tuple(ensure_tuple_rep(roi_size, nd), spatial)
        if any(r > s for r, s in zip(roi, spatial)):
            raise ValueError(f"volume {tuple(spatial)} is smaller than the window {tuple(roi)}; pad it first")
        self.roi = tuple(int(r) for r in roi)
        scan = _get_scan_interval(tuple(spatial), self.roi, nd, ensure_tuple_rep(overlap, nd))
        windows = dense_patch_slices(tuple(spatial), self.roi, scan)
        # (image index, spatial slices) in sliding_window_inference's order: image-major, then the grid
        self.windows = [(b, tuple(w)) for b in range(batch) for w in windows]
        self.sw_batch_size = max(1, int(sw_batch_size))
        self.count = torch.zeros((1, 1, *spatial))
        for w in windows:
            self.count[(slice(None), slice(None), *w)] += 1.0
        self._buffer: torch.Tensor | None = None
        self._out: torch.Tensor | None = None

    def __call__(self, image: torch.Tensor, x_k: torch.Tensor, network, k: int) -> torch.Tensor:
        """Stitched logits ``(B, C, *S)`` of ``network(cat([image, x_k]) window, k)`` over the grid."""
        n_img = image.shape[1]
        if self._buffer is None:
            self._buffer = torch.empty((min(self.sw_batch_size, len(self.windows)), n_img + x_k.shape[1], *self.roi),
                                       dtype=image.dtype, device=image.device)
        for start in range(0, len(self.windows), self.sw_batch_size):
            group = self.windows[start:start + self.sw_batch_size]
            buffer = self._buffer[: len(group)]
            for j, (b, w) in enumerate(group):
                buffer[j, :n_img].copy_(image[(b, slice(None), *w)])
                buffer[j, n_img:].copy_(x_k[(b, slice(None), *w)])  # x_k is float32: cast to the image's dtype
            logits = network(buffer, k)
            if self._out is None:
                self._out = torch.zeros((image.shape[0], logits.shape[1], *image.shape[2:]), dtype=image.dtype,
                                        device=image.device)
            elif start == 0:
                self._out.zero_()
            for j, (b, w) in enumerate(group):
                self._out[(b, slice(None), *w)] += logits[j]
        if self.count.device != self._out.device:
            self.count = self.count.to(self._out.device)  # once, not at every step
        return self._out.div_(self.count)


def _divisor(network) -> int | None:
    """What every spatial size of ``network``'s input must be a multiple of (``DiffSegUNet.divisor``), or ``None``;
    through a runtime wrapper that keeps the module as ``.network`` (:class:`OpenVINONetwork`) too."""
    divisor = getattr(getattr(network, "network", network), "divisor", None)
    return int(divisor) if divisor else None


class DiffSegInferer(Inferer):
    """``inferer(image, network) -> logits`` running T reverse diffusion steps (or one pass for the baseline).

    Args:
        num_classes: C, background included.
        scheduler: :class:`DiffSegScheduler` (default: paper A's 5-step schedule).
        roi_size: sliding-window size (the training patch); ``None`` runs on the whole volume.
        sw_batch_size, overlap, mode: as in ``sliding_window_inference`` (``mode="constant"``).
        padding_mode: how the image is padded up to one window, ``"constant"`` (zeros) or ``"replicate"``
            (the same for the diffusion chain and the baseline's windows; the logits are cropped back).
        sampler: ``"ddpm"`` (paper A) or ``"ddim"``.
        eta: DDIM stochasticity (0: deterministic given ``x_{T-1}``).
        seed: seed of the generator of ``x_{T-1}`` and of the step noise; every call restarts it,
            so the same input gives the same labels. ``None`` draws from the global generator.
        stitching: ``"per_step"`` (default) or ``"per_patch"``.
        diffusion: False runs the non-diffusion baseline (one pass per window, no mask input).
        save_steps: keep the per-step probabilities (``(1, C, *S)`` on the CPU, step T-1 first)
            in ``self.step_probs`` after each call (per-step metrics, visualisation).
        runtime: who runs the network passes: ``"torch"`` (eager PyTorch), ``"openvino"`` (the same weights
            compiled by OpenVINO, CPU only: :class:`common.inferers.openvino.OpenVINONetwork`) or ``"auto"``
            (OpenVINO when it is installed, the network is on the CPU and no gradient is being recorded;
            PyTorch otherwise).
        runtime_precision: OpenVINO's arithmetic, ``"f32"`` (default), ``"bf16"`` (faster, inexact) or ``"auto"``
            (``bf16`` on a CPU with bfloat16 units, ``f32`` elsewhere).
        fit_window: shrink the window to the volume along the axes where the volume is smaller than it (see the
            module docstring) instead of padding the volume up to the window.
        window_multiple: what a shrunk window's size is a multiple of; ``None``: the network's ``divisor``
            attribute (1 where it has none).
        min_window_fraction: the smallest part of the configured window a fitted window keeps, per axis (then
            rounded up to ``window_multiple``).
        max_window_fraction: with ``fit_window``, an axis of the volume up to this many windows long is covered by
            one window (the volume's size rounded up to ``window_multiple``); 1 (default) never grows the window.

    ``image`` has the ``n_img`` image channels; the network receives ``n_img + C`` channels and
    the step index as its second argument.
    """

    def __init__(
        self,
        num_classes: int,
        scheduler: DiffSegScheduler | None = None,
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 1,
        overlap: Sequence[float] | float = 0.25,
        mode: str = "constant",
        padding_mode: str = "constant",
        sampler: str = "ddpm",
        eta: float = 0.0,
        seed: int | None = 0,
        stitching: str = "per_step",
        diffusion: bool = True,
        save_steps: bool = False,
        runtime: str = "torch",
        runtime_precision: str = "f32",
        fit_window: bool = False,
        window_multiple: int | None = None,
        min_window_fraction: float = 0.5,
        max_window_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if padding_mode not in ("constant", "replicate"):
            raise ValueError(f"padding_mode must be 'constant' or 'replicate', got {padding_mode!r}")
        if stitching not in ("per_step", "per_patch"):
            raise ValueError(f"stitching must be 'per_step' or 'per_patch', got {stitching!r}")
        self.num_classes = int(num_classes)
        self.scheduler = scheduler if scheduler is not None else DiffSegScheduler()
        self.roi_size = roi_size
        self.sw_kwargs = {"sw_batch_size": sw_batch_size, "overlap": overlap, "mode": mode, "padding_mode": padding_mode}
        self.sampler, self.eta, self.seed = sampler, float(eta), seed
        self.stitching, self.diffusion, self.save_steps = stitching, bool(diffusion), bool(save_steps)
        self.step_probs: list[torch.Tensor] = []
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime_precision not in PRECISIONS:
            raise ValueError(f"runtime_precision must be one of {PRECISIONS}, got {runtime_precision!r}")
        self.runtime, self.runtime_precision = runtime, runtime_precision
        self.fit_window = bool(fit_window)
        if window_multiple is not None and int(window_multiple) < 1:
            raise ValueError(f"window_multiple must be a positive integer, got {window_multiple!r}")
        self.window_multiple = None if window_multiple is None else int(window_multiple)
        if not 0.0 <= float(min_window_fraction) <= 1.0:
            raise ValueError(f"min_window_fraction must be in [0, 1], got {min_window_fraction!r}")
        self.min_window_fraction = float(min_window_fraction)
        if not float(max_window_fraction) >= 1.0:
            raise ValueError(f"max_window_fraction must be at least 1, got {max_window_fraction!r}")
        self.max_window_fraction = float(max_window_fraction)
        self._compiled: OpenVINONetwork | None = None

    def _network_for_runtime(self, network):
        """``network`` itself, or its OpenVINO wrapper (kept across calls; it reconverts when the weights change)."""
        if not isinstance(network, torch.nn.Module):
            return network
        runtime = resolve_runtime(self.runtime, network)
        if runtime == "openvino" and torch.is_grad_enabled():
            if self.runtime == "openvino":
                raise RuntimeError("runtime 'openvino' computes no gradients; call the inferer under torch.no_grad()")
            runtime = "torch"
        if runtime == "torch":
            return network
        if self._compiled is None or self._compiled.network is not network:
            # DiffSegUNet's graph is the same for every size divisible by its divisor: trace it small
            self._compiled = OpenVINONetwork(network, precision=self.runtime_precision,
                                             shape_multiple=_divisor(network))
        return self._compiled

    def window_size(self, spatial: Sequence[int], network=None) -> tuple[int, ...] | None:
        """The window used on a volume of size ``spatial``: ``roi_size`` (``None``: the whole volume), or with
        ``fit_window`` fitted to the volume, rounded up to ``window_multiple``, along the axes where the volume is
        shorter (to no less than ``min_window_fraction`` of ``roi_size``) or longer but within ``max_window_fraction``
        of it (one window covers the axis)."""
        if self.roi_size is None:
            return None
        roi = tuple(int(r) for r in fall_back_tuple(ensure_tuple_rep(self.roi_size, len(spatial)), spatial))
        if not self.fit_window:
            return roi
        m = self.window_multiple
        if m is None:
            m = _divisor(network) or 1
        window = []
        for r, s in zip(roi, (int(s) for s in spatial)):
            if s <= r:  # shrink towards the volume, to no less than the lower bound
                window.append(min(r, -(-max(s, math.ceil(self.min_window_fraction * r)) // m) * m))
            elif s <= self.max_window_fraction * r:  # grow: one window covers the axis
                window.append(-(-s // m) * m)
            else:  # sliding windows of the configured size
                window.append(r)
        return tuple(window)

    def _windowed(self, inputs: torch.Tensor, predictor, roi) -> torch.Tensor:
        """``predictor`` on the whole volume or averaged over sliding windows of size ``roi``."""
        if roi is None:
            return predictor(inputs)
        return sliding_window_inference(inputs, roi, predictor=predictor, **self.sw_kwargs)

    def _chain(self, image: torch.Tensor, network, generator: torch.Generator | None) -> torch.Tensor:
        """The T-step chain on ``image`` (one window or the whole volume), stitching nothing."""
        x_k = torch.randn((image.shape[0], self.num_classes, *image.shape[2:]), generator=generator, device=image.device)
        logits = x_k
        for k in reversed(range(self.scheduler.num_timesteps)):
            logits = network(torch.cat([image, x_k.to(image.dtype)], dim=1), k).float()
            x_k = self.scheduler.step(self.scheduler.logits_to_x0(logits), x_k, k, self.sampler, self.eta, generator)
        return logits

    @staticmethod
    def _pad_to_roi(spatial: Sequence[int], roi) -> list[int]:
        """``F.pad`` amounts (last axis first) that bring ``spatial`` up to the window size ``roi``."""
        if roi is None:
            return []
        short = [max(int(r) - int(s), 0) for r, s in zip(roi, spatial)]
        if not any(short):
            return []
        pads: list[int] = []
        for amount in reversed(short):
            pads += [amount // 2, amount - amount // 2]
        return pads

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Final-step logits ``(B, C, *S)`` for ``inputs`` ``(B, n_img, *S)``."""
        roi = self.window_size(inputs.shape[2:], network)
        network = self._network_for_runtime(network)
        if not self.diffusion:
            return self._windowed(inputs, lambda w: network(w, *args, **kwargs), roi)
        pads = self._pad_to_roi(inputs.shape[2:], roi) if self.stitching == "per_step" else []
        if not pads:
            return self._sample(inputs, network, roi)
        logits = self._sample(F.pad(inputs, pads, mode=self.sw_kwargs["padding_mode"]), network, roi)  # constant: zeros
        spatial = inputs.shape[2:]
        crop = [slice(None), slice(None)]
        for axis in range(len(spatial)):
            before = pads[2 * (len(spatial) - 1 - axis)]
            crop.append(slice(before, before + spatial[axis]))
        if self.save_steps:
            self.step_probs = [p[tuple(crop)] for p in self.step_probs]
        return logits[tuple(crop)]

    def _sample(self, inputs: torch.Tensor, network, roi) -> torch.Tensor:
        """The reverse process on ``inputs`` (already at least one window large for per-step stitching)."""
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=inputs.device)
            generator.manual_seed(int(self.seed))
        if self.stitching == "per_patch":
            return self._windowed(inputs, lambda w: self._chain(w, network, generator), roi)
        self.step_probs = []
        # x_{T-1} ~ N(0, I) on the full volume: every window sees the same noise
        x_k = torch.randn((inputs.shape[0], self.num_classes, *inputs.shape[2:]), generator=generator, device=inputs.device)
        logits = x_k
        windows = None
        if roi is not None and self.sw_kwargs["mode"] == "constant":
            windows = _StepWindows(inputs.shape[2:], roi, self.sw_kwargs["overlap"],
                                   self.sw_kwargs["sw_batch_size"], inputs.shape[0])
            plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs  # windows without metadata copies
        # the step's noise is drawn by a second thread while the network passes run: the generator is used in the
        # same order as drawing it in the step (nothing else draws from it), so the values are the same, but the
        # one-threaded draw (about 0.6 s per step for the paper CT's 16 x 243 x 198 x 128 masks) leaves the loop
        draws = ThreadPoolExecutor(max_workers=1) if windows is not None and x_k.device.type == "cpu" else None
        try:
            for k in reversed(range(self.scheduler.num_timesteps)):
                noise = None
                if draws is not None and self.scheduler.draws_noise(k, self.sampler, self.eta):
                    noise = draws.submit(torch.randn, x_k.shape, generator=generator, dtype=x_k.dtype)
                if windows is None:
                    joint = torch.cat([inputs, x_k.to(inputs.dtype)], dim=1)
                    logits = self._windowed(joint, lambda w, k=k: network(w, k), roi).float()
                else:
                    # the stitched logits live in a buffer the next step overwrites: the last step's are returned
                    logits = windows(plain, x_k, network, k).float()
                x0_hat = self.scheduler.logits_to_x0(logits)
                if self.save_steps:
                    self.step_probs.append(((x0_hat + 1.0) / 2.0).detach().cpu())
                x_k = self.scheduler.step(x0_hat, x_k, k, self.sampler, self.eta, generator,
                                          noise=None if noise is None else noise.result())
        finally:
            if draws is not None:
                draws.shutdown(wait=True)
        if windows is not None and isinstance(inputs, MetaTensor):
            # what sliding_window_inference returns for a MetaTensor input: the input's metadata on the logits
            logits = convert_to_dst_type(logits, MetaTensor([]).copy_meta_from(inputs, copy_attr=False))[0]
        return logits
