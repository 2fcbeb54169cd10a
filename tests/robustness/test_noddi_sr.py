"""Bad input and faults for the noddi_sr bundle: inference, evaluation and the three training stages.

Inference inputs are made from dipy's real ``small_101D`` series (6 x 10 x 10 x 102 at 2.5 mm, 13 shells) with its
real bval/bvec files and a brain mask computed from its own b0 (the bundle's rule); evaluation and training inputs
from the bundle's semi-synthetic phantom (NODDI maps from real tissue priors, DWI simulated with the same real
``small_101D`` scheme). The weights are a seeded, untrained tiny model: what matters here is the path the data
take, not the maps. Every refusal must be one user error naming the file or config key and what was expected,
with nothing written (no output, no checkpoint, no temporary file).

Accepted and checked to give the right output: extreme intensities (the DWI is divided by its b0, so a scaled
series gives the same maps), an oblique anisotropic affine (maps on the x2 grid of the input's own geometry) and a
volume smaller than a patch (padded by the sliding window, cropped back).

Not applicable: ``unknown_modality`` (the only image input is the DWI series) and ``labels_outside_set`` (no label
map; the masks are binarised). ``wrong_channels`` is tried as its diffusion analogue, a series missing one of the
shells the model was trained with (and, for evaluation, a reference with one map instead of three).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_quiet_streams, run_bundle, run_bundle_cli
from faults import (CheckpointError, HashMismatchError, InputNotFoundError, InvalidInputError, OutputExistsError,
                    OutputNotWritableError, assert_nothing_written, expect_refused, forget_bundle, kinds_tried,
                    make_bad_nifti, make_held_out_input, make_unwritable_dir, snapshot)

from common.data.dwi import GradientTableError, bin_shells
from common.data.fetch import sha256sum
from common.data.noddi_phantom import PhantomConfig, build_phantom_cohort, hr_affine
from common.transforms.dwi import brain_mask_from_s0

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "noddi_sr"
KINDS = kinds_tried("unknown_modality", "labels_outside_set", "no_overlap", "wrong_task_checkpoint", "dicom_series")

INFER = ["inference.json", "tiny.json"]
EVAL = ["inference.json", "evaluate.json", "tiny.json"]
STAGE1 = ["train_vqgan.json", "tiny.json"]
STAGE2 = ["train_cond_encoder.json", "tiny.json"]
MAPS = ("noddi", "NDI", "ODI", "FWF")


def _parsed(configs, ident, **overrides):
    """``ident`` of the bundle's configs (seeded), e.g. a freshly initialised tiny network."""
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(BUNDLE))
    try:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
        parser["bundle_root"] = str(BUNDLE)
        for k, v in overrides.items():
            parser[k] = v
        torch.manual_seed(0)
        return parser.get_parsed_content(ident)
    finally:
        forget_bundle(BUNDLE)


def _save_like(data: np.ndarray, like: nib.Nifti1Image, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, like.affine, like.header), str(dest))
    return dest


