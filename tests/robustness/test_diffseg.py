"""Bad input and faults for the diffseg bundle: inference, evaluation and training.

Every bad input is made from a real image (the TotalSegmentator example CT of the CT demo cohort and its
merged 7-class label map, deformed training copies for training) and fed to the configs in-process with the
tiny configuration. Each refusal must be one user error naming the file or config key and what was
expected, with nothing written (no prediction, no metric table, no checkpoint, no log, no temporary file).
Oblique anisotropic inputs and volumes smaller than the network's minimum must work, with the label map
written in the input's geometry; extreme intensities are refused for CT (HU expected) and give the same
labels as the unscaled image for MR (percentile normalisation).

Not applicable to this bundle: ``three_d_dwi`` and ``bval_bvec_mismatch`` (no diffusion input).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_quiet_streams, run_bundle, run_bundle_cli
from faults import (GUARD_ERRORS, HELD_OUT_KINDS, CheckpointError, HashMismatchError, InputNotFoundError,
                    InvalidInputError, OutputExistsError, OutputNotWritableError, assert_in_input_geometry,
                    assert_nothing_written, expect_user_error, kinds_tried, make_bad_labels, make_bad_nifti,
                    make_held_out_input, make_unwritable_dir, snapshot)

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "diffseg"
KINDS = kinds_tried("three_d_dwi", "bval_bvec_mismatch", "no_overlap", "wrong_task_checkpoint")

INFER = ("inference.json", "tiny.json")
EVAL = ("inference.json", "evaluate.json", "tiny.json")
TRAIN = ("train.json", "tiny.json")
NUM_CLASSES = 7  # tiny.json: the demo's merged classes


def _network_state(**overrides) -> dict:
    """State dict of ``network_def`` of inference.json + tiny.json (with ``overrides``), seeded."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in INFER])
    for k, v in overrides.items():
        parser[k] = v
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def").state_dict()


@pytest.fixture(scope="module")
def data(ct_demo, tmp_path_factory):
    """Real inputs, a datalist with absolute paths and tiny checkpoints, shared read-only."""
    root = tmp_path_factory.mktemp("diffseg_robust")
    base = Path(ct_demo).parent
    dl = json.loads(Path(ct_demo).read_text())

    def absolute(items):
        return [{k: str(base / it[k]) for k in ("image", "label")} for it in items]

    datalist = {"labels": dl["labels"], "training": absolute(dl["training"][:2]),
                "validation": absolute(dl["validation"][:1]), "test": absolute(dl["test"])}
    ckpt = root / "models"
    ckpt.mkdir()
    torch.save(_network_state(), ckpt / "model.pt")
    other = root / "other"
    other.mkdir()
    # n_img = 2: the same network for two image channels (multi-modal datasets)
    torch.save(_network_state(n_img=2), other / "model_2ch.pt")
    # another configuration of this bundle: the 16 AMOS classes
    torch.save(_network_state(num_classes=16), other / "model_16cls.pt")
    # a checkpoint of another bundle (ivan_fusion's network)
    from common.networks.ivan import IVAN

    torch.save({"model": IVAN(2, num_blocks=2, growth=8, seed=0).state_dict()}, other / "ivan_fusion.pt")
    # a training checkpoint of another configuration (the 16 classes), for resume
    torch.save({"model": _network_state(num_classes=16)}, other / "checkpoint_16cls.pt")
    # a 64 x 64 x 48 crop of the real test CT (affine shifted accordingly) keeps inference runs and
    # the re-compression of corrupted copies short
    ct = nib.load(datalist["test"][0]["image"])
    centre = [s // 2 for s in ct.shape]
    crop = ct.slicer[centre[0] - 32 : centre[0] + 32, centre[1] - 32 : centre[1] + 32, centre[2] - 24 : centre[2] + 24]
    nib.save(crop, str(root / "ct_crop.nii.gz"))
    return {
        "root": root,
        "ct": root / "ct_crop.nii.gz",
        "image": Path(datalist["test"][0]["image"]),
        "label": Path(datalist["test"][0]["label"]),
        "datalist": datalist,
        "ckpt_dir": ckpt,
        "other": other,
    }


def _write_datalist(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def _infer(data, image, out: Path, configs=INFER, **overrides) -> None:
    images = [str(i) for i in image] if isinstance(image, (list, tuple)) else str(image)
    kw = dict(dataset_dir=str(data["root"]), data=[{"image": images}], ckpt_dir=str(data["ckpt_dir"]),
              output_dir=str(out))
    kw.update(overrides)
    run_bundle(BUNDLE, list(configs), **kw)


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _single_output(out: Path) -> Path:
    files = sorted(out.rglob("*_seg.nii.gz"))
    assert len(files) == 1, files
    assert not [p for p in out.rglob("*") if ".part" in p.name]
    return files[0]


def _assert_input_geometry(pred: Path, image: Path) -> np.ndarray:
    p, i = nib.load(str(pred)), nib.load(str(image))
    assert p.shape == i.shape
    np.testing.assert_allclose(p.affine, i.affine, atol=1e-5)
    labels = _labels(pred)
    assert labels.dtype == np.uint8 and labels.max() < NUM_CLASSES
    return labels


# ------------------------------------------------------------------------------ inference: bad files

FILE_KINDS = {
    **GUARD_ERRORS,  # the shared guards' messages
    # CT is expected in HU: a wrong scaling is refused (ValidateImaged max_abs = 1e5 for CT)
    "extreme_intensity": (
        InvalidInputError, r"voxels with \|value\| > 100000 .*expected intensities within that bound"
    ),
}


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_inference_refuses_bad_image(kind, data, tmp_path):
    exc, pattern = FILE_KINDS[kind]
    bad = make_bad_nifti(kind, data["ct"], tmp_path / "in" / f"ct_{kind}.nii.gz")
    out = tmp_path / "out"
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(lambda: _infer(data, bad, out), re.escape(bad.name), r"key 'image'", pattern, exc_type=exc)
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])


