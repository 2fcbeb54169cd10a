"""Replicas of the official MAISI checkpoint files, loaded the way NVIDIA ships them.

* rflow UNet: ``{epoch, loss, num_train_timesteps, scale_factor, unet_state_dict}`` with ``scale_factor = 1 /
  std(z)`` of a ``LoadImaged`` batch (a ``MetaTensor``), as ``diff_model_train.py`` saves it;
* ControlNet: ``{epoch, loss (tensor), controlnet_state_dict}`` (``train_controlnet.py``); autoencoder: a raw state
  dict;
* MONAI 1.4 files: ``monai14_unet_header_*.pt`` were written by MONAI 1.4.0 / numpy 1.26 with
  ``make_monai14_reference.py`` (the scale factor of a collated batch and of one item, numpy 1.x pickle names);
  ``monai14_reference.json`` holds the DDPM layouts MONAI 1.4 creates (22 / 10 unused ``attn.out_proj`` keys).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.networks import maisi as M
from common.utils.errors import InputNotFoundError, InvalidInputError
from common.utils.io import CheckpointError

HERE = Path(__file__).parent
REF = json.loads((HERE / "monai14_reference.json").read_text())
LAYOUT = json.loads((HERE / "official_state_dict_layout.json").read_text())


def _globals(path: Path) -> set[str]:
    """The globals a checkpoint's pickle refers to, read the way the generator recorded them."""
    spec = importlib.util.spec_from_file_location("make_monai14_reference", HERE / "make_monai14_reference.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    return set(generator.pickled_globals(path))


def _official_scale_factor(tmp: Path) -> torch.Tensor:
    """``1 / std(first batch)`` of the official diffusion trainer's pipeline on a latent NIfTI."""
    import monai
    from monai.data import DataLoader, Dataset
    from monai.utils import first

    lat = np.random.default_rng(0).normal(size=(8, 8, 8, 4)).astype(np.float32) * 0.7
    nib.save(nib.Nifti1Image(lat, np.diag([6.0, 6.0, 6.0, 1.0])), str(tmp / "case_emb.nii.gz"))
    t = monai.transforms.Compose([monai.transforms.LoadImaged(keys=["image"]),
                                  monai.transforms.EnsureChannelFirstd(keys=["image"])])
    z = first(DataLoader(Dataset([{"image": str(tmp / "case_emb.nii.gz")}], transform=t), batch_size=1))["image"]
    return 1 / torch.std(z)


@pytest.fixture(scope="module")
def replica_dir(tmp_path_factory) -> Path:
    """Tiny networks in the official rflow files, saved exactly as the official trainers save them."""
    out = tmp_path_factory.mktemp("maisi_replica")
    torch.manual_seed(1)
    sf = _official_scale_factor(out)
    assert type(sf).__name__ == "MetaTensor" and sf.meta  # what the official file holds
    torch.save(M.maisi_autoencoder(tiny=True, device="cpu").state_dict(), out / "autoencoder_v1.pt")
    torch.save({"epoch": 20, "loss": 0.12, "num_train_timesteps": 1000, "scale_factor": sf,
                "unet_state_dict": M.maisi_diffusion_unet(tiny=True, device="cpu").state_dict()},
               out / "diff_unet_3d_rflow-ct.pt")
    torch.save({"epoch": 60, "loss": torch.tensor(0.3), "controlnet_state_dict":
                M.maisi_controlnet(tiny=True, device="cpu").state_dict()}, out / "controlnet_3d_rflow-ct.pt")
    (out / "scale_factor.txt").write_text(repr(float(sf)))
    return out


@pytest.mark.parametrize("name", sorted(REF["header_files"]))
def test_monai14_written_files_need_and_pass_the_allow_list(name):
    path = HERE / name
    ref = REF["header_files"][name]
    assert _globals(path) == set(ref["globals"])  # the committed file is what the generator recorded
    with pytest.raises(Exception, match="Unsupported global|not an allowed global"):
        torch.load(path, weights_only=True)  # plain weights_only refuses the official layout
    ckpt = M.safe_load_checkpoint(path)
    assert type(ckpt["scale_factor"]).__name__ == ref["scale_factor_type"]
    assert float(ckpt["scale_factor"]) == pytest.approx(ref["scale_factor"], rel=1e-7)
    # every non-torch global of the file is on the documented allow-list
    extra = {g for g in ref["globals"] if not g.startswith(("torch.", "collections.OrderedDict", "_codecs."))}
    assert extra <= set(M.CHECKPOINT_ALLOWED_GLOBALS)


def test_replica_rflow_files_load_strictly_and_scale_factor_is_read(replica_dir):
    unet = M.maisi_diffusion_unet(tiny=True, device="cpu")
    M.load_pretrained(unet, replica_dir / "diff_unet_3d_rflow-ct.pt", "unet")
    saved = M.safe_load_checkpoint(replica_dir / "diff_unet_3d_rflow-ct.pt")["unet_state_dict"]
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in saved.items())
    sf = M.read_scale_factor(replica_dir / "diff_unet_3d_rflow-ct.pt")
    assert sf == pytest.approx(float((replica_dir / "scale_factor.txt").read_text())) and sf != 1.0
    state, scale = M.load_maisi_checkpoint(replica_dir / "diff_unet_3d_rflow-ct.pt", "unet")
    assert type(scale) is torch.Tensor and scale.dtype == torch.float32  # the MetaTensor's metadata is dropped
    cn = M.maisi_controlnet(tiny=True, device="cpu")
    M.load_pretrained(cn, replica_dir / "controlnet_3d_rflow-ct.pt", "controlnet", init_from=unet)
    saved = torch.load(replica_dir / "controlnet_3d_rflow-ct.pt", weights_only=True)["controlnet_state_dict"]
    assert torch.equal(cn.conv_in.conv.weight, saved["conv_in.conv.weight"])
    vae = M.maisi_autoencoder(tiny=True, device="cpu")
    M.load_pretrained(vae, replica_dir / "autoencoder_v1.pt", "autoencoder")


