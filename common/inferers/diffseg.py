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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, sliding_window_inference
from monai.utils import ensure_tuple_rep, fall_back_tuple

from common.inferers.openvino import PRECISIONS, RUNTIMES, OpenVINONetwork, resolve_runtime
from common.schedulers.diffseg import DiffSegScheduler

__all__ = ["DiffSegInferer"]


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
        runtime_precision: OpenVINO's arithmetic, ``"f32"`` (default) or ``"bf16"`` (faster, inexact).

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
                                             shape_multiple=getattr(network, "divisor", None))
        return self._compiled

    def _windowed(self, inputs: torch.Tensor, predictor) -> torch.Tensor:
        """``predictor`` on the whole volume or averaged over sliding windows."""
        if self.roi_size is None:
            return predictor(inputs)
        return sliding_window_inference(inputs, self.roi_size, predictor=predictor, **self.sw_kwargs)

    def _chain(self, image: torch.Tensor, network, generator: torch.Generator | None) -> torch.Tensor:
        """The T-step chain on ``image`` (one window or the whole volume), stitching nothing."""
        x_k = torch.randn((image.shape[0], self.num_classes, *image.shape[2:]), generator=generator, device=image.device)
        logits = x_k
        for k in reversed(range(self.scheduler.num_timesteps)):
            logits = network(torch.cat([image, x_k.to(image.dtype)], dim=1), k).float()
            x_k = self.scheduler.step(self.scheduler.logits_to_x0(logits), x_k, k, self.sampler, self.eta, generator)
        return logits

    def _pad_to_roi(self, spatial: Sequence[int]) -> list[int]:
        """``F.pad`` amounts (last axis first) that bring ``spatial`` up to the window size."""
        if self.roi_size is None:
            return []
        roi = fall_back_tuple(ensure_tuple_rep(self.roi_size, len(spatial)), spatial)
        short = [max(int(r) - int(s), 0) for r, s in zip(roi, spatial)]
        if not any(short):
            return []
        pads: list[int] = []
        for amount in reversed(short):
            pads += [amount // 2, amount - amount // 2]
        return pads

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Final-step logits ``(B, C, *S)`` for ``inputs`` ``(B, n_img, *S)``."""
        network = self._network_for_runtime(network)
        if not self.diffusion:
            return self._windowed(inputs, lambda w: network(w, *args, **kwargs))
        pads = self._pad_to_roi(inputs.shape[2:]) if self.stitching == "per_step" else []
        if not pads:
            return self._sample(inputs, network)
        logits = self._sample(F.pad(inputs, pads, mode=self.sw_kwargs["padding_mode"]), network)  # constant: zeros
        spatial = inputs.shape[2:]
        crop = [slice(None), slice(None)]
        for axis in range(len(spatial)):
            before = pads[2 * (len(spatial) - 1 - axis)]
            crop.append(slice(before, before + spatial[axis]))
        if self.save_steps:
            self.step_probs = [p[tuple(crop)] for p in self.step_probs]
        return logits[tuple(crop)]

    def _sample(self, inputs: torch.Tensor, network) -> torch.Tensor:
        """The reverse process on ``inputs`` (already at least one window large for per-step stitching)."""
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=inputs.device)
            generator.manual_seed(int(self.seed))
        if self.stitching == "per_patch":
            return self._windowed(inputs, lambda w: self._chain(w, network, generator))
        self.step_probs = []
        # x_{T-1} ~ N(0, I) on the full volume: every window sees the same noise
        x_k = torch.randn((inputs.shape[0], self.num_classes, *inputs.shape[2:]), generator=generator, device=inputs.device)
        logits = x_k
        for k in reversed(range(self.scheduler.num_timesteps)):
            joint = torch.cat([inputs, x_k.to(inputs.dtype)], dim=1)
            logits = self._windowed(joint, lambda w, k=k: network(w, k)).float()
            x0_hat = self.scheduler.logits_to_x0(logits)
            if self.save_steps:
                self.step_probs.append(((x0_hat + 1.0) / 2.0).detach().cpu())
            x_k = self.scheduler.step(x0_hat, x_k, k, self.sampler, self.eta, generator)
        return logits