def _write_table(bvals: np.ndarray, bvecs: np.ndarray, folder: Path, name: str = "dwi") -> tuple[Path, Path]:
    """FSL files: one row of b-values, three rows of vector components (bvecs given as (N, 3))."""
    folder.mkdir(parents=True, exist_ok=True)
    bval, bvec = folder / f"{name}.bval", folder / f"{name}.bvec"
    np.savetxt(bval, np.asarray(bvals)[None], fmt="%g")
    np.savetxt(bvec, np.asarray(bvecs).T, fmt="%.8f")
    return bval, bvec


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def real(dwi_demo, tmp_path_factory):
    """The real series, its gradient files, a brain mask of its own b0 and its raw arrays."""
    meta = json.loads(Path(dwi_demo).read_text())
    root = Path(dwi_demo).parent
    dwi, bval, bvec = (root / meta["smoke"][k] for k in ("dwi", "bval", "bvec"))
    img = nib.load(str(dwi))
    bvals = np.loadtxt(bval)
    bvecs = np.loadtxt(bvec).T
    data = np.asarray(img.dataobj)
    s0 = data[..., bvals <= 50].mean(-1)
    work = tmp_path_factory.mktemp("noddi_real")
    mask = _save_like(brain_mask_from_s0(s0).astype(np.uint8), nib.Nifti1Image(s0, img.affine), work / "mask.nii.gz")
    return SimpleNamespace(dwi=dwi, bval=bval, bvec=bvec, mask=mask, img=img, data=data, bvals=bvals, bvecs=bvecs)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """``models/model.pt`` of a seeded tiny model, its sha256, and the state dicts for other checkpoints."""
    model = _parsed(INFER, "network_def")
    ckpt = tmp_path_factory.mktemp("noddi_weights")
    torch.save({"model": model.state_dict()}, ckpt / "model.pt")
    return SimpleNamespace(dir=ckpt, sha=sha256sum(ckpt / "model.pt"), model=model)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A small phantom cohort (2 training, 1 validation, 1 test case; HR 16^3, LR 8^3, real scheme)."""
    root = tmp_path_factory.mktemp("noddi_phantom")
    cfg = PhantomConfig(hr_spacing=10.0, hr_shape=(16, 16, 16), scheme="dipy_small_101D")
    datalist = build_phantom_cohort(root, n_train=2, n_val=1, n_test=1, seed=0, cfg=cfg)
    return Path(datalist)


def _case(dwi, bval, bvec, mask=None) -> dict:
    out = {"dwi": str(dwi), "bval": str(bval), "bvec": str(bvec)}
    if mask is not None:
        out["mask"] = str(mask)
    return out


def _infer(out: Path, ckpt: Path, data: list, **kw) -> None:
    run_bundle(BUNDLE, INFER, ckpt_dir=str(ckpt), output_dir=str(out), data=data, progress=False, **kw)


def _refused(run, roots, *patterns, exc_type):
    return expect_refused(run, *patterns, exc_type=exc_type, roots=roots)


@pytest.fixture(scope="module")
def reference(real, weights, tmp_path_factory):
    """Maps of the unmodified real series; the right ``ckpt_sha256`` is accepted."""
    out = tmp_path_factory.mktemp("noddi_ref")
    forget_bundle(BUNDLE)
    try:
        _infer(out, weights.dir, [_case(real.dwi, real.bval, real.bvec)], ckpt_sha256=weights.sha)
    finally:
        forget_bundle(BUNDLE)
    img = nib.load(str(out / "small_101D_noddi.nii.gz"))
    return SimpleNamespace(maps=img.get_fdata(), affine=img.affine)


# ------------------------------------------------------------------------------------------ inference: the DWI


#: (input, kind): the error and what its message says after the file's name (``dwi.nii.gz`` / ``mask.nii.gz``)
INPUT_FAULTS = {
    ("dwi", "missing_file"): (InputNotFoundError, r"does not exist"),
    ("dwi", "truncated_gzip"): (InvalidInputError, r"truncated gzip"),
    ("dwi", "corrupt_header"): (InvalidInputError, r"corrupt NIfTI header"),
    ("dwi", "two_d"): (InvalidInputError, r"holds a 2D image.*expected a 3D image"),
    ("dwi", "three_d_dwi"): (InvalidInputError, r"3D image.*expected a 4D diffusion-weighted series"),
    ("dwi", "nan"): (InvalidInputError, r"has [1-9]\d* NaN and 0 Inf voxels.*expected finite values"),
    ("dwi", "inf"): (InvalidInputError, r"has 0 NaN and [1-9]\d* Inf voxels.*expected finite values"),
    ("dwi", "all_zero"): (InvalidInputError, r"all-zero.*expected an image with contrast"),
    ("mask", "missing_file"): (InputNotFoundError, r"does not exist"),
    ("mask", "truncated_gzip"): (InvalidInputError, r"truncated gzip"),
    ("mask", "two_d"): (InvalidInputError, r"holds a 2D image"),
    ("mask", "four_d"): (InvalidInputError, r"4D image with 3 volumes.*expected a 3D image"),
    ("mask", "nan"): (InvalidInputError, r"NaN"),
    ("mask", "all_zero"): (InvalidInputError, r"all-zero.*expected a non-empty image"),
    ("mask", "too_small"): (InvalidInputError, r"spatial shape \(4, 4, 4\).*small_101D\.nii\.gz.*\(6, 10, 10\)"),
    ("mask", "oblique_anisotropic"): (InvalidInputError, r"another affine than.*small_101D\.nii\.gz"),
}


def _kinds_of(table: dict, name: str) -> list[str]:
    """The kinds a ``(name, kind)``-keyed table lists for ``name``, sorted."""
    return sorted(kind for key, kind in table if key == name)


def _bad_input_is_refused(name: str, kind: str, real, weights, tmp: Path) -> None:
    """The real case with its ``name`` input (``dwi`` or ``mask``) replaced by a ``kind`` copy (``too_small``: 4 voxels
    a side) is refused as ``INPUT_FAULTS`` says, naming that file; nothing is written."""
    exc, pattern = INPUT_FAULTS[name, kind]
    files = {"dwi": real.dwi, "bval": real.bval, "bvec": real.bvec, "mask": real.mask if name == "mask" else None}
    files[name] = make_bad_nifti(kind, getattr(real, name), tmp / "in" / f"{name}.nii.gz", size=4)
    out = tmp / "out"
    data = [_case(**files)]
    _refused(lambda: _infer(out, weights.dir, data), [out, weights.dir], rf"{name}\.nii\.gz.*{pattern}", exc_type=exc)


@pytest.mark.parametrize("kind", _kinds_of(INPUT_FAULTS, "dwi"))
def test_bad_dwi_is_refused(kind, real, weights, tmp_path):
    _bad_input_is_refused("dwi", kind, real, weights, tmp_path)


@pytest.mark.parametrize("kind", _kinds_of(INPUT_FAULTS, "mask"))
def test_bad_mask_is_refused(kind, real, weights, tmp_path):
    """The optional LR mask: a 3D image on the DWI's grid with some brain in it (a mask of another grid too)."""
    _bad_input_is_refused("mask", kind, real, weights, tmp_path)