LAST_CASE_FAULTS = {
    "four_d": r"4D image with 3 volumes/channels .*expected a 3D image \(1 channel\)",
    "single_slice": r"single slice .*along axis 2; expected a 3D volume",
}


@pytest.mark.parametrize("last", list(LAST_CASE_FAULTS))
@pytest.mark.parametrize("configs", [INFER, EVAL], ids=["inference", "evaluate"])
def test_multi_case_run_refuses_a_bad_last_case_before_the_first_output(configs, last, data, tmp_path):
    """Three cases, the last one a 4D series or a single slice: every case's header is checked before the first
    prediction, so the run stops naming that file and no prediction of the good cases is written."""
    if last == "four_d":
        bad = make_bad_nifti("four_d", data["ct"], tmp_path / "in" / "ct_last.nii.gz")
    else:
        bad = make_held_out_input(last, data["ct"], tmp_path / "in" / "ct_last.nii.gz")
    goods = [shutil.copy(data["ct"], tmp_path / "in" / f"ct_good{i}.nii.gz") for i in range(2)]  # two output names
    cases = [{"id": f"good{i}", "image": str(g), "label": str(data["label"])} for i, g in enumerate(goods)]
    cases.append({"id": "bad", "image": str(bad), "label": str(data["label"])})
    if configs == EVAL:
        datalist = _write_datalist(tmp_path / "datalist.json", {"test": cases})
        run = lambda: run_bundle(BUNDLE, list(EVAL), datalist_file=str(datalist), dataset_dir=str(tmp_path),  # noqa: E731
                                 ckpt_dir=str(data["ckpt_dir"]), output_dir=str(tmp_path / "out"))
    else:
        run = lambda: run_bundle(BUNDLE, list(INFER), dataset_dir=str(tmp_path), data=[{"image": c["image"]} for c in cases],  # noqa: E731
                                 ckpt_dir=str(data["ckpt_dir"]), output_dir=str(tmp_path / "out"))
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(run, re.escape(bad.name), r"key 'image'", LAST_CASE_FAULTS[last], exc_type=InvalidInputError)
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])  # in particular no prediction of the good cases


@pytest.mark.parametrize("kind", [k for k in HELD_OUT_KINDS if k != "single_slice"])
def test_held_out_input_works_in_the_input_geometry(kind, data, tmp_path):
    """NRRD, a DICOM series folder and 7 mm slices: a label map in the input's own grid, named after the file or
    folder."""
    src = make_held_out_input(kind, data["ct"], tmp_path / "in" / "ct_case.nii.gz")
    _infer(data, src, tmp_path / "out")
    pred = _single_output(tmp_path / "out")
    assert pred.name == "ct_case_seg.nii.gz"
    labels = assert_in_input_geometry(pred, src)
    assert labels.dtype == np.uint8 and labels.max() < NUM_CLASSES


