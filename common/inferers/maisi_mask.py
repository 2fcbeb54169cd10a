"""MAISI mask generation: a label mask drawn from the mask diffusion model, conditioned on anatomy sizes.

Method (MAISI, Guo et al., arXiv 2409.11169, section "mask generation"; facts from the official code:
``LDMSampler.prepare_anatomy_size_condtion`` and ``ldm_conditional_sample_one_mask`` in ``scripts/sample.py``
and ``remap_labels`` / ``general_mask_generation_post_process`` in ``scripts/utils.py`` of
Project-MONAI/tutorials ``generation/maisi`` and NVIDIA-Medtech/NV-Generate-CTMR (DDPM mask model); the
slot table and file formats are also described in NV-Generate-CTMR ``skills/infer_mask-generation.md``;
hyper-parameters from the model-zoo bundle ``maisi_ct_generative`` ``configs/inference.json``):

1. **Condition.** ``controllable_anatomy_size`` = ``[[name, scale], ...]`` with scale in [0, 1] or -1
   (absent) fills a 10-slot vector, order :data:`ANATOMY_SIZE_ORDER`. The official table
   ``all_anatomy_size_conditions.json`` (a JSON list of ``{"organ_size": [10 numbers]}``, -1 = absent;
   values may exceed 1) is searched for the row with the smallest L1 distance to the user's slots (only the
   slots the user gave, -1 included; the first row wins ties), and the user's values overwrite that row.
2. **Sampling.** The mask DM (MONAI ``DiffusionModelUNet`` with cross-attention, ``cross_attention_dim=10``)
   denoises a latent ``z`` of shape (1, 4, 64, 64, 64) with ``context`` = the condition, shape (1, 1, 10),
   ε-prediction and ``DDPMScheduler(1000, beta 0.0015..0.0195, scaled_linear_beta, clip_sample=False)``
   with all 1000 steps.
3. **Decode.** The mask VAE decodes ``z / scale_factor`` (1.0055984258651733 unless the checkpoint stores
   its own) to 125 logits (1, 125, 256, 256, 256); ``argmax`` over channels (the official softmax before it
   changes nothing) gives decoder channels 0..124.
4. **Remap.** ``label_dict_124_to_132.json`` (a JSON object ``name -> [decoder_channel, maisi_label]``, 125
   entries, channel 0 = background, channel 124 = ``"body"`` -> 200) turns channels into MAISI ids; the body
   label 200 comes from this table.
5. **Post-processing** (:func:`common.transforms.maisi.post_process_generated_mask`), with the requested
   tumour = the last tumour slot (5..9) that is not -1.
6. The mask lies on a 1.5 mm isotropic grid (256^3 with the official weights); the bundle then resamples it
   (nearest neighbour) and pads/crops it to the requested size and spacing.

Random numbers: one CPU ``torch.Generator`` seeded from ``seed`` through a ``numpy.random.SeedSequence``
tagged for mask generation, so the masks never share noise with the image sampler seeded with the same seed.

Cost: the full-size mask DM takes about 49 s per step on a CPU at latent 64^3 (about 14 h for 1000 steps):
this path is meant for a GPU.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.networks.schedulers import DDPMScheduler
from monai.utils import optional_import

from common.networks.maisi import (
    clamp_num_splits,
    load_maisi_checkpoint,
    load_maisi_state,
    set_num_splits,
    verify_checkpoint_hash,
)
from common.transforms.maisi import BODY_LABEL, MAISI_LABELS, post_process_generated_mask
from common.utils.io import atomic_path

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
logger = logging.getLogger(__name__)

__all__ = [
    "ANATOMY_SIZE_ORDER",
    "TUMOR_SLOT_LABELS",
    "MASK_GENERATION_FILES",
    "require_mask_generation_files",
    "load_anatomy_size_conditions",
    "anatomy_size_condition",
    "requested_tumor_label",
    "load_label_remap",
    "remap_decoder_channels",
    "MaisiMaskGenerator",
]

#: slot order of the anatomy-size condition (official ``anatomy_size_idx``)
ANATOMY_SIZE_ORDER: tuple[str, ...] = (
    "gallbladder", "liver", "stomach", "pancreas", "colon",
    "lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion",
)
#: tumour slot -> MAISI label (lung tumour 23, pancreatic tumour 24, hepatic tumour 26, colon cancer 27, bone lesion 128)
TUMOR_SLOT_LABELS: dict[int, int] = {5: 23, 6: 24, 7: 26, 8: 27, 9: 128}
#: config key of each official file mask generation needs -> its path in the bundle's ``large_files.yml``
MASK_GENERATION_FILES: dict[str, str] = {
    "mask_generation_autoencoder_path": "models/mask_generation_autoencoder.pt",
    "mask_generation_diffusion_unet_path": "models/mask_generation_diffusion_unet.pt",
    "mask_generation_conditions_path": "datasets/all_anatomy_size_conditions.json",
    "mask_generation_label_remap_path": "configs/label_dict_124_to_132.json",
}
_VALID_IDS = frozenset([0, BODY_LABEL, *MAISI_LABELS.values()])


def require_mask_generation_files(paths: Mapping[str, str | Path | None]) -> None:
    """Raise one ``FileNotFoundError`` naming every missing file, its config key and its ``large_files.yml`` entry.

    Args:
        paths: config key (see :data:`MASK_GENERATION_FILES`) -> file path.
    """
    missing = []
    for key, path in paths.items():
        if path is None or not Path(path).is_file():
            entry = MASK_GENERATION_FILES.get(key, "?")
            missing.append(f"'{path}' (config key '{key}'; large_files.yml entry '{entry}')")
    if missing:
        raise FileNotFoundError(
            "mask generation from controllable_anatomy_size needs the official MAISI files, missing: "
            + "; ".join(missing)
            + ". Fetch them with `python -m monai.bundle download_large_files --bundle_path <bundle>` or place them "
            "there by hand (see docs/README.md), or give a user mask (label_path) instead."
        )


def load_anatomy_size_conditions(path: str | Path) -> np.ndarray:
    """Read ``all_anatomy_size_conditions.json`` (``[{"organ_size": [10 numbers]}, ...]``) into a (K, 10) array."""
    try:
        rows = json.loads(Path(path).read_text())
        table = np.asarray([row["organ_size"] for row in rows], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected a JSON list of {{'organ_size': [10 numbers]}} entries ({e})") from e
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] != len(ANATOMY_SIZE_ORDER):
        raise ValueError(f"{path}: expected a non-empty list of 10-value 'organ_size' vectors, got shape {table.shape}")
    return table


def anatomy_size_condition(
    controllable_anatomy_size: Sequence[Sequence[Any]], conditions: np.ndarray | Sequence[Sequence[float]]
) -> list[float]:
    """The 10-value condition: the nearest row of ``conditions`` with the user's entries written over it.

    Nearest = smallest sum of ``|user - row|`` over the slots the user gave (a user -1 counts as a value);
    ties go to the first row. Slot order :data:`ANATOMY_SIZE_ORDER`.
    """
    table = np.asarray(conditions, dtype=np.float64)
    slots, values = [], []
    for name, scale in ((str(item[0]), float(item[1])) for item in controllable_anatomy_size):
        if name not in ANATOMY_SIZE_ORDER:
            raise ValueError(f"{name!r} cannot be size-controlled; choose from {ANATOMY_SIZE_ORDER}")
        slots.append(ANATOMY_SIZE_ORDER.index(name))
        values.append(scale)
    if not slots:
        raise ValueError("controllable_anatomy_size is empty: nothing to condition the mask on")
    distance = np.abs(table[:, slots] - np.asarray(values)[None]).sum(axis=1)
    condition = table[int(np.argmin(distance))].copy()
    condition[slots] = values
    return [float(v) for v in condition]


def requested_tumor_label(condition: Sequence[float]) -> int | None:
    """MAISI id of the tumour the condition asks for: the last tumour slot that is not -1 (``None`` if none)."""
    label = None
    for slot, tumor in TUMOR_SLOT_LABELS.items():
        if float(condition[slot]) != -1.0:
            label = tumor
    return label


def load_label_remap(path: str | Path) -> torch.Tensor:
    """Read ``label_dict_124_to_132.json`` (``name -> [decoder_channel, maisi_label]``) as a look-up table.

    Returns:
        long tensor ``lut`` of length C (number of decoder channels) with ``lut[channel] = maisi_label``.
        Every channel 0..C-1 must appear exactly once and every label must be 0, a MAISI id or 200.
    """
    try:
        table = json.loads(Path(path).read_text())
        pairs = [(str(name), int(v[0]), int(v[1])) for name, v in table.items() if len(v) == 2]
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: expected a JSON object name -> [decoder_channel, maisi_label] ({e})") from e
    if not pairs or len(pairs) != len(table):
        raise ValueError(f"{path}: expected a non-empty JSON object name -> [decoder_channel, maisi_label]")
    channels = sorted(c for _, c, _ in pairs)
    if channels != list(range(len(pairs))):
        raise ValueError(f"{path}: decoder channels must be 0..{len(pairs) - 1}, each once")
    bad = sorted({lab for _, _, lab in pairs if lab not in _VALID_IDS})
    if bad:
        raise ValueError(f"{path}: labels {bad} are not MAISI ids (1..132), 0 or body {BODY_LABEL}")
    lut = torch.zeros(len(pairs), dtype=torch.long)
    for _, channel, lab in pairs:
        lut[channel] = lab
    return lut


def remap_decoder_channels(channels: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Decoder channel indices (any shape, values < len(lut)) -> MAISI ids, uint8."""
    channels = torch.as_tensor(channels).long()
    if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= len(lut)):
        raise ValueError(f"channel indices must lie in [0, {len(lut) - 1}]")
    return lut.to(channels.device)[channels].to(torch.uint8)


