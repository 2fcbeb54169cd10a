"""Bad input and faults for the maisi_ct bundle: inference (user label mask), evaluation (VAE reconstruction of
real CT, checks of generated volumes) and the three training stages (CT + labels).

Every bad input is made from a real image: the MAISI label mask of the shipped demo mask database (built from the
TotalSegmentator example CT) and the CT demo cohort (that scan and its deformed copies). Each refusal must be one
user error naming the file or config key and what was expected, with nothing written (no output, no checkpoint,
no latent, no temporary file). An oblique, anisotropic mask must work with the outputs on the mask's grid; a mask
smaller than the requested volume is padded (outside the body); CT values beyond ``max_abs_hu`` (a wrong HU
scaling) are refused.

Not applicable to this bundle: ``three_d_dwi`` and ``bval_bvec_mismatch`` (no diffusion-weighted input).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_quiet_streams, run_bundle, run_bundle_cli
from faults import (GUARD_ERRORS, CheckpointError, HashMismatchError, InputNotFoundError, InvalidInputError,
                    OutputExistsError, OutputNotWritableError, assert_nothing_written, expect_refused, kinds_tried,
                    make_bad_labels, make_bad_nifti, make_held_out_input, make_unwritable_dir, snapshot, write_datalist)

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "maisi_ct"
KINDS = kinds_tried("three_d_dwi", "bval_bvec_mismatch", "no_overlap", "wrong_task_checkpoint")

TINY = "tiny.json"
GRID = 64  # tiny output_size per axis
LOG = [r"events\.out\.tfevents"]  # TensorBoard logs of a training run are logs, not outputs


@pytest.fixture(scope="module")
def data(ct_demo, tmp_path_factory):
    """Good inputs (a real MAISI mask cropped to the tiny grid, the real CT cohort), tiny random-weight checkpoints
    in the official layouts and checkpoints that do not fit, shared read-only."""
    from common.networks.maisi import maisi_autoencoder, maisi_controlnet, maisi_diffusion_unet

    root = tmp_path_factory.mktemp("maisi_robust_data")
    db = json.loads((BUNDLE / "datasets" / "demo_mask_db" / "mask_db.json").read_text())
    full = nib.load(str(BUNDLE / "datasets" / "demo_mask_db" / db[0]["pseudo_label_filename"]))
    # a 64^3 box of the real 3 mm mask around the liver: body, organs and air
    lab = np.asarray(full.dataobj)
    centre = [int(np.mean(ix)) for ix in np.nonzero(lab == 1)]
    lo = [min(max(c - GRID // 2, 0), s - GRID) for c, s in zip(centre, lab.shape)]
    mask = root / "mask.nii.gz"
    nib.save(full.slicer[lo[0]:lo[0] + GRID, lo[1]:lo[1] + GRID, lo[2]:lo[2] + GRID], str(mask))

    ct = json.loads(Path(ct_demo).read_text())
    base = Path(ct_demo).parent
    test_ct = str(base / ct["test"][0]["image"])
    train = [{"id": it["id"], "image": str(base / it["image"]), "label": str(base / it["label"])} for it in ct["training"]]
    # a 48^3 crop of the real CT for the runs that must work (short)
    small_ct = root / "ct_small.nii.gz"
    img = nib.load(test_ct)
    c = [s // 2 for s in img.shape]
    nib.save(img.slicer[c[0] - 24:c[0] + 24, c[1] - 24:c[1] + 24, c[2] - 24:c[2] + 24], str(small_ct))

    ckpt = root / "models"
    ckpt.mkdir()
    torch.manual_seed(0)
    torch.save(maisi_autoencoder(tiny=True, device="cpu").state_dict(), ckpt / "autoencoder_v1.pt")
    unet = maisi_diffusion_unet(tiny=True, device="cpu")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.25), "num_train_timesteps": 1000},
               ckpt / "diff_unet_3d_rflow-ct.pt")
    torch.save({"controlnet_state_dict": maisi_controlnet(tiny=True, device="cpu").state_dict()},
               ckpt / "controlnet_3d_rflow-ct.pt")
    other = root / "other_models"
    other.mkdir()
    # another bundle's checkpoint (diffseg's layout: the UNet under "model") and this bundle's VAE of another
    # configuration (16 channels per level instead of the tiny 8)
    from common.networks.diffseg_unet import DiffSegUNet

    seg = DiffSegUNet(in_channels=1, out_channels=7, channels=[8, 8, 8, 8], time_conditioning=False)
    torch.save({"model": seg.state_dict()}, other / "diffseg.pt")
    torch.save(maisi_autoencoder(tiny=True, device="cpu", num_channels=[16, 16, 16]).state_dict(), other / "vae_c16.pt")
    return {"root": root, "mask": str(mask), "test_ct": test_ct, "small_ct": str(small_ct), "train": train,
            "labels": ct["labels"], "ckpt_dir": ckpt, "other": other}


def _check_refused(data, tmp: Path, run, exc_type, *patterns, allow=()) -> BaseException:
    """``run()`` fails with one user error matching ``patterns``; nothing is written anywhere."""
    return expect_refused(run, *patterns, exc_type=exc_type, roots=(tmp, data["root"]), allow=allow)


def _infer(data, out: Path, **overrides) -> None:
    overrides.setdefault("ckpt_dir", str(data["ckpt_dir"]))
    overrides.setdefault("label_path", data["mask"])
    run_bundle(BUNDLE, ["inference.json", TINY], output_dir=str(out), quality_check=False, num_output_samples=1,
               **overrides)


def _evaluate(data, datalist: str, out: Path, **overrides) -> None:
    overrides.setdefault("ckpt_dir", str(data["ckpt_dir"]))
    run_bundle(BUNDLE, ["evaluate.json", TINY], datalist=datalist, output_dir=str(out), **overrides)


def _train(data, stage: str, datalist: str, tmp: Path, **overrides) -> None:
    overrides.setdefault("ckpt_dir", str(data["ckpt_dir"]))
    if stage != "autoencoder":
        overrides.setdefault("latent_dir", str(tmp / "latents"))
    run_bundle(BUNDLE, [f"train_{stage}.json", TINY], datalist=datalist, output_dir=str(tmp / "runs"), **overrides)


# ------------------------------------------------------------------------------------------ bad files


FILE_KINDS = GUARD_ERRORS  # the shared guards' messages


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_inference_refuses_bad_user_mask(data, tmp_path, kind):
    """A broken label mask (label_path) is refused by name before any network runs or any output is written."""
    exc, pattern = FILE_KINDS[kind]
    bad = make_bad_nifti(kind, data["mask"], tmp_path / "inputs" / f"{kind}_mask.nii.gz")
    run = lambda: _infer(data, tmp_path / "out", label_path=str(bad))  # noqa: E731
    names = [r"'label_path'"] if kind == "missing_file" else [r"\(key 'label'\)"]
    _check_refused(data, tmp_path, run, exc, re.escape(bad.name), pattern, *names)


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_evaluate_refuses_bad_ct(data, tmp_path, kind):
    exc, pattern = FILE_KINDS[kind]
    bad = make_bad_nifti(kind, data["small_ct"], tmp_path / "inputs" / f"{kind}_ct.nii.gz")
    dl = write_datalist(tmp_path, test={"image": str(bad)})
    _check_refused(data, tmp_path, lambda: _evaluate(data, dl, tmp_path / "out"), exc, re.escape(bad.name), pattern,
                   r"'image'")


@pytest.mark.parametrize("kind", ["missing_file", "four_d", "nan"])
def test_autoencoder_training_refuses_bad_ct(data, tmp_path, kind):
    """A broken training CT stops the VAE stage before any checkpoint is written."""
    exc, pattern = FILE_KINDS[kind]
    bad = make_bad_nifti(kind, data["train"][0]["image"], tmp_path / "inputs" / f"{kind}_ct.nii.gz")
    dl = write_datalist(tmp_path, train={"image": str(bad)}, val={"image": data["small_ct"]})
    _check_refused(data, tmp_path, lambda: _train(data, "autoencoder", dl, tmp_path), exc, re.escape(bad.name), pattern,
                   allow=LOG)


def test_training_refuses_missing_datalist(data, tmp_path):
    missing = tmp_path / "no_datalist.json"
    run = lambda: _train(data, "diffusion", str(missing), tmp_path)  # noqa: E731
    _check_refused(data, tmp_path, run, InputNotFoundError, re.escape(missing.name), r"config key 'datalist'",
                   "does not exist")


@pytest.mark.parametrize("fault", ["missing_label", "shape_mismatch"])
def test_evaluate_refuses_bad_generated_samples(data, tmp_path, fault):
    """generated_dir is checked before the reconstruction runs: a sample without its label, or with a label on
    another grid, is refused before any table is written."""
    gen = tmp_path / "generated"
    gen.mkdir()
    shutil.copy(data["mask"], gen / "sample_1_label.nii.gz")
    image = gen / "sample_1_image.nii.gz"
    make_bad_nifti("too_small" if fault == "shape_mismatch" else "all_zero", data["mask"], image)
    if fault == "missing_label":
        (gen / "sample_1_label.nii.gz").unlink()
        patterns = [r"sample_1_label\.nii\.gz", "does not exist", r"config key 'generated_dir'"]
        exc = InputNotFoundError
    else:
        patterns = [r"sample_1_image\.nii\.gz", r"shape \(8, 8, 8\)", r"\(64, 64, 64\)", "expected the same grid"]
        exc = InvalidInputError
    dl = write_datalist(tmp_path, test={"image": data["small_ct"]})
    run = lambda: _evaluate(data, dl, tmp_path / "out", generated_dir=str(gen))  # noqa: E731
    _check_refused(data, tmp_path, run, exc, *patterns)


# ------------------------------------------------------------------------------------------ labels, modality


def test_inference_refuses_labels_outside_maisi_set(data, tmp_path):
    """133 is not a MAISI id (1..132, body 200)."""
    bad = make_bad_labels(data["mask"], tmp_path / "inputs" / "mask_133.nii.gz", value=133)
    run = lambda: _infer(data, tmp_path / "out", label_path=str(bad))  # noqa: E731
    _check_refused(data, tmp_path, run, InvalidInputError, re.escape(bad.name), r"outside the class set",
                   r"\{0, \.\.\., 132, 200\}", r"133 \(5 voxels\)")


def test_inference_refuses_extreme_mask_values(data, tmp_path):
    """A mask with its values scaled (x 1e7) is no label map: refused as values outside the MAISI label set."""
    bad = make_bad_nifti("extreme_intensity", data["mask"], tmp_path / "inputs" / "mask_scaled.nii.gz")
    run = lambda: _infer(data, tmp_path / "out", label_path=str(bad))  # noqa: E731
    _check_refused(data, tmp_path, run, InvalidInputError, re.escape(bad.name), r"outside the class set",
                   r"\{0, \.\.\., 132, 200\}", r"1e\+07")


def test_training_refuses_labels_outside_datalist_classes(data, tmp_path):
    """ControlNet stage: a training label map with a value the datalist's ``labels`` do not name (99) is refused
    while the latents are prepared; no latent is left behind."""
    item = dict(data["train"][0])
    bad = make_bad_labels(item["label"], tmp_path / "inputs" / "label_99.nii.gz", value=99)
    dl = write_datalist(tmp_path, train={**item, "label": str(bad)}, labels=data["labels"])
    run = lambda: _train(data, "controlnet", dl, tmp_path)  # noqa: E731
    _check_refused(data, tmp_path, run, InvalidInputError, re.escape(bad.name), r"outside the class set",
                   r"\{0, \.\.\., 6\}", r"99 \(5 voxels\)")


def test_inference_refuses_unknown_modality(data, tmp_path):
    run = lambda: _infer(data, tmp_path / "out", modality="pet")  # noqa: E731
    _check_refused(data, tmp_path, run, InvalidInputError, r"config key 'modality' is 'pet'",
                   r"modality_mapping\.json", r"expected one of \[.*'ct'.*'mri'")


def test_diffusion_training_refuses_latents_with_wrong_channel_count(data, tmp_path):
    """Latents left by a VAE with another latent size (3 channels, the UNet needs 4) in latent_dir are refused."""
    latents = tmp_path / "latents"
    latents.mkdir()
    ct = nib.load(data["small_ct"])
    x = np.asarray(ct.dataobj, dtype=np.float32)[::4, ::4, ::4] / 1000.0
    nib.save(nib.Nifti1Image(np.stack([x, -x, x * x], -1), ct.affine), str(latents / "case_emb.nii.gz"))
    entry = {"image": "case_emb.nii.gz", "spacing": [12.0, 12.0, 12.0], "modality": 1, "dim": [48, 48, 48],
             "top_region_index": [0, 0, 1, 0], "bottom_region_index": [0, 0, 1, 0]}
    (latents / "datalist_latents.json").write_text(json.dumps({"training": [entry], "validation": []}))
    dl = write_datalist(tmp_path, train=data["train"][0], labels=data["labels"])
    run = lambda: _train(data, "diffusion", dl, tmp_path, latent_dir=str(latents))  # noqa: E731
    _check_refused(data, tmp_path, run, InvalidInputError, r"case_emb\.nii\.gz", r"has 3 channels.*expected 4",
                   allow=LOG)


# ------------------------------------------------------------------------------------------ intensities, geometry


def test_extreme_ct_intensity_refused(data, tmp_path):
    """CT is expected in HU: values beyond max_abs_hu (1e5) mean a wrong scaling, refused by evaluation and by the
    latent preparation of the diffusion stage (instead of being clipped to a white volume)."""
    bad = make_bad_nifti("extreme_intensity", data["test_ct"], tmp_path / "inputs" / "ct_scaled.nii.gz")
    patterns = [re.escape(bad.name), r"\|value\| > 100000", "expected intensities within that bound"]
    dl = write_datalist(tmp_path, test={"image": str(bad)}, train={"image": str(bad)}, labels=None)
    _check_refused(data, tmp_path, lambda: _evaluate(data, dl, tmp_path / "out"), InvalidInputError, *patterns)
    _check_refused(data, tmp_path, lambda: _train(data, "diffusion", dl, tmp_path), InvalidInputError, *patterns)


def _outputs(out: Path) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    images = sorted(out.glob("sample_*_image.nii.gz"))
    assert len(images) == 1, images
    label = images[0].with_name(images[0].name.replace("_image.nii.gz", "_label.nii.gz"))
    return nib.load(str(images[0])), nib.load(str(label))


def test_oblique_anisotropic_mask_works_on_the_mask_grid(data, tmp_path):
    """An oblique mask with anisotropic voxels, requested at its own spacing and size: image and label are written
    on exactly the mask's grid (affine and shape), the label unchanged."""
    spacing = (1.2, 1.6, 2.4)
    bad = make_bad_nifti("oblique_anisotropic", data["mask"], tmp_path / "inputs" / "mask_oblique.nii.gz",
                         spacing=spacing)
    ref = nib.load(str(bad))
    assert not np.allclose(ref.affine[:3, :3], np.diag(np.diag(ref.affine[:3, :3])))  # oblique
    _infer(data, tmp_path / "out", label_path=str(bad), spacing=list(spacing), output_size=[GRID] * 3)
    img, lab = _outputs(tmp_path / "out")
    for out in (img, lab):
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
    mask = np.asarray(ref.dataobj)
    assert np.array_equal(np.asarray(lab.dataobj), mask)
    hu = np.asarray(img.dataobj)
    assert np.isfinite(hu).all() and np.all(hu[mask == 0] == -1000) and hu[mask > 0].std() > 0