# ------------------------------------------------------------------------------------------ gradient tables


def _table_fault(variant: str, real, folder: Path) -> tuple[dict, str, type]:
    """(case, regex, error class) for one way a bval/bvec pair fails to describe its DWI series."""
    b, g = real.bvals, real.bvecs
    if variant == "fewer_bvals":
        bval, bvec = _write_table(b[:-1], g[:-1], folder)
        return _case(real.dwi, bval, bvec), r"small_101D\.nii\.gz' has 102 volumes but bval file '.*dwi\.bval' lists 101", GradientTableError
    if variant == "bvec_count":
        bval, bvec = _write_table(b, g[:-2], folder)
        return _case(real.dwi, bval, bvec), r"dwi\.bval' lists 102 b-values but bvec file '.*dwi\.bvec' lists 100 vectors", GradientTableError
    if variant == "malformed_bval":
        bval, bvec = _write_table(b, g, folder)
        bval.write_text("b=0 b=1000 b=2000\n")
        return _case(real.dwi, bval, bvec), r"cannot read bval file '.*dwi\.bval'", GradientTableError
    if variant == "bvec_two_rows":
        bval, bvec = _write_table(b, g, folder)
        np.savetxt(bvec, g.T[:2], fmt="%.8f")
        return _case(real.dwi, bval, bvec), r"bvec file '.*dwi\.bvec' must hold 3 rows", GradientTableError
    if variant == "bvec_not_unit":
        bval, bvec = _write_table(b, g * b[:, None], folder)  # b-scaled vectors
        return _case(real.dwi, bval, bvec), r"bvec file '.*dwi\.bvec' has vectors that are not unit length", GradientTableError
    if variant == "missing_bvec":
        bval, bvec = _write_table(b, g, folder)
        bvec.unlink()
        return _case(real.dwi, bval, bvec), r"bvec file '.*dwi\.bvec'.*does not exist", InputNotFoundError
    if variant == "missing_b0":
        keep = b > 50
        dwi = _save_like(real.data[..., keep], real.img, folder / "dwi.nii.gz")
        bval, bvec = _write_table(b[keep], g[keep], folder)
        return _case(dwi, bval, bvec), r"bval file '.*dwi\.bval' has no b0 volume.*expected at least one b0", GradientTableError
    raise KeyError(variant)


TABLE_VARIANTS = ["fewer_bvals", "bvec_count", "malformed_bval", "bvec_two_rows", "bvec_not_unit", "missing_bvec", "missing_b0"]


