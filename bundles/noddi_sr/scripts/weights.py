"""Loading the weights of earlier stages and of inference (``models/model.pt`` or the three stage files).

Every file is read by :func:`common.utils.io.load_checkpoint` (``weights_only=True``, its sha256 checked first when
one is given) and checked against the network before anything is loaded, so a missing, foreign (another bundle's),
mismatched (another configuration's) or altered file ends in one error that names it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from common.utils.errors import InputNotFoundError, InvalidInputError
from common.utils.io import CheckpointError, check_state_fits, load_checkpoint, load_state_into

__all__ = ["load_weights", "load_inference_weights", "EMAFromNetwork", "STAGE_FILES"]

#: stage files of inference: file name -> (entry, config that trains it)
STAGE_FILES = {
    "vqgan.pt": ("vqgan", "configs/train_vqgan.json"),
    "encoder.pt": ("encoder", "configs/train_cond_encoder.json"),
    "diffusion.pt": ("unet", "configs/train_diffusion.json"),
}


def _digest(sha256: str | Mapping[str, str] | None, name: str, key: str = "ckpt_sha256") -> str | None:
    """The expected digest of file ``name``: a mapping is looked up by file name, a string is the digest itself."""
    if sha256 is None or isinstance(sha256, str):
        return sha256 or None
    if isinstance(sha256, Mapping):
        unknown = [k for k in sha256 if k not in ("model.pt", *STAGE_FILES)]
        if unknown:
            raise InvalidInputError(
                f"config key '{key}' names unknown files {unknown}; expected a subset of {['model.pt', *STAGE_FILES]}"
            )
        return sha256.get(name) or None
    raise InvalidInputError(f"config key '{key}' must be null, a sha256 string or a dict {{file name: sha256}}, got {type(sha256).__name__}")


def load_weights(module: torch.nn.Module, path: str | os.PathLike, key: str, sha256: str | None = None) -> torch.nn.Module:
    """Load ``key`` of a checkpoint (or the whole file when it is a bare state dict) into ``module``.

    Stage 2 reads the VQ-GAN of stage 1, stage 3 the VQ-GAN and the encoder; a missing file says which stage to run.
    ``sha256``: expected digest of the file (checked before it is read).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"checkpoint '{path}' does not exist: train the earlier stage first "
            "(configs/train_vqgan.json, configs/train_cond_encoder.json) or set 'ckpt_dir'"
        )
    ckpt = load_checkpoint(path, sha256=sha256)
    state = ckpt[key] if key in ckpt else ckpt
    target = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    load_state_into(target, state, source=f"checkpoint '{path}' (entry '{key}')")
    return module


def load_inference_weights(
    model: torch.nn.Module, ckpt_dir: str | os.PathLike, sha256: str | Mapping[str, str] | None = None
) -> torch.nn.Module:
    """Weights of :class:`common.engines.noddi_steps.NODDISRModel`: ``model.pt`` if present, else the stage files.

    Stage files: ``vqgan.pt`` (key ``vqgan``), ``encoder.pt`` (``encoder``), ``diffusion.pt`` (``unet``, the EMA
    weights, and ``latent_norm``). ``sha256`` (config ``ckpt_sha256``): the digest of ``model.pt`` (a string), or a
    dict ``{file name: digest}`` for ``model.pt`` and/or the stage files; each listed file is checked before it is read.
    Every part is checked against the network before any weight is replaced.
    """
    ckpt_dir = Path(ckpt_dir)
    whole = ckpt_dir / "model.pt"
    if whole.is_file():
        ckpt = load_checkpoint(whole, sha256=_digest(sha256, "model.pt"))
        load_state_into(model, ckpt.get("model", ckpt), source=f"checkpoint '{whole}'")
        return model
    if isinstance(sha256, str) and sha256:
        raise InvalidInputError(
            f"config key 'ckpt_sha256' is one digest, for '{whole}', which does not exist; for the stage files give a "
            f"dict {{file name: sha256}} of {list(STAGE_FILES)}"
        )
    missing = [name for name in STAGE_FILES if not (ckpt_dir / name).is_file()]
    if missing:
        name = missing[0]
        raise InputNotFoundError(
            f"checkpoint '{ckpt_dir / name}' does not exist (config key 'ckpt_dir'): inference needs '{whole}' or the "
            f"three stage files {list(STAGE_FILES)}; run {STAGE_FILES[name][1]} first"
        )
    # read and check every part before loading any, so that a bad file leaves the network untouched
    parts = []
    for name in ("vqgan.pt", "encoder.pt"):
        entry = STAGE_FILES[name][0]
        ckpt = load_checkpoint(ckpt_dir / name, sha256=_digest(sha256, name))
        parts.append((getattr(model, entry), ckpt[entry] if entry in ckpt else ckpt, f"checkpoint '{ckpt_dir / name}' (entry '{entry}')"))
    diff_path = ckpt_dir / "diffusion.pt"
    diff = load_checkpoint(diff_path, sha256=_digest(sha256, "diffusion.pt"))
    absent = [k for k in ("unet", "latent_norm") if k not in diff]
    if absent:
        raise CheckpointError(
            f"checkpoint '{diff_path}' has no entries {absent} (it has {sorted(diff)[:8]}); expected the 'unet' and "
            "'latent_norm' of configs/train_diffusion.json: is it a checkpoint of another bundle or stage?"
        )
    unet_state = diff["unet"]
    if isinstance(unet_state, Mapping) and any(k.startswith("module.") for k in unet_state):  # an EMA wrapper saved whole
        unet_state = {k[len("module."):]: v for k, v in unet_state.items() if k.startswith("module.")}
    parts.append((model.unet, unet_state, f"checkpoint '{diff_path}' (entry 'unet')"))
    parts.append((model.latent_norm, diff["latent_norm"], f"checkpoint '{diff_path}' (entry 'latent_norm')"))
    for module, state, source in parts:
        check_state_fits(module, state, source)
    for module, state, source in parts:
        load_state_into(module, state, source)
    return model


class EMAFromNetwork:
    """Stage 3 fine-tuning: the EMA of the UNet starts from the fine-tuned weights, not from the fresh initialisation.

    The EMA (``common.engines.ema.EMA``) copies the network when it is built, before ``finetune_loader`` loads
    ``finetune_ckpt`` into the network (at ``STARTED``); this handler copies the loaded weights into it when the first
    epoch starts, so that an EMA update (``ema_start`` reached) averages towards the fine-tuned model.
    """

    def __init__(self, ema: torch.nn.Module, network: torch.nn.Module) -> None:
        self.ema, self.network = ema, network

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED(once=1), self)

    def __call__(self, engine=None) -> None:
        net = self.network.module if isinstance(self.network, torch.nn.parallel.DistributedDataParallel) else self.network
        with torch.no_grad():
            self.ema.module.load_state_dict(net.state_dict())
