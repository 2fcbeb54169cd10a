"""Framing: what makes a model independent of the field of view of a user's scan.

``RandFieldOfViewd`` (training augmentation), the inferer padding a small volume up to one window
before drawing noise, and the framing cases of the held-out example CT (padded field of view,
thin slabs, TotalSegmentator's own crop) with every voxel kept at its physical position.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.demo import CT_SLAB_SLICES, build_ct_framings
from common.inferers import DiffSegInferer
from common.networks.diffseg_unet import DiffSegUNet
from common.transforms.segmentation import RandFieldOfViewd


@pytest.fixture(scope="module")
def real_ct(ct_demo) -> dict:
    """The held-out example CT (HU -> [0, 1] with the AMOS window, air 0) and its merged labels."""
    case = json.loads(Path(ct_demo).read_text())["test"][0]
    hu = np.asarray(nib.load(str(Path(ct_demo).parent / case["image"])).dataobj, dtype=np.float32)
    image = np.clip((hu + 991.0) / (362.0 + 991.0), 0.0, 1.0)
    label = np.asarray(nib.load(str(Path(ct_demo).parent / case["label"])).dataobj).astype(np.int64)
    return {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label)[None]}


def _kept_box(image: torch.Tensor, fill: float = 0.0) -> list[tuple[int, int]]:
    """First/last index of voxels that differ from ``fill`` along each spatial axis."""
    idx = torch.nonzero(image[0] != fill)
    return [(int(idx[:, a].min()), int(idx[:, a].max())) for a in range(3)]


def test_field_of_view_cut_keeps_a_box_of_the_body_and_blanks_the_rest(real_ct):
    t = RandFieldOfViewd(["image", "label"], prob=1.0, slab_size=(8, 12), inplane_prob=1.0, inplane_fraction=(0.5, 0.6))
    body = real_ct["image"][0] > 0
    first_body = [int(torch.nonzero(body.any(dim=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    last_body = [int(torch.nonzero(body.any(dim=tuple(b for b in range(3) if b != a)))[-1]) for a in range(3)]
    for seed in range(4):
        t.set_random_state(seed)
        out = t(dict(real_ct))
        image, label = out["image"], out["label"]
        assert image.shape == real_ct["image"].shape and label.dtype == real_ct["label"].dtype
        box = t._box
        assert box is not None
        z = box[2]
        assert 8 <= z.stop - z.start <= 12 and first_body[2] <= z.start and z.stop - 1 <= last_body[2]
        for axis in (0, 1):  # in-plane: 50-60 % of the body's extent, inside it
            length = last_body[axis] - first_body[axis] + 1
            kept = box[axis].stop - box[axis].start
            assert round(0.5 * length) - 1 <= kept <= round(0.6 * length) + 1
            assert first_body[axis] <= box[axis].start and box[axis].stop - 1 <= last_body[axis]
        inside = (slice(None), *box)
        assert torch.equal(image[inside], real_ct["image"][inside])
        assert torch.equal(label[inside], real_ct["label"][inside])
        outside = torch.ones_like(image, dtype=torch.bool)
        outside[inside] = False
        assert float(image[outside].abs().max()) == 0.0 and int(label[outside].max()) == 0
        assert int((real_ct["label"][outside] > 0).sum()) > 0  # organs really were cut away
    assert not torch.equal(real_ct["image"], out["image"])  # the input dictionary was not modified in place


def test_field_of_view_cut_in_replicate_mode_is_what_edge_padding_shows(real_ct):
    """fill_mode="replicate": outside the kept box the cut volume is the box padded by F.pad(replicate)."""
    t = RandFieldOfViewd(["image", "label"], prob=1.0, slab_size=(8, 12), inplane_prob=1.0, fill_mode="replicate")
    for seed in range(3):
        t.set_random_state(seed)
        out = t(dict(real_ct))
        box = t._box
        for key in ("image", "label"):
            source, cut = real_ct[key], out[key]
            kept = source[(slice(None), *box)]
            assert torch.equal(cut[(slice(None), *box)], kept)
            pads = []
            for axis in (2, 1, 0):  # F.pad order: last axis first
                pads += [box[axis].start, source.shape[axis + 1] - box[axis].stop]
            padded = torch.nn.functional.pad(kept[None].double(), pads, mode="replicate")[0]
            assert torch.equal(cut.double(), padded)
            assert cut.dtype == source.dtype
        z = box[2]
        assert not torch.equal(out["label"][..., : z.start], real_ct["label"][..., : z.start])  # really replaced
    array_out = t(dict(image=real_ct["image"].numpy(), label=real_ct["label"].numpy()))
    assert isinstance(array_out["image"], np.ndarray) and array_out["image"].shape == real_ct["image"].shape
    with pytest.raises(ValueError, match="fill_mode"):
        RandFieldOfViewd(["image"], fill_mode="reflect")


def test_field_of_view_cut_is_seeded_and_off_at_probability_zero(real_ct):
    t = RandFieldOfViewd(["image", "label"], prob=0.5, slab_size=(8, 40), inplane_prob=0.5)
    t.set_random_state(3)
    first = [t(dict(real_ct))["image"].sum().item() for _ in range(6)]
    t.set_random_state(3)
    again = [t(dict(real_ct))["image"].sum().item() for _ in range(6)]
    assert first == again and len(set(first)) > 1  # some draws cut, some differ
    off = RandFieldOfViewd(["image", "label"], prob=0.0, inplane_prob=0.0)
    out = off(dict(real_ct))
    assert torch.equal(out["image"], real_ct["image"]) and torch.equal(out["label"], real_ct["label"])


def test_anchored_slabs_keep_one_end_of_the_body(real_ct):
    """slab_anchor_prob=1: every slab starts at the body's first slice or ends at its last (both ends seen);
    0 (default) draws starts anywhere, and an invalid probability is refused."""
    body = real_ct["image"].amax(dim=0) > 0
    zs = torch.nonzero(body.any(dim=0).any(dim=0)).flatten()
    first, last = int(zs[0]), int(zs[-1])
    t = RandFieldOfViewd(["image", "label"], prob=1.0, slab_size=(8, 12), inplane_prob=0.0, slab_anchor_prob=1.0)
    ends = set()
    for seed in range(12):
        t.set_random_state(seed)
        t(dict(real_ct))
        z = t._box[2]
        assert z.start == first or z.stop - 1 == last, (seed, z, first, last)
        ends.add("first" if z.start == first else "last")
    assert ends == {"first", "last"}
    free = RandFieldOfViewd(["image", "label"], prob=1.0, slab_size=(8, 12), inplane_prob=0.0)
    starts = set()
    for seed in range(12):
        free.set_random_state(seed)
        free(dict(real_ct))
        starts.add(free._box[2].start)
    assert len(starts - {first}) > 3  # interior starts occur without anchoring
    with pytest.raises(ValueError, match="slab_anchor_prob"):
        RandFieldOfViewd(["image"], slab_anchor_prob=1.5)


class _Recorder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x, t=None):
        self.inputs.append(x.detach().clone())
        return self.net(x, t)


def test_inferer_pads_a_thin_volume_to_one_window_before_drawing_noise(real_ct):
    """A 60 mm slab is thinner than the window: the padded voxels must carry noise in their mask
    channels (as in every training patch), not the zeros of sliding_window_inference's padding."""
    torch.manual_seed(0)
    net = _Recorder(DiffSegUNet(1 + 7, 7, (4, 8, 8, 16), time_conditioning=True).eval())
    slab = real_ct["image"][None, :, 16:48, 16:48, 40:52]  # (1, 1, 32, 32, 12): thinner than the window
    inferer = DiffSegInferer(7, roi_size=(32, 32, 32), overlap=0.25, seed=0)
    with torch.no_grad():
        logits = inferer(slab, net)
    assert logits.shape == (1, 7, 32, 32, 12)
    assert all(x.shape[2:] == (32, 32, 32) for x in net.inputs)
    first = net.inputs[0]
    pad_before = (32 - 12) // 2
    padded_rows = torch.cat([first[:, 1:, :, :, :pad_before], first[:, 1:, :, :, pad_before + 12 :]], dim=-1)
    assert float(padded_rows.std()) > 0.5  # noise, not zeros
    assert float(first[:, :1, :, :, :pad_before].abs().max()) == 0.0  # the image is padded with air
    assert torch.equal(first[:, :1, :, :, pad_before : pad_before + 12], slab)
    # the same as padding by hand and cropping the logits back
    padded = torch.nn.functional.pad(slab, (pad_before, 32 - 12 - pad_before))
    with torch.no_grad():
        by_hand = inferer(padded, net.net)[..., pad_before : pad_before + 12]
    assert torch.allclose(logits, by_hand, atol=1e-5)