@pytest.mark.parametrize("variant", TABLE_VARIANTS)
def test_gradient_table_mismatch_is_refused(variant, real, weights, tmp_path):
    """bval_bvec_mismatch: counts that disagree with the DWI or with each other, malformed files, no b0."""
    case, pattern, exc = _table_fault(variant, real, tmp_path / "in")
    out = tmp_path / "out"
    _refused(lambda: _infer(out, weights.dir, [case]), [out, weights.dir], pattern, exc_type=exc)


def test_missing_shell_is_refused(real, weights, tmp_path):
    """wrong_channels for DWI: the model's shells are its input channels; a series without b=1500 cannot feed it."""
    shells = bin_shells(real.bvals)
    keep = shells != 1500
    folder = tmp_path / "in"
    dwi = _save_like(real.data[..., keep], real.img, folder / "dwi.nii.gz")
    bval, bvec = _write_table(real.bvals[keep], real.bvecs[keep], folder)
    out = tmp_path / "out"
    _refused(
        lambda: _infer(out, weights.dir, [_case(dwi, bval, bvec)]),
        [out, weights.dir],
        r"bval file '.*dwi\.bval'.*expected shell b=1500 s/mm.*is missing",
        exc_type=GradientTableError,
    )


# ------------------------------------------------------------------------------------------ inputs that must work


@pytest.mark.parametrize("scale", [1e-4, 1e7])
def test_extreme_intensity_gives_the_same_maps(scale, real, weights, reference, tmp_path):
    """The signal is divided by its b0: the same series in other units gives the same maps."""
    dwi = make_bad_nifti("extreme_intensity", real.dwi, tmp_path / "in" / "dwi.nii.gz", scale=scale)
    out = tmp_path / "out"
    _infer(out, weights.dir, [_case(dwi, real.bval, real.bvec)])
    img = nib.load(str(out / "dwi_noddi.nii.gz"))
    np.testing.assert_allclose(img.affine, reference.affine, atol=1e-6)
    np.testing.assert_allclose(img.get_fdata(), reference.maps, atol=1e-4)
    assert reference.maps.max() > 0


def test_oblique_anisotropic_is_kept(real, weights, reference, tmp_path):
    """Nothing is resampled: the maps lie on the x2 grid of the input's own oblique, anisotropic geometry."""
    dwi = make_bad_nifti("oblique_anisotropic", real.dwi, tmp_path / "in" / "dwi.nii.gz")
    lr = nib.load(str(dwi))
    assert abs(lr.affine[0, 1]) > 0.1  # oblique indeed
    out = tmp_path / "out"
    _infer(out, weights.dir, [_case(dwi, real.bval, real.bvec)])
    for m in MAPS:
        img = nib.load(str(out / f"dwi_{m}.nii.gz"))
        assert img.shape[:3] == tuple(2 * s for s in lr.shape[:3])
        np.testing.assert_allclose(img.affine, hr_affine(lr.affine, 2), atol=1e-4)
    np.testing.assert_allclose(nib.load(str(out / "dwi_noddi.nii.gz")).get_fdata(), reference.maps, atol=1e-4)


def test_too_small_volume_is_padded_and_cropped_back(real, weights, tmp_path):
    """4 x 4 x 3 LR voxels, smaller than the 8^3 patch: padded by the sliding window, maps of 8 x 8 x 6."""
    dwi = make_bad_nifti("too_small", real.dwi, tmp_path / "in" / "dwi.nii.gz", size=(4, 4, 3))
    lr = nib.load(str(dwi))
    assert lr.shape == (4, 4, 3, 102)
    out = tmp_path / "out"
    _infer(out, weights.dir, [_case(dwi, real.bval, real.bvec)])
    img = nib.load(str(out / "dwi_noddi.nii.gz"))
    assert img.shape == (8, 8, 6, 3)
    np.testing.assert_allclose(img.affine, hr_affine(lr.affine, 2), atol=1e-4)
    maps = img.get_fdata()
    assert np.all(np.isfinite(maps)) and maps.min() >= 0 and maps.max() <= 1


# ------------------------------------------------------------------------------------------ checkpoints


def _foreign_state() -> dict:
    """What a segmentation bundle saves: {'network': a UNet's state dict}."""
    from monai.networks.nets import BasicUNet

    return {"network": BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).state_dict()}