def test_too_small_mask_is_padded(data, tmp_path):
    """An 8^3 mask (3 mm) covers 16^3 voxels of the 1.5 mm tiny grid: it is padded to output_size with 0 (outside
    the body, air in the image), its labels kept in the centre."""
    bad = make_bad_nifti("too_small", data["mask"], tmp_path / "inputs" / "mask_small.nii.gz")
    src = np.asarray(nib.load(str(bad)).dataobj)
    assert src.shape == (8, 8, 8) and (src > 0).any()
    _infer(data, tmp_path / "out", label_path=str(bad))
    img, lab = _outputs(tmp_path / "out")
    assert img.shape == lab.shape == (GRID,) * 3
    label, hu = np.asarray(lab.dataobj), np.asarray(img.dataobj)
    inside = np.zeros(label.shape, dtype=bool)
    inside[24:40, 24:40, 24:40] = True
    assert not label[~inside].any() and set(np.unique(label[inside])) <= set(np.unique(src)) | {0}
    assert (label[inside] > 0).mean() > 0.8  # the mask itself, resampled to 1.5 mm
    assert np.all(hu[label == 0] == -1000)


def test_too_small_ct_refused_by_evaluation(data, tmp_path):
    """SSIM needs an 11^3 window inside the body: an 8^3 CT is refused (min_spatial_size) before any metric file."""
    bad = make_bad_nifti("too_small", data["test_ct"], tmp_path / "inputs" / "ct_small8.nii.gz")
    dl = write_datalist(tmp_path, test={"image": str(bad)})
    _check_refused(data, tmp_path, lambda: _evaluate(data, dl, tmp_path / "out"), InvalidInputError,
                   re.escape(bad.name), r"spatial size \(8, 8, 8\), smaller than the minimum \(16, 16, 16\)")


