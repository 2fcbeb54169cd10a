"""The translation inferer of the ALDM bundle: source -> one volume per requested target modality.

:class:`ALDMTranslationInferer` encodes the source once, switches SPADE and the target condition per
target, samples the latent with :class:`common.inferers.LatentDiffusionSampler` (``mode="diffusion"``)
or skips diffusion (``mode="spade_only"``), decodes without re-quantising and clips to ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.inferers import Inferer

from common.inferers import LatentDiffusionSampler
from common.networks.aldm_ldm import target_condition
from common.utils.errors import InvalidInputError

from .networks import ALDMFirstStage

__all__ = ["ALDMTranslationInferer", "per_sample_targets"]


def per_sample_targets(targets: Any, batch_size: int) -> list[list[str]]:
    """Target names per sample from a collated batch (``[("t2",), ("flair",)]``), a list, or a string."""
    if isinstance(targets, str):
        return [[t.strip() for t in targets.split(",") if t.strip()]] * batch_size
    targets = list(targets)
    if targets and isinstance(targets[0], (tuple, list)):  # default_collate transposes lists of strings
        return [list(s) for s in zip(*targets)]
    return [[str(t) for t in targets]] * batch_size


class ALDMTranslationInferer(Inferer):
    """Translate a batch of source images into each requested target modality.

    Args:
        sampler: latent sampler (DDIM 200 steps, eta 1 by default); unused in ``spade_only`` mode.
        diffusion_model: the UNet (or its :class:`common.engines.ema.EMA`, as for sampling).
        modalities: modality names in the order of the one-hot condition.
        mode: ``"diffusion"`` (ALDM) or ``"spade_only"`` (``D(SPADE_tgt(E_q(x)))``, no diffusion).
        conditioning: ``"cross_attention"`` or ``"class_embed"``, as the UNet was built.
        scale_factor: latent scale used in training (1.0 in v1); loading the stage-3 checkpoint's
            ``step`` entry into this inferer (:meth:`load_state_dict`) sets the trained value.
            ``"auto"`` (what stage 3's ``scale_factor: auto`` trains with, so that one overlay serves
            training and inference): the value of that checkpoint, required before the first
            diffusion translation.
        requantize: nearest-code the sampled latent before decoding (official: False).
        seed: sampling seed; each target of a batch gets ``seed + k`` so targets are independent
            but a rerun is bit-identical.
        scale_from: optional object whose ``scale_factor`` attribute (when not None) replaces
            ``scale_factor`` at call time, e.g. the stage-3 training step during validation.

    Call: ``inferer(x, network, targets, source=None)`` with ``network`` an :class:`ALDMFirstStage`;
    returns ``(N, T, H, W, D)``, channel ``k`` = target ``k``, clipped to ``[0, 1]``.
    """

    def __init__(
        self,
        sampler: LatentDiffusionSampler | None,
        diffusion_model: nn.Module | None,
        modalities: Sequence[str],
        mode: str = "diffusion",
        conditioning: str = "cross_attention",
        scale_factor: float | str = 1.0,
        requantize: bool = False,
        seed: int | None = 0,
        scale_from: Any = None,
    ) -> None:
        super().__init__()
        self.scale_from = scale_from
        if mode not in ("diffusion", "spade_only"):
            raise InvalidInputError(f"config key 'mode' must be 'diffusion' or 'spade_only', got {mode!r}")
        if mode == "diffusion" and (sampler is None or diffusion_model is None):
            raise InvalidInputError("mode 'diffusion' needs a sampler and a diffusion model (config keys 'sampler', 'diffusion_model')")
        self.sampler = sampler
        self.diffusion_model = diffusion_model
        self.modalities = list(modalities)
        self.mode = mode
        self.conditioning = conditioning
        if isinstance(scale_factor, str) and scale_factor != "auto":
            raise InvalidInputError(f"config key 'scale_factor' must be a number or 'auto', got {scale_factor!r}")
        self.scale_factor = float("nan") if scale_factor == "auto" else float(scale_factor)  # NaN: from the checkpoint
        self.requantize = requantize
        self.seed = seed

    def state_dict(self) -> dict[str, Any]:
        return {"scale_factor": torch.tensor(self.scale_factor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the latent scale of a ``LatentDiffusionTrainingStep`` checkpoint entry."""
        value = float(state["scale_factor"])
        if value == value:  # NaN: the scale was never estimated
            self.scale_factor = value

    @torch.no_grad()
    def translate(self, x: torch.Tensor, network: ALDMFirstStage, targets: Sequence[str]) -> torch.Tensor:
        """``(N, 1, *S)`` source -> ``(N, len(targets), *S)``, the source encoded once."""
        z_src = network.encode(x)
        outs = []
        for k, tgt in enumerate(targets):
            c = network.translate_latent(z_src, tgt)
            if self.mode == "spade_only":
                z0 = c
            else:
                s = getattr(self.scale_from, "scale_factor", None) or self.scale_factor
                if s != s:
                    raise InvalidInputError(
                        "config key 'scale_factor' is 'auto' but no stage-3 checkpoint set it: load the diffusion "
                        "checkpoint's 'step' entry (config key 'diffusion_ckpt') or give the trained value"
                    )
                cond = torch.cat([s * z_src, s * c], dim=1)
                kwargs = target_condition(tgt, self.modalities, self.conditioning, batch_size=x.shape[0], device=x.device)
                seed = None if self.seed is None else int(self.seed) + k
                z0 = self.sampler(cond, self.diffusion_model, seed=seed, **kwargs) / s
                if self.requantize:
                    z0 = network.autoencoder.quantize(z0)[0]
            outs.append(network.decode(z0).clamp(0.0, 1.0))
        return torch.cat(outs, dim=1)

    def __call__(self, inputs: torch.Tensor, network: ALDMFirstStage, targets: Any = None, source: Any = None, **kwargs: Any):  # type: ignore[override]
        if targets is None:
            targets = [network.default_target]
        names = per_sample_targets(targets, inputs.shape[0])
        if any(n != names[0] for n in names):
            # different targets per sample: translate sample by sample
            if any(len(n) != len(names[0]) for n in names):
                raise ValueError(f"every sample of a batch needs the same number of targets, got {names}")
            return torch.cat([self.translate(inputs[i : i + 1], network, n) for i, n in enumerate(names)], dim=0)
        return self.translate(inputs, network, names[0])