#: the checkpoint a run reads: its file in ``ckpt_dir``, its entry, the configs and definition of its network, the
#: digest override and a wrong digest
_CKPT_SLOTS = {
    "inference": ("model.pt", "model", INFER, "network_def", "ckpt_sha256", "0" * 64),
    "stage2": ("vqgan.pt", "vqgan", STAGE2, "vqgan_def", "vqgan_sha256", "f" * 64),
}


def _write_ckpt(kind: str, weights, folder: Path, slot: str = "inference") -> tuple[Path, dict]:
    """A checkpoint of ``kind`` where the ``slot`` run (``_CKPT_SLOTS``) reads it in ``folder``, and the overrides that
    use it."""
    name, entry, configs, definition, sha_key, wrong_sha = _CKPT_SLOTS[slot]
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "foreign_checkpoint":
        torch.save(_foreign_state(), folder / name)
    elif kind == "mismatched_checkpoint":  # another configuration: 16 VQ-GAN channels instead of 8
        torch.save({entry: _parsed(configs, definition, vqgan_channels=16).state_dict()}, folder / name)
    elif kind == "hash_mismatch":
        if slot == "inference":
            shutil.copy(weights.dir / name, folder / name)
        else:
            torch.save({entry: weights.model.vqgan.state_dict()}, folder / name)
        return folder, {sha_key: wrong_sha}
    elif kind != "missing_file":
        raise KeyError(kind)
    return folder, {}


#: (slot, kind): the error and its message
CKPT_FAULTS = {
    ("inference", "foreign_checkpoint"): (CheckpointError, r"model\.pt' does not fit NODDISRModel.*unexpected keys \(e\.g\. \['network'\]\).*another bundle"),
    ("inference", "mismatched_checkpoint"): (CheckpointError, r"model\.pt' does not fit NODDISRModel: \d+ shape mismatches.*another configuration"),
    ("inference", "hash_mismatch"): (HashMismatchError, r"model\.pt' has sha256 [0-9a-f]{64}, expected 0{64}"),
    ("inference", "missing_file"): (InputNotFoundError, r"vqgan\.pt' does not exist \(config key 'ckpt_dir'\).*model\.pt"),
    ("stage2", "missing_file"): (InputNotFoundError, r"checkpoint '.*vqgan\.pt' does not exist: train the earlier stage first"),
    ("stage2", "foreign_checkpoint"): (CheckpointError, r"vqgan\.pt' \(entry 'vqgan'\) does not fit VQGAN.*unexpected keys \(e\.g\. \['network'\]\)"),
    ("stage2", "mismatched_checkpoint"): (CheckpointError, r"vqgan\.pt' \(entry 'vqgan'\) does not fit VQGAN: \d+ shape mismatches"),
    ("stage2", "hash_mismatch"): (HashMismatchError, r"vqgan\.pt' has sha256 [0-9a-f]{64}, expected f{64}"),
}


def _bad_checkpoint_is_refused(slot: str, kind: str, weights, tmp: Path, out: Path, run) -> None:
    """``run(ckpt_dir, **overrides)`` with a ``kind`` checkpoint in the ``slot`` is refused as ``CKPT_FAULTS`` says;
    nothing is written in ``ckpt_dir`` nor ``out``."""
    exc, pattern = CKPT_FAULTS[slot, kind]
    ckpt, extra = _write_ckpt(kind, weights, tmp / "models", slot)
    _refused(lambda: run(ckpt, **extra), [out, ckpt], pattern, exc_type=exc)


@pytest.mark.parametrize("kind", _kinds_of(CKPT_FAULTS, "inference"))
def test_bad_inference_checkpoint_is_refused(kind, real, weights, tmp_path):
    out, data = tmp_path / "out", [_case(real.dwi, real.bval, real.bvec)]
    _bad_checkpoint_is_refused("inference", kind, weights, tmp_path, out, lambda ckpt, **kw: _infer(out, ckpt, data, **kw))


