"""Loading the weights of earlier stages and of inference (``models/model.pt`` or the three stage files)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.utils.io import load_checkpoint, load_state_into

__all__ = ["load_weights", "load_inference_weights"]


def load_weights(module: torch.nn.Module, path: str | os.PathLike, key: str) -> torch.nn.Module:
    """Load ``key`` of a checkpoint (or the whole file when it is a bare state dict) into ``module``.

    Stage 2 reads the VQ-GAN of stage 1, stage 3 the VQ-GAN and the encoder; a missing file says which stage to run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist: train the earlier stage first (configs/train_vqgan.json, configs/train_cond_encoder.json)")
    ckpt = load_checkpoint(path)
    state = ckpt[key] if key in ckpt else ckpt
    target = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    load_state_into(target, state, source=f"'{path}' ({key})")
    return module


def load_inference_weights(model: torch.nn.Module, ckpt_dir: str | os.PathLike) -> torch.nn.Module:
    """Weights of :class:`common.engines.noddi_steps.NODDISRModel`: ``model.pt`` if present, else the stage files.

    Stage files: ``vqgan.pt`` (key ``vqgan``), ``encoder.pt`` (``encoder``), ``diffusion.pt`` (``unet``, the EMA
    weights, and ``latent_norm``).
    """
    ckpt_dir = Path(ckpt_dir)
    whole = ckpt_dir / "model.pt"
    if whole.is_file():
        ckpt = load_checkpoint(whole)
        load_state_into(model, ckpt.get("model", ckpt), source=f"'{whole}'")
        return model
    load_weights(model.vqgan, ckpt_dir / "vqgan.pt", "vqgan")
    load_weights(model.encoder, ckpt_dir / "encoder.pt", "encoder")
    diff = load_checkpoint(ckpt_dir / "diffusion.pt") if (ckpt_dir / "diffusion.pt").is_file() else None
    if diff is None:
        raise FileNotFoundError(f"'{ckpt_dir / 'diffusion.pt'}' does not exist: run configs/train_diffusion.json first")
    unet_state = diff["unet"]
    if any(k.startswith("module.") for k in unet_state):  # an EMA wrapper saved whole
        unet_state = {k[len("module."):]: v for k, v in unet_state.items() if k.startswith("module.")}
    load_state_into(model.unet, unet_state, source=f"'{ckpt_dir / 'diffusion.pt'}' (unet)")
    load_state_into(model.latent_norm, diff["latent_norm"], source=f"'{ckpt_dir / 'diffusion.pt'}' (latent_norm)")
    return model