def _evaluate_one(data, tmp: Path, image: Path) -> dict:
    """Evaluation of the one CT ``image``: its reconstruction summary."""
    _evaluate(data, write_datalist(tmp, test={"image": str(image)}), tmp / "out")
    return json.loads((tmp / "out" / "reconstruction_summary.json").read_text())


def test_oblique_anisotropic_ct_evaluated(data, tmp_path):
    bad = make_bad_nifti("oblique_anisotropic", data["small_ct"], tmp_path / "inputs" / "ct_oblique.nii.gz")
    summary = _evaluate_one(data, tmp_path, bad)
    assert summary["n"] == 1 and np.isfinite(summary["psnr"])


# ------------------------------------------------------------------------------------------ held-out formats


def test_nrrd_mask_gives_the_same_sample_as_nifti(data, tmp_path):
    """The same mask as NRRD: the same label and, with the same seed, the same image."""
    src = make_held_out_input("nrrd", data["mask"], tmp_path / "inputs" / "mask.nii.gz")
    _infer(data, tmp_path / "nifti")
    _infer(data, tmp_path / "nrrd", label_path=str(src))
    (img_a, lab_a), (img_b, lab_b) = _outputs(tmp_path / "nifti"), _outputs(tmp_path / "nrrd")
    assert np.array_equal(np.asarray(lab_a.dataobj), np.asarray(lab_b.dataobj)) and np.asarray(lab_b.dataobj).any()
    np.testing.assert_allclose(np.asarray(img_b.dataobj), np.asarray(img_a.dataobj), atol=1e-3)
    np.testing.assert_allclose(img_b.affine, img_a.affine, atol=1e-5)