@pytest.mark.parametrize("kind", _kinds_of(CKPT_FAULTS, "stage2"))
def test_stage2_refuses_bad_vqgan_checkpoint(kind, phantom, weights, tmp_path):
    """Stage 2 starts from the VQ-GAN of stage 1 (``vqgan_ckpt``, ``vqgan_sha256``)."""
    out = tmp_path / "runs"
    _bad_checkpoint_is_refused("stage2", kind, weights, tmp_path, out, lambda ckpt, **kw: _train(STAGE2, phantom, ckpt, out, **kw))


# ------------------------------------------------------------------------------------------ outputs


def test_unwritable_output_dir_is_refused(real, weights, tmp_path):
    out = make_unwritable_dir(tmp_path / "out")
    data = [_case(real.dwi, real.bval, real.bvec)]
    _refused(lambda: _infer(out, weights.dir, data), [tmp_path], r"output folder \(config key 'output_dir'\) '.*out' cannot be written",
             exc_type=OutputNotWritableError)


def test_existing_output_is_kept_unless_overwrite(real, weights, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "small_101D_ODI.nii.gz"
    old.write_bytes(b"an earlier result")
    data = [_case(real.dwi, real.bval, real.bvec)]
    _refused(lambda: _infer(out, weights.dir, data), [out], r"output '.*small_101D_ODI\.nii\.gz' already exists.*set 'overwrite' to true",
             exc_type=OutputExistsError)
    assert old.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in out.iterdir()) == ["small_101D_ODI.nii.gz"]  # nothing else written either
    _infer(out, weights.dir, data, overwrite=True)
    assert nib.load(str(old)).shape[:3] == (12, 20, 20)


def test_nrrd_series_is_refused_with_the_conversion_hint(real, weights, tmp_path):
    """The series as NRRD: the bundle reads FSL-style NIfTI + bval/bvec only (an NRRD DWI keeps its gradients in its
    own header); one error naming the file and saying what is expected, nothing written."""
    dwi = make_held_out_input("nrrd", real.dwi, tmp_path / "in" / "dwi.nii.gz")
    _refused(lambda: _infer(tmp_path / "out", weights.dir, [_case(dwi, real.bval, real.bvec)]), [tmp_path, weights.dir],
             r"dwi\.nrrd", r"key 'dwi'", r"expected a 4D NIfTI series with FSL bval/bvec files", exc_type=InvalidInputError)


def test_clinical_7mm_series_keeps_its_grid(real, weights, tmp_path):
    """7 mm slices: maps on the x2 grid of the series' own geometry."""
    dwi = make_held_out_input("clinical_7mm", real.dwi, tmp_path / "in" / "dwi.nii.gz")
    lr = nib.load(str(dwi))
    assert abs(np.linalg.norm(lr.affine[:3, 2]) - 7.0) < 1e-3 and lr.shape[3] == real.data.shape[3]
    out = tmp_path / "out"
    _infer(out, weights.dir, [_case(dwi, real.bval, real.bvec)])
    img = nib.load(str(out / "dwi_noddi.nii.gz"))
    assert img.shape == (*(2 * s for s in lr.shape[:3]), 3)
    np.testing.assert_allclose(img.affine, hr_affine(lr.affine, 2), atol=1e-4)
    maps = img.get_fdata()
    assert np.all(np.isfinite(maps)) and maps.min() >= 0 and maps.max() <= 1


def test_single_slice_series_is_refused(real, weights, tmp_path):
    """One slice of a DWI series: refused by name, nothing written."""
    dwi = make_held_out_input("single_slice", real.dwi, tmp_path / "in" / "dwi.nii.gz")
    out = tmp_path / "out"
    _refused(lambda: _infer(out, weights.dir, [_case(dwi, real.bval, real.bvec)]), [tmp_path, weights.dir],
             r"dwi\.nii\.gz", r"single slice", exc_type=InvalidInputError)


def test_multi_case_run_refuses_a_bad_last_case_before_the_first_output(real, weights, tmp_path):
    """Two good series and a 3D volume last: every case is checked before the first map is written."""
    (tmp_path / "in").mkdir()
    goods = [shutil.copy(real.dwi, tmp_path / "in" / f"good{i}_dwi.nii.gz") for i in range(2)]
    bad = make_bad_nifti("three_d_dwi", real.dwi, tmp_path / "in" / "last_dwi.nii.gz")
    cases = [_case(g, real.bval, real.bvec) for g in goods] + [_case(bad, real.bval, real.bvec)]
    _refused(lambda: _infer(tmp_path / "out", weights.dir, cases), [tmp_path, weights.dir],
             r"last_dwi\.nii\.gz.*3D image.*expected a 4D diffusion-weighted series", r"case 'last_dwi' \(#2\)",
             exc_type=InvalidInputError)