def _constant_state(layout: dict) -> dict[str, torch.Tensor]:
    return {k: torch.full(shape, 0.25) if shape else torch.tensor(0.25) for k, shape in layout.items()}


@pytest.mark.parametrize("net_name, build, n_extra", [
    ("diffusion_unet_ddpm", lambda: M.maisi_diffusion_unet("ddpm", device="cpu"), 22),
    ("controlnet_ddpm", lambda: M.maisi_controlnet("ddpm", device="cpu"), 10),
])
def test_ddpm_monai14_layout_loads_dropping_only_unused_out_proj(net_name, build, n_extra):
    ref = REF["layouts"][net_name]
    extra = ref["only_in_monai14"]
    assert len(extra) == n_extra and ref["n_keys"] == len(LAYOUT[net_name]) + n_extra
    assert not ref["only_in_monai16"] and not ref["shape_differs"]
    assert all(".attn.out_proj." in k for k in extra)
    net = build()
    state = {**_constant_state(LAYOUT[net_name]), **_constant_state(extra)}  # the MONAI 1.4 file's keys
    kept, dropped = M.drop_unused_attention_keys(net, state)
    assert sorted(dropped) == sorted(extra) and len(kept) == len(LAYOUT[net_name])
    # strict on everything else (checked before any weight is replaced): another unexpected key, or a missing one
    with pytest.raises(CheckpointError, match="attn.extra.weight"):
        M.load_maisi_state(net, {**state, "down_blocks.2.attentions.0.attn.extra.weight": torch.zeros(1)}, "x")
    short = {k: v for k, v in state.items() if k != "conv_in.conv.weight"}
    with pytest.raises(CheckpointError, match="conv_in.conv.weight"):
        M.load_maisi_state(net, short, "y")
    assert sorted(M.load_maisi_state(net, state, "ddpm")) == sorted(extra)
    assert float(net.state_dict()["conv_in.conv.weight"].flatten()[0]) == 0.25


def test_out_proj_kept_strict_where_the_network_uses_it():
    """include_fc=True (rflow): an out_proj key of the file is a real weight; nothing is dropped, so a file
    lacking it fails and an extra out_proj key at a block without attention is not dropped either."""
    net = M.maisi_diffusion_unet("rflow", tiny=True, device="cpu")
    state = net.state_dict()
    assert any(".attn.out_proj." in k for k in state)
    _, dropped = M.drop_unused_attention_keys(net, {**state, "down_blocks.0.resnets.0.out_proj.weight": torch.zeros(1)})
    assert dropped == []
    tiny_ddpm = M.maisi_diffusion_unet("ddpm", tiny=True, device="cpu")
    layout14 = REF["layouts"]["diffusion_unet_ddpm_tiny"]
    _, dropped = M.drop_unused_attention_keys(tiny_ddpm, _constant_state(layout14))
    assert len(dropped) == len(layout14) - len(tiny_ddpm.state_dict()) > 0


def test_checkpoint_with_other_pickled_global_is_refused(tmp_path):
    unet = M.maisi_diffusion_unet(tiny=True, device="cpu")
    path = tmp_path / "with_args.pt"
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.0),
                "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError) as err:
        M.load_maisi_checkpoint(path, "unet")
    msg = str(err.value)
    assert "with_args.pt" in msg and "'argparse.Namespace'" in msg and "not loaded" in msg
    assert "cannot be read" not in msg and "\n" not in msg  # one clear line, no torch advice


