"""The networks of the ALDM bundle and how a stage gets the weights of the stages before it.

- :class:`ALDMFirstStage` is ``network_def`` of inference and evaluation: ``D(SPADE_tgt(E_q(x)))``,
  deterministic and traceable (the ``spade_only`` translation). It holds the frozen autoencoder and
  MS-SPADE.
- :func:`load_entry` loads a frozen earlier stage (the stage-1 autoencoder in stages 2 and 3, the
  stage-2 SPADE in stage 3) from its checkpoint, optional sha256 checked.
- :func:`restart_ema_on_start`: a stage-3 run fine-tuned from a model averages from that model's
  weights, not from the random ones the EMA copied when it was built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from common.engines.aldm_steps import decode_latent, encode_quantized
from common.utils.io import CheckpointError, load_checkpoint, load_state_into

__all__ = ["ALDMFirstStage", "load_entry", "restart_ema_on_start"]


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


def restart_ema_on_start(trainer: Any, ema: nn.Module, network: nn.Module) -> None:
    """When ``trainer`` starts (after the handlers attached before this call, e.g. the ``finetune_loader``),
    the EMA of ``network`` (``common.engines.ema.EMA``) restarts from ``network``'s current weights with no
    update counted, as an EMA built after loading the model would."""
    from ignite.engine import Events

    def _restart(engine: Any) -> None:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            source = network.module
        else:
            source = network
        ema.module.load_state_dict(source.state_dict())
        ema.num_updates.zero_()

    trainer.add_event_handler(Events.STARTED, _restart)