def test_two_cases_writing_the_same_file_are_refused(real, weights, tmp_path):
    out = tmp_path / "out"
    case = _case(real.dwi, real.bval, real.bvec)
    _refused(lambda: _infer(out, weights.dir, [case, dict(case)]), [out], r"would both write '.*small_101D_noddi\.nii\.gz'",
             exc_type=InvalidInputError)


def test_cli_prints_one_error_and_exits_nonzero(real, weights, tmp_path):
    """A 3D series given as the DWI, through ``python -m monai.bundle run`` with a datalist."""
    data_dir = tmp_path / "data"
    make_bad_nifti("three_d_dwi", real.dwi, data_dir / "sub01_dwi.nii.gz")
    shutil.copy(real.bval, data_dir / "sub01_dwi.bval")
    shutil.copy(real.bvec, data_dir / "sub01_dwi.bvec")
    entry = {"dwi": "sub01_dwi.nii.gz", "bval": "sub01_dwi.bval", "bvec": "sub01_dwi.bvec"}
    (data_dir / "datalist.json").write_text(json.dumps({"testing": [entry]}))
    out = tmp_path / "out"
    before = snapshot(out, weights.dir, data_dir)
    proc = run_bundle_cli("noddi_sr", INFER, dataset_dir=str(data_dir), ckpt_dir=str(weights.dir), output_dir=str(out))
    assert proc.returncode != 0
    tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
    assert "ERROR: InvalidInputError:" in tail and "sub01_dwi.nii.gz" in tail and "expected a 4D diffusion-weighted series" in tail, tail
    assert_quiet_streams(proc.stdout, proc.stderr, "InvalidInputError:")  # nothing else on either stream
    assert_nothing_written(before, out, weights.dir, data_dir)
    assert not out.exists()  # the output folder this refused run created is gone


# ------------------------------------------------------------------------------------------ evaluation


def _test_case(phantom: Path) -> dict:
    entry = json.loads(phantom.read_text())["test"][0]
    return {k: (str(phantom.parent / v) if k != "id" else v) for k, v in entry.items()}


def _evaluate(out: Path, ckpt: Path, data: list, **kw) -> None:
    run_bundle(BUNDLE, EVAL, ckpt_dir=str(ckpt), output_dir=str(out), data=data, progress=False, **kw)


