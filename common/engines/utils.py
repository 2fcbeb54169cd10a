"""Small helpers the bundle configs call: device selection and AMP resolution."""

from __future__ import annotations

import torch

__all__ = ["get_device", "resolve_amp"]


def get_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device a bundle runs on: ``preferred`` if usable, otherwise CUDA if present, else CPU.

    A config can say ``"device": "$common.engines.get_device()"`` and still run on a laptop: a
    request for CUDA on a machine without it falls back to the CPU instead of failing late.
    """
    if preferred is not None:
        dev = torch.device(preferred)
        if dev.type != "cuda" or torch.cuda.is_available():
            return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_amp(amp: bool, device: torch.device | str) -> bool:
    """Mixed precision only where it helps and works: CUDA devices."""
    return bool(amp) and torch.device(device).type == "cuda"
