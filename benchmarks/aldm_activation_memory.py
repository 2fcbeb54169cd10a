#!/usr/bin/env python
"""Activation memory of one ALDM training step per stage, counted without a GPU.

Every network is built on PyTorch's ``meta`` device (shapes, no data), one training forward pass runs
with ``torch.autograd.graph.saved_tensors_hooks``, and the bytes of the tensors autograd saves for the
backward pass are summed (each tensor object once). That is the activation memory a GPU must hold at the
peak of the step, on top of the parameters, gradients and Adam's two moments (also printed); the
backward pass's own temporaries and the CUDA allocator's slack come on top, so treat the numbers as a
lower bound of the peak (typically 10-30 % below what ``torch.cuda.max_memory_allocated`` reports).

Stages, as the bundle's configs wire them (``scripts`` of the bundle are not needed):

- stage 1: VQ-GAN forward on one ``ae_train_roi_size`` volume + the image discriminator on the
  reconstruction (the generator's adversarial term, after ``disc_start``);
- stage 2: frozen encoder (no saved tensors) + MS-SPADE on the latent + the latent discriminator;
- stage 3: frozen stages 1-2 + the latent diffusion UNet on ``[z_src, c, z_t]``.

Usage::

    python benchmarks/aldm_activation_memory.py                                # paper and light configurations
    python benchmarks/aldm_activation_memory.py --stage1-rois 144x144x112     # other stage-1 training volumes

Prints one JSON document and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = 2.0**30


def _meta_safe_codebook_usage() -> None:
    """The quantiser's usage statistics (``bincount``, no meta kernel; not part of the graph) as zeros on meta."""
    from common.networks import quantizers

    real = quantizers.codebook_usage

    def usage(indices: torch.Tensor, num_embeddings: int) -> dict[str, torch.Tensor]:
        if indices.device.type != "meta":
            return real(indices, num_embeddings)
        zero = torch.zeros((), device="meta")
        return {"perplexity": zero, "codebook_used": zero}

    quantizers.codebook_usage = usage


class SavedTensorCounter:
    """Sum of the bytes autograd saves for backward inside the ``with`` block (each tensor object once).

    ``units``: modules that activation checkpointing would wrap (the VQ-GAN's ResBlocks and resampling
    blocks). Bytes saved while one of them runs are attributed to it, and its input size is recorded;
    :attr:`checkpointed_bytes` is then the activation memory with checkpointing: what is saved outside
    the units, plus every unit's input (kept for the recomputation), plus the largest unit's own
    activations (recomputed one unit at a time in the backward pass).
    """

    def __init__(self, units: list[torch.nn.Module] = ()) -> None:
        self.bytes = 0
        self.outside = 0
        self.unit_bytes: dict[int, int] = {}
        self.unit_inputs = 0
        self._seen: set[int] = set()
        self._alive: list[torch.Tensor] = []
        self._stack: list[int] = []
        self._units = list(units)
        self._handles: list = []

    def _pack(self, t: torch.Tensor):
        if id(t) not in self._seen:
            self._seen.add(id(t))
            self._alive.append(t)  # keeps the id unique while counting
            n = t.numel() * t.element_size()
            self.bytes += n
            if self._stack:
                self.unit_bytes[self._stack[-1]] = self.unit_bytes.get(self._stack[-1], 0) + n
            else:
                self.outside += n
        return t

    def _enter_unit(self, module, args):
        self._stack.append(id(module))
        self.unit_inputs += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))

    def _leave_unit(self, module, args, output):
        self._stack.pop()

    @property
    def checkpointed_bytes(self) -> int:
        return self.outside + self.unit_inputs + max(self.unit_bytes.values(), default=0)

    def __enter__(self):
        for m in self._units:
            self._handles += [m.register_forward_pre_hook(self._enter_unit), m.register_forward_hook(self._leave_unit)]
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._alive.clear()


