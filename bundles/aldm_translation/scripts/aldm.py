"""Glue of the ALDM bundle: the exportable first-stage translator, the translation inferer, saving.

- :class:`ALDMFirstStage` is ``network_def``: ``D(SPADE_tgt(E_q(x)))``, deterministic and
  traceable (the ``spade_only`` translation). It holds the frozen autoencoder and MS-SPADE.
- :class:`ALDMTranslationInferer` runs the whole translation for one or more targets: encode the
  source once, switch SPADE and the target condition per target, sample the latent with
  :class:`common.inferers.LatentDiffusionSampler` (``mode="diffusion"``) or skip diffusion
  (``mode="spade_only"``), decode without re-quantising, clip to ``[0, 1]``.
- :class:`SaveTranslationsd` writes one NIfTI per target, ``<case>_<src>2<tgt>.nii.gz``, atomically,
  refusing existing files unless ``overwrite``.
- Input guards of the workflows (each raises a :class:`common.utils.errors.UserInputError` naming the
  file or config key): :func:`single_case_datalist` (modality names, source image per entry),
  :func:`check_outputs` (inference outputs), :func:`training_datalist` (every modality in every
  training entry), :func:`check_training_outputs` (checkpoint and log folders, existing checkpoints),
  :func:`load_entry` (stage checkpoints, optional sha256).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from common.engines.aldm_steps import decode_latent, encode_quantized
from common.inferers import LatentDiffusionSampler
from common.networks.aldm_ldm import target_condition
from common.transforms.saving import SafeSaveImage
from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError
from common.utils.io import CheckpointError, check_writable_dir, load_checkpoint, load_state_into, refuse_overwrite

__all__ = [
    "ALDMFirstStage",
    "ALDMTranslationInferer",
    "SaveTranslationsd",
    "per_sample_targets",
    "single_case_datalist",
    "require_items",
    "check_outputs",
    "case_name",
    "load_datalist",
    "training_datalist",
    "check_training_outputs",
    "load_entry",
    "normalize_modality",
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
            raise InvalidInputError(f"config key 'mode' must be 'diffusion' or 'spade_only', got {mode!r}")
        if mode == "diffusion" and (sampler is None or diffusion_model is None):
            raise InvalidInputError("mode 'diffusion' needs a sampler and a diffusion model (config keys 'sampler', 'diffusion_model')")
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


_IMAGE_EXTS = (".nii.gz", ".nii", ".mha", ".nrrd")


def case_name(item: dict | str) -> str:
    """Output stem of a case: its ``id`` when given, else the source file name without extension."""
    if isinstance(item, dict):
        if item.get("id"):
            return os.path.basename(str(item["id"]))
        item = str(item.get("image", "case"))
    name = os.path.basename(str(item))
    for ext in _IMAGE_EXTS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def output_paths(item: dict, output_dir: str) -> list[str]:
    """The files inference writes for one item: ``<output_dir>/<case>_<source>2<target>.nii.gz``."""
    case = case_name(item)
    return [os.path.join(str(output_dir), f"{case}_{item['source']}2{t}.nii.gz") for t in item["targets"]]


class SaveTranslationsd(MapTransform):
    """Write channel ``k`` of ``data[key]`` as ``<case>_<source>2<target_k>.nii.gz`` in ``output_dir``.

    ``data[key]`` must carry the input geometry (a ``MetaTensor`` after ``Invertd``). ``<case>`` is
    ``data["id"]`` when present, else the source file name without extension. Existing files are
    refused (naming the file and the key ``overwrite``) unless ``overwrite`` is true; each file is
    written under a temporary name and renamed into place
    (:class:`common.transforms.SafeSaveImage`). The written paths are stored in ``data["saved_files"]``.
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
            return case_name({"id": data["id"]})
        return case_name(str(img.meta.get("filename_or_obj", "case")))

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        source = d[self.source_key]
        source = source[0] if isinstance(source, (list, tuple)) else source
        targets = per_sample_targets(d[self.targets_key], 1)[0]
        planned = []
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(targets):
                raise ValueError(f"'{key}' has {img.shape[0]} channels for {len(targets)} targets {targets}")
            if not isinstance(img, MetaTensor):
                raise TypeError("the prediction must be a MetaTensor with the input geometry (run Invertd first)")
            case = self._case(d, img)
            for k, tgt in enumerate(targets):
                path = os.path.join(self.output_dir, f"{case}_{source}2{tgt}.nii.gz")
                refuse_overwrite(path, self.overwrite)  # every target checked before the first is written
                planned.append((img, k, path))
        saved = []
        for img, k, path in planned:
            out = img[k : k + 1]
            out.meta["filename_or_obj"] = path
            writer = SafeSaveImage(
                output_dir=self.output_dir,
                output_postfix="",
                output_ext=".nii.gz",
                output_dtype=self.output_dtype,
                resample=False,
                separate_folder=False,
                print_log=False,
                overwrite=self.overwrite,
                output_name_formatter=lambda meta, saver, p=path: {"subject": os.path.basename(p)[: -len(".nii.gz")], "idx": None},
            )
            writer(out)
            saved.append(path)
        d["saved_files"] = saved
        return d


