"""Fixtures of the maisi_ct tests: a MAISI label mask from the real TotalSegmentator example CT and tiny
random-weight checkpoints in the official file layouts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "maisi_ct"
OUTPUT_SIZE = (64, 64, 64)
SPACING = (1.5, 1.5, 1.5)


@pytest.fixture(scope="session")
def maisi_bundle() -> Path:
    return BUNDLE


@pytest.fixture(scope="session")
def bundle_env() -> dict[str, str]:
    """Environment of a bundle subprocess: the bundle folder on the path (``scripts``), one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BUNDLE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(autouse=True)
def _bundle_on_path(_isolate_bundle_scripts):
    """This bundle's ``scripts`` importable in-process (after the suite-wide purge of other bundles')."""
    sys.path.insert(0, str(BUNDLE))
    yield
    if str(BUNDLE) in sys.path:
        sys.path.remove(str(BUNDLE))


@pytest.fixture(scope="session")
def maisi_masks(tmp_path_factory) -> dict[str, Path]:
    """MAISI label maps of the real example scan: ``native`` (3 mm, 122x101x112, body 200 from the CT) and
    ``grid`` (resampled to 1.5 mm and padded/cropped to 64^3, the tiny inference grid)."""
    from monai.transforms import ResizeWithPadOrCrop, Spacing, SpatialCrop

    from common.data.demo import total_class_names
    from common.data.fetch import demo_file
    from common.transforms.maisi import to_maisi_label, totalsegmentator_to_maisi_lut

    out = tmp_path_factory.mktemp("maisi_masks")
    ct = nib.load(str(demo_file("totalsegmentator/example_ct.nii.gz")))
    seg = nib.load(str(demo_file("totalsegmentator/example_seg_fast_force_split.nii.gz")))
    label = to_maisi_label(np.asarray(seg.dataobj), totalsegmentator_to_maisi_lut(total_class_names()), np.asarray(ct.dataobj))
    native = out / "mask_native.nii.gz"
    nib.save(nib.Nifti1Image(label, ct.affine), str(native))
    from monai.data import MetaTensor

    mt = MetaTensor(torch.as_tensor(label[None]), affine=torch.as_tensor(ct.affine))
    mt = Spacing(pixdim=SPACING, mode="nearest")(mt)
    # a 64^3 box (96 mm) centred on the liver, so organs (not only body) are in the tiny grid
    centre = [int(c.float().mean()) for c in torch.nonzero(mt[0] == 1, as_tuple=True)]
    mt = SpatialCrop(roi_center=centre, roi_size=OUTPUT_SIZE)(mt)
    mt = ResizeWithPadOrCrop(OUTPUT_SIZE)(mt)
    grid = out / "mask_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(mt[0]).astype(np.uint8), np.asarray(mt.affine)), str(grid))
    return {"native": native, "grid": grid}


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory) -> Path:
    """Tiny random networks saved under the official rflow file names and layouts."""
    from common.networks.maisi import maisi_autoencoder, maisi_controlnet, maisi_diffusion_unet

    out = tmp_path_factory.mktemp("maisi_ckpt")
    torch.manual_seed(0)
    torch.save(maisi_autoencoder(tiny=True, device="cpu").state_dict(), out / "autoencoder_v1.pt")
    unet = maisi_diffusion_unet(tiny=True, device="cpu")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.25), "num_train_timesteps": 1000},
               out / "diff_unet_3d_rflow-ct.pt")
    torch.save({"controlnet_state_dict": maisi_controlnet(tiny=True, device="cpu").state_dict()}, out / "controlnet_3d_rflow-ct.pt")
    return out


@pytest.fixture
def tiny_train_workflow(maisi_bundle):
    """``make(config, **overrides)``: an initialised train ``ConfigWorkflow`` of a maisi_ct stage with the tiny
    overlay (the training and fine-tuning tests build their runs this one way)."""
    from monai.bundle import ConfigWorkflow

    def make(config: str, **overrides) -> ConfigWorkflow:
        wf = ConfigWorkflow(
            config_file=[str(maisi_bundle / "configs" / config), str(maisi_bundle / "configs" / "tiny.json")],
            meta_file=str(maisi_bundle / "configs" / "metadata.json"),
            logging_file=str(maisi_bundle / "configs" / "logging.conf"),
            workflow_type="train",
            bundle_root=str(maisi_bundle),
            **overrides,
        )
        wf.initialize()
        return wf

    return make