def _params_bytes(module: torch.nn.Module) -> int:
    """Bytes of the trainable parameters (the gradients and each of Adam's two moments take as much again)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def stage1(scale: str, roi: list[int], disc_channels: int = 32, disc_layers: int = 3, disc_groups: int = 32,
           dtype: torch.dtype = torch.float32) -> dict:
    from common.networks.discriminators import aldm_discriminator, disc_logits
    from common.networks.vqgan import VQGAN

    with torch.device("meta"):
        net = VQGAN.aldm(scale).to(dtype)
        disc = aldm_discriminator(in_channels=1, channels=disc_channels, num_layers_d=disc_layers, norm_num_groups=disc_groups).to(dtype)
        x = torch.zeros(1, 1, *roi, dtype=dtype)
    for p in disc.parameters():
        p.requires_grad_(False)  # the generator step: gradients flow through D into G, not into D
    units = [*net.encoder.down, *net.encoder.mid, *net.decoder.mid, *net.decoder.up]
    with SavedTensorCounter(units) as c:
        x_hat, vq_loss, _ = net(x)
        logits = disc(x_hat)
        loss = (x_hat - x).abs().mean() + vq_loss - disc_logits(logits).mean()
    trainable = _params_bytes(net)
    return {"activations_gib": c.bytes / GiB, "activations_checkpointing_gib": c.checkpointed_bytes / GiB,
            "parameters_gib": trainable / GiB, "adam_state_gib": 3 * trainable / GiB,
            "input": list(x.shape), "loss_shape": list(loss.shape)}


def stage2(scale: str, roi: list[int], modalities: int, spade_nf: int = 64, spade_hidden: int = 64,
           disc_channels: int = 32, disc_layers: int = 3, disc_groups: int = 32, dtype: torch.dtype = torch.float32) -> dict:
    from common.networks.discriminators import aldm_discriminator, disc_logits
    from common.networks.spade import MSSPADEGenerator
    from common.networks.vqgan import VQGAN

    names = [f"m{i}" for i in range(modalities)]
    with torch.device("meta"):
        ae = VQGAN.aldm(scale).to(dtype)
        spade = MSSPADEGenerator(names, in_channels=ae.embed_dim, nf=spade_nf, hidden_channels=spade_hidden).to(dtype)
        disc = aldm_discriminator(in_channels=ae.embed_dim, channels=disc_channels, num_layers_d=disc_layers,
                                  norm_num_groups=disc_groups).to(dtype)
        x = torch.zeros(1, 1, *roi, dtype=dtype)
    with torch.no_grad():
        z = ae.quantize(ae.encode(x))[0]
    for p in disc.parameters():
        p.requires_grad_(False)
    with SavedTensorCounter() as c:
        z_t = spade(z, names[1])
        z_back = spade(z_t, names[0])  # the cycle term
        logits = disc(z_t)
        loss = (z_t - z).abs().mean() + (z_back - z).abs().mean() - disc_logits(logits).mean()
    trainable = _params_bytes(spade)
    return {"activations_gib": c.bytes / GiB, "parameters_gib": trainable / GiB, "adam_state_gib": 3 * trainable / GiB,
            "latent": list(z.shape), "loss_shape": list(loss.shape)}


def stage3(scale: str, ldm_scale: str, roi: list[int], modalities: int, dtype: torch.dtype = torch.float32) -> dict:
    from common.networks.aldm_ldm import aldm_diffusion_unet
    from common.networks.vqgan import VQGAN

    with torch.device("meta"):
        ae = VQGAN.aldm(scale)
        f = ae.downsample_factor
        unet = aldm_diffusion_unet(modalities, embed_dim=ae.embed_dim, scale=ldm_scale).to(dtype)
        z = torch.zeros(1, 3 * ae.embed_dim, *(s // f for s in roi), dtype=dtype)
        t = torch.zeros(1, dtype=torch.long)
        context = torch.zeros(1, 1, modalities, dtype=dtype)
    with SavedTensorCounter() as c:
        eps = unet(z, t, context=context)
        loss = eps.pow(2).mean()
    trainable = _params_bytes(unet)
    return {"activations_gib": c.bytes / GiB, "parameters_gib": trainable / GiB, "adam_state_gib": 3 * trainable / GiB,
            "latent_input": list(z.shape), "loss_shape": list(loss.shape)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modalities", type=int, default=4, help="4: BraTS (t1, t1ce, t2, flair)")
    ap.add_argument("--stage1-rois", type=str, default="192x192x144,160x160x128,96x96x96",
                    help="stage-1 training volumes to count (comma-separated XxYxZ)")
    args = ap.parse_args(argv)
    _meta_safe_codebook_usage()
    rois = [[int(v) for v in r.split("x")] for r in args.stage1_rois.split(",") if r]
    out: dict = {"command": "python benchmarks/aldm_activation_memory.py " + " ".join(argv or sys.argv[1:]),
                 "stage1": {}, "stage2": {}, "stage3": {}}
    # autoencoder / LDM scale and model grid of the default configs and of light.json
    for name, (scale, ldm_scale, grid) in {"paper": ("paper", "paper", [192, 192, 144]),
                                            "light": ("light", "light", [160, 160, 128])}.items():
        for roi in rois:
            out["stage1"][f"{name} {'x'.join(map(str, roi))}"] = {"scale": scale, "roi": roi, **stage1(scale, roi)}
        out["stage2"][name] = {"scale": scale, "roi": grid, **stage2(scale, grid, args.modalities)}
        out["stage3"][name] = {"scale": ldm_scale, "roi": grid, **stage3(scale, ldm_scale, grid, args.modalities)}
    lines = ["| stage | scale | training volume | activations (GiB) | with checkpointing (GiB) | parameters + gradients + Adam (GiB) |",
             "|---|---|---|---|---|---|"]
    for stage in ("stage1", "stage2", "stage3"):
        for r in out[stage].values():
            ck = r.get("activations_checkpointing_gib")
            lines.append(f"| {stage[-1]} | {r['scale']} | {'x'.join(map(str, r['roi']))} | {r['activations_gib']:.1f} | "
                         f"{'-' if ck is None else f'{ck:.1f}'} | {r['parameters_gib'] + r['adam_state_gib']:.2f} |")
    out["markdown"] = "\n".join(lines)
    print(json.dumps(out, indent=1))
    print(out["markdown"])
    return out


if __name__ == "__main__":
    main()