def test_single_slice_is_refused_as_not_a_volume(data, tmp_path):
    """A 3D network has no context in one slice (edge padding would repeat it into a column): refused, naming the
    file and the axis, nothing written."""
    src = make_held_out_input("single_slice", data["ct"], tmp_path / "in" / "ct_case.nii.gz")
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(lambda: _infer(data, src, tmp_path / "out"), re.escape(src.name), r"key 'image'",
                      r"single slice .*along axis 2; expected a 3D volume", exc_type=InvalidInputError)
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])


def test_inference_refuses_a_dataset_dir_without_images(data, tmp_path):
    (tmp_path / "data" / "imagesTs").mkdir(parents=True)
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(
        lambda: run_bundle(BUNDLE, list(INFER), dataset_dir=str(tmp_path / "data"), ckpt_dir=str(data["ckpt_dir"]),
                           output_dir=str(tmp_path / "out")),
        r"no input images: nothing matches '.*/data/imagesTs/\*\.nii\.gz' \(key 'dataset_dir'\)",
        exc_type=InputNotFoundError,
    )
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])


def test_extreme_mr_intensities_give_the_unscaled_labels(data, tmp_path):
    """MR is normalised by its 0.5/99.5 percentiles: x 1e7 is the same image, so the same labels (up to
    float32 rounding, which can flip a near-tie of the untrained network's logits in a few voxels). Float32 passes
    pinned: on a CPU with bfloat16 units the default (``runtime_precision: auto``) rounds the normalised inputs to
    bf16, which flips about 1 % of this untrained network's near-ties; what bf16 costs a trained model is measured
    in tests/diffseg/test_demo_model.py."""
    scaled = make_bad_nifti("extreme_intensity", data["ct"], tmp_path / "in" / "mr_scaled.nii.gz")
    _infer(data, data["ct"], tmp_path / "plain", modality="MR", runtime_precision="f32")
    _infer(data, scaled, tmp_path / "scaled", modality="MR", runtime_precision="f32")
    plain = _assert_input_geometry(_single_output(tmp_path / "plain"), data["ct"])
    big = _assert_input_geometry(_single_output(tmp_path / "scaled"), scaled)
    assert len(np.unique(plain)) > 1
    assert (big != plain).mean() < 1e-4, f"{(big != plain).sum()} of {plain.size} voxels differ"


def test_oblique_anisotropic_works_in_the_input_geometry(data, tmp_path):
    bad = make_bad_nifti("oblique_anisotropic", data["ct"], tmp_path / "in" / "ct_oblique.nii.gz")
    sha = hashlib.sha256((data["ckpt_dir"] / "model.pt").read_bytes()).hexdigest()
    _infer(data, bad, tmp_path / "out", ckpt_sha256=sha)  # the right digest passes
    labels = _assert_input_geometry(_single_output(tmp_path / "out"), bad)
    assert len(np.unique(labels)) > 1
    assert not np.allclose(nib.load(str(bad)).affine, nib.load(str(data["ct"])).affine)


def test_too_small_is_padded_and_written_back_in_the_input_geometry(data, tmp_path):
    """8^3 voxels of 3 mm are 3^3 voxels on the 8 mm network grid, below the UNet's 16-voxel minimum:
    padded on that grid (DivisiblePadd), the prediction cropped back and resampled to the input grid."""
    bad = make_bad_nifti("too_small", data["ct"], tmp_path / "in" / "ct_small.nii.gz", size=8)
    assert nib.load(str(bad)).shape == (8, 8, 8)
    _infer(data, bad, tmp_path / "out")
    _assert_input_geometry(_single_output(tmp_path / "out"), bad)


# ------------------------------------------------------------------------------ channels, modality


def test_wrong_channel_count_and_missing_modality(data, tmp_path):
    """A dataset with two image channels (n_img 2): one image given, or a second modality that is empty."""
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    shutil.copy(data["other"] / "model_2ch.pt", ckpt / "model.pt")
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    expect_user_error(
        lambda: _infer(data, data["ct"], out, n_img=2, ckpt_dir=str(ckpt)),
        re.escape(data["ct"].name), r"has 1 channels .*expected 2", exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path)
    empty = make_bad_nifti("all_zero", data["ct"], tmp_path / "in" / "t2_missing.nii.gz")
    before = snapshot(tmp_path)
    expect_user_error(
        lambda: _infer(data, [data["ct"], empty], out, n_img=2, ckpt_dir=str(ckpt)),
        r"key 'image'", r"constant channel\(s\) \[1\] of 2 \(an all-zero or missing modality",
        exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path)


def test_unknown_modality(data, tmp_path):
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(
        lambda: _infer(data, data["ct"], tmp_path / "out", modality="PET"),
        r"unknown modality 'PET' \(config key 'modality'\); expected 'CT' or 'MR'", exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])


