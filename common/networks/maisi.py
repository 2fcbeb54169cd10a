"""MAISI networks (CT VAE, diffusion UNet, ControlNet, mask VAE / mask DM) with the official hyper-parameters.

The classes are MONAI's (``monai.apps.generation.maisi.networks``, ``monai.networks.nets.DiffusionModelUNet``);
this module only holds the published hyper-parameters, the tiny CPU-test variants and the switches that
make the networks run on a CPU. Hyper-parameter sources: NV-Generate-CTMR / MONAI tutorials
``generation/maisi/configs/config_maisi3d-rflow.json`` (rectified flow, "v2", default) and
``config_maisi3d-ddpm.json`` (DDPM, "v1"); MONAI model zoo ``maisi_ct_generative``.

Tensor shapes (N = batch):

* CT VAE: image (N, 1, X, Y, Z) -> latent (N, 4, X/4, Y/4, Z/4) -> image (N, 1, X, Y, Z).
* Diffusion UNet: latent (N, 4, x, y, z) with x, y, z divisible by 8, ``timesteps`` (N,),
  ``spacing_tensor`` (N, 3) = spacing in mm x 100, rflow ``class_labels`` (N,) (CT = 1), DDPM
  ``top_region_index_tensor`` / ``bottom_region_index_tensor`` (N, 4) one-hot x 100 -> (N, 4, x, y, z).
* ControlNet: latent (N, 4, x, y, z), ``controlnet_cond`` (N, 8, 4x, 4y, 4z) (binarised label at image
  resolution) -> residuals for the UNet's down and mid blocks.
* Mask VAE: (N, 8, X, Y, Z) -> latent (N, 4, X/4, Y/4, Z/4) -> 125 logits; mask DM: latent (N, 4, 64, 64, 64),
  context (N, 1, 10).

CPU switches (MONAI 1.6.1): ``use_flash_attention=True`` raises without CUDA and ``norm_float16=True`` gives
float16 activations that meet float32 biases on a CPU. Neither flag changes a state-dict key, so the
switches are applied automatically from the device and official checkpoints still load strictly.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.nets import DiffusionModelUNet
from monai.networks.utils import copy_model_state

__all__ = [
    "AUTOENCODER_ARGS",
    "UNET_RFLOW_ARGS",
    "UNET_DDPM_ARGS",
    "CONTROLNET_RFLOW_ARGS",
    "CONTROLNET_DDPM_ARGS",
    "MASK_AUTOENCODER_ARGS",
    "MASK_DIFFUSION_ARGS",
    "TINY_AUTOENCODER_ARGS",
    "TINY_UNET_ARGS",
    "cpu_switches",
    "maisi_autoencoder",
    "maisi_diffusion_unet",
    "maisi_controlnet",
    "maisi_mask_autoencoder",
    "maisi_mask_diffusion",
    "init_controlnet_from_unet",
    "load_maisi_checkpoint",
    "safe_load_checkpoint",
    "CHECKPOINT_ALLOWED_GLOBALS",
    "drop_unused_attention_keys",
    "load_maisi_state",
    "maisi_perceptual_loss",
    "clamp_num_splits",
    "set_num_splits",
    "load_pretrained",
    "read_scale_factor",
    "verify_checkpoint_hash",
]

F, T = False, True

# CT VAE shared by the DDPM and rflow releases (config_maisi3d-rflow.json "autoencoder_def"; the DDPM
# config uses num_splits=8, which changes no key).
AUTOENCODER_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "num_channels": [64, 128, 256],
    "num_res_blocks": [2, 2, 2],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [F, F, F],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_checkpointing": False,
    "use_convtranspose": False,
    "norm_float16": True,
    "num_splits": 4,
    "dim_split": 1,
}

# Diffusion UNet, rectified flow ("diffusion_unet_def" of config_maisi3d-rflow.json).
UNET_RFLOW_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 4,
    "num_channels": [64, 128, 256, 512],
    "attention_levels": [F, F, T, T],
    "num_head_channels": [0, 0, 32, 32],
    "num_res_blocks": 2,
    "use_flash_attention": True,
    "include_top_region_index_input": False,
    "include_bottom_region_index_input": False,
    "include_spacing_input": True,
    "num_class_embeds": 128,
    "resblock_updown": True,
    "include_fc": True,
}

# Diffusion UNet, DDPM v1 (config_maisi3d-ddpm.json): body-region inputs, no class embedding.
UNET_DDPM_ARGS: dict[str, Any] = {
    **{k: v for k, v in UNET_RFLOW_ARGS.items() if k not in ("num_class_embeds", "resblock_updown", "include_fc")},
    "include_top_region_index_input": True,
    "include_bottom_region_index_input": True,
}

CONTROLNET_RFLOW_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 4,
    "num_channels": [64, 128, 256, 512],
    "attention_levels": [F, F, T, T],
    "num_head_channels": [0, 0, 32, 32],
    "num_res_blocks": 2,
    "use_flash_attention": True,
    "conditioning_embedding_in_channels": 8,
    "conditioning_embedding_num_channels": [8, 32, 64],
    "num_class_embeds": 128,
    "resblock_updown": True,
    "include_fc": True,
}

CONTROLNET_DDPM_ARGS: dict[str, Any] = {
    k: v for k, v in CONTROLNET_RFLOW_ARGS.items() if k not in ("num_class_embeds", "resblock_updown", "include_fc")
}

MASK_AUTOENCODER_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 8,
    "out_channels": 125,
    "latent_channels": 4,
    "num_channels": [32, 64, 128],
    "num_res_blocks": [1, 2, 2],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [F, F, F],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_flash_attention": False,
    "use_checkpointing": True,
    "use_convtranspose": True,
    "norm_float16": True,
    "num_splits": 8,
    "dim_split": 1,
}

MASK_DIFFUSION_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 4,
    "channels": [64, 128, 256, 512],
    "attention_levels": [F, F, T, T],
    "num_head_channels": [0, 0, 32, 32],
    "num_res_blocks": 2,
    "use_flash_attention": True,
    "with_conditioning": True,
    "upcast_attention": True,
    "cross_attention_dim": 10,
}

# Tiny variants for CPU tests (spec section 10, ours): same classes and conditioning, far fewer channels.
TINY_AUTOENCODER_ARGS: dict[str, Any] = {"num_channels": [8, 8, 8], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4}
TINY_UNET_ARGS: dict[str, Any] = {
    "num_channels": [32, 32, 32, 32],
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "num_head_channels": [0, 0, 8, 8],
}


def _on_cuda(device: torch.device | str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def cpu_switches(kwargs: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """``kwargs`` with the CUDA-only flags turned off when ``device`` is not a usable CUDA device.

    ``use_flash_attention`` and ``norm_float16`` change no state-dict key, so this never affects which
    checkpoints load. ``device=None`` means "CUDA if available".
    """
    out = dict(kwargs)
    if not _on_cuda(device):
        for flag in ("use_flash_attention", "norm_float16"):
            if out.get(flag):
                out[flag] = False
    return out


def _build(cls: type, defaults: Mapping[str, Any], tiny: Mapping[str, Any] | None, device, overrides) -> torch.nn.Module:
    kwargs = copy.deepcopy(dict(defaults))
    if tiny:
        kwargs.update(copy.deepcopy(dict(tiny)))
    kwargs.update(overrides)
    return cls(**cpu_switches(kwargs, device))


def maisi_autoencoder(tiny: bool = False, device: torch.device | str | None = None, **overrides: Any) -> AutoencoderKlMaisi:
    """CT VAE (``AutoencoderKlMaisi``), official hyper-parameters unless overridden (20,944,897 parameters)."""
    return _build(AutoencoderKlMaisi, AUTOENCODER_ARGS, TINY_AUTOENCODER_ARGS if tiny else None, device, overrides)


def maisi_diffusion_unet(
    version: str = "rflow", tiny: bool = False, device: torch.device | str | None = None, **overrides: Any
) -> DiffusionModelUNetMaisi:
    """Latent diffusion UNet: ``version="rflow"`` (v2, 180,500,868 parameters) or ``"ddpm"`` (v1, 169,370,884)."""
    defaults = {"rflow": UNET_RFLOW_ARGS, "ddpm": UNET_DDPM_ARGS}[_check_version(version)]
    return _build(DiffusionModelUNetMaisi, defaults, TINY_UNET_ARGS if tiny else None, device, overrides)


def maisi_controlnet(
    version: str = "rflow", tiny: bool = False, device: torch.device | str | None = None, **overrides: Any
) -> ControlNetMaisi:
    """ControlNet matching :func:`maisi_diffusion_unet` of the same ``version`` (rflow: 72,037,072 parameters)."""
    defaults = {"rflow": CONTROLNET_RFLOW_ARGS, "ddpm": CONTROLNET_DDPM_ARGS}[_check_version(version)]
    return _build(ControlNetMaisi, defaults, TINY_UNET_ARGS if tiny else None, device, overrides)


def maisi_mask_autoencoder(device: torch.device | str | None = None, **overrides: Any) -> AutoencoderKlMaisi:
    """Mask-generation VAE (8 binary channels in, 125 class logits out; 5,256,509 parameters)."""
    return _build(AutoencoderKlMaisi, MASK_AUTOENCODER_ARGS, None, device, overrides)


def maisi_mask_diffusion(device: torch.device | str | None = None, **overrides: Any) -> DiffusionModelUNet:
    """Mask-generation diffusion UNet (MONAI ``DiffusionModelUNet``, context = 10 anatomy sizes)."""
    return _build(DiffusionModelUNet, MASK_DIFFUSION_ARGS, None, device, overrides)


def _check_version(version: str) -> str:
    if version not in ("rflow", "ddpm"):
        raise ValueError(f"version must be 'rflow' or 'ddpm', got {version!r}")
    return version


def init_controlnet_from_unet(controlnet: torch.nn.Module, unet: torch.nn.Module) -> int:
    """Copy every UNet tensor whose name and shape exist in the ControlNet; returns the number copied.

    This must happen *before* a ControlNet checkpoint is loaded (the official order); the reverse
    silently overwrites trained ControlNet weights. Full-size rflow: 180 of 231 tensors.
    """
    _, updated, _ = copy_model_state(controlnet, unet.state_dict(), inplace=True)
    return len(updated)


# keys of the official checkpoint dicts (model zoo / NV-Generate) and of this collection's own
# checkpoints (AtomicCheckpointSaver save_dict keys), tried in this order
_STATE_KEYS = {
    "autoencoder": ("autoencoder", "state_dict"),
    "unet": ("unet_state_dict", "unet", "diffusion_unet"),
    "controlnet": ("controlnet_state_dict", "controlnet"),
}


def _checkpoint_allow_list() -> list[Any]:
    """The pickled globals, beyond PyTorch's own ``weights_only`` set, that a MAISI checkpoint may contain.

    The official diffusion trainer (``diff_model_train.py``) saves ``scale_factor = 1 / torch.std(z)`` with ``z``
    a batch of a ``LoadImaged`` pipeline, so that entry is a MONAI ``MetaTensor`` whose metadata holds MONAI's
    key enums and, when it comes from an uncollated item or an older pipeline, numpy arrays (numpy 1.x names such
    as ``numpy.core.multiarray._reconstruct`` and numpy 2 names ``numpy._core...``). Each entry is ``(object,
    name in the pickle)``: exactly these names are accepted, nothing else (no code, no arbitrary classes).
    """
    import numpy as np
    from monai.data.meta_tensor import MetaTensor
    from monai.utils.enums import MetaKeys, SpaceKeys, TraceKeys

    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    entries: list[Any] = [
        (MetaTensor, "monai.data.meta_tensor.MetaTensor"),
        (MetaKeys, "monai.utils.enums.MetaKeys"),
        (SpaceKeys, "monai.utils.enums.SpaceKeys"),
        (TraceKeys, "monai.utils.enums.TraceKeys"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((_reconstruct, f"{module}._reconstruct"))
    # the dtype objects ``numpy.dtype(...)`` rebuilds (the NIfTI header fields: numbers, flags and byte strings)
    for name in _NUMPY_DTYPE_CLASSES:
        cls = getattr(np.dtypes, name, None)
        if cls is not None:
            entries.append((cls, f"numpy.dtypes.{name}"))
    return entries


_NUMPY_DTYPE_CLASSES = (
    "BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType", "Int32DType", "UInt32DType", "Int64DType",
    "UInt64DType", "Float16DType", "Float32DType", "Float64DType", "BytesDType",
)


#: names of :func:`_checkpoint_allow_list` (documented in the maisi_ct model card)
CHECKPOINT_ALLOWED_GLOBALS: tuple[str, ...] = (
    "monai.data.meta_tensor.MetaTensor",
    "monai.utils.enums.MetaKeys",
    "monai.utils.enums.SpaceKeys",
    "monai.utils.enums.TraceKeys",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtypes.<Bool|(U)Int8..64|Float16..64|Bytes>DType",
)

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def safe_load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the MAISI allow-list (:data:`CHECKPOINT_ALLOWED_GLOBALS`).

    A file that pickles any other global (a class or function that could run code) is refused with one
    ``CheckpointError`` naming the file and the global; unreadable files likewise.
    """
    from common.utils.io import CheckpointError

    try:
        with torch.serialization.safe_globals(_checkpoint_allow_list()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated archives, foreign formats
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        if found:
            raise CheckpointError(
                f"checkpoint '{path}' contains a pickled object of type '{found.group(1)}', which a MAISI checkpoint "
                "does not hold; it was not loaded (objects that could run code are refused: only tensors, state "
                "dicts, numbers, strings and the allow-list "
                f"{', '.join(CHECKPOINT_ALLOWED_GLOBALS[:4])}, numpy arrays are read; see the model card, "
                "'Checkpoints')"
            ) from None
        raise CheckpointError(f"checkpoint '{path}' cannot be read as a PyTorch weights file: {e}") from e


def load_maisi_checkpoint(
    path: str | Path, kind: str, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Load an official or self-trained MAISI checkpoint with ``weights_only=True`` and the MAISI allow-list.

    Args:
        path: checkpoint file.
        kind: ``"autoencoder"`` (official: a raw state dict), ``"unet"`` (official:
            ``{unet_state_dict, scale_factor, ...}``) or ``"controlnet"`` (official: ``{controlnet_state_dict, ...}``).
        map_location: where tensors are loaded.

    Returns:
        ``(state_dict, scale_factor)``; ``scale_factor`` is a plain 0-d float32 tensor (a ``MetaTensor`` in the
        file loses its metadata) or ``None`` when the file has none.
    """
    if kind not in _STATE_KEYS:
        raise ValueError(f"kind must be one of {sorted(_STATE_KEYS)}, got {kind!r}")
    from common.utils.errors import InputNotFoundError
    from common.utils.io import CheckpointError

    if not Path(path).is_file():
        raise InputNotFoundError(
            f"checkpoint '{path}' not found: place the official file there (see large_files.yml and docs/README.md)"
        )
    ckpt = safe_load_checkpoint(path, map_location)
    state = None
    for key in _STATE_KEYS[kind]:
        if isinstance(ckpt, Mapping) and key in ckpt and isinstance(ckpt[key], Mapping):
            state = dict(ckpt[key])
            break
    if state is None:
        if isinstance(ckpt, Mapping) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            state = dict(ckpt)  # raw state dict (official autoencoder layout)
        else:
            found = sorted(str(k) for k in ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
            raise CheckpointError(
                f"checkpoint '{path}' holds no MAISI {kind} state dict (looked for the entries {list(_STATE_KEYS[kind])} "
                f"or a raw state dict; it has {found}); is it a checkpoint of another bundle or another stage?"
            )
    state = {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in state.items()}
    scale = ckpt.get("scale_factor") if isinstance(ckpt, Mapping) else None
    if isinstance(scale, Mapping):  # this collection's trainer checkpoint: ScaleFactor module state
        scale = scale.get("value")
    if scale is not None:
        if hasattr(scale, "as_tensor"):  # MetaTensor of the official trainer: keep the number only
            scale = scale.as_tensor()
        try:
            scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(())
        except (TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{path}': 'scale_factor' is not one number ({e})") from e
    return state, scale


_OUT_PROJ_KEY = re.compile(r"^(?P<block>.+)\.out_proj\.(weight|bias)$")


def drop_unused_attention_keys(net: torch.nn.Module, state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove the ``<block>.out_proj.{weight,bias}`` entries MONAI 1.4 wrote for attention blocks built with
    ``include_fc=False`` (it created the layer and never used it; MONAI >= 1.5 has no such keys).

    Only keys ``net`` does not have, whose ``<block>`` in ``net`` is an attention block with ``include_fc`` False,
    are removed: every other key is left for the strict check. Official DDPM files: 22 (UNet) / 10 (ControlNet).

    Returns:
        ``(state without those keys, the removed keys)``.
    """
    own = net.state_dict()
    dropped = []
    for key in state:
        if key in own:
            continue
        m = _OUT_PROJ_KEY.match(key)
        if not m:
            continue
        try:
            block = net.get_submodule(m.group("block"))
        except AttributeError:
            continue
        if getattr(block, "include_fc", True) is False and isinstance(getattr(block, "out_proj", None), torch.nn.Identity):
            dropped.append(key)
    return {k: v for k, v in state.items() if k not in set(dropped)}, dropped


def load_maisi_state(net: torch.nn.Module, state: Mapping[str, Any], source: str) -> list[str]:
    """Strict load of ``state`` into ``net`` after :func:`drop_unused_attention_keys`; returns the dropped keys."""
    from common.utils.io import load_state_into

    state, dropped = drop_unused_attention_keys(getattr(net, "module", net), state)
    load_state_into(net, state, source=source)
    return dropped


def clamp_num_splits(num_splits: int, latent_len: int, min_voxels: int = 3) -> int:
    """Largest number of TSP splits <= ``num_splits`` leaving >= ``min_voxels`` latent voxels per split.

    MONAI's ``MaisiConvolution`` fails when a split is thinner than its overlap padding (spec section 8.8).
    """
    n = max(1, int(num_splits))
    while n > 1 and latent_len // n < min_voxels:
        n -= 1
    return n


def set_num_splits(autoencoder: torch.nn.Module, num_splits: int) -> torch.nn.Module:
    """Set the tensor-splitting parallelism of every ``MaisiConvolution`` (no weight changes; returns the model)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution

    for module in autoencoder.modules():
        if isinstance(module, MaisiConvolution):
            module.num_splits = int(num_splits)
    return autoencoder


def _large_file_entry(path: str | Path, large_files: str | Path | None) -> dict[str, Any] | None:
    """The ``large_files.yml`` entry whose path (relative to the YAML's folder, the bundle root) is ``path``."""
    if not large_files or not Path(large_files).is_file():
        return None
    import yaml

    target = Path(path).resolve()
    entries = (yaml.safe_load(Path(large_files).read_text()) or {}).get("large_files", []) or []
    for entry in entries:
        if entry.get("path") and (Path(large_files).parent / entry["path"]).resolve() == target:
            return dict(entry)
    return None


def verify_checkpoint_hash(
    path: str | Path, sha256: str | None = None, large_files: str | Path | None = None, key: str | None = None,
    what: str = "checkpoint",
) -> None:
    """Check a file before it is used: against ``sha256`` (a config key, named ``key`` in the error) and, when the
    file is the one a ``large_files.yml`` entry downloads (same path under the bundle root), against that entry's
    ``hash_val`` (md5 or sha256). Raises ``HashMismatchError`` naming the file and where the expected hash came from.
    """
    import hashlib

    from common.data.fetch import HashMismatchError

    def digest(kind: str) -> str:
        h = hashlib.new(kind)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    if sha256:
        got = digest("sha256")
        if got.lower() != str(sha256).lower():
            where = f"config key '{key}'" if key else "the expected sha256"
            raise HashMismatchError(f"{what} '{path}' has sha256 {got}, expected {sha256} ({where}); "
                                    "the file is damaged or not the intended one")
    entry = _large_file_entry(path, large_files)
    if entry and entry.get("hash_val") not in (None, ""):
        kind = str(entry.get("hash_type", "md5")).lower()
        expected = entry["hash_val"]
        if isinstance(expected, int):  # YAML reads an all-digit hex digest as a number: restore its zeros
            expected = str(expected).zfill(hashlib.new(kind).digest_size * 2)
        got = digest(kind)
        if got.lower() != str(expected).lower():
            raise HashMismatchError(
                f"{what} '{path}' has {kind} {got}, expected {expected} (large_files.yml entry "
                f"'{entry['path']}'); the download is incomplete or damaged: download it again"
            )


def load_pretrained(
    net: torch.nn.Module,
    path: str | Path | None,
    kind: str,
    device: torch.device | str = "cpu",
    init_from: torch.nn.Module | None = None,
    sha256: str | None = None,
    large_files: str | Path | None = None,
    sha256_key: str | None = None,
) -> torch.nn.Module:
    """Load a checkpoint strictly into ``net`` (``weights_only=True``) and return it on ``device`` in eval mode.

    ``init_from`` (ControlNet): copy that UNet's matching weights first, then load the ControlNet checkpoint,
    the official order. ``path=None`` keeps the (copied or random) initial weights. A missing file raises
    ``FileNotFoundError`` naming the file, so a user sees which official checkpoint to place in ``models/``.
    The file is first checked against ``sha256`` and its ``large_files.yml`` entry (:func:`verify_checkpoint_hash`),
    and its keys and shapes against ``net`` before any weight is replaced: a checkpoint of another bundle or
    configuration raises ``CheckpointError`` naming the file and the mismatching keys.
    """
    if path is not None:
        if not Path(path).is_file():
            from common.utils.errors import InputNotFoundError

            raise InputNotFoundError(
                f"checkpoint '{path}' not found: place the official file there (see large_files.yml and docs/README.md)"
            )
        verify_checkpoint_hash(path, sha256, large_files, sha256_key)
        state, _ = load_maisi_checkpoint(path, kind, map_location="cpu")
    if init_from is not None:
        init_controlnet_from_unet(net, init_from)
    if path is not None:
        load_maisi_state(net, state, source=f"{kind} checkpoint '{path}'")
    return net.to(device).eval()


def read_scale_factor(path: str | Path, default: float | None = None) -> float:
    """The latent ``scale_factor`` stored in a diffusion checkpoint (``default`` if the file has none)."""
    _, scale = load_maisi_checkpoint(path, "unet")
    if scale is None:
        if default is None:
            from common.utils.io import CheckpointError

            raise CheckpointError(f"diffusion checkpoint '{path}' holds no scale_factor (the latent scale of its training)")
        return float(default)
    return float(scale)


def maisi_perceptual_loss(
    weights_path: str | Path | None, device: torch.device | str = "cpu", key: str = "perceptual_weights_path"
) -> torch.nn.Module | None:
    """The VAE's perceptual term (``PerceptualLoss(spatial_dims=3, network_type="squeeze", is_fake_3d=True,
    fake_3d_ratio=0.2)``, official) with its weights from a **local** file; never a download.

    MONAI 1.6.1 ignores ``pretrained_path`` for the ``squeeze`` network and its LPIPS backbone downloads the
    ImageNet SqueezeNet weights when built. Here the network is built with a random backbone (``lpips``'s
    ``pnet_rand=True``, no download) and ``weights_path`` is loaded into it strictly (``weights_only=True``): the
    file is the ``state_dict()`` of ``PerceptualLoss(...).perceptual_function`` (backbone and LPIPS linear layers).

    Returns ``None`` when ``weights_path`` is ``None`` (no perceptual term). Raises a user error naming the config
    key ``key`` when the file is missing, does not fit, or the packages the network needs (``lpips``,
    ``torchvision``) are not installed.
    """
    if not weights_path:
        return None
    import functools
    import importlib.util

    from common.utils.errors import InputNotFoundError, InvalidInputError
    from common.utils.io import load_state_into

    if not Path(weights_path).is_file():
        raise InputNotFoundError(f"perceptual weights '{weights_path}' (config key '{key}') do not exist")
    missing = [m for m in ("lpips", "torchvision") if importlib.util.find_spec(m) is None]
    if missing:
        raise InvalidInputError(
            f"config key '{key}' is set ('{weights_path}'), but the squeeze perceptual network needs the package(s) "
            f"{missing}, which are not installed; install them or set '{key}' to null (no perceptual term: "
            "perceptual_weight 0)"
        )
    import lpips
    import monai.losses.perceptual as perceptual

    original = perceptual.LPIPS
    perceptual.LPIPS = functools.partial(lpips.LPIPS, pnet_rand=True)  # random backbone: nothing is downloaded
    try:
        loss = perceptual.PerceptualLoss(spatial_dims=3, network_type="squeeze", is_fake_3d=True, fake_3d_ratio=0.2,
                                         pretrained=False)
    finally:
        perceptual.LPIPS = original
    state = safe_load_checkpoint(weights_path)
    if not isinstance(state, Mapping):
        from common.utils.io import CheckpointError

        raise CheckpointError(f"perceptual weights '{weights_path}' (config key '{key}') hold a {type(state).__name__}, "
                              "expected the state dict of PerceptualLoss(network_type='squeeze').perceptual_function")
    load_state_into(loss.perceptual_function, state, source=f"perceptual weights '{weights_path}' (config key '{key}')")
    return loss.to(device).eval()