def test_framing_cases_keep_every_voxel_at_its_physical_position(tmp_path_factory):
    root = tmp_path_factory.mktemp("framings")
    datalist = build_ct_framings(root)
    cases = {c["id"]: c for c in json.loads(Path(datalist).read_text())["test"]}
    assert set(cases) == {"example", "example_fov150", "example_slab60", "example_slab60_fov150", "example_ct_sm"}

    def load(cid, key):
        img = nib.load(str(Path(datalist).parent / cases[cid][key]))
        return np.asarray(img.dataobj), img.affine

    ct, affine = load("example", "image")
    labels, _ = load("example", "label")
    for cid, (lo, hi) in {"example_fov150": (0, ct.shape[2]), "example_slab60": CT_SLAB_SLICES,
                          "example_slab60_fov150": CT_SLAB_SLICES}.items():
        image, aff = load(cid, "image")
        label, laff = load(cid, "label")
        assert np.allclose(aff, laff)
        # world position of the original voxel (0, 0, lo) inside the reframed volume
        world = affine @ np.array([0, 0, lo, 1.0])
        ijk = np.rint(np.linalg.solve(aff, world)[:3]).astype(int)
        window = tuple(slice(i, i + n) for i, n in zip(ijk, (ct.shape[0], ct.shape[1], hi - lo)))
        assert np.array_equal(image[window], ct[:, :, lo:hi]) and np.array_equal(label[window], labels[:, :, lo:hi])
        outside = np.ones(image.shape, dtype=bool)
        outside[window] = False
        if outside.any():
            assert float(image[outside].max()) == float(ct.min()) and int(label[outside].max()) == 0
    fov, _ = load("example_fov150", "image")
    assert all(abs(n / m - 1.5) < 0.02 for n, m in zip(fov.shape, ct.shape))
    assert load("example_slab60", "image")[0].shape[2] * 3.0 == 60.0
    sm, _ = load("example_ct_sm", "image")
    sm_label, _ = load("example_ct_sm", "label")
    assert np.array_equal(sm, ct[:, :, 82:112])
    # TotalSegmentator's own reference for the crop, merged: close to (not identical with) the full scan's
    for c in (1, 2, 3):
        a, b = sm_label == c, labels[:, :, 82:112] == c
        assert 0.9 < 2 * (a & b).sum() / (a.sum() + b.sum()) < 1.0