def test_clinical_7mm_mask_is_resampled_to_the_output_grid(data, tmp_path):
    """A mask with 7 mm slices is resampled (nearest) to the requested grid: its organs are kept, nothing new."""
    src = make_held_out_input("clinical_7mm", data["mask"], tmp_path / "inputs" / "mask.nii.gz")
    assert abs(abs(nib.load(str(src)).affine[2, 2]) - 7.0) < 1e-3
    _infer(data, tmp_path / "out", label_path=str(src))
    img, lab = _outputs(tmp_path / "out")
    assert img.shape == lab.shape == (GRID,) * 3
    label, given = np.asarray(lab.dataobj), np.asarray(nib.load(str(src)).dataobj)
    assert label.any() and set(np.unique(label)) <= set(np.unique(given)) | {0}
    assert np.isfinite(np.asarray(img.dataobj)).all()


def test_single_slice_mask_is_refused(data, tmp_path):
    """One slice is no body to generate a CT for: refused by name, nothing written."""
    src = make_held_out_input("single_slice", data["mask"], tmp_path / "inputs" / "mask.nii.gz")
    _check_refused(data, tmp_path, lambda: _infer(data, tmp_path / "out", label_path=str(src)), InvalidInputError,
                   re.escape(src.name), r"single slice .*along axis 2", r"expected a 3D volume")


