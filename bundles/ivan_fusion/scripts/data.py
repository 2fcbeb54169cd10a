"""Slice serving for 2D training on 3D volumes, checkpoint lookup and the semi-synthetic fusion demo."""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SliceDataset", "load_datalist", "require_file", "latest_checkpoint", "build_fusion_demo"]


class SliceDataset(Dataset):
    """Every 2D slice of a dataset of 3D volumes, as one training item.

    ``volumes[i]`` is a dict whose ``keys`` are ``(C, H, W, D)`` tensors (e.g. a ``CacheDataset`` after
    ``VariableAugmentd``). Item ``j`` is ``{key: (C, a, b)}`` for one ``(volume, slice)`` pair along the spatial
    axis ``slice_axis`` (0, 1 or 2), plus ``case`` and ``slice`` indices. Slices whose ``skip_empty_key`` is all
    zero (background outside the head) are left out. The index is built once, in volume order, so a seeded
    shuffling sampler gives the same sequence on every run.
    """

    def __init__(
        self,
        volumes: Sequence,
        keys: Sequence[str] = ("image", "label"),
        slice_axis: int = 2,
        skip_empty_key: str | None = "image",
        transform: Callable | None = None,
    ) -> None:
        self.volumes, self.keys = volumes, tuple(keys)
        self.axis = int(slice_axis) % 3 + 1  # channel first
        self.transform = transform
        self.index: list[tuple[int, int]] = []
        for i in range(len(volumes)):
            item = volumes[i]
            ref = torch.as_tensor(item[skip_empty_key if skip_empty_key else self.keys[0]])
            n = ref.shape[self.axis]
            if skip_empty_key is None:
                self.index += [(i, s) for s in range(n)]
            else:
                nonzero = torch.movedim(ref, self.axis, 0).reshape(n, -1).abs().amax(dim=1) > 0
                self.index += [(i, int(s)) for s in torch.nonzero(nonzero).flatten()]
        if len(volumes) and not self.index:
            raise ValueError("no non-empty slice in the training volumes")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> dict:
        i, s = self.index[j]
        item = self.volumes[i]
        out = {k: torch.as_tensor(item[k]).select(self.axis, s).clone() for k in self.keys}
        out["case"], out["slice"] = i, s
        return self.transform(out) if self.transform is not None else out


def load_datalist(path: str, key: str, base_dir: str | None = None) -> list[dict]:
    """``monai.data.load_decathlon_datalist`` or, when ``path`` does not exist yet, an empty list.

    Building a workflow (e.g. ``check_properties`` of a freshly downloaded bundle) must not need the data;
    running it does: ``run`` starts with :func:`require_file`.
    """
    from monai.data import load_decathlon_datalist

    if not os.path.isfile(path):
        return []
    items = load_decathlon_datalist(path, data_list_key=key, base_dir=base_dir or os.path.dirname(path))
    return items


def require_file(path: str, what: str = "datalist") -> str:
    """Raise ``FileNotFoundError`` naming the config key to override when ``path`` is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist: pass --dataset_dir or --datalist")
    return path


def latest_checkpoint(ckpt_dir: str, default: str = "model.pt") -> str:
    """Newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (largest ``N``), else ``ckpt_dir/default``."""
    best, best_epoch = os.path.join(ckpt_dir, default), -1
    for f in glob.glob(os.path.join(ckpt_dir, "checkpoint_epoch=*.pt")):
        m = re.search(r"checkpoint_epoch=(\d+)\.pt$", f)
        if m and int(m.group(1)) > best_epoch:
            best, best_epoch = f, int(m.group(1))
    return best


# Approximate CT numbers (HU) per SPM tissue class, for a CT-like image of the ICBM-152 head.
_TPM_HU = {0: 37.0, 1: 30.0, 2: 15.0, 3: 1000.0, 4: 40.0, 5: -1000.0}  # GM, WM, CSF, bone, soft tissue, air


def build_fusion_demo(out_dir: str | os.PathLike, t2_path: str | os.PathLike, tpm_path: str | os.PathLike) -> Path:
    """Semi-synthetic T2 + CT fusion pair for tests and the benchmark (not for distribution).

    The CT-like image is the SPM tissue-probability map (6 classes incl. bone) weighted by typical HU values and
    resampled (trilinear) onto the T2 grid; both come from the same ICBM-152 space, so they are co-registered.
    Writes ``<out_dir>/fusion/{t2,ct}.nii.gz`` and ``datalist.json`` with the pair in training, validation and
    test (the fusion target is a rule of the two inputs, so this is a smoke test of the pipeline, not a
    generalisation experiment).
    """
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    root = Path(out_dir) / "fusion"
    root.mkdir(parents=True, exist_ok=True)
    t2 = nib.load(str(t2_path))
    tpm = nib.load(str(tpm_path))
    t2_arr = np.asarray(t2.dataobj, dtype=np.float32)
    probs = np.asarray(tpm.dataobj, dtype=np.float32)
    hu = sum(_TPM_HU[c] * probs[..., c] for c in range(probs.shape[-1]))
    hu = hu / np.maximum(probs.sum(-1), 1e-6)
    # voxel coordinates of the T2 grid in the TPM grid
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in t2_arr.shape], indexing="ij"), 0).reshape(3, -1)
    vox = np.linalg.inv(tpm.affine) @ t2.affine @ np.vstack([ijk, np.ones((1, ijk.shape[1]))])
    ct = map_coordinates(hu, vox[:3], order=1, mode="nearest").reshape(t2_arr.shape).astype(np.float32)
    nib.Nifti1Image(t2_arr, t2.affine).to_filename(str(root / "t2.nii.gz"))
    nib.Nifti1Image(ct, t2.affine).to_filename(str(root / "ct.nii.gz"))
    item = {"id": "icbm152", "t2": "t2.nii.gz", "ct": "ct.nii.gz"}
    datalist = {
        "name": "icbm152_t2_ct_fusion_demo",
        "description": "SPM avg152T2 and a CT-like image from SPM's TPM (HU-weighted tissue classes); GPL-2 derived, local use only",
        "task": {"inputs": ["t2", "ct"], "target": "fused"},
        "training": [item], "validation": [item], "test": [item],
    }
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path
