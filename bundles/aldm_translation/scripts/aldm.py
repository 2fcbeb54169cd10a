"""Glue of the ALDM bundle: the exportable first-stage translator, the translation inferer, saving.

- :class:`ALDMFirstStage` is ``network_def``: ``D(SPADE_tgt(E_q(x)))``, deterministic and
  traceable (the ``spade_only`` translation). It holds the frozen autoencoder and MS-SPADE.
- :class:`ALDMTranslationInferer` runs the whole translation for one or more targets: encode the
  source once, switch SPADE and the target condition per target, sample the latent with
  :class:`common.inferers.LatentDiffusionSampler` (``mode="diffusion"``) or skip diffusion
  (``mode="spade_only"``), decode without re-quantising, clip to ``[0, 1]``.
- :class:`SaveTranslationsd` writes one NIfTI per target, ``<case>_<src>2<tgt>.nii.gz``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform, SaveImage

from common.engines.aldm_steps import decode_latent, encode_quantized
from common.inferers import LatentDiffusionSampler
from common.networks.aldm_ldm import target_condition
from common.utils.io import refuse_overwrite

__all__ = [
    "ALDMFirstStage",
    "ALDMTranslationInferer",
    "SaveTranslationsd",
    "per_sample_targets",
    "single_case_datalist",
    "require_items",
]


class ALDMFirstStage(nn.Module):
    """Frozen VQ-GAN + MS-SPADE: ``forward(x) = D(SPADE_target(E_q(x)))`` (``spade_only`` translation).

    Args:
        autoencoder: the stage-1 VQ-GAN (``common.networks.vqgan.VQGAN``).
        spade: the stage-2 MS-SPADE generator.
        default_target: target used by ``forward`` when none is given (export, ``verify_net_in_out``).

    Shapes: ``x (N, 1, H, W, D) -> (N, 1, H, W, D)``; ``encode(x) -> (N, E, H/4, W/4, D/4)``.
    """

    def __init__(self, autoencoder: nn.Module, spade: nn.Module, default_target: str) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.spade = spade
        self.default_target = default_target

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return encode_quantized(self.autoencoder, x)

    def translate_latent(self, z: torch.Tensor, target: str) -> torch.Tensor:
        return self.spade(z, target)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return decode_latent(self.autoencoder, z)

    def forward(self, x: torch.Tensor, target: str | None = None) -> torch.Tensor:
        return self.decode(self.translate_latent(self.encode(x), target or self.default_target))


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
        scale_factor: float = 1.0,
        requantize: bool = False,
        seed: int | None = 0,
        scale_from: Any = None,
    ) -> None:
        super().__init__()
        self.scale_from = scale_from
        if mode not in ("diffusion", "spade_only"):
            raise ValueError(f"mode must be 'diffusion' or 'spade_only', got {mode!r}")
        if mode == "diffusion" and (sampler is None or diffusion_model is None):
            raise ValueError("mode 'diffusion' needs a sampler and a diffusion model")
        self.sampler = sampler
        self.diffusion_model = diffusion_model
        self.modalities = list(modalities)
        self.mode = mode
        self.conditioning = conditioning
        self.scale_factor = float(scale_factor)
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


class SaveTranslationsd(MapTransform):
    """Write channel ``k`` of ``data[key]`` as ``<case>_<source>2<target_k>.nii.gz`` in ``output_dir``.

    ``data[key]`` must carry the input geometry (a ``MetaTensor`` after ``Invertd``). ``<case>`` is
    ``data["id"]`` when present, else the source file name without extension. Existing files are
    refused unless ``overwrite`` is true. The written paths are stored in ``data["saved_files"]``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        source_key: str = "source",
        targets_key: str = "targets",
        overwrite: bool = False,
        output_dtype: Any = "float32",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = str(output_dir)
        self.source_key = source_key
        self.targets_key = targets_key
        self.overwrite = overwrite
        self.output_dtype = output_dtype

    def _case(self, data: dict, img: MetaTensor) -> str:
        if data.get("id"):
            return os.path.basename(str(data["id"]))
        name = os.path.basename(str(img.meta.get("filename_or_obj", "case")))
        for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
            if name.endswith(ext):
                return name[: -len(ext)]
        return os.path.splitext(name)[0]

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        source = d[self.source_key]
        source = source[0] if isinstance(source, (list, tuple)) else source
        targets = per_sample_targets(d[self.targets_key], 1)[0]
        os.makedirs(self.output_dir, exist_ok=True)
        saved = []
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(targets):
                raise ValueError(f"'{key}' has {img.shape[0]} channels for {len(targets)} targets {targets}")
            case = self._case(d, img)
            for k, tgt in enumerate(targets):
                path = os.path.join(self.output_dir, f"{case}_{source}2{tgt}.nii.gz")
                refuse_overwrite(path, self.overwrite)
                out = img[k : k + 1]
                if not isinstance(out, MetaTensor):
                    raise TypeError("the prediction must be a MetaTensor with the input geometry (run Invertd first)")
                out.meta["filename_or_obj"] = path
                writer = SaveImage(
                    output_dir=self.output_dir,
                    output_postfix="",
                    output_ext=".nii.gz",
                    output_dtype=self.output_dtype,
                    resample=False,
                    separate_folder=False,
                    print_log=False,
                    output_name_formatter=lambda meta, saver, p=path: {"subject": os.path.basename(p)[: -len(".nii.gz")], "idx": None},
                )
                writer(out)
                saved.append(path)
        d["saved_files"] = saved
        return d


def single_case_datalist(input_image: str | None, source: str, targets: Sequence[str] | str, datalist: str | None, dataset_dir: str) -> list[dict]:
    """Inference items: one case from the command line, or ``testing`` of a datalist JSON.

    A datalist entry is ``{"image": ..., "source": "t1", "targets": ["t2", "flair"]}``; entries
    without ``source``/``targets`` get the command-line values.
    """
    from monai.data import load_decathlon_datalist

    tgts = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    if input_image:
        items = [{"image": str(input_image)}]
    elif datalist and os.path.isfile(datalist):
        items = load_decathlon_datalist(datalist, is_segmentation=False, data_list_key="testing", base_dir=dataset_dir)
    else:
        return []  # nothing to do yet: `require_items` at the start of `run` says what is missing
    return [{**it, "source": it.get("source", source), "targets": list(it.get("targets", tgts))} for it in items]


def require_items(items: Sequence, datalist: str | None) -> None:
    """Fail early, naming the input to give, when a run has nothing to process."""
    if not items:
        raise ValueError(
            f"no input: give 'input_image' (one source NIfTI) or a datalist JSON (looked for '{datalist}'; "
            "'testing' list for inference, 'test' list for evaluation)"
        )