def test_evaluate_refuses_existing_metrics(phantom, weights, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.csv").write_text("case,method\n")
    _refused(lambda: _evaluate(out, weights.dir, [_test_case(phantom)]), [out],
             r"output '.*metrics\.csv' already exists.*set 'overwrite' to true", exc_type=OutputExistsError)
    assert (out / "metrics.csv").read_text() == "case,method\n"


def test_evaluate_refuses_missing_reference(phantom, weights, tmp_path):
    case = _test_case(phantom)
    case["noddi"] = str(tmp_path / "nowhere" / "noddi_hr.nii.gz")
    out = tmp_path / "eval"
    _refused(lambda: _evaluate(out, weights.dir, [case]), [out], r"noddi_hr\.nii\.gz' \(key 'noddi'\) does not exist",
             exc_type=InputNotFoundError)


def test_evaluate_refuses_reference_without_three_maps(phantom, weights, tmp_path):
    """wrong_channels for the reference: one map (NDI) where NDI, ODI and FWF are expected."""
    case = _test_case(phantom)
    ref = nib.load(case["noddi"])
    case["noddi"] = str(_save_like(np.asarray(ref.dataobj)[..., 0], ref, tmp_path / "in" / "ndi_only.nii.gz"))
    out = tmp_path / "eval"
    _refused(lambda: _evaluate(out, weights.dir, [case]), [out, weights.dir], r"ndi_only\.nii\.gz' \(key 'noddi'\) has 1 channels.*expected 3",
             exc_type=InvalidInputError)


def test_evaluate_refuses_reference_on_the_lr_grid(phantom, weights, tmp_path):
    case = _test_case(phantom)
    case["mask_hr"] = case["mask"]  # the LR mask where the HR one is expected
    out = tmp_path / "eval"
    _refused(lambda: _evaluate(out, weights.dir, [case]), [out, weights.dir],
             r"mask_lr\.nii\.gz' \(key 'mask_hr'\) has spatial shape \(8, 8, 8\).*expected \(16, 16, 16\)", exc_type=InvalidInputError)


# ------------------------------------------------------------------------------------------ training


def _train(configs, phantom: Path, ckpt: Path, out: Path, **kw) -> None:
    run_bundle(BUNDLE, configs, dataset_dir=str(phantom.parent), ckpt_dir=str(ckpt), output_dir=str(out), **kw)


def test_stage2_refuses_mismatched_training_table(phantom, weights, tmp_path):
    """A training case whose gradient files list fewer directions than its DWI has volumes (checked before training)."""
    data_dir = tmp_path / "data"
    shutil.copytree(phantom.parent, data_dir)
    entry = json.loads((data_dir / "datalist.json").read_text())["training"][1]
    bval, bvec = data_dir / entry["bval"], data_dir / entry["bvec"]
    _write_table(np.loadtxt(bval)[:-3], np.loadtxt(bvec).T[:-3], bval.parent, name="dwi_lr")
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    torch.save({"vqgan": weights.model.vqgan.state_dict()}, ckpt / "vqgan.pt")
    out = tmp_path / "runs"
    _refused(lambda: _train(STAGE2, data_dir / "datalist.json", ckpt, out), [ckpt, out],
             r"DWI series '.*phantom_001/dwi_lr\.nii\.gz' has 102 volumes but bval file '.*phantom_001/dwi_lr\.bval' lists 99",
             exc_type=GradientTableError)


def test_stage1_refuses_nan_in_training_maps(phantom, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(phantom.parent, data_dir)
    entry = json.loads((data_dir / "datalist.json").read_text())["training"][0]
    noddi = data_dir / entry["noddi"]
    make_bad_nifti("nan", noddi, noddi)
    ckpt, out = tmp_path / "models", tmp_path / "runs"
    _refused(lambda: _train(STAGE1, data_dir / "datalist.json", ckpt, out), [ckpt, out],
             r"phantom_000/noddi_hr\.nii\.gz' \(key 'noddi'\) has [1-9]\d* NaN", exc_type=InvalidInputError)


def test_stage1_refuses_wrong_resume_hash(phantom, weights, tmp_path):
    """``resume_ckpt_sha256`` is checked before the resumed checkpoint is read (SafeCheckpointLoader)."""
    ckpt, out = tmp_path / "models", tmp_path / "runs"
    resume = tmp_path / "saved" / "checkpoint_vqgan.pt"
    resume.parent.mkdir()
    torch.save({"vqgan": weights.model.vqgan.state_dict()}, resume)
    _refused(
        lambda: _train(STAGE1, phantom, ckpt, out, resume=True, resume_ckpt=str(resume), resume_ckpt_sha256="a" * 64),
        [ckpt, resume.parent, out],
        r"checkpoint_vqgan\.pt' has sha256 [0-9a-f]{64}, expected a{64}",
        exc_type=HashMismatchError,
    )


def test_stage1_refuses_unwritable_ckpt_dir(phantom, tmp_path):
    ckpt = make_unwritable_dir(tmp_path / "models")
    out = tmp_path / "runs"
    _refused(lambda: _train(STAGE1, phantom, ckpt, out), [tmp_path], r"checkpoint folder \(config key 'ckpt_dir'\) '.*models' cannot be written",
             exc_type=OutputNotWritableError)


def test_stage2_keeps_an_earlier_run_unless_resume_or_overwrite(phantom, weights, tmp_path):
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    torch.save({"vqgan": weights.model.vqgan.state_dict()}, ckpt / "vqgan.pt")
    (ckpt / "checkpoint_encoder.pt").write_bytes(b"an earlier run")
    out = tmp_path / "runs"
    _refused(lambda: _train(STAGE2, phantom, ckpt, out), [ckpt, out],
             r"checkpoint\(s\) of an earlier run: '.*checkpoint_encoder\.pt' already exists.*'overwrite'.*'resume'",
             exc_type=OutputExistsError)