@pytest.mark.parametrize("kind", ["nrrd", "dicom_series", "clinical_7mm"])
def test_held_out_ct_is_evaluated(data, tmp_path, kind):
    """The VAE's reconstruction metrics of a CT given as NRRD, a DICOM series folder or with 7 mm slices."""
    src = make_held_out_input(kind, data["small_ct"], tmp_path / "inputs" / "ct.nii.gz")
    summary = _evaluate_one(data, tmp_path, src)
    assert summary["n"] == 1 and np.isfinite(summary["psnr"])


def test_multi_case_evaluation_refuses_a_bad_last_case_before_the_first_output(data, tmp_path):
    """Two good CTs and a 4D series last: refused naming that file, no metric of the good cases written."""
    bad = make_bad_nifti("four_d", data["small_ct"], tmp_path / "inputs" / "ct_last.nii.gz")
    dl = write_datalist(tmp_path, test=[{"image": data["small_ct"]}, {"image": data["small_ct"]}, {"image": str(bad)}])
    _check_refused(data, tmp_path, lambda: _evaluate(data, dl, tmp_path / "out"), InvalidInputError,
                   re.escape(bad.name), r"4D image with 3 volumes/channels .*expected a 3D image \(1 channel\)")


# ------------------------------------------------------------------------------------------ checkpoints