class MaisiMaskGenerator:
    """Generate MAISI label masks from anatomy sizes: condition -> DDPM on the mask latent -> VAE -> remap -> clean.

    Args:
        autoencoder: mask VAE (``AutoencoderKlMaisi``, 8 channels in, 125 logits out).
        diffusion_unet: mask DM (``DiffusionModelUNet`` with ``cross_attention_dim=10``).
        scheduler: ``DDPMScheduler`` (official: 1000 steps, beta 0.0015..0.0195, ``scaled_linear_beta``).
        autoencoder_path / diffusion_unet_path: official checkpoints (raw state dict; ``{unet_state_dict,
            scale_factor}``), loaded strictly with ``weights_only=True`` on first use.
        conditions_path: ``all_anatomy_size_conditions.json``.
        label_remap_path: ``label_dict_124_to_132.json``.
        latent_shape: (C, x, y, z) of the mask latent; official (4, 64, 64, 64) -> 256^3 mask.
        mask_spacing: voxel spacing of the generated mask in mm (official 1.5 mm isotropic).
        scale_factor: latent scale used when the DM checkpoint stores none (official 1.0055984258651733).
        num_inference_steps: DDPM steps (official 1000 = the training steps; fewer gives a warning).
        decode_roi_size / decode_overlap / decode_num_splits: VAE decode by sliding window **on the latent**
            when the latent has more voxels than the ROI (official ROI 96^3 -> the 64^3 latent is decoded whole),
            with tensor-splitting parallelism clamped to >= 3 voxels per split.
        seed: seed of the mask noise (a stream of its own, see the module docstring).
        device: where the networks run.
        amp: autocast on CUDA.
        progress: progress bar over the DDPM steps.
        post_process: apply :func:`~common.transforms.maisi.post_process_generated_mask`.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        diffusion_unet: torch.nn.Module,
        scheduler: DDPMScheduler,
        autoencoder_path: str | Path,
        diffusion_unet_path: str | Path,
        conditions_path: str | Path,
        label_remap_path: str | Path,
        latent_shape: Sequence[int] = (4, 64, 64, 64),
        mask_spacing: Sequence[float] = (1.5, 1.5, 1.5),
        scale_factor: float = 1.0055984258651733,
        num_inference_steps: int = 1000,
        decode_roi_size: Sequence[int] = (96, 96, 96),
        decode_overlap: float = 0.6667,
        decode_num_splits: int = 8,
        seed: int = 0,
        device: torch.device | str = "cpu",
        amp: bool = False,
        progress: bool = True,
        post_process: bool = True,
        large_files: str | None = None,
    ) -> None:
        if not isinstance(scheduler, DDPMScheduler):
            raise TypeError(f"the mask DM is a DDPM model: scheduler must be a DDPMScheduler, got {type(scheduler).__name__}")
        self.autoencoder = autoencoder
        self.diffusion_unet = diffusion_unet
        self.scheduler = scheduler
        self.files = {
            "mask_generation_autoencoder_path": autoencoder_path,
            "mask_generation_diffusion_unet_path": diffusion_unet_path,
            "mask_generation_conditions_path": conditions_path,
            "mask_generation_label_remap_path": label_remap_path,
        }
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if len(self.latent_shape) != 4:
            raise ValueError(f"latent_shape must be (C, x, y, z), got {self.latent_shape}")
        self.mask_spacing = tuple(float(s) for s in mask_spacing)
        self.scale_factor = float(scale_factor)
        self.num_inference_steps = int(num_inference_steps)
        self.decode_roi_size = tuple(int(r) for r in decode_roi_size)
        self.decode_overlap = float(decode_overlap)
        self.decode_num_splits = int(decode_num_splits)
        self.seed = int(seed)
        child = int(np.random.SeedSequence([self.seed, 0x6D61736B]).generate_state(1, dtype=np.uint64)[0] >> 1)
        self.generator = torch.Generator(device="cpu").manual_seed(child)
        self.device = torch.device(device)
        self.amp = bool(amp)
        self.progress = bool(progress) and has_tqdm
        self.post_process = bool(post_process)
        self.large_files = large_files
        self._loaded = False
        self._conditions: np.ndarray | None = None
        self._lut: torch.Tensor | None = None
        self.last_condition: dict[str, Any] = {}

    # ---- files and weights
    def load(self) -> None:
        """Check the four official files, load both networks strictly and read the tables (once)."""
        if self._loaded:
            return
        require_mask_generation_files(self.files)
        for path in self.files.values():  # the official files are checked against large_files.yml first
            verify_checkpoint_hash(path, large_files=self.large_files)
        self._conditions = load_anatomy_size_conditions(self.files["mask_generation_conditions_path"])
        self._lut = load_label_remap(self.files["mask_generation_label_remap_path"])
        ae_path = self.files["mask_generation_autoencoder_path"]
        state, _ = load_maisi_checkpoint(ae_path, "autoencoder")
        load_maisi_state(self.autoencoder, state, source=f"mask VAE checkpoint '{ae_path}'")
        dm_path = self.files["mask_generation_diffusion_unet_path"]
        state, scale = load_maisi_checkpoint(dm_path, "unet")
        load_maisi_state(self.diffusion_unet, state, source=f"mask DM checkpoint '{dm_path}'")
        if scale is not None:  # the official loader reads it from the checkpoint as well
            self.scale_factor = float(scale)
        self.autoencoder.to(self.device).eval()
        self.diffusion_unet.to(self.device).eval()
        n_out = self._decoder_channels()
        if n_out is not None and n_out != len(self._lut):
            raise ValueError(
                f"the mask VAE decodes {n_out} channels but {self.files['mask_generation_label_remap_path']} maps {len(self._lut)}"
            )
        if self.device.type == "cpu" and math.prod(self.latent_shape[1:]) >= 32**3:
            logger.warning(
                "mask generation on a CPU: about 49 s per DM step at latent 64^3 with the official networks "
                "(%d steps); use a GPU, a user mask (label_path) or the mask database", self.num_inference_steps,
            )
        self._loaded = True

    def _decoder_channels(self) -> int | None:
        """Number of decoder output channels (the bias of the decoder's last layer), ``None`` if not found."""
        decoder = getattr(self.autoencoder, "decoder", None)
        if decoder is None:
            return None
        biases = [v for k, v in decoder.state_dict().items() if k.endswith("bias")]
        return int(biases[-1].shape[0]) if biases else None

    def condition(self, controllable_anatomy_size: Sequence[Sequence[Any]]) -> list[float]:
        """The 10-value condition for ``controllable_anatomy_size`` (nearest table row, user values written over it)."""
        self.load()
        return anatomy_size_condition(controllable_anatomy_size, self._conditions)

    # ---- sampler
    @torch.no_grad()
    def sample_latent(self, condition: Sequence[float]) -> torch.Tensor:
        """Reverse DDPM from noise: returns the clean mask latent (1, C, x, y, z) in the scaled latent space.

        Per step: ``eps = unet(x_t, t, context)`` with ``context`` (1, 1, 10), then ``x_{t-1} =
        scheduler.step(eps, t, x_t)`` (adds the DDPM variance noise from the seeded generator).
        """
        self.load()
        device = self.device
        context = torch.as_tensor(condition, dtype=torch.float32).reshape(1, 1, -1).to(device)
        latent = torch.randn((1, *self.latent_shape), generator=self.generator).to(device)
        if self.num_inference_steps < self.scheduler.num_train_timesteps:
            warnings.warn(
                f"the mask DM was trained with {self.scheduler.num_train_timesteps} DDPM steps; sampling with "
                f"{self.num_inference_steps} steps does not give masks of the published quality",
                stacklevel=2,
            )
        self.scheduler.set_timesteps(self.num_inference_steps)
        step_generator = self._device_generator(device)
        timesteps = self.scheduler.timesteps
        if self.progress:
            timesteps = tqdm(timesteps, desc="MAISI mask sampling")
        autocast = torch.autocast("cuda", enabled=self.amp and device.type == "cuda")
        for t in timesteps:
            t_batch = torch.full((1,), int(t), device=device, dtype=torch.long)
            with autocast:
                eps = self.diffusion_unet(x=latent, timesteps=t_batch, context=context)
            latent, _ = self.scheduler.step(eps.float(), int(t), latent, generator=step_generator)
        return latent

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        gen = torch.Generator(device=device)
        gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        return gen

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE decode of ``latent / scale_factor`` and argmax: decoder channels (1, 1, 4x, 4y, 4z), long, on the CPU."""
        z = latent / self.scale_factor
        roi = self.decode_roi_size
        direct = math.prod(z.shape[2:]) <= math.prod(roi)
        split_len = z.shape[3] if direct else min(z.shape[3], roi[1])
        set_num_splits(self.autoencoder, clamp_num_splits(self.decode_num_splits, split_len))
        autocast = torch.autocast("cuda", enabled=self.amp and z.device.type == "cuda")
        with autocast:
            if direct:
                return self.autoencoder.decode_stage_2_outputs(z).argmax(dim=1, keepdim=True).cpu()
            inferer = SlidingWindowInferer(
                roi_size=roi, sw_batch_size=1, overlap=self.decode_overlap, mode="gaussian",
                sw_device=z.device, device=torch.device("cpu"), progress=self.progress,
            )
            return inferer(z, self.autoencoder.decode_stage_2_outputs).argmax(dim=1, keepdim=True)

    def generate(self, controllable_anatomy_size: Sequence[Sequence[Any]]) -> MetaTensor:
        """One mask: (1, X, Y, Z) uint8 MetaTensor of MAISI ids (body 200), affine = diag(mask_spacing)."""
        condition = self.condition(controllable_anatomy_size)
        channels = self.decode(self.sample_latent(condition))
        label = remap_decoder_channels(channels[0, 0], self._lut).numpy()
        tumor = requested_tumor_label(condition)
        if self.post_process:
            label = post_process_generated_mask(label, target_tumor_label=tumor)
        affine = torch.diag(torch.tensor([*self.mask_spacing, 1.0], dtype=torch.float64))
        out = MetaTensor(torch.as_tensor(label[None]), affine=affine)
        self.last_condition = {"condition": condition, "target_tumor_label": tumor, "scale_factor": self.scale_factor}
        return out

    def generate_files(
        self, controllable_anatomy_size: Sequence[Sequence[Any]], num: int, output_dir: str | Path
    ) -> list[str]:
        """Generate ``num`` masks into ``output_dir`` as ``generated_mask_<timestamp>.nii.gz`` (+ a ``.json`` with the
        condition used); returns the NIfTI paths."""
        output_dir = Path(output_dir)
        paths = []
        for _ in range(int(num)):
            mask = self.generate(controllable_anatomy_size)
            stem = "generated_mask_" + datetime.now().strftime("%Y%m%d_%H%M%S_%f")
            path = output_dir / f"{stem}.nii.gz"
            with atomic_path(path) as tmp:
                nib.save(nib.Nifti1Image(np.asarray(mask[0]).astype(np.uint8), np.asarray(mask.affine)), str(tmp))
            info = {
                "controllable_anatomy_size": [list(i) for i in controllable_anatomy_size],
                **self.last_condition,
                "seed": self.seed,
                "num_inference_steps": self.num_inference_steps,
                "spacing": list(self.mask_spacing),
            }
            with atomic_path(output_dir / f"{stem}.json") as tmp:
                tmp.write_text(json.dumps(info, indent=1))
            paths.append(str(path))
        return paths
