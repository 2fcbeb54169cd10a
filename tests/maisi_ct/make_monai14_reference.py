"""Capture what MONAI 1.4 writes into MAISI checkpoints, for the replica tests of ``test_maisi_checkpoints.py``.

The official MAISI checkpoints were written by the MONAI 1.3/1.4 era code (NV-Generate-CTMR / MONAI tutorials
``generation/maisi``; model-zoo ``maisi_ct_generative`` v0.4.x-1.0.x). Two things in them cannot be rebuilt with
the MONAI this collection pins (1.6.1):

* **State-dict layouts.** MONAI 1.4's ``SABlock`` always created ``out_proj`` (``nn.Linear``), also with
  ``include_fc=False``, where it is never used; MONAI 1.6 makes it an ``nn.Identity`` (no keys). The DDPM UNet and
  ControlNet (``include_fc=False``) files therefore carry 22 / 10 keys our networks do not have.
* **Pickled objects.** The diffusion trainer (``diff_model_train.py``) saves ``scale_factor = 1 / torch.std(z)``
  with ``z`` the first batch of a ``LoadImaged`` pipeline: a ``MetaTensor`` whose metadata holds MONAI enums and
  (with older pipelines or a single item) numpy arrays written by numpy 1.x.

Run this script **outside the repository's environment**, in a throwaway one::

    python -m venv <env> && <env>/bin/pip install monai==1.4.0 torch==2.13.0 nibabel einops
    <env>/bin/python tests/maisi_ct/make_monai14_reference.py

It writes, next to itself (no weights; small files):

* ``monai14_reference.json``: versions used; for the full-size networks (official hyper-parameters: DDPM and
  rflow UNet / ControlNet, CT VAE) the key count and the difference to the MONAI 1.6.1 layouts of
  ``official_state_dict_layout.json``; the whole key -> shape layouts of the tiny DDPM UNet / ControlNet (test
  size); for each header file below the pickled globals it contains and its ``scale_factor`` value.
* ``monai14_unet_header_batch.pt``: ``{epoch, loss, num_train_timesteps, scale_factor}`` exactly as the
  official trainer saves them, ``scale_factor`` from a collated ``DataLoader`` batch (the official recipe).
* ``monai14_unet_header_item.pt``: the same with ``scale_factor`` from one uncollated ``LoadImaged`` item (its
  metadata holds numpy arrays, numpy 1.x pickle names).

The ``unet_state_dict`` entry is left out of the header files (weights are not committed); the tests add the
weights of a tiny network in the current environment.
"""

from __future__ import annotations

import json
import pickletools
import sys
import tempfile
import zipfile
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.data import CacheDataset, DataLoader
from monai.utils import first

HERE = Path(__file__).resolve().parent
F, T = False, True

# official hyper-parameters (config_maisi3d-ddpm.json / config_maisi3d-rflow.json), CPU flags off (no key changes)
UNET = dict(spatial_dims=3, in_channels=4, out_channels=4, num_channels=[64, 128, 256, 512],
            attention_levels=[F, F, T, T], num_head_channels=[0, 0, 32, 32], num_res_blocks=2,
            use_flash_attention=False, include_spacing_input=True)
UNET_DDPM = dict(UNET, include_top_region_index_input=True, include_bottom_region_index_input=True)
UNET_RFLOW = dict(UNET, include_top_region_index_input=False, include_bottom_region_index_input=False,
                  num_class_embeds=128, resblock_updown=True, include_fc=True)
CN = dict(spatial_dims=3, in_channels=4, num_channels=[64, 128, 256, 512], attention_levels=[F, F, T, T],
          num_head_channels=[0, 0, 32, 32], num_res_blocks=2, use_flash_attention=False,
          conditioning_embedding_in_channels=8, conditioning_embedding_num_channels=[8, 32, 64])
CN_RFLOW = dict(CN, num_class_embeds=128, resblock_updown=True, include_fc=True)
VAE = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[64, 128, 256],
           num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-6, attention_levels=[F, F, F],
           with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_checkpointing=False,
           use_convtranspose=False, norm_float16=False, num_splits=4, dim_split=1)
# the tiny variant of the tests (common.networks.maisi.TINY_UNET_ARGS)
TINY = dict(num_channels=[32, 32, 32, 32], num_res_blocks=1, norm_num_groups=8, num_head_channels=[0, 0, 8, 8])