def _bad_ckpt_dir(data, tmp: Path, kind: str) -> tuple[Path, type, list[str]]:
    """A copy of the tiny checkpoints with the VAE replaced by an unusable file."""
    ckpt = tmp / "models"
    shutil.copytree(data["ckpt_dir"], ckpt)
    if kind == "foreign_checkpoint":
        shutil.copy(data["other"] / "diffseg.pt", ckpt / "autoencoder_v1.pt")
        return ckpt, CheckpointError, [r"autoencoder_v1\.pt", r"no MAISI autoencoder state dict",
                                       r"it has \['model'\]", "another bundle"]
    shutil.copy(data["other"] / "vae_c16.pt", ckpt / "autoencoder_v1.pt")
    return ckpt, CheckpointError, [r"autoencoder_v1\.pt", r"does not fit AutoencoderKlMaisi",
                                   r"shape mismatches.*\(16, 1, 3, 3, 3\) in file vs \(8, 1, 3, 3, 3\)"]


@pytest.mark.parametrize("kind", ["foreign_checkpoint", "mismatched_checkpoint"])
@pytest.mark.parametrize("entry", ["inference", "evaluate", "train_diffusion"])
def test_bad_checkpoint_refused(data, tmp_path, kind, entry):
    ckpt, exc, patterns = _bad_ckpt_dir(data, tmp_path, kind)
    if entry == "inference":
        run = lambda: _infer(data, tmp_path / "out", ckpt_dir=str(ckpt))  # noqa: E731
    elif entry == "evaluate":
        dl = write_datalist(tmp_path, test={"image": data["small_ct"]})
        run = lambda: _evaluate(data, dl, tmp_path / "out", ckpt_dir=str(ckpt))  # noqa: E731
    else:
        dl = write_datalist(tmp_path, train=data["train"][0], labels=data["labels"])
        run = lambda: _train(data, "diffusion", dl, tmp_path, ckpt_dir=str(ckpt))  # noqa: E731
    _check_refused(data, tmp_path, run, exc, *patterns)