def test_inferer_replicate_padding_repeats_the_edge_slices(real_ct):
    """``padding_mode="replicate"`` (the bundle's default): the slab's edge slices continue into the padding, so
    the network sees anatomy past the cut instead of a body that ends there; the logits are cropped back."""
    net = _Recorder(DiffSegUNet(1 + 7, 7, (4, 8, 8, 16), time_conditioning=True).eval())
    slab = real_ct["image"][None, :, 16:48, 16:48, 40:52]
    inferer = DiffSegInferer(7, roi_size=(32, 32, 32), overlap=0.25, seed=0, padding_mode="replicate")
    with torch.no_grad():
        logits = inferer(slab, net)
    assert logits.shape == (1, 7, 32, 32, 12)
    first = net.inputs[0][:, :1]
    pad_before = (32 - 12) // 2
    assert torch.equal(first[..., pad_before : pad_before + 12], slab)
    assert torch.equal(first[..., :pad_before], slab[..., :1].expand(-1, -1, -1, -1, pad_before))
    assert torch.equal(first[..., pad_before + 12 :], slab[..., -1:].expand(-1, -1, -1, -1, 32 - 12 - pad_before))
    with pytest.raises(ValueError, match="padding_mode"):
        DiffSegInferer(7, roi_size=(32, 32, 32), padding_mode="reflect")


