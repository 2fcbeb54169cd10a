"""MAISI sampler: latent diffusion with ControlNet conditioning on a label mask, then VAE decode to HU.

Method (MAISI, Guo et al., arXiv 2409.11169; MAISI-v2, arXiv 2508.05772; official sampler in
NV-Generate-CTMR ``scripts/sample.py``): noise ``z ~ N(0, I)`` of shape (N, 4, X/4, Y/4, Z/4); at every step
the ControlNet turns ``binarize_labels(mask)`` into residuals that are added inside the diffusion UNet
(conditioned on spacing x 100 and the modality label (rectified flow) or the body region (DDPM)); the
scheduler steps the latent; the VAE decodes ``z / scale_factor`` (whole or by sliding window on the latent,
with tensor splitting); the [0, 1] image becomes HU and air outside the body. An organ-intensity quality
check can redraw the noise when a sample fails.

This module also holds :func:`check_input`, the official request constraints (strict mode) and the ones any
model needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler, Scheduler
from monai.utils import optional_import

from common.networks.maisi import clamp_num_splits, load_pretrained, read_scale_factor, set_num_splits
from common.networks.maisi_streaming_decoder import streaming_decode, supports_streaming
from common.transforms.maisi import (
    MAISI_LABELS,
    apply_body_mask,
    binarize_labels,
    body_region_from_mask,
    latent_image_to_hu,
    quality_check,
)
from common.utils.errors import InvalidInputError

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["MaisiInferer", "MaisiReconstructionInferer", "MaisiWeightLoader", "check_input", "body_region_index", "spacing_from_affine"]

# official request constraints (NV-Generate-CTMR ``check_input``; spec section 4.1)
_XY_SIZES = (256, 384, 512)
_Z_SIZES = (128, 256, 384, 512, 640, 768)
_CONTROLLABLE = ("liver", "gallbladder", "stomach", "pancreas", "colon")
_TUMORS = ("hepatic tumor", "bone lesion", "lung tumor", "colon cancer primaries", "pancreatic tumor")
_REGIONS = {"head": 0, "chest": 1, "thorax": 1, "abdomen": 2, "pelvis": 3, "lower": 3}


def check_input(
    output_size: Sequence[int],
    spacing: Sequence[float],
    anatomy_list: Sequence[str] | None = None,
    controllable_anatomy_size: Sequence[Sequence[Any]] | None = None,
    body_region: Sequence[str] | None = None,
    strict: bool = True,
    label_dict: Mapping[str, int] = MAISI_LABELS,
) -> None:
    """Raise ``ValueError`` with a clear message when a generation request cannot be served.

    Always checked: three sizes, each a positive multiple of 32 (the VAE divides by 4 and the UNet halves the
    latent three times), three positive spacings, at most 10 controllable anatomies, at most one tumour, no
    repeats, sizes in [0, 1] or -1, known anatomy and body-region names.
    ``strict=True`` adds the constraints of the official weights: spacing x == y, output_size[0] == [1] in
    {256, 384, 512},
    output_size[2] in {128, ..., 768}, spacing x/y in [0.5, 3.0] mm, z in [0.5, 5.0] mm, field of view
    x/y >= 256 mm. Custom-trained small models set ``strict=False``.
    """
    size = [int(s) for s in output_size]
    spc = [float(s) for s in spacing]
    if len(size) != 3 or len(spc) != 3:
        raise InvalidInputError(f"output_size and spacing need three values each, got {size} and {spc}")
    if any(s <= 0 or s % 32 for s in size):
        raise InvalidInputError(f"every output_size value must be a positive multiple of 32, got {size}")
    if any(s <= 0 for s in spc):
        raise InvalidInputError(f"spacing must be positive, got {spc}")
    if strict:
        if spc[0] != spc[1]:
            raise InvalidInputError(f"spacing[0] and spacing[1] must be equal for the official weights, got {spc}")
        if size[0] != size[1]:
            raise InvalidInputError(f"output_size[0] and output_size[1] must be equal, got {size}")
        if size[0] not in _XY_SIZES or size[2] not in _Z_SIZES:
            raise InvalidInputError(
                f"output_size {size} is not supported by the official weights: x = y in {_XY_SIZES}, z in {_Z_SIZES} "
                "(set strict_input_check to false for a custom-trained model)"
            )
        if not (0.5 <= spc[0] <= 3.0 and 0.5 <= spc[1] <= 3.0 and 0.5 <= spc[2] <= 5.0):
            raise InvalidInputError(f"spacing {spc} mm is outside [0.5, 3.0] (x, y) / [0.5, 5.0] (z) of the official weights")
        fov = [size[i] * spc[i] for i in range(2)]
        if min(fov) < 256:
            raise InvalidInputError(f"field of view {fov} mm is below 256 mm in x/y; increase output_size or spacing")
    anatomy = list(anatomy_list or [])
    unknown = [a for a in anatomy if a not in label_dict]
    if unknown:
        raise InvalidInputError(f"anatomy_list has unknown anatomy {unknown}; names must be keys of the MAISI label dictionary (configs/label_dict.json)")
    sizes = list(controllable_anatomy_size or [])
    names = [str(item[0]) for item in sizes]
    if len(names) > 10:
        raise InvalidInputError(f"at most 10 controllable anatomies, got {len(names)}")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"controllable_anatomy_size repeats an anatomy: {names}")
    bad = [n for n in names if n not in _CONTROLLABLE + _TUMORS]
    if bad:
        raise InvalidInputError(f"{bad} cannot be size-controlled; choose from {_CONTROLLABLE + _TUMORS}")
    tumors = {n for n in names + anatomy if n in _TUMORS}
    if len(tumors) > 1:
        raise InvalidInputError(f"at most one tumour per sample, got {sorted(tumors)}")
    for name, scale in ((str(i[0]), float(i[1])) for i in sizes):
        if not (0.0 <= scale <= 1.0 or scale == -1.0):
            raise InvalidInputError(f"size of {name!r} must be in [0, 1] or -1, got {scale}")
    regions = [r for r in (body_region or []) if r not in _REGIONS]
    if regions:
        raise InvalidInputError(f"body_region has unknown region(s) {regions}; choose from {sorted(_REGIONS)}")


def body_region_index(region: str | None) -> torch.Tensor | None:
    """One-hot x 100 body-region vector (order head, chest/thorax, abdomen, pelvis/lower) of the DDPM UNet."""
    if region is None:
        return None
    if region not in _REGIONS:
        raise InvalidInputError(f"unknown body region {region!r}; choose from {sorted(_REGIONS)}")
    vec = torch.zeros(4)
    vec[_REGIONS[region]] = 100.0  # the official code feeds one-hot x 100 (like spacing x 100)
    return vec


def spacing_from_affine(affine: torch.Tensor) -> torch.Tensor:
    """Voxel spacing (mm) from a 4x4 affine: the norms of its first three columns."""
    return torch.linalg.norm(torch.as_tensor(affine, dtype=torch.float64)[:3, :3], dim=0).float()


class MaisiInferer(Inferer):
    """Generate CT from label masks: ``inferer(mask, unet) -> image in HU`` (a MetaTensor on the mask's grid).

    Args:
        scheduler: ``RFlowScheduler`` (default method, 30 steps) or ``DDPMScheduler`` (v1 option, 1000 steps).
        autoencoder: the CT VAE (``decode_stage_2_outputs``).
        controlnet: ControlNet conditioned on ``binarize_labels(mask)``.
        scale_factor: latent scale of the diffusion checkpoint (the sampler decodes ``z / scale_factor``).
        num_inference_steps: sampling steps.
        modality: rflow class label (CT = 1; ``modality_mapping.json``); ignored by the DDPM UNet.
        top_region / bottom_region: DDPM body regions (``head``, ``chest``, ``abdomen``, ``pelvis``, ...), used only
            for a mask without region marker labels: the DDPM regions come from each mask (:meth:`region_tensors`).
        cfg_guidance_scale: classifier-free guidance on the modality label (0 = off; rflow only).
        decode_roi_size: sliding-window ROI **in latent voxels**; volumes whose latent has at most this many
            voxels are decoded in one pass.
        decode_overlap: sliding-window overlap.
        decode_num_splits: tensor-splitting parallelism of the VAE; clamped so every split keeps >= 3 voxels.
        decode_mode: ``"streaming"``: the whole latent decoded at once by
            :func:`common.networks.maisi_streaming_decoder.streaming_decode` (equal to the whole-volume decode up to
            float32 rounding, memory bounded by one residual block's input and output; ``decode_roi_size``,
            ``decode_overlap`` and ``decode_num_splits`` unused); ``"sliding_window"``: the official path above;
            ``"auto"``: streaming where the decoder supports it (float32 normalisation: on a CPU), else sliding
            window.
        decode_chunk: slab thickness of the streaming decode (voxels of each layer, last axis).
        quality_statistics: ``image_median_statistics.json`` table; ``None`` disables the quality check.
        max_try: samples drawn per mask until one passes the quality check (the last is kept either way); the
            mask-database path uses 1 and moves to the next mask instead (official).
        seed: seed of the generator that draws all noise (on the CPU, so results do not depend on the device).
        amp: autocast (CUDA only).
        progress: show a progress bar over the sampling steps.
        sw_device: device of the sliding-window patches (default: the latent's device); the stitched output
            is kept on the CPU so memory on the accelerator stays bounded.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        autoencoder: torch.nn.Module,
        controlnet: torch.nn.Module | None,
        scale_factor: float | torch.Tensor = 1.0,
        num_inference_steps: int = 30,
        modality: int = 1,
        top_region: str | None = None,
        bottom_region: str | None = None,
        cfg_guidance_scale: float = 0.0,
        decode_roi_size: Sequence[int] = (48, 48, 48),
        decode_overlap: float = 0.6666,
        decode_num_splits: int = 4,
        decode_mode: str = "auto",
        decode_chunk: int = 8,
        quality_statistics: Mapping[str, Mapping[str, float]] | None = None,
        max_try: int = 2,
        seed: int = 0,
        amp: bool = False,
        progress: bool = True,
        sw_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, (RFlowScheduler, DDPMScheduler)):
            raise TypeError(f"scheduler must be an RFlowScheduler or a DDPMScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.autoencoder = autoencoder
        self.controlnet = controlnet
        self.scale_factor = float(scale_factor)
        self.num_inference_steps = int(num_inference_steps)
        self.modality = int(modality)
        self.top_region = body_region_index(top_region)
        self.bottom_region = body_region_index(bottom_region)
        self.cfg_guidance_scale = float(cfg_guidance_scale)
        self.decode_roi_size = tuple(int(r) for r in decode_roi_size)
        self.decode_overlap = float(decode_overlap)
        self.decode_num_splits = int(decode_num_splits)
        if decode_mode not in ("auto", "streaming", "sliding_window"):
            raise ValueError(f"decode_mode must be 'auto', 'streaming' or 'sliding_window', got {decode_mode!r}")
        if decode_mode == "streaming" and not supports_streaming(autoencoder):
            raise ValueError(
                "decode_mode 'streaming' needs a decoder with float32 normalisation and no transposed convolutions "
                "or non-local attention (the official CT VAE on a CPU); use 'sliding_window' or 'auto'"
            )
        self.decode_mode = decode_mode
        self.decode_chunk = int(decode_chunk)
        self.quality_statistics = quality_statistics
        self.max_try = max(1, int(max_try))
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.amp = bool(amp)
        self.progress = bool(progress) and has_tqdm
        self.sw_device = sw_device
        self.last_report: dict[str, Any] = {}
        self.last_regions: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def is_rflow(self) -> bool:
        return isinstance(self.scheduler, RFlowScheduler)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> MetaTensor:
        """``inputs``: label masks (N, 1, X, Y, Z) (MAISI ids, body 200; a MetaTensor carries the affine).

        Returns the CT in HU, float32 (N, 1, X, Y, Z), -1000 outside the body, as a MetaTensor with the mask's
        metadata; :attr:`last_report` holds the quality check of the kept sample and the number of draws.
        """
        mask = inputs
        if mask.ndim != 5 or mask.shape[1] != 1:
            raise ValueError(f"expected label masks of shape (N, 1, X, Y, Z), got {tuple(mask.shape)}")
        if any(s % 32 for s in mask.shape[2:]):
            raise ValueError(f"mask size {tuple(mask.shape[2:])} must be a multiple of 32 in every axis")
        affine = mask.affine if isinstance(mask, MetaTensor) else torch.eye(4)
        if affine.ndim == 3:
            affine = affine[0]
        spacing = spacing_from_affine(affine)
        self.last_regions = None
        for attempt in range(1, self.max_try + 1):
            latent = self.sample_latent(mask, network, spacing)
            image = apply_body_mask(latent_image_to_hu(self.decode(latent).float()), torch.as_tensor(mask).cpu())
            qc = None
            if self.quality_statistics is not None:
                qc = quality_check(image, mask, self.quality_statistics)
                if all(v["passed"] for v in qc.values()):
                    break
            else:
                break
        if isinstance(mask, MetaTensor):  # keep the mask's geometry (a plain tensor would be saved with an identity affine)
            out = MetaTensor(image.float())
            out.copy_meta_from(mask, copy_attr=True)
        else:
            out = MetaTensor(image.float(), affine=affine.clone())
        # kept outside the tensor's metadata so decollation and the NIfTI writer never see it
        self.last_report = {"quality_check": qc, "attempts": attempt, "spacing": spacing.tolist()}
        if self.last_regions is not None:
            self.last_report["top_region_index"] = (self.last_regions[0][0] / 100).int().tolist()
            self.last_report["bottom_region_index"] = (self.last_regions[1][0] / 100).int().tolist()
        return out

    @torch.no_grad()
    def sample_latent(self, mask: torch.Tensor, unet: torch.nn.Module, spacing: torch.Tensor) -> torch.Tensor:
        """Run the reverse process from noise to a clean latent (N, 4, X/4, Y/4, Z/4), in the scaled latent space."""
        device = next(unet.parameters()).device
        n = mask.shape[0]
        latent_shape = (n, unet.in_channels, *(s // 4 for s in mask.shape[2:]))
        latent = torch.randn(latent_shape, generator=self.generator).to(device)
        cond, labels, extra = self.denoise_inputs(mask, unet, spacing, device)

        if self.is_rflow:
            # the rflow schedule shifts toward the noisy end for latents larger than 32^3
            self.scheduler.set_timesteps(self.num_inference_steps, input_img_size_numel=math.prod(latent_shape[2:]))
        else:
            self.scheduler.set_timesteps(self.num_inference_steps)
        timesteps = self.scheduler.timesteps
        next_timesteps = torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype)))
        autocast = torch.autocast("cuda", enabled=self.amp and device.type == "cuda")
        steps = zip(timesteps, next_timesteps)
        if self.progress:
            steps = tqdm(steps, total=len(timesteps), desc="MAISI sampling")
        for t, t_next in steps:
            t_batch = torch.full((n,), float(t), device=device)
            with autocast:
                pred = self._denoise(unet, latent, t_batch, cond, labels, extra)
            if self.is_rflow:
                latent, _ = self.scheduler.step(pred.float(), t, latent, t_next)
            else:
                latent, _ = self.scheduler.step(pred.float(), int(t), latent, generator=self._device_generator(device))
        return latent

    def denoise_inputs(self, mask: torch.Tensor, unet: torch.nn.Module, spacing: torch.Tensor, device: torch.device):
        """What every step's :meth:`_denoise` gets besides the latent and the step: the ControlNet condition
        ``binarize_labels(mask)``, the rflow modality labels (None for DDPM) and the UNet's extra inputs (spacing in
        mm x 100, as the UNet is trained; the body region where the UNet takes one)."""
        n = mask.shape[0]
        cond = binarize_labels(torch.as_tensor(mask).to(device))
        spacing_t = (spacing.to(device) * 100.0).reshape(1, 3).repeat(n, 1)
        extra: dict[str, torch.Tensor] = {"spacing_tensor": spacing_t}
        if getattr(unet, "include_top_region_index_input", False):
            extra.update(self.region_tensors(mask, device))
        elif self.top_region is not None and self.bottom_region is not None:
            extra["top_region_index_tensor"] = self.top_region.to(device).repeat(n, 1)
            extra["bottom_region_index_tensor"] = self.bottom_region.to(device).repeat(n, 1)
        labels = torch.full((n,), self.modality, dtype=torch.long, device=device) if self.is_rflow else None
        return cond, labels, extra

    def region_tensors(self, mask: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """DDPM body-region conditioning (N, 4) one-hot x 100, from each mask as the official sampler does
        (``get_body_region_index_from_mask``); the configured ``top_region`` / ``bottom_region`` only when a mask
        has none of the region marker labels."""
        tops, bottoms = [], []
        for i in range(mask.shape[0]):
            found = body_region_from_mask(mask[i])
            if found is not None:
                tops.append(torch.tensor(found[0], dtype=torch.float32) * 100.0)
                bottoms.append(torch.tensor(found[1], dtype=torch.float32) * 100.0)
            elif self.top_region is not None and self.bottom_region is not None:
                tops.append(self.top_region.float())
                bottoms.append(self.bottom_region.float())
            else:
                raise InvalidInputError(
                    "the DDPM UNet needs the body region, but the mask has none of the marker labels (brain/skull, "
                    "lung lobes, abdominal organs, femurs); set config key 'body_region'"
                )
        self.last_regions = (torch.stack(tops), torch.stack(bottoms))
        return {"top_region_index_tensor": self.last_regions[0].to(device),
                "bottom_region_index_tensor": self.last_regions[1].to(device)}

    def _denoise(self, unet, latent, t_batch, cond, labels, extra) -> torch.Tensor:
        """One network evaluation: ControlNet residuals into the UNet, with optional modality guidance."""

        def evaluate(class_labels):
            kw = {"class_labels": class_labels} if class_labels is not None else {}
            down, mid = (None, None)
            if self.controlnet is not None:
                down, mid = self.controlnet(x=latent, timesteps=t_batch, controlnet_cond=cond, **kw)
            return unet(
                x=latent, timesteps=t_batch, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                **kw, **extra,
            )

        pred = evaluate(labels)
        if self.is_rflow and self.cfg_guidance_scale > 0:
            uncond = evaluate(torch.zeros_like(labels))  # label 0 = "unknown modality", trained with p = 0.1
            pred = uncond + self.cfg_guidance_scale * (pred - uncond)
        return pred

    def _device_generator(self, device: torch.device) -> torch.Generator | None:
        # DDPM draws its variance noise on the latent's device; derive that generator from the CPU one
        if device.type == "cpu":
            return self.generator
        gen = torch.Generator(device=device)
        gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        return gen

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE decode of ``latent / scale_factor`` -> image in [0, 1] scale (N, 1, 4x, 4y, 4z), returned on the CPU."""
        z = latent / self.scale_factor
        if self.decode_mode == "streaming" or (self.decode_mode == "auto" and supports_streaming(self.autoencoder)):
            with torch.autocast("cuda", enabled=False):
                return streaming_decode(self.autoencoder, z, chunk=self.decode_chunk).float().cpu()
        roi = self.decode_roi_size
        direct = math.prod(z.shape[2:]) <= math.prod(roi)
        # MaisiConvolution splits along dim_split (axis 1 = y of the official config); keep >= 3 voxels per split
        split_len = min(z.shape[3], roi[1]) if not direct else z.shape[3]
        set_num_splits(self.autoencoder, clamp_num_splits(self.decode_num_splits, split_len))
        autocast = torch.autocast("cuda", enabled=self.amp and z.device.type == "cuda")
        with autocast:
            if direct:
                return self.autoencoder.decode_stage_2_outputs(z).float().cpu()
            inferer = SlidingWindowInferer(
                roi_size=roi,
                sw_batch_size=1,
                overlap=self.decode_overlap,
                mode="gaussian",
                sw_device=self.sw_device or z.device,
                device=torch.device("cpu"),
                progress=self.progress,
            )
            return inferer(z, self.autoencoder.decode_stage_2_outputs).float()


class MaisiWeightLoader:
    """Ignite handler: when the engine starts, load the three checkpoints and the latent scale factor.

    Order (official): the UNet, then the ControlNet initialised from the UNet and *then* loaded strictly from
    its own checkpoint, then the VAE; ``inferer.scale_factor`` is read from the UNet checkpoint. Loading at
    ``STARTED`` (not at construction) lets a bundle's properties be checked without the weights present.
    """

    def __init__(
        self,
        inferer: MaisiInferer,
        unet: torch.nn.Module,
        unet_path: str,
        autoencoder_path: str,
        controlnet_path: str | None,
        device: torch.device | str = "cpu",
        unet_sha256: str | None = None,
        autoencoder_sha256: str | None = None,
        controlnet_sha256: str | None = None,
        large_files: str | None = None,
    ) -> None:
        self.inferer = inferer
        self.unet = unet
        self.unet_path = unet_path
        self.autoencoder_path = autoencoder_path
        self.controlnet_path = controlnet_path
        self.device = device
        # expected hashes (config keys diffusion_unet_sha256, ...) and the bundle's large_files.yml: each file is
        # verified before it is loaded
        self.unet_sha256 = unet_sha256
        self.autoencoder_sha256 = autoencoder_sha256
        self.controlnet_sha256 = controlnet_sha256
        self.large_files = large_files

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        lf = self.large_files
        load_pretrained(self.unet, self.unet_path, "unet", self.device, sha256=self.unet_sha256, large_files=lf,
                        sha256_key="diffusion_unet_sha256")
        if self.inferer.controlnet is not None:
            load_pretrained(self.inferer.controlnet, self.controlnet_path, "controlnet", self.device, init_from=self.unet,
                            sha256=self.controlnet_sha256, large_files=lf, sha256_key="controlnet_sha256")
        load_pretrained(self.inferer.autoencoder, self.autoencoder_path, "autoencoder", self.device,
                        sha256=self.autoencoder_sha256, large_files=lf, sha256_key="autoencoder_sha256")
        self.inferer.scale_factor = read_scale_factor(self.unet_path)


class MaisiReconstructionInferer(Inferer):
    """Deterministic VAE round trip ``decode(mu(x))`` by sliding window on the image (validation, evaluation).

    Args:
        roi_size: window in image voxels (official VAE validation: [96, 96, 64]); inputs no larger are done whole.
        overlap: window overlap.
        num_splits: tensor-splitting parallelism (clamped to >= 3 latent voxels per split).
    """

    def __init__(self, roi_size: Sequence[int] = (96, 96, 64), overlap: float = 0.25, num_splits: int = 1) -> None:
        super().__init__()
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = float(overlap)
        self.num_splits = int(num_splits)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        net = getattr(network, "module", network)
        roi = [min(r, s) for r, s in zip(self.roi_size, inputs.shape[2:])]
        set_num_splits(net, clamp_num_splits(self.num_splits, roi[1] // 4))
        if all(s <= r for s, r in zip(inputs.shape[2:], self.roi_size)):
            return net.reconstruct(inputs)
        sw = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=self.overlap, mode="gaussian")
        return sw(inputs, net.reconstruct)