# ------------------------------------------------------------------------------ checkpoints


CKPT_KINDS = {
    "foreign_checkpoint": (
        "ivan_fusion.pt", CheckpointError, r"does not fit DiffSegUNet: .*missing keys.*another bundle"
    ),
    "mismatched_checkpoint": (
        "model_16cls.pt", CheckpointError, r"does not fit DiffSegUNet: \d+ shape mismatches .*16"
    ),
    "hash_mismatch": ("model.pt", HashMismatchError, r"has sha256 [0-9a-f]{64}, expected 0{64}"),
}


@pytest.mark.parametrize("kind", sorted(CKPT_KINDS))
def test_inference_refuses_bad_checkpoint(kind, data, tmp_path):
    name, exc, pattern = CKPT_KINDS[kind]
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    src = data["ckpt_dir"] if kind == "hash_mismatch" else data["other"]
    shutil.copy(src / name, ckpt / "model.pt")
    extra = {"ckpt_sha256": "0" * 64} if kind == "hash_mismatch" else {}
    before = snapshot(tmp_path)
    expect_user_error(
        lambda: _infer(data, data["ct"], tmp_path / "out", ckpt_dir=str(ckpt), **extra),
        re.escape(str(ckpt / "model.pt")), pattern, exc_type=exc,
    )
    assert_nothing_written(before, tmp_path)


# ------------------------------------------------------------------------------ outputs


def test_unwritable_output_folder_refused_before_any_work(data, tmp_path):
    out = make_unwritable_dir(tmp_path / "out")
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(
        lambda: _infer(data, data["ct"], out), r"output folder \(config key 'output_dir'\)", re.escape(str(out)),
        r"cannot be written", exc_type=OutputNotWritableError,
    )
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])


def test_existing_prediction_refused_unless_overwrite(data, tmp_path):
    out = tmp_path / "out"
    old = out / "ct_crop_seg.nii.gz"  # where this input's prediction goes (dataset_dir is its folder)
    out.mkdir()
    old.write_bytes(b"an earlier prediction")
    before = snapshot(tmp_path)
    expect_user_error(
        lambda: _infer(data, data["ct"], out), re.escape(str(old)), r"set 'overwrite' to true",
        exc_type=OutputExistsError,
    )
    assert_nothing_written(before, tmp_path)
    _infer(data, data["ct"], out, overwrite=True)
    assert _single_output(out) == old
    _assert_input_geometry(old, data["ct"])


def test_cli_prints_one_error_and_exits_non_zero(data, tmp_path):
    bad = make_bad_nifti("truncated_gzip", data["ct"], tmp_path / "in" / "ct_cut.nii.gz")
    out = tmp_path / "out"
    before = snapshot(tmp_path, data["ckpt_dir"])
    proc = run_bundle_cli(
        BUNDLE, list(INFER), dataset_dir=str(tmp_path / "in"), data=[{"image": str(bad)}],
        ckpt_dir=str(data["ckpt_dir"]), output_dir=str(out),
    )
    assert proc.returncode != 0
    tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
    assert "ERROR: InvalidInputError:" in tail, proc.stderr[-3000:]
    assert "ct_cut.nii.gz" in tail and "truncated gzip" in tail, tail
    assert_quiet_streams(proc.stdout, proc.stderr, "InvalidInputError:")  # nothing else on either stream
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])
    assert not out.exists()  # the output folder this refused run created is gone


# ------------------------------------------------------------------------------ evaluation


def _evaluate(data, datalist: Path, out: Path, **overrides) -> None:
    kw = dict(dataset_dir=str(data["root"]), datalist_file=str(datalist), ckpt_dir=str(data["ckpt_dir"]),
              output_dir=str(out))
    kw.update(overrides)
    run_bundle(BUNDLE, list(EVAL), **kw)


def test_evaluate_refuses_labels_outside_the_class_set(data, tmp_path):
    bad = make_bad_labels(data["label"], tmp_path / "in" / "label_99.nii.gz")
    dl = dict(data["datalist"], test=[{"image": str(data["image"]), "label": str(bad)}])
    datalist = _write_datalist(tmp_path / "in" / "datalist.json", dl)
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(
        lambda: _evaluate(data, datalist, tmp_path / "out"),
        re.escape(bad.name), r"key 'label'",
        r"values outside the class set \{0, \.\.\., 6\} \(7 classes\): 99 \(5 voxels\)",
        exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])