# ------------------------------------------------------------------------------------ input guards


def normalize_modality(name: Any, modalities: Sequence[str], where: str) -> str:
    """``name`` as one of ``modalities`` (case-insensitive: ``"T1ce"`` is ``"t1ce"``), or an
    :class:`InvalidInputError` naming ``where`` (e.g. ``"config key 'targets'"``) and the known names."""
    known = {str(m).lower(): str(m) for m in modalities}
    value = str(name).strip()
    if value.lower() not in known:
        raise InvalidInputError(
            f"unknown modality {value!r} in {where}; expected one of {list(modalities)} "
            "(the contrasts this model was trained on, config key 'modalities')"
        )
    return known[value.lower()]


def _split_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)):
        return [str(t).strip() for t in value]
    raise InvalidInputError(f"expected a modality name or a list of names, got {type(value).__name__} {value!r}")


def _join(base_dir: str, value: Any) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.normpath(os.path.join(base_dir, value))
    return value


def load_datalist(
    datalist: str, split: str, base_dir: str, path_keys: Sequence[str] = (), optional: bool = False
) -> list[dict]:
    """The ``split`` list of a datalist JSON, paths of ``path_keys`` joined to ``base_dir``.

    Raises :class:`InputNotFoundError` when the file does not exist, :class:`InvalidInputError`
    (naming the file and the split) when it is not JSON, lacks ``split`` (unless ``optional``:
    then ``[]``) or holds something else than a list of objects.
    """
    if not os.path.isfile(str(datalist)):
        raise InputNotFoundError(f"datalist '{datalist}' (config key 'datalist') does not exist")
    try:
        with open(datalist) as fh:
            raw = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"datalist '{datalist}' is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or split not in raw:
        if optional and isinstance(raw, dict):
            return []
        have = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise InvalidInputError(f"datalist '{datalist}' has no '{split}' list (it has {have}); expected a '{split}' list of cases")
    entries = raw[split]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidInputError(f"'{split}' of datalist '{datalist}' must be a list of objects (one per case)")
    return [{k: (_join(base_dir, v) if k in path_keys else v) for k, v in e.items()} for e in entries]


def _entry_name(i: int, entry: dict, split: str, datalist: str) -> str:
    who = f"entry {i}" + (f" (id '{entry['id']}')" if entry.get("id") is not None else "")
    return f"{who} of '{split}' in datalist '{datalist}'"


def single_case_datalist(
    input_image: str | None,
    source: str,
    targets: Sequence[str] | str,
    datalist: str | None,
    dataset_dir: str,
    modalities: Sequence[str] | None = None,
) -> list[dict]:
    """Inference items: one case from the command line, or ``testing`` of a datalist JSON.

    A datalist entry is ``{"image": ..., "source": "t1", "targets": ["t2", "flair"]}``; entries
    without ``source``/``targets`` get the command-line values. Instead of ``image`` an entry may
    give the source file under the source's name (``{"id": ..., "t1": ..., "t2": ...}``).

    With ``modalities``, every source and target name must be one of them (case-insensitive, so
    ``T1ce`` is ``t1ce``); an unknown name, an empty target list, an entry without its source
    image or a source file that does not exist raises a user error naming the key or entry.
    """
    check = (lambda n, key: normalize_modality(n, modalities, key)) if modalities else (lambda n, key: str(n))
    if input_image:
        items = [{"image": str(input_image)}]
        where = ["config key 'input_image'"]
    elif datalist and os.path.isfile(datalist):
        items = load_datalist(datalist, "testing", dataset_dir, path_keys=["image"])
        where = [_entry_name(i, it, "testing", datalist) for i, it in enumerate(items)]
    else:
        return []  # nothing to do yet: `require_items` at the start of `run` says what is missing
    out = []
    for it, w in zip(items, where):
        # where a name came from: the entry itself, else the command line / config
        src_from = f"'source' of {w}" if "source" in it else "config key 'source'"
        tgt_from = f"'targets' of {w}" if "targets" in it else "config key 'targets'"
        src = check(it.get("source", source), src_from)
        tgts = [check(t, tgt_from) for t in _split_names(it.get("targets", targets))]
        if not tgts:
            raise InvalidInputError(f"no target modality in {tgt_from}; expected one or more of {list(modalities or [])}")
        image = it.get("image")
        if not image:
            # the source contrast under its own name, matched case-insensitively
            image = next((v for k, v in it.items() if str(k).lower() == src.lower() and isinstance(v, str)), None)
            image = _join(dataset_dir, image)
        if not image:
            raise InvalidInputError(
                f"{w} has no source image: expected the '{src}' file (the requested source contrast) "
                f"under 'image' or '{src}'; it has {sorted(k for k in it if k not in ('source', 'targets'))}"
            )
        if not os.path.exists(image):
            raise InputNotFoundError(f"input file '{image}' ({w}) does not exist")
        out.append({**{k: v for k, v in it.items() if k not in ("source", "targets")}, "image": image, "source": src, "targets": tgts})
    return out