def test_foreign_resume_checkpoint_refused(data, tmp_path):
    """resume: true with another bundle's checkpoint: no entry of this stage, nothing replaced or written."""
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    shutil.copy(data["other"] / "diffseg.pt", ckpt / "autoencoder_checkpoint.pt")
    dl = write_datalist(tmp_path, train={"image": data["small_ct"]}, val={"image": data["small_ct"]})
    run = lambda: _train(data, "autoencoder", dl, tmp_path, ckpt_dir=str(ckpt), resume=True)  # noqa: E731
    _check_refused(data, tmp_path, run, CheckpointError, r"autoencoder_checkpoint\.pt",
                   r"no entries \['autoencoder', 'discriminator'", "another bundle", allow=LOG)


def test_hash_mismatch_refused(data, tmp_path):
    """A sha256 config key that does not match, and a file whose large_files.yml entry (md5) does not match."""
    run = lambda: _infer(data, tmp_path / "out", autoencoder_sha256="0" * 64)  # noqa: E731
    _check_refused(data, tmp_path, run, HashMismatchError, r"autoencoder_v1\.pt", r"has sha256 [0-9a-f]{64}, expected 0{64}",
                   r"config key 'autoencoder_sha256'")
    # a bundle layout: <root>/large_files.yml lists models/diff_unet_3d_rflow-ct.pt with another md5
    root = tmp_path / "bundle"
    shutil.copytree(data["ckpt_dir"], root / "models")
    (root / "large_files.yml").write_text(
        "large_files:\n  - path: \"models/diff_unet_3d_rflow-ct.pt\"\n    url: \"https://example.org/unet.pt\"\n"
        "    hash_val: \"0123456789abcdef0123456789abcdef\"\n    hash_type: \"md5\"\n")
    run = lambda: _infer(data, tmp_path / "out", ckpt_dir=str(root / "models"),  # noqa: E731
                         large_files=str(root / "large_files.yml"))
    _check_refused(data, tmp_path, run, HashMismatchError, r"diff_unet_3d_rflow-ct\.pt", r"has md5 [0-9a-f]{32}",
                   r"expected 0123456789abcdef0123456789abcdef", r"large_files\.yml entry 'models/diff_unet_3d_rflow-ct\.pt'")
    # training: the resume checkpoint's sha256
    ckpt = tmp_path / "train_models"
    ckpt.mkdir()
    shutil.copy(data["ckpt_dir"] / "autoencoder_v1.pt", ckpt / "autoencoder_checkpoint.pt")
    dl = write_datalist(tmp_path, train={"image": data["small_ct"]}, val={"image": data["small_ct"]})
    run = lambda: _train(data, "autoencoder", dl, tmp_path, ckpt_dir=str(ckpt), resume=True,  # noqa: E731
                         resume_ckpt_sha256="f" * 64)
    _check_refused(data, tmp_path, run, HashMismatchError, r"autoencoder_checkpoint\.pt", "expected f{64}", allow=LOG)


