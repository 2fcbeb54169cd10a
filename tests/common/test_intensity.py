"""Percentile scaling over the non-zero voxels: the same head in any field of view reaches a network alike."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRangePercentilesd

from common.data.fetch import demo_file
from common.transforms.intensity import ScaleNonzeroPercentiled


@pytest.fixture(scope="module")
def t2() -> torch.Tensor:
    """The real SPM avg152 T2, (1, 91, 109, 91)."""
    return torch.from_numpy(np.asarray(nib.load(str(demo_file("spm/avg152T2.nii"))).dataobj, dtype=np.float32))[None]


def test_padding_with_background_leaves_the_scaled_head_unchanged(t2):
    pad = (27, 27, 23, 23)  # a 1.5x in-plane field of view: W and H padded on both sides with zeros
    padded = torch.nn.functional.pad(t2, (0, 0) + pad)
    ours = ScaleNonzeroPercentiled("x", lower=0, upper=99.5)
    head = ours({"x": t2})["x"]
    head_padded = ours({"x": padded})["x"][:, 23:-23, 27:-27]
    torch.testing.assert_close(head_padded, head)
    # MONAI's percentiles over all voxels drift with the background: the T2 comes out brighter, more of it clipped
    monai = ScaleIntensityRangePercentilesd("x", lower=0, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    drift = monai({"x": padded})["x"][:, 23:-23, 27:-27] - monai({"x": t2})["x"]
    assert drift.max() > 0.1
    # unpadded, both agree up to the lowest non-zero intensity (ours maps it to 0; 0.006 on this image)
    torch.testing.assert_close(head, monai({"x": t2})["x"], atol=0.01, rtol=0)
    assert head.min() == 0.0 and head.max() == 1.0


def test_degenerate_inputs_and_arguments(t2):
    zeros = {"x": torch.zeros(1, 4, 4, 4)}
    assert ScaleNonzeroPercentiled("x")(zeros)["x"].abs().max() == 0
    assert ScaleNonzeroPercentiled("x", allow_missing_keys=True)({"y": 1})["y"] == 1
    with pytest.raises(ValueError, match="lower < upper"):
        ScaleNonzeroPercentiled("x", lower=99.5, upper=10)
