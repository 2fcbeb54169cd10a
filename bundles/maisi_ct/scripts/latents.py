"""Latent precompute for the diffusion and ControlNet stages (official ``diff_model_create_training_data.py``).

Each CT is loaded, oriented to RAS, optionally resampled to a fixed spacing, mapped from [-1000, 1000] HU to [0, 1], resized (trilinear) so every
dimension becomes the nearest multiple of ``size_multiple`` (128 officially, at least one multiple), encoded with
the trained VAE (sampled latent ``mu + sigma * eps``, as the official script) and saved as
``<case>_emb.nii.gz`` (float32, X x Y x Z x 4) with a JSON sidecar (spacing of the resized image, modality,
body regions). With labels, the label map is resized the same way (nearest), mapped to MAISI ids by name and
saved as ``<case>_label.nii.gz``. A new Decathlon datalist ``datalist_latents.json`` lists the outputs.
``<case>`` is ``common.bundle.case_name``: the entry's ``id``, else its image file's stem; two cases with one
name are refused before anything is encoded. Datalists are read by ``common.bundle.load_datalist`` (only the
:data:`PATH_KEYS` entries are paths).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Orientationd, Resized, ScaleIntensityRanged, Spacingd

from common.bundle import case_name, load_datalist, planned_outputs, require_file
from common.transforms.maisi import BODY_LABEL, to_maisi_label, totalsegmentator_to_maisi_lut
from common.transforms.validation import CheckedLoadImaged, ValidateImaged, ValidateLabeld
from common.utils.errors import InvalidInputError
from common.utils.io import atomic_write, check_writable_dir

__all__ = ["PATH_KEYS", "target_dims", "precompute_latents", "region_one_hot"]

#: the entries of a maisi_ct datalist (CT or latent) that are file paths, joined to the datalist's folder by
#: ``common.bundle.load_datalist``; the latent datalist's numbers (spacing, dim, region indices) stay as they are
PATH_KEYS = ("image", "label")

_REGION_ORDER = ("head", "chest", "abdomen", "pelvis")


def target_dims(shape: Sequence[int], multiple: int = 128) -> list[int]:
    """Each dimension rounded to the nearest multiple of ``multiple`` (at least one multiple)."""
    return [max(multiple, int(round(s / multiple)) * multiple) for s in shape]


def region_one_hot(region: str) -> list[int]:
    """One-hot body region in the official order head, chest/thorax, abdomen, pelvis/lower."""
    alias = {"thorax": "chest", "lower": "pelvis"}
    vec = [0, 0, 0, 0]
    vec[_REGION_ORDER.index(alias.get(region, region))] = 1
    return vec


def _save(path: Path, array: np.ndarray, affine: np.ndarray, dtype: Any) -> None:
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_data_dtype(dtype)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


@torch.no_grad()
def precompute_latents(
    autoencoder: torch.nn.Module,
    datalist: str,
    out_dir: str,
    device: torch.device | str = "cpu",
    sections: Sequence[str] = ("training", "validation"),
    size_multiple: int = 128,
    label_names: Mapping[int | str, str] | None = None,
    modality: int = 1,
    body_region: Sequence[str] = ("abdomen", "abdomen"),
    target_spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    max_abs_hu: float | None = 1e5,
) -> str:
    """Encode every image of ``datalist`` and write the latent datalist; returns its path.

    ``label_names`` ({id: name}, e.g. TotalSegmentator's ``class_map["total"]`` or a datalist's ``labels``)
    maps labels to MAISI ids by name (+ body 200 from the CT); ``None`` skips labels. ``target_spacing``
    resamples every image to that spacing first (the official "fixed" spacing option; ``None`` keeps the
    original spacing). Existing outputs are reused unless ``overwrite``.

    Every CT is checked (3D, finite, not constant, ``|HU| <= max_abs_hu``: larger values mean a wrong scaling)
    and every label map (3D, same grid as its CT, values among the ids of ``label_names``). The outputs are
    written to a hidden folder in ``out_dir`` and moved into place only when every image is done, so a
    failure leaves no partial latents.
    """
    out = check_writable_dir(out_dir, "output folder (config key 'latent_dir')")
    result = out / "datalist_latents.json"
    if result.is_file() and not overwrite:
        return str(result)
    require_file(datalist, "datalist")
    lut = None if label_names is None else totalsegmentator_to_maisi_lut({int(k): v for k, v in label_names.items()})
    keys = ["image", "label"] if lut is not None else ["image"]
    cases = _plan_cases(datalist, sections, keys, out)
    checks = [ValidateImaged("image", spatial_dims=3, channels=1, max_abs=max_abs_hu)]
    if lut is not None:
        classes = sorted({0} | {int(k) for k in label_names})
        checks += [ValidateImaged("label", spatial_dims=3, channels=1, reject_constant=False),
                   ValidateLabeld("label", num_classes=classes)]
    load = Compose([CheckedLoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), *checks,
                    Orientationd(keys, axcodes="RAS")])
    tmp_dir = Path(tempfile.mkdtemp(prefix=".latents.", dir=out))
    try:
        lists = _encode_all(autoencoder, cases, keys, load, lut, size_multiple, modality, body_region, target_spacing,
                            device, tmp_dir)
        for f in sorted(tmp_dir.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    with atomic_write(result, "w") as fh:
        fh.write(json.dumps(lists, indent=1))
    return str(result)


def _plan_cases(datalist: str, sections: Sequence[str], keys: Sequence[str], out: Path) -> dict[str, list[tuple[str, dict]]]:
    """``{section: [(case name, item), ...]}``, checked before any image is encoded: every item has ``keys`` and
    no two cases (of any section) write the same latent (:func:`common.bundle.planned_outputs`)."""
    lists = {section: load_datalist(datalist, section, path_keys=PATH_KEYS) for section in sections}
    for section, items in lists.items():
        for i, item in enumerate(items):
            missing = [k for k in keys if k not in item]
            if missing:
                raise InvalidInputError(f"datalist '{datalist}' section '{section}' entry {i} has no {missing}")
    everything = [item for items in lists.values() for item in items]
    planned_outputs(everything, out, ["emb", "label"][: len(keys)])  # refuses two cases with one name
    names = iter(case_name(item, i) for i, item in enumerate(everything))
    return {section: [(next(names), item) for item in items] for section, items in lists.items()}


@torch.no_grad()
def _encode_all(autoencoder, cases, keys, load, lut, size_multiple, modality, body_region, target_spacing, device,
                out: Path) -> dict[str, list[dict[str, Any]]]:
    """Encode every case of ``cases`` (:func:`_plan_cases`) into ``out``; returns the latent datalist sections."""
    scale = ScaleIntensityRanged("image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True)
    autoencoder.eval()
    lists: dict[str, list[dict[str, Any]]] = {}
    for section, items in cases.items():
        entries = []
        for name, item in items:
            d = load({k: item[k] for k in keys})
            if lut is not None:
                if tuple(d["image"].shape[1:]) != tuple(d["label"].shape[1:]):
                    raise InvalidInputError(
                        f"label '{item['label']}' has spatial shape {tuple(d['label'].shape[1:])} but its image "
                        f"'{item['image']}' has {tuple(d['image'].shape[1:])}; expected the same grid"
                    )
                # MAISI ids by name, body (200) from the CT in HU, on the native grid before resizing
                mapped = to_maisi_label(d["label"][0].numpy(), lut, d["image"][0].numpy())
                d["label"] = d["label"].clone().to(torch.uint8)
                d["label"][0] = torch.as_tensor(mapped)
            if target_spacing is not None:
                modes = ["bilinear", "nearest"][: len(keys)]
                d = Spacingd(keys, pixdim=target_spacing, mode=modes)(d)
            d = scale(d)
            dims = target_dims(d["image"].shape[1:], size_multiple)
            resize = Compose(
                [Resized("image", spatial_size=dims, mode="trilinear")]
                + ([Resized("label", spatial_size=dims, mode="nearest")] if lut is not None else [])
            )
            d = resize(d)
            affine = d["image"].affine.numpy()
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            z = autoencoder.encode_stage_2_inputs(d["image"][None].to(device).float())[0].cpu()
            latent_affine = affine.copy()
            latent_affine[:3, :3] = affine[:3, :3] * 4  # latent voxels are 4x larger
            _save(out / f"{name}_emb.nii.gz", z.permute(1, 2, 3, 0).numpy(), latent_affine, np.float32)
            entry: dict[str, Any] = {
                "image": f"{name}_emb.nii.gz",
                "spacing": [round(float(s), 6) for s in spacing],
                "modality": int(modality),
                "top_region_index": region_one_hot(body_region[0]),
                "bottom_region_index": region_one_hot(body_region[-1]),
                "dim": [int(s) for s in dims],
            }
            (out / f"{name}_emb.nii.gz.json").write_text(json.dumps(entry))
            if lut is not None:
                lab = np.asarray(d["label"][0]).astype(np.uint8)
                if BODY_LABEL not in np.unique(lab):
                    raise InvalidInputError(f"input file '{item['image']}': no body voxels found (HU > -500); expected a CT in HU")
                _save(out / f"{name}_label.nii.gz", lab, affine, np.uint8)
                entry["label"] = f"{name}_label.nii.gz"
            entries.append(entry)
        lists[section] = entries
    return lists
