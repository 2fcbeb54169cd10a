"""ivan_fusion with the inputs and settings users have: exact inversion when AMP is requested, 2D inputs (2D NIfTI,
one-slice NIfTI, PNG slices as in the Harvard whole-brain atlas), the physical-overlap check, the task recorded in
checkpoints, and a training slice dataset whose memory does not grow with the number of subjects.

Images are real: the SPM avg152 T1/T2 triple of the brain demo (middle axial slices, cropped) and the CT-like image
of the semi-synthetic fusion pair.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "ivan_fusion"
CROP2D = (slice(14, 78), slice(20, 92))  # 64 x 72 in-plane voxels of the 91 x 109 avg152 slices
MID = 45  # middle axial slice of the 91 axial slices


def _forget_scripts():
    while str(BUNDLE) in sys.path:
        sys.path.remove(str(BUNDLE))
    for m in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[m]


def _run(files, wtype="infer", **overrides):
    from monai.bundle import ConfigWorkflow

    sys.path.insert(0, str(BUNDLE))
    try:
        wf = ConfigWorkflow(
            config_file=[str(BUNDLE / "configs" / f) for f in files], meta_file=str(BUNDLE / "configs" / "metadata.json"),
            workflow_type=wtype, bundle_root=str(BUNDLE), **overrides,
        )
        wf.initialize()
        wf.run()
        wf.finalize()
    finally:
        _forget_scripts()


def _parse(files, *ids, **overrides):
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(BUNDLE))
    try:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / f) for f in files])
        parser.update({"bundle_root": str(BUNDLE), **overrides})
        return [parser.get_parsed_content(i) for i in ids]
    finally:
        _forget_scripts()


@pytest.fixture(scope="module")
def avg152(brain_demo):
    d = json.loads(Path(brain_demo).read_text())
    base = Path(brain_demo).parent
    return {k: base / v for k, v in d["test"][0].items() if k != "id"}


@pytest.fixture(scope="module")
def real_slices(avg152):
    """Normalised middle axial slices (64 x 72) of the real T1 and T2."""
    out = {}
    for k in ("t1", "t2"):
        v = np.asarray(nib.load(str(avg152[k])).dataobj, dtype=np.float32)
        out[k] = np.clip(v[CROP2D + (MID,)] / np.percentile(v, 99.5), 0, 1)
    return out


# ------------------------------------------------------------------------------------------------ precision


def test_inverse_exact_under_default_inference_config_with_amp(real_slices):
    """The default inference network (8 blocks, growth 32) with ``amp: true``, run inside a bf16 autocast region (the
    CPU's reduced-precision path; CUDA AMP is fp16/bf16 the same way): the invertible layers stay in float32 and
    ``f^-1(f(x))`` stays within 1e-5 of ``x``. With ``reduced_precision: true`` the same check fails by orders of
    magnitude, so the guard is what keeps the inverse exact."""
    x = torch.from_numpy(np.stack([real_slices["t1"][16:48, 18:54]] * 2))[None]  # [T1, T1]: the 1 -> 1 stack
    errors = {}
    for reduced in (False, True):
        net, amp, evaluator_amp = _parse(["inference.json"], "network", "amp", "evaluator#amp", amp=True,
                                         reduced_precision=reduced, device="$torch.device('cpu')")
        assert amp is True and evaluator_amp is True
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
            rec = net(y, rev=True)
        errors[reduced] = float((rec.float() - x).abs().max())
        if not reduced:
            assert y.dtype == torch.float32 and rec.dtype == torch.float32
    assert errors[False] <= 1e-5, errors
    assert errors[True] > 1e-3, errors


# ------------------------------------------------------------------------------------------------ 2D inputs


@pytest.fixture(scope="module")
def slices2d(avg152, tmp_path_factory):
    """The middle axial slices of the real T1 and T2 as a 2D NIfTI, a one-slice 3D NIfTI and an 8-bit PNG; an
    untrained tiny checkpoint of the 1 -> 1 task."""
    from PIL import Image

    from common.networks.ivan import IVAN

    root = tmp_path_factory.mktemp("ivan_2d")
    files: dict[str, dict[str, str]] = {"nifti2d": {}, "slice3d": {}, "png": {}}
    for k in ("t1", "t2"):
        img = nib.load(str(avg152[k]))
        affine = img.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.array([CROP2D[0].start, CROP2D[1].start, MID])
        sl = np.asarray(img.dataobj, dtype=np.float32)[CROP2D + (MID,)]
        nib.save(nib.Nifti1Image(sl, affine), str(root / f"{k}_2d.nii.gz"))
        nib.save(nib.Nifti1Image(sl[..., None], affine), str(root / f"{k}_slice.nii.gz"))
        # 8-bit, as the atlas distributes them, in the RAS voxel order the network sees for the NIfTI (a PNG has no
        # affine); PIL's (row, column) is MONAI's (y, x): save the transpose
        ras = sl[:: int(np.sign(affine[0, 0])), :: int(np.sign(affine[1, 1]))]
        Image.fromarray(np.round(255 * ras / ras.max()).astype(np.uint8).T).save(root / f"{k}.png")
        files["nifti2d"][k], files["slice3d"][k], files["png"][k] = (
            str(root / f"{k}_2d.nii.gz"), str(root / f"{k}_slice.nii.gz"), str(root / f"{k}.png"))
    ckpt = root / "models"
    ckpt.mkdir()
    torch.save({"model": IVAN(2, num_blocks=2, growth=8, seed=0).state_dict()}, ckpt / "model.pt")
    return {"root": root, "files": files, "ckpt": ckpt, "affine": affine}


@pytest.mark.parametrize("kind", ["nifti2d", "slice3d", "png"])
def test_2d_inputs_run_inference_and_evaluation(slices2d, kind):
    root, files = slices2d["root"], slices2d["files"][kind]
    dl = root / f"{kind}.json"
    dl.write_text(json.dumps({"test": [{"id": kind, **files}]}))
    out = root / f"out_{kind}"
    _run(["inference.json", "task_1to1.json", "tiny.json"], datalist=str(dl), ckpt_dir=str(slices2d["ckpt"]),
         output_dir=str(out), direction="both")
    pred = nib.load(str(out / f"{kind}_1to1.nii.gz"))
    shape = (64, 72, 1) if kind == "slice3d" else (64, 72)  # the input's own shape: a one-slice NIfTI stays one
    assert pred.shape == shape
    p = pred.get_fdata()
    assert np.isfinite(p).all() and p.std() > 0 and 0 <= p.min() and p.max() <= 1
    if kind != "png":  # a NIfTI keeps its geometry; a PNG has none (unit spacing)
        np.testing.assert_allclose(pred.affine, slices2d["affine"], atol=1e-5)
    else:
        np.testing.assert_allclose(pred.affine, np.eye(4), atol=1e-6)
    assert nib.load(str(out / f"{kind}_rev_t1.nii.gz")).shape == shape
    ev = root / f"eval_{kind}"
    _run(["inference.json", "evaluate.json", "task_1to1.json", "tiny.json"], datalist=str(dl),
         ckpt_dir=str(slices2d["ckpt"]), output_dir=str(ev))
    import csv

    rows = list(csv.DictReader(open(ev / "metrics_per_slice.csv")))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["t2_psnr"])) and np.isfinite(float(rows[0]["t2_ssim"]))


def test_2d_outputs_agree_across_formats(slices2d):
    """The 2D NIfTI and the one-slice NIfTI give the same output; the 8-bit PNG (written in RAS order) gives nearly
    the same once put back in the NIfTI's voxel order."""
    root, affine = slices2d["root"], slices2d["affine"]
    outs = {k: nib.load(str(root / f"out_{k}" / f"{k}_1to1.nii.gz")).get_fdata() for k in ("nifti2d", "slice3d", "png")}
    outs["slice3d"] = outs["slice3d"][..., 0]
    outs["png"] = outs["png"][:: int(np.sign(affine[0, 0])), :: int(np.sign(affine[1, 1]))]
    np.testing.assert_allclose(outs["slice3d"], outs["nifti2d"], atol=1e-6)
    assert np.abs(outs["png"] - outs["nifti2d"]).mean() < 0.02


def _refused_1to1(t1: Path, ckpt_dir: Path, tmp_path: Path):
    """Run 1->1 inference on the single input ``t1``; return the user error it must raise."""
    from common.utils.errors import find_user_error

    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"test": [{"id": t1.stem, "t1": str(t1)}]}))
    with pytest.raises(Exception) as err:
        _run(["inference.json", "task_1to1.json", "tiny.json"], datalist=str(dl), ckpt_dir=str(ckpt_dir),
             output_dir=str(tmp_path / "out"))
    return find_user_error(err.value)