def layout(net: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in net.state_dict().items()}


def pickled_globals(path: Path) -> list[str]:
    """``module.name`` of every global the checkpoint's pickle refers to (GLOBAL and STACK_GLOBAL opcodes)."""
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
    return sorted(names)


def scale_factors(tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 / std(z)`` as the official trainer computes it: from a collated batch, and from one item."""
    rng = np.random.RandomState(0)
    latent = (rng.randn(16, 16, 16, 4) * 0.8).astype(np.float32)  # an ``*_emb.nii.gz`` latent, H x W x D x 4
    path = tmp / "case_emb.nii.gz"
    nib.save(nib.Nifti1Image(latent, np.diag([6.0, 6.0, 8.0, 1.0])), str(path))
    (tmp / "case_emb.nii.gz.json").write_text(json.dumps({"spacing": [1.5, 1.5, 2.0]}))
    load = lambda p, k: torch.FloatTensor(json.loads(Path(p).read_text())[k])  # noqa: E731
    transform = monai.transforms.Compose([
        monai.transforms.LoadImaged(keys=["image"]),
        monai.transforms.EnsureChannelFirstd(keys=["image"]),
        monai.transforms.Lambdad(keys="spacing", func=lambda x: load(x, "spacing")),
        monai.transforms.Lambdad(keys="spacing", func=lambda x: x * 1e2),
    ])
    files = [{"image": str(path), "spacing": str(tmp / "case_emb.nii.gz.json")}]
    ds = CacheDataset(data=files, transform=transform, cache_rate=1.0, num_workers=0)
    z = first(DataLoader(ds, num_workers=0, batch_size=1, shuffle=False))["image"]
    batch = 1 / torch.std(z)
    item = 1 / torch.std(transform(files[0])["image"])
    return batch, item


def main() -> None:
    torch.manual_seed(0)
    out: dict = {
        "generated_with": {"monai": monai.__version__, "torch": torch.__version__.split("+")[0],
                           "numpy": np.__version__, "python": sys.version.split()[0]},
        "layouts": {},
        "header_files": {},
    }
    nets = {
        "diffusion_unet_ddpm": lambda: DiffusionModelUNetMaisi(**UNET_DDPM),
        "controlnet_ddpm": lambda: ControlNetMaisi(**CN),
        "diffusion_unet_ddpm_tiny": lambda: DiffusionModelUNetMaisi(**{**UNET_DDPM, **TINY}),
        "controlnet_ddpm_tiny": lambda: ControlNetMaisi(**{**CN, **TINY}),
        "diffusion_unet_rflow": lambda: DiffusionModelUNetMaisi(**UNET_RFLOW),
        "controlnet_rflow": lambda: ControlNetMaisi(**CN_RFLOW),
        "autoencoder": lambda: AutoencoderKlMaisi(**VAE),
    }
    # full size: the difference to the MONAI 1.6.1 layouts committed in official_state_dict_layout.json (small);
    # tiny: the whole layout (the tests build tiny replicas from it)
    reference = json.loads((HERE / "official_state_dict_layout.json").read_text())
    for name, build in nets.items():
        lay = layout(build())
        if name.endswith("_tiny"):
            out["layouts"][name] = lay
        else:
            ref = reference[name]
            out["layouts"][name] = {
                "n_keys": len(lay),
                "only_in_monai14": {k: v for k, v in lay.items() if k not in ref},
                "only_in_monai16": sorted(k for k in ref if k not in lay),
                "shape_differs": sorted(k for k in lay if k in ref and ref[k] != lay[k]),
            }
        print(name, len(lay), "keys")
    with tempfile.TemporaryDirectory() as tmp:
        batch, item = scale_factors(Path(tmp))
    for name, sf in (("monai14_unet_header_batch.pt", batch), ("monai14_unet_header_item.pt", item)):
        path = HERE / name
        torch.save({"epoch": 3, "loss": 0.25, "num_train_timesteps": 1000, "scale_factor": sf}, path)
        out["header_files"][name] = {"scale_factor": float(sf), "scale_factor_type": type(sf).__name__,
                                     "globals": pickled_globals(path)}
        print(name, out["header_files"][name])
    (HERE / "monai14_reference.json").write_text(
        "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in out.items()) + "\n}\n")


if __name__ == "__main__":
    main()