def test_evaluate_refuses_missing_datalist_and_existing_metrics(data, tmp_path):
    missing = tmp_path / "in" / "no_datalist.json"
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(
        lambda: _evaluate(data, missing, tmp_path / "out"), re.escape(str(missing)), r"key 'datalist_file'",
        r"does not exist; expected a Decathlon-style datalist JSON with a 'test' list", exc_type=InputNotFoundError,
    )
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])
    # metric tables of an earlier evaluation are not replaced silently
    datalist = _write_datalist(tmp_path / "in" / "datalist.json", data["datalist"])
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "metrics_summary.csv").write_text("class,dice_mean\noverall,0.9\n")
    before = snapshot(tmp_path, data["ckpt_dir"])
    expect_user_error(
        lambda: _evaluate(data, datalist, out), re.escape(str(out / "metrics_summary.csv")), r"'overwrite'",
        exc_type=OutputExistsError,
    )
    assert_nothing_written(before, tmp_path, data["ckpt_dir"])


# ------------------------------------------------------------------------------ training


def _train(data, datalist: Path, ckpt: Path, out: Path, **overrides) -> None:
    kw = dict(dataset_dir=str(data["root"]), datalist=str(datalist), ckpt_dir=str(ckpt), output_dir=str(out))
    kw.update(overrides)
    run_bundle(BUNDLE, list(TRAIN), **kw)


def test_train_refuses_labels_outside_the_class_set(data, tmp_path):
    """With the default cache (train.json: cache_rate 1), every case is checked before training starts."""
    bad = make_bad_labels(Path(data["datalist"]["training"][1]["label"]), tmp_path / "in" / "train_label_99.nii.gz")
    training = [dict(data["datalist"]["training"][0]), dict(data["datalist"]["training"][1], label=str(bad))]
    datalist = _write_datalist(tmp_path / "in" / "datalist.json", dict(data["datalist"], training=training))
    before = snapshot(tmp_path)
    expect_user_error(
        lambda: _train(data, datalist, tmp_path / "models", tmp_path / "logs", cache_rate=1.0),
        re.escape(bad.name), r"values outside the class set \{0, \.\.\., 6\} \(7 classes\): 99 \(5 voxels\)",
        exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path)


TRAIN_FAULTS = {
    "foreign_checkpoint": (CheckpointError, r"'resume_ckpt'.*does not fit DiffSegUNet: .*missing keys"),
    "mismatched_checkpoint": (CheckpointError, r"'resume_ckpt'.*does not fit DiffSegUNet: \d+ shape mismatches"),
    "hash_mismatch": (HashMismatchError, r"has sha256 [0-9a-f]{64}, expected 0{64}"),
    "unwritable_output": (OutputNotWritableError, r"checkpoint folder \(config key 'ckpt_dir'\) .* cannot be written"),
    "existing_output": (
        OutputExistsError, r"\(config key 'ckpt_dir'\) already holds 1 checkpoint.*model\.pt.*'overwrite'.*'resume'"
    ),
    "missing_file": (InputNotFoundError, r"datalist .*no_datalist\.json' \(config key 'datalist'\) does not exist"),
}


@pytest.mark.parametrize("kind", sorted(TRAIN_FAULTS))
def test_train_refuses_before_writing_anything(kind, data, tmp_path):
    exc, pattern = TRAIN_FAULTS[kind]
    datalist = _write_datalist(tmp_path / "in" / "datalist.json", data["datalist"])
    ckpt, logs = tmp_path / "models", tmp_path / "logs"
    extra = {}
    if kind == "foreign_checkpoint":
        extra = dict(resume=True, resume_ckpt=str(data["other"] / "ivan_fusion.pt"))
    elif kind == "mismatched_checkpoint":
        extra = dict(resume=True, resume_ckpt=str(data["other"] / "checkpoint_16cls.pt"))
    elif kind == "hash_mismatch":
        extra = dict(resume=True, resume_ckpt=str(data["other"] / "checkpoint_16cls.pt"), resume_ckpt_sha256="0" * 64)
    elif kind == "unwritable_output":
        ckpt = make_unwritable_dir(ckpt)
    elif kind == "existing_output":
        ckpt.mkdir()
        shutil.copy(data["ckpt_dir"] / "model.pt", ckpt / "model.pt")
    elif kind == "missing_file":
        datalist = tmp_path / "in" / "no_datalist.json"
    before = snapshot(tmp_path, data["ckpt_dir"], data["other"])
    expect_user_error(lambda: _train(data, datalist, ckpt, logs, **extra), pattern, exc_type=exc)
    assert_nothing_written(before, tmp_path, data["ckpt_dir"], data["other"])