def test_small_components_are_removed_per_class_and_real_organs_kept(real_ct):
    """RemoveSmallComponentsd on the real merged label map (3 mm grid, affine from the image's meta):
    stray islands of a class (bladder voxels at the top of the scan, a lone liver voxel in the pelvis)
    become background; every organ of the reference is kept, the two kidneys as two parts (only the
    reference's own 1-2 voxel fragments go);
    the threshold is physical (a 2-voxel island is 54 mm^3 at 3 mm); 0 changes nothing."""
    from monai.data import MetaTensor

    from common.transforms.segmentation import RemoveSmallComponentsd

    affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0]))
    label = real_ct["label"].clone()
    bladder, liver = 5, 1
    stray = label.clone()
    stray[0, 60:62, 50, -2] = bladder  # 2 voxels, top slice
    stray[0, 40, 40, 3] = liver  # 1 voxel, bottom of the scan
    assert int((label[0, :, :, -1] == bladder).sum()) == 0 and int(label[0, 40, 40, 3]) != liver
    data = {"pred": MetaTensor(stray.float()), "image": MetaTensor(real_ct["image"], affine=affine)}
    out = RemoveSmallComponentsd("pred", min_size_mm3=100.0, affine_key="image")(data)["pred"]
    assert isinstance(out, MetaTensor)
    expected = stray.clone()
    expected[0, 60:62, 50, -2] = 0
    expected[0, 40, 40, 3] = 0
    assert int((out[0, 60:62, 50, -2] != 0).sum()) == 0 and int(out[0, 40, 40, 3]) == 0
    assert bool(((out == stray.float()) | (out == 0)).all())  # voxels only ever become background
    from scipy import ndimage

    for c in range(1, 7):  # the reference's own 1-2 voxel fragments go, the organs stay
        before, after = int((label == c).sum()), int((out == c).sum())
        assert before - 5 <= after <= before, (c, before, after)
    assert ndimage.label((out[0] == 3).numpy())[1] == 2  # both kidneys
    kept = RemoveSmallComponentsd("pred", min_size_mm3=50.0, affine_key="image")(data)["pred"]
    assert int((kept[0, 60:62, 50, -2] == bladder).sum()) == 2  # 54 mm^3 >= 50 mm^3
    assert int(kept[0, 40, 40, 3]) == 0  # 27 mm^3 < 50 mm^3
    same = RemoveSmallComponentsd("pred", min_size_mm3=0.0)(data)["pred"]
    assert torch.equal(same, data["pred"])
    with pytest.raises(ValueError, match="label map"):
        RemoveSmallComponentsd("pred", min_size_mm3=10.0, pixdim=[3, 3, 3])({"pred": torch.zeros(2, 4, 4, 4)})


def test_min_component_mm3_reaches_the_postprocessing_of_inference_and_evaluate(real_ct):
    """``min_component_mm3`` of the configs is what the post-processing applies, after the argmax and
    before the labels are written back (off by default, as the official code)."""
    import sys

    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    bundle = Path(__file__).resolve().parents[2] / "bundles" / "diffseg"
    if str(bundle) not in sys.path:
        sys.path.insert(0, str(bundle))
    label = real_ct["label"].clone()
    label[0, 60:62, 50, -2] = 5  # a 2-voxel bladder island (54 mm^3 at 3 mm)
    affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0]))
    for files in (["inference.json"], ["inference.json", "evaluate.json"]):
        for value, island in ((0.0, 2), (100.0, 0)):
            parser = ConfigParser()
            parser.read_config([str(bundle / "configs" / f) for f in files])
            parser.update({"bundle_root": str(bundle), "min_component_mm3": value})
            names = [t["_target_"] for t in parser["postprocessing"]["transforms"]]
            at = names.index("common.transforms.segmentation.RemoveSmallComponentsd")
            assert names[at - 1] == "AsDiscreted" and "Invertd" in names[at + 1:]
            step = parser.get_parsed_content(f"postprocessing#transforms#{at}")
            out = step({"pred": MetaTensor(label.float()), "image": MetaTensor(real_ct["image"], affine=affine)})["pred"]
            assert int((out[0, 60:62, 50, -2] == 5).sum()) == island, (files, value)