def test_perceptual_weights_offline_or_refused(tmp_path):
    assert M.maisi_perceptual_loss(None) is None
    with pytest.raises(InputNotFoundError, match="perceptual_weights_path"):
        M.maisi_perceptual_loss(tmp_path / "missing.pth")
    weights = tmp_path / "squeeze.pth"
    torch.save({}, weights)
    import importlib.util

    if importlib.util.find_spec("lpips") is None or importlib.util.find_spec("torchvision") is None:
        with pytest.raises(InvalidInputError, match=r"config key 'perceptual_weights_path'.*lpips"):
            M.maisi_perceptual_loss(weights)
    else:  # built offline, then the (empty) file does not fit: refused strictly, never downloaded
        with pytest.raises(CheckpointError):
            M.maisi_perceptual_loss(weights)


class _OfflineLPIPS(torch.nn.Module):
    """Stands in for ``lpips.LPIPS`` (not installed here) with its constructor's signature: it refuses to be built
    in any way that would fetch weights (ImageNet backbone unless ``pnet_rand``, LPIPS layers when ``pretrained``)."""

    built: list[dict] = []

    def __init__(self, pretrained=True, net="alex", version="0.1", lpips=True, spatial=False, pnet_rand=False,
                 pnet_tune=False, use_dropout=True, model_path=None, eval_mode=True, verbose=True):
        super().__init__()
        type(self).built.append({"pretrained": pretrained, "net": net, "pnet_rand": pnet_rand, "model_path": model_path})
        if pretrained or not pnet_rand or model_path is not None:
            raise RuntimeError("this construction would download weights")
        self.net = torch.nn.Conv2d(1, 4, 3)
        self.lin0 = torch.nn.Conv2d(4, 1, 1, bias=False)

    def forward(self, x, y):
        return self.lin0((self.net(x) - self.net(y)) ** 2).mean(dim=(2, 3), keepdim=True)


def test_perceptual_weights_file_is_loaded_into_the_network_monai_builds(maisi_bundle, tmp_path, monkeypatch):
    """With the packages present (stood in for), the squeeze network is built without any download and the local
    file's weights are the ones the loss computes with; a file that does not fit is refused; the train config turns
    the 0.3 term on exactly when the key is set."""
    import importlib.machinery
    import sys
    import types

    import monai.losses.perceptual as perceptual  # imported before the stand-ins: its optional imports stay as they are
    from monai.bundle import ConfigParser

    for name in ("lpips", "torchvision"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["lpips"].LPIPS = _OfflineLPIPS
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    _OfflineLPIPS.built.clear()
    before = perceptual.LPIPS

    files, losses = [], []
    x, y = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 1, 12, 12, 12)
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = _OfflineLPIPS(pretrained=False, pnet_rand=True).state_dict()
        files.append(tmp_path / f"squeeze_{seed}.pth")
        torch.save(state, files[-1])
        loss = M.maisi_perceptual_loss(files[-1])
        assert isinstance(loss.perceptual_function, _OfflineLPIPS)
        assert all(torch.equal(loss.perceptual_function.state_dict()[k], v) for k, v in state.items())
        torch.manual_seed(5)  # the fake-3D slice draw
        with torch.no_grad():
            losses.append(float(loss(x, y)))
    assert losses[0] != losses[1]  # the loss computes with the file's weights
    built = [b for b in _OfflineLPIPS.built if b["net"] == "squeeze"]
    assert len(built) == 2 and all(b["pnet_rand"] and not b["pretrained"] for b in built)
    assert perceptual.LPIPS is before  # MONAI's module is left as it was
    bad = tmp_path / "other.pth"
    torch.save({"net.weight": torch.zeros(4, 1, 3, 3)}, bad)
    with pytest.raises(CheckpointError, match=r"perceptual_weights_path"):
        M.maisi_perceptual_loss(bad)

    parser = ConfigParser()
    parser.read_config(str(maisi_bundle / "configs" / "train_autoencoder.json"))
    parser.update({"bundle_root": str(maisi_bundle), "device": "$torch.device('cpu')"})
    assert parser.get_parsed_content("perceptual_weight") == 0.0 and parser.get_parsed_content("perceptual_loss") is None
    parser = ConfigParser()
    parser.read_config(str(maisi_bundle / "configs" / "train_autoencoder.json"))
    parser.update({"bundle_root": str(maisi_bundle), "device": "$torch.device('cpu')", "perceptual_weights_path": str(files[1])})
    assert parser.get_parsed_content("perceptual_weight") == 0.3
    loss = parser.get_parsed_content("perceptual_loss")
    assert torch.equal(loss.perceptual_function.lin0.weight, torch.load(files[1], weights_only=True)["lin0.weight"])