def require_items(items: Sequence, datalist: str | None, split: str = "testing/test") -> None:
    """Fail early, naming the input to give, when a run has nothing to process."""
    if items:
        return
    if datalist and not os.path.isfile(str(datalist)):
        raise InputNotFoundError(
            f"no input: datalist '{datalist}' (config key 'datalist') does not exist; give 'input_image' "
            "(one source NIfTI, inference) or an existing datalist JSON"
        )
    raise InvalidInputError(
        f"no input: the '{split}' list of datalist '{datalist}' is empty; give 'input_image' (one source NIfTI) "
        "or a datalist JSON ('testing' list for inference, 'test' list for evaluation, 'training' for training)"
    )


def check_outputs(items: Sequence[dict], output_dir: str, overwrite: bool) -> None:
    """Before any work: the output folder can be written (config key ``output_dir``), no planned
    output exists unless ``overwrite``, and no two cases would write the same file."""
    planned: dict[str, int] = {}
    for i, it in enumerate(items):
        for path in output_paths(it, output_dir):
            if path in planned:
                raise InvalidInputError(
                    f"cases {planned[path]} and {i} would both write '{path}'; give each case a distinct 'id'"
                )
            planned[path] = i
            refuse_overwrite(path, overwrite)
    check_writable_dir(output_dir, "output folder (config key 'output_dir')")


def training_datalist(
    datalist: str, modalities: Sequence[str], dataset_dir: str, split: str = "training", optional: bool = False
) -> list[dict]:
    """Cases of ``split`` for training, each with a file for every modality of ``modalities``.

    Returns ``[]`` when ``datalist`` does not exist (the run then stops in :func:`require_items`)
    and, with ``optional``, when the split is absent. A case without one of the modalities raises
    :class:`InvalidInputError` naming the datalist, the case and the missing modality.
    """
    if not os.path.isfile(str(datalist)):
        return []
    items = load_datalist(datalist, split, dataset_dir, path_keys=[*modalities, "image", "label", "mask"], optional=optional)
    for i, it in enumerate(items):
        missing = [m for m in modalities if not it.get(m)]
        if missing:
            raise InvalidInputError(
                f"{_entry_name(i, it, split, datalist)} has no {missing} image (missing modality); every case needs "
                f"a file for each of {list(modalities)} (config key 'modalities'); it has {sorted(it)}"
            )
    return items


def check_training_outputs(ckpt_dir: str, prefix: str, resume: bool, overwrite: bool, log_dir: str | None = None) -> None:
    """Before training: the checkpoint (``ckpt_dir``) and log (``output_dir``) folders can be written,
    and this stage's checkpoints (``<prefix>.pt``, ``<prefix>_*.pt``) are not there already, unless
    training resumes from them (``resume``) or ``overwrite`` is set."""
    check_writable_dir(ckpt_dir, "checkpoint folder (config key 'ckpt_dir')")
    if log_dir:
        check_writable_dir(log_dir, "log folder (config key 'output_dir')")
    if resume or overwrite:
        return
    existing = sorted({*Path(ckpt_dir).glob(f"{prefix}.pt"), *Path(ckpt_dir).glob(f"{prefix}_*.pt")})
    if existing:
        raise OutputExistsError(
            f"output '{existing[0]}' already exists (a checkpoint of an earlier '{prefix}' training); "
            "set 'resume' to true to continue from it, or 'overwrite' to true to start again and replace it"
        )


def load_entry(
    module: nn.Module, path: str, entry: str, sha256: str | None = None, map_location: Any = "cpu"
) -> nn.Module:
    """Load entry ``entry`` of the checkpoint ``path`` into ``module`` (``weights_only``, sha256
    checked first when given). A file that is the module's plain state dict (``autoencoder_best.pt``,
    shipped weights) loads as it is. A file without that entry or with other keys or shapes raises
    :class:`common.utils.io.CheckpointError` naming the file, before any weight is changed."""
    ckpt = load_checkpoint(path, sha256=sha256 or None, map_location=map_location)
    if entry not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        load_state_into(module, ckpt, source=f"checkpoint '{path}'")
        return module
    if entry not in ckpt:
        raise CheckpointError(
            f"checkpoint '{path}' has no entry '{entry}' (it has {sorted(ckpt)[:8]}); "
            "is it a checkpoint of another bundle or another training stage?"
        )
    load_state_into(module, ckpt[entry], source=f"checkpoint '{path}' entry '{entry}'")
    return module