def test_colour_png_refused(slices2d, tmp_path):
    from PIL import Image

    from common.utils.errors import InvalidInputError

    grey = np.asarray(Image.open(slices2d["files"]["png"]["t1"]))
    colour = np.stack([grey, grey // 2, 255 - grey], -1).astype(np.uint8)  # a colour-mapped slice, as atlas PET
    Image.fromarray(colour).save(tmp_path / "t1_rgb.png")
    e = _refused_1to1(tmp_path / "t1_rgb.png", slices2d["ckpt"], tmp_path)
    assert isinstance(e, InvalidInputError) and "t1_rgb.png" in str(e) and "colour image (3 channels" in str(e)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_single_slice_across_another_axis_is_named(slices2d, tmp_path):
    """A one-slice volume whose slice is coronal (singleton along y after RAS) is refused, naming slice_axis."""
    from common.utils.errors import InvalidInputError

    sl = np.asarray(nib.load(slices2d["files"]["nifti2d"]["t1"]).dataobj)
    nib.save(nib.Nifti1Image(sl[:, None, :], np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "coronal.nii.gz"))
    e = _refused_1to1(tmp_path / "coronal.nii.gz", slices2d["ckpt"], tmp_path)
    assert isinstance(e, InvalidInputError) and "single slice across axis 1" in str(e) and "'slice_axis' to 1" in str(e)


# ------------------------------------------------------------------------------------------------ overlap


def test_overlap_fraction():
    from common.transforms.ivan import overlap_fraction

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    assert overlap_fraction(aff, (40, 48, 12), aff, (40, 48, 12)) == 1.0
    shifted = aff.copy()
    shifted[0, 3] = 40.0  # half of the 80 mm field of view along x
    assert overlap_fraction(aff, (40, 48, 12), shifted, (40, 48, 12), samples=40) == pytest.approx(0.5, abs=0.03)
    shifted[0, 3] = 200.0
    assert overlap_fraction(aff, (40, 48, 12), shifted, (40, 48, 12)) == 0.0
    # a larger image containing the reference covers all of it; the reference covers only part of the larger one
    assert overlap_fraction(aff, (10, 10, 10), aff, (40, 48, 12)) == 1.0
    assert overlap_fraction(aff, (40, 48, 12), aff, (10, 10, 10)) < 0.1
    # a one-slice reference inside a volume, and an oblique copy rotated about the centre (partial overlap)
    assert overlap_fraction(aff, (40, 48, 1), aff, (40, 48, 12)) == 1.0
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    rot = np.eye(4)
    rot[:2, :2] = [[c, -s], [s, c]]
    centre = aff @ np.array([19.5, 23.5, 5.5, 1.0])
    t = np.eye(4)
    t[:3, 3] = centre[:3]
    oblique = t @ rot @ np.linalg.inv(t) @ aff
    assert 0.5 < overlap_fraction(aff, (40, 48, 12), oblique, (40, 48, 12)) < 0.95


# ------------------------------------------------------------------------------------------------ memory


class _CountingVolumes:
    """A list of volumes that counts how often each is loaded (as a ``monai.data.Dataset`` would preprocess it)."""

    def __init__(self, vols):
        self.vols, self.loads = vols, [0] * len(vols)

    def __len__(self):
        return len(self.vols)

    def __getitem__(self, i):
        self.loads[i] += 1
        return {"image": self.vols[i].clone(), "label": (1 - self.vols[i]).clone()}


def test_slice_dataset_holds_a_bounded_number_of_volumes(real_slices):
    sys.path.insert(0, str(BUNDLE))
    try:
        from scripts.data import SliceDataset, VolumeBlockSampler
    finally:
        _forget_scripts()
    base = torch.from_numpy(real_slices["t1"])
    vols = []
    for i in range(10):  # 10 subjects of 4 slices, one empty slice each
        v = torch.stack([base * (0.5 + 0.05 * i)] * 4, -1)
        v[..., i % 4] = 0
        vols.append(torch.stack([v, v]))
    counting = _CountingVolumes(vols)
    ds = SliceDataset(counting, cache_volumes=3)
    assert len(ds) == 30 and len(ds._cache) <= 3 and counting.loads == [1] * 10
    full = SliceDataset(_CountingVolumes(vols), cache_volumes=None)
    torch.manual_seed(0)
    order = list(VolumeBlockSampler(ds, block=3))
    assert sorted(order) == list(range(30))  # every slice once per epoch
    torch.manual_seed(0)
    assert list(VolumeBlockSampler(ds, block=3)) == order  # seeded: the same order
    before = list(counting.loads)
    for j in order:
        item = ds[j]
        assert len(ds._cache) <= 3
        torch.testing.assert_close(item["image"], full[j]["image"])
    # each volume loaded once more in the epoch: the sampler keeps consecutive slices within the cached block
    assert [a - b for a, b in zip(counting.loads, before)] == [1] * 10
    # a plain shuffle over all slices would reload volumes again and again
    counting.loads = [0] * 10
    for j in torch.randperm(30, generator=torch.Generator().manual_seed(1)).tolist():
        ds[j]
    assert sum(counting.loads) > 15


def test_train_config_does_not_cache_whole_volumes():
    """Default training: no volume cache (cache_rate 0), a bounded slice cache and the block sampler."""
    cache_rate, cache_volumes, val_rate = _parse(
        ["train.json"], "train#volumes#cache_rate", "train#dataset#cache_volumes", "validate#dataset#cache_rate")
    assert cache_rate == 0.0 and val_rate == 0.0 and cache_volumes == 8
    sys.path.insert(0, str(BUNDLE))
    try:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        assert parser["train"]["dataloader"]["sampler"] == "@train#sampler"
        assert parser["train"]["sampler"]["_target_"] == "scripts.data.VolumeBlockSampler"
    finally:
        _forget_scripts()


def test_slice_dataset_keeps_slices_where_any_source_has_signal():
    sys.path.insert(0, str(BUNDLE))
    try:
        from scripts.data import SliceDataset
    finally:
        _forget_scripts()
    a = torch.zeros(1, 4, 4, 3)
    b = torch.zeros(1, 4, 4, 3)
    a[..., 0] = 1.0  # slice 0: signal in a only
    b[..., 1] = 1.0  # slice 1: signal in b only; slice 2 empty in both
    vols = [{"a": a, "b": b}]
    assert [s for _, s in SliceDataset(vols, keys=("a", "b"), skip_empty_key="a").index] == [0]
    assert [s for _, s in SliceDataset(vols, keys=("a", "b"), skip_empty_key=["a", "b"]).index] == [0, 1]


def _fusion_train_dataset(avg152, tmp_path, files):
    """``train#dataset`` of the fusion task on one real training case: the avg152 T2 and its CT-like image."""
    datalist = tmp_path / "datalist.json"
    case = {"t2": str(avg152["t2"]), "ct": str(avg152["ct"])}
    datalist.write_text(json.dumps({"training": [case], "validation": [case]}))
    (ds,) = _parse(files, "train#dataset", datalist=str(datalist), train_crop=[-1, -1, 40], cache_rate=0.0)
    return ds


def test_fusion_training_target_follows_the_augmented_sources(avg152, tmp_path):
    """The demo's fusion training augments each source's intensities per slice (random gamma and blur) and computes the
    reference fusion image of the *augmented* pair, so the network learns the rule, not one pair of contrasts;
    the default ``train.json`` has no augmentation and gives the same item on every access."""
    from common.transforms.ivan import laplacian_maxabs_fusion

    demo = _fusion_train_dataset(avg152, tmp_path, ["train.json", "demo.json", "task_fusion.json"])
    plain = _fusion_train_dataset(avg152, tmp_path, ["train.json", "task_fusion.json"])
    assert len(demo) == len(plain) > 0 and demo.index == plain.index
    changed = 0
    for j in range(0, len(demo), 7):
        p0, p1, d = plain[j], plain[j], demo[j]
        torch.testing.assert_close(p0["image"], p1["image"])  # no randomness by default
        for item in (p0, d):
            x, y = torch.as_tensor(item["image"]), torch.as_tensor(item["label"])
            assert x.shape[0] == y.shape[0] and x.shape[0] % 2 == 0  # [t2, ct] replicated to C channels
            torch.testing.assert_close(x, x[:2].repeat(x.shape[0] // 2, 1, 1))
            ref = laplacian_maxabs_fusion(x[:2, None].double())[0].float()  # the rule on this item's own sources
            for c in range(y.shape[0]):
                torch.testing.assert_close(y[c], ref, atol=1e-5, rtol=0)
        xd, xp = torch.as_tensor(d["image"])[:2], torch.as_tensor(p0["image"])[:2]
        # a gamma keeps each source's range and a blur averages within it: nothing leaves [0, the source's max]
        assert float(xd.min()) >= 0.0
        assert bool((xd.amax(dim=(1, 2)) <= xp.amax(dim=(1, 2)) + 1e-5).all())
        changed += int(not torch.allclose(xd, xp, atol=1e-4))
    assert changed >= 0.5 * len(range(0, len(demo), 7))


def test_train_slice_crop_takes_one_random_window_of_source_and_target(avg152, tmp_path):
    """``train_slice_crop`` (the demo's synthesis training): each training item is one random in-plane window of
    its slice, the same window in the sources and the target, drawn anew on every access; ``null`` (the paper,
    ``train.json``) keeps whole slices."""
    datalist = tmp_path / "datalist.json"
    case = {"t1": str(avg152["t1"]), "t2": str(avg152["t2"])}
    datalist.write_text(json.dumps({"training": [case], "validation": [case]}))
    common = {"datalist": str(datalist), "train_crop": [-1, -1, 40], "cache_rate": 0.0}
    (plain,) = _parse(["train.json", "task_1to1.json"], "train#dataset", **common)
    (crop,) = _parse(["train.json", "task_1to1.json"], "train#dataset", train_slice_crop=[48, 40], **common)
    assert plain.index == crop.index and len(crop) > 10
    j = len(crop) // 2  # a slice through the brain
    whole = plain[j]
    x, y = torch.as_tensor(whole["image"]), torch.as_tensor(whole["label"])
    assert tuple(x.shape[1:]) == (91, 109)
    corners = set()
    for _ in range(6):
        item = crop[j]
        xc, yc = torch.as_tensor(item["image"]), torch.as_tensor(item["label"])
        assert tuple(xc.shape) == (x.shape[0], 48, 40) and tuple(yc.shape) == (y.shape[0], 48, 40)
        # where in the slice this window lies: the unique offset at which the source window matches
        hits = [(a, b) for a in range(91 - 48 + 1) for b in range(109 - 40 + 1)
                if torch.equal(x[:, a : a + 48, b : b + 40], xc)]
        assert len(hits) == 1, hits
        a, b = hits[0]
        torch.testing.assert_close(yc, y[:, a : a + 48, b : b + 40], atol=0, rtol=0)  # the target's same window
        corners.add((a, b))
    assert len(corners) >= 3  # random, not one fixed window