# ------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("entry", ["inference", "evaluate", "train_output_dir", "train_ckpt_dir"])
def test_unwritable_output_refused_up_front(data, tmp_path, entry):
    bad = make_unwritable_dir(tmp_path / "blocked")
    dl = write_datalist(tmp_path, test={"image": data["small_ct"]}, train={"image": data["small_ct"]},
                   val={"image": data["small_ct"]})
    key = "output_dir"
    if entry == "inference":
        run = lambda: _infer(data, bad)  # noqa: E731
    elif entry == "evaluate":
        run = lambda: _evaluate(data, dl, bad)  # noqa: E731
    elif entry == "train_output_dir":
        run = lambda: run_bundle(BUNDLE, ["train_autoencoder.json", TINY], datalist=dl, output_dir=str(bad),  # noqa: E731
                                 ckpt_dir=str(tmp_path / "models"))
    else:
        run = lambda: _train(data, "autoencoder", dl, tmp_path, ckpt_dir=str(bad))  # noqa: E731
        key = "ckpt_dir"
    _check_refused(data, tmp_path, run, OutputNotWritableError, re.escape(str(bad)), rf"config key '{key}'",
                   "cannot be written")


def test_existing_outputs_refused_unless_overwrite(data, tmp_path):
    """Evaluation tables and a training stage's final checkpoint are never replaced silently."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "reconstruction_metrics.csv").write_text("an earlier result\n")
    dl = write_datalist(tmp_path, test={"image": data["small_ct"]}, train={"image": data["small_ct"]},
                   val={"image": data["small_ct"]})
    _check_refused(data, tmp_path, lambda: _evaluate(data, dl, out), OutputExistsError,
                   r"reconstruction_metrics\.csv", "already exists", "'overwrite'")
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    (ckpt / "autoencoder_checkpoint.pt").write_bytes(b"an earlier run")
    run = lambda: _train(data, "autoencoder", dl, tmp_path, ckpt_dir=str(ckpt))  # noqa: E731
    _check_refused(data, tmp_path, run, OutputExistsError, r"autoencoder_checkpoint\.pt", "already exists",
                   "'overwrite'")
    assert (ckpt / "autoencoder_checkpoint.pt").read_bytes() == b"an earlier run"


def test_existing_sample_report_refused(data, tmp_path):
    """The per-sample writer refuses an existing file (sample names carry a time stamp, so this is a race)."""
    sys.path.insert(0, str(BUNDLE))
    from monai.data import MetaTensor
    from scripts.inference import WriteSampleReportd

    class _Inferer:
        last_report = {"quality_check": None}

    (tmp_path / "sample_x.json").write_text("{}")
    pred = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"sample_name": "sample_x"})
    writer = WriteSampleReportd("pred", str(tmp_path), _Inferer())
    _check_refused(data, tmp_path, lambda: writer({"pred": pred}), OutputExistsError, r"sample_x\.json",
                   "'overwrite'")
    WriteSampleReportd("pred", str(tmp_path), _Inferer(), overwrite=True)({"pred": pred})
    assert json.loads((tmp_path / "sample_x.json").read_text())["quality_check_result"] == "skipped"


# ------------------------------------------------------------------------------------------ command line


def test_command_line_one_error_line(data, tmp_path):
    bad = make_bad_nifti("truncated_gzip", data["mask"], tmp_path / "inputs" / "cut_mask.nii.gz")
    before = snapshot(tmp_path, data["root"])
    proc = run_bundle_cli(BUNDLE, ["inference.json", TINY], ckpt_dir=str(data["ckpt_dir"]),
                          output_dir=str(tmp_path / "out"), label_path=str(bad), quality_check=False)
    assert proc.returncode != 0
    tail = proc.stderr.strip().splitlines()[-3:]
    assert any(line.startswith("ERROR: InvalidInputError:") and bad.name in line and "truncated gzip" in line
               for line in tail), proc.stderr[-2000:]
    assert_quiet_streams(proc.stdout, proc.stderr, "InvalidInputError:")  # nothing else on either stream
    assert_nothing_written(before, tmp_path, data["root"])
    assert not (tmp_path / "out").exists()  # the output folder this refused run created is gone
