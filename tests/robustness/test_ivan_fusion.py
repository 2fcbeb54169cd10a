"""Bad input and faults for the ivan_fusion bundle: inference, evaluation and training.

Every bad input is made from a real image (the SPM avg152 T1/T2/PD triple of the brain demo cohort, cropped
so that tiny-configuration runs stay short; the CT-like image of the semi-synthetic fusion pair) and fed to the
configs in-process. Each refusal must be one user error naming the file or config key and what was expected,
with nothing written (no output, no checkpoint, no temporary file, nothing next to the inputs). Oblique and
anisotropic inputs, too-small volumes (inference), 2D images (the network is 2D) and extreme MR intensities must
work, in the input's geometry; extreme CT values (HU expected), too-small volumes for evaluation, sources that do
not overlap in physical space and checkpoints trained for another task are refused.

Not applicable to this bundle: ``three_d_dwi`` and ``bval_bvec_mismatch`` (no diffusion input) and
``labels_outside_set`` (no label map: the optional evaluation mask is only thresholded at 0).
"""

from __future__ import annotations

import json
import re
import sys
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_quiet_streams, run_bundle, run_bundle_cli
from faults import (GUARD_ERRORS, HELD_OUT_KINDS, CheckpointError, HashMismatchError, InputNotFoundError,
                    InvalidInputError, OutputExistsError, OutputNotWritableError, assert_in_input_geometry,
                    assert_nothing_written, expect_refused, forget_bundle, kinds_tried, make_bad_nifti,
                    make_held_out_input, make_unwritable_dir, snapshot, write_datalist)

from common.data.fetch import demo_file

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "ivan_fusion"
KINDS = kinds_tried("three_d_dwi", "bval_bvec_mismatch", "labels_outside_set")

# real avg152 / sim voxels, cropped (affine shifted accordingly): 40 x 48 x 12
CROP = (slice(20, 60), slice(30, 78), slice(38, 50))
TINY = ("tiny.json",)


def _run(configs, **overrides) -> None:
    run_bundle(BUNDLE, [*configs, *TINY], **overrides)


def _crop(src: Path, dst: Path) -> str:
    nib.save(nib.load(str(src)).slicer[CROP], str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def data(brain_demo, tmp_path_factory):
    """Good inputs (cropped real images), an untrained tiny checkpoint and a fusion pair, shared read-only."""
    root = tmp_path_factory.mktemp("ivan_robust_data")
    d = json.loads(Path(brain_demo).read_text())
    base = Path(brain_demo).parent
    test = {"id": "avg152"}
    test.update({k: _crop(base / v, root / f"avg152_{k}.nii.gz") for k, v in d["test"][0].items() if k != "id"})
    train = [
        {"id": it["id"], **{k: _crop(base / it[k], root / f"{it['id']}_{k}.nii.gz") for k in ("t1", "t2", "pd")}}
        for it in (d["training"][0], d["validation"][0])
    ]
    sys.path.insert(0, str(BUNDLE))
    try:
        from scripts.data import task_record

        from common.data.fusion_demo import build_fusion_demo

        fus = build_fusion_demo(root, demo_file("spm/avg152T2.nii"), demo_file("spm/TPM.nii")).parent
    finally:
        forget_bundle(BUNDLE)
    fusion = {"id": "icbm152", **{k: _crop(fus / f"{k}.nii.gz", root / f"icbm152_{k}.nii.gz") for k in ("t2", "ct")}}

    from common.networks.diffseg_unet import DiffSegUNet
    from common.networks.ivan import IVAN

    ckpt = root / "models"
    ckpt.mkdir()
    torch.save({"model": IVAN(2, num_blocks=2, growth=8, seed=0).state_dict()}, ckpt / "model.pt")
    other = root / "other_models"
    other.mkdir()
    diffseg = DiffSegUNet(in_channels=1, out_channels=7, channels=[8, 8, 8, 8], time_conditioning=False)
    torch.save({"model": diffseg.state_dict()}, other / "diffseg.pt")
    # a checkpoint of this bundle for another task configuration (three sources: C = 4 channels)
    torch.save({"model": IVAN(4, num_blocks=2, growth=8, seed=0).state_dict()}, other / "ivan_c4.pt")
    # a checkpoint of this bundle with the same shapes, recorded as trained for T1 -> T2 synthesis
    record = task_record({"name": "1to1", "inputs": ["t1"], "targets": ["t2"]}, "replicate", 2)
    torch.save({"model": IVAN(2, num_blocks=2, growth=8, seed=0).state_dict(), "task": record}, other / "ivan_1to1.pt")
    return {"root": root, "test": test, "train": train[0], "val": train[1], "fusion": fusion, "ckpt_dir": ckpt,
            "other": other}


def _check_refused(data, tmp: Path, run, exc_type, *patterns) -> BaseException:
    """``run()`` fails with one user error matching ``patterns``; nothing is written in the test's folder (inputs,
    outputs, checkpoints) nor next to the shared inputs and checkpoint."""
    return expect_refused(run, *patterns, exc_type=exc_type, roots=(tmp, data["root"]))


def _bad_input(data, tmp: Path, kind: str, key: str = "t1", case: str = "test", **kw) -> tuple[dict, Path]:
    item = dict(data[case])
    bad = make_bad_nifti(kind, item[key], tmp / "inputs" / f"{kind}_{key}.nii.gz", **kw)
    item[key] = str(bad)
    return item, bad


def _infer(data, datalist: str, out: Path, task: str = "1to1", **overrides) -> None:
    overrides.setdefault("ckpt_dir", str(data["ckpt_dir"]))
    _run(["inference.json", f"task_{task}.json"], datalist=datalist, output_dir=str(out), **overrides)


def _evaluate(data, datalist: str, out: Path, task: str = "1to1", **overrides) -> None:
    overrides.setdefault("ckpt_dir", str(data["ckpt_dir"]))
    _run(["inference.json", "evaluate.json", f"task_{task}.json"], datalist=datalist, output_dir=str(out), **overrides)


def _train(datalist: str, out: Path, ckpt_dir: Path, task: str = "1to1", **overrides) -> None:
    _run(["train.json", f"task_{task}.json"], datalist=datalist, output_dir=str(out), ckpt_dir=str(ckpt_dir),
         **overrides)


# ------------------------------------------------------------------------------------------ file and content


FILE_KINDS = {k: v for k, v in GUARD_ERRORS.items() if k != "two_d"}  # the shared guards' messages; 2D works here


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_inference_refuses_bad_source(data, tmp_path, kind):
    """1 -> 1 and 2 -> 1: a broken source (the second one for 2 -> 1) is refused by name, before any output."""
    exc, pattern = FILE_KINDS[kind]
    task, key = ("2to1", "pd") if kind in ("nan", "truncated_gzip") else ("1to1", "t1")
    item, bad = _bad_input(data, tmp_path, kind, key)
    dl = write_datalist(tmp_path, test=item)
    out = tmp_path / "out"
    _check_refused(data, tmp_path, partial(_infer, data, dl, out, task), exc, re.escape(bad.name), pattern, f"'{key}'")


@pytest.mark.parametrize("run", [_infer, _evaluate], ids=["inference", "evaluate"])
def test_multi_case_run_refuses_a_4d_last_case_before_the_first_output(data, tmp_path, run):
    """Three cases, the last one's T1 a 4D series: every case's header is checked before the first output, so the
    run stops naming that file and nothing of the good cases is written."""
    good = [dict(data["test"], id=f"good{i}") for i in range(2)]
    bad_case, bad = _bad_input(data, tmp_path, "four_d", "t1")
    dl = write_datalist(tmp_path, test=good + [dict(bad_case, id="bad")])
    _check_refused(data, tmp_path, partial(run, data, dl, tmp_path / "out"), InvalidInputError, re.escape(bad.name),
                   r"key 't1', case 'bad'", r"4D image with 3 volumes/channels .*expected a 3D image \(1 channel\)")


@pytest.mark.parametrize("kind", ["missing_file", "corrupt_header", "nan"])
def test_training_refuses_bad_training_case(data, tmp_path, kind):
    """A broken training volume stops training before any checkpoint or log file is written."""
    exc, pattern = FILE_KINDS[kind]
    item, bad = _bad_input(data, tmp_path, kind, "t2", case="train")
    dl = write_datalist(tmp_path, train=item, val=data["val"])
    run = partial(_train, dl, tmp_path / "out", tmp_path / "models")
    _check_refused(data, tmp_path, run, exc, re.escape(bad.name), pattern)


def test_inference_refuses_reverse_target_missing(data, tmp_path):
    """Reverse inference loads the targets: a missing target file is the one named."""
    item, bad = _bad_input(data, tmp_path, "missing_file", "t2")
    dl = write_datalist(tmp_path, test=item)
    run = partial(_infer, data, dl, tmp_path / "out", direction="reverse")
    _check_refused(data, tmp_path, run, InputNotFoundError, re.escape(bad.name), "does not exist")


# ------------------------------------------------------------------------------------------ modalities


def test_wrong_channels_multichannel_source(data, tmp_path):
    """Two modalities stacked in one file where one volume per modality is expected."""
    t1, pd = (np.asarray(nib.load(data["test"][k]).dataobj, dtype=np.float32) for k in ("t1", "pd"))
    bad = tmp_path / "inputs" / "t1_pd_stacked.nii.gz"
    bad.parent.mkdir()
    nib.save(nib.Nifti1Image(np.stack([t1, pd], -1), nib.load(data["test"]["t1"]).affine), str(bad))
    dl = write_datalist(tmp_path, test={**data["test"], "t1": str(bad)})
    _check_refused(data, tmp_path, partial(_infer, data, dl, tmp_path / "out"), InvalidInputError,
                   re.escape(bad.name), r"2 volumes/channels.*expected a 3D image \(1 channel\)")


@pytest.mark.parametrize("entry", ["inference_2to1", "evaluate_1to1", "train_2to1"])
def test_wrong_channels_missing_modality(data, tmp_path, entry):
    """A case without a modality the task needs (2 -> 1 needs T1 and PD; evaluation needs the target too),
    found before the complete case listed first is processed."""
    if entry == "inference_2to1":
        item = {**{k: v for k, v in data["test"].items() if k != "pd"}, "id": "second"}
        dl = write_datalist(tmp_path, test=[data["test"], item])
        run = partial(_infer, data, dl, tmp_path / "out", "2to1")
        missing, split = "pd", "test"
    elif entry == "evaluate_1to1":
        item = {**{k: v for k, v in data["test"].items() if k != "t2"}, "id": "second"}
        dl = write_datalist(tmp_path, test=[data["test"], item])
        run = partial(_evaluate, data, dl, tmp_path / "out")
        missing, split = "t2", "test"
    else:
        item = {k: v for k, v in data["val"].items() if k != "pd"}
        dl = write_datalist(tmp_path, train=data["train"], val=[data["train"], item])
        run = partial(_train, dl, tmp_path / "out", tmp_path / "models", "2to1")
        missing, split = "pd", "validation"
    _check_refused(data, tmp_path, run, InvalidInputError, rf"case '{item['id']}'", f"'{split}' list",
                   re.escape(dl), f"has no '{missing}' image", r"needs \[")


@pytest.mark.parametrize("entry", ["inference", "train"])
def test_unknown_modality(data, tmp_path, entry):
    """A modality name the datalist does not have (here a capitalised 'T1') is named with the config key and the
    modalities that exist."""
    if entry == "inference":
        dl = write_datalist(tmp_path, test=data["test"])
        run = partial(_infer, data, dl, tmp_path / "out", **{"task#inputs": ["T1"]})
        key, split = "task#inputs", "test"
    else:
        dl = write_datalist(tmp_path, train=data["train"], val=data["val"])
        run = partial(_train, dl, tmp_path / "out", tmp_path / "models", **{"task#targets": ["T2"]})
        key, split = "task#targets", "training"
    _check_refused(data, tmp_path, run, InvalidInputError, r"modality 'T[12]'", "unknown modality name", re.escape(key),
                   f"'{split}' list", r"expected one of .*pd, t1, t2")


# ------------------------------------------------------------------------------------------ intensities, geometry


def _pred(out: Path, name: str) -> nib.Nifti1Image:
    files = sorted(out.glob(f"*_{name}.nii.gz"))
    assert len(files) == 1, files
    return nib.load(str(files[0]))


def test_extreme_mr_intensity_gives_the_unscaled_output(data, tmp_path):
    """MR is normalised per volume by percentiles: values x 1e7 (raw scanner units, a wrong scale slope) give the
    same output as the original."""
    dl_good = write_datalist(tmp_path, test=data["test"], name="good.json")
    _infer(data, dl_good, tmp_path / "good")
    item, _ = _bad_input(data, tmp_path, "extreme_intensity", "t1")
    peak = [np.abs(np.asarray(nib.load(f).dataobj)).max() for f in (data["test"]["t1"], item["t1"])]
    assert peak[1] >= 1e6 * peak[0]
    _infer(data, write_datalist(tmp_path, test=item, name="scaled.json"), tmp_path / "scaled")
    good, scaled = _pred(tmp_path / "good", "1to1"), _pred(tmp_path / "scaled", "1to1")
    assert good.get_fdata().std() > 0
    np.testing.assert_allclose(scaled.get_fdata(), good.get_fdata(), atol=1e-4)
    np.testing.assert_allclose(scaled.affine, good.affine)


def test_extreme_ct_intensity_refused(data, tmp_path):
    """CT is expected in HU (window [-1000, 2000]): values beyond ct_max_abs are a wrong scaling, refused."""
    item, bad = _bad_input(data, tmp_path, "extreme_intensity", "ct", case="fusion")
    dl = write_datalist(tmp_path, test=item)
    _check_refused(data, tmp_path, partial(_infer, data, dl, tmp_path / "out", "fusion"), InvalidInputError,
                   re.escape(bad.name), r"'ct'", r"\|value\| > 100000", "expected intensities within that bound")


@pytest.mark.parametrize("direction", ["forward", "both"])
def test_oblique_anisotropic_input_works_in_input_geometry(data, tmp_path, direction):
    item, bad = _bad_input(data, tmp_path, "oblique_anisotropic", "t1")
    ref = nib.load(str(bad))
    assert not np.allclose(ref.affine[:3, :3], np.diag(np.diag(ref.affine[:3, :3])))  # oblique
    _infer(data, write_datalist(tmp_path, test=item), tmp_path / "out", direction=direction)
    names = ["1to1"] + (["rev_t1"] if direction == "both" else [])
    for name in names:
        pred = _pred(tmp_path / "out", name)
        assert pred.shape == ref.shape
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
        p = pred.get_fdata()
        assert np.isfinite(p).all() and p.std() > 0


def test_too_small_volume_inference_works_in_input_geometry(data, tmp_path):
    """The network is fully convolutional without down-sampling: an 8^3 volume needs no padding."""
    item, bad = _bad_input(data, tmp_path, "too_small", "t1")
    ref = nib.load(str(bad))
    assert ref.shape == (8, 8, 8)
    _infer(data, write_datalist(tmp_path, test=item), tmp_path / "out")
    pred = _pred(tmp_path / "out", "1to1")
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)


def test_too_small_volume_refused_by_evaluation(data, tmp_path):
    """Per-slice SSIM needs 7 x 7 voxels per slice: a 6^3 volume is refused before any metric file is written."""
    item, bad = _bad_input(data, tmp_path, "too_small", "t1", size=6)
    dl = write_datalist(tmp_path, test=item)
    run = partial(_evaluate, data, dl, tmp_path / "out")
    _check_refused(data, tmp_path, run, InvalidInputError, re.escape(bad.name), r"slices of 6x6 voxels",
                   r"at least 7x7")


@pytest.mark.parametrize("task", ["1to1", "2to1"])
def test_two_d_source_works_as_a_single_slice(data, tmp_path, task):
    """The network is 2D: a 2D NIfTI source (the middle axial slice) gives a 2D output in the slice's geometry; with 2 -> 1 the second source (a volume) is resampled onto that slice."""
    item, bad = _bad_input(data, tmp_path, "two_d", "t1")
    assert nib.load(str(bad)).ndim == 2
    _infer(data, write_datalist(tmp_path, test=item), tmp_path / "out", task)
    pred = _pred(tmp_path / "out", task)
    assert pred.shape == nib.load(str(bad)).shape  # a 2D NIfTI in, a 2D NIfTI out
    np.testing.assert_allclose(pred.affine, nib.load(str(bad)).affine, atol=1e-5)
    p = pred.get_fdata()
    assert np.isfinite(p).all() and p.std() > 0


@pytest.mark.parametrize("kind", HELD_OUT_KINDS)
def test_held_out_source_works_in_input_geometry(data, tmp_path, kind):
    """NRRD, a DICOM series folder, one slice (the network is 2D) and 7 mm slices as the T1 source of 1 -> 1, forward
    and reverse: outputs in the source's own grid."""
    item = dict(data["test"])
    src = make_held_out_input(kind, item["t1"], tmp_path / "inputs" / "case_t1.nii.gz")
    item["t1"] = str(src)
    _infer(data, write_datalist(tmp_path, test=item), tmp_path / "out", direction="both")
    for name in ("1to1", "rev_t1"):
        p = assert_in_input_geometry(_pred(tmp_path / "out", name).get_filename(), src).astype(np.float32)
        assert np.isfinite(p).all() and p.std() > 0


def test_two_sources_in_two_held_out_formats(data, tmp_path):
    """2 -> 1 with the T1 as a DICOM series and the PD as NRRD: the PD is resampled onto the T1's grid, the output
    lies on that grid."""
    item = dict(data["test"])
    item["t1"] = str(make_held_out_input("dicom_series", item["t1"], tmp_path / "inputs" / "case_t1"))
    item["pd"] = str(make_held_out_input("nrrd", item["pd"], tmp_path / "inputs" / "case_pd.nii.gz"))
    _infer(data, write_datalist(tmp_path, test=item), tmp_path / "out", "2to1")
    p = assert_in_input_geometry(_pred(tmp_path / "out", "2to1").get_filename(), item["t1"]).astype(np.float32)
    assert np.isfinite(p).all() and p.std() > 0


@pytest.mark.parametrize("entry", ["inference_fusion", "inference_2to1", "train_fusion"])
def test_no_overlap_refused(data, tmp_path, entry):
    """Sources that do not overlap in physical space (the CT-like image, or PD, moved 1.5 fields of view away) are
    refused before resampling would fill the grid with edge values; nothing is written."""
    if entry == "inference_2to1":
        item, bad = _bad_input(data, tmp_path, "no_overlap", "pd")
        run = partial(_infer, data, write_datalist(tmp_path, test=item), tmp_path / "out", "2to1")
        key, ref = "pd", "t1"
    elif entry == "inference_fusion":
        item, bad = _bad_input(data, tmp_path, "no_overlap", "ct", case="fusion")
        run = partial(_infer, data, write_datalist(tmp_path, test=item), tmp_path / "out", "fusion")
        key, ref = "ct", "t2"
    else:
        item, bad = _bad_input(data, tmp_path, "no_overlap", "ct", case="fusion")
        dl = write_datalist(tmp_path, train=item, val=data["fusion"])
        run = partial(_train, dl, tmp_path / "out", tmp_path / "models", "fusion")
        key, ref = "ct", "t2"
    _check_refused(data, tmp_path, run, InvalidInputError, re.escape(bad.name), rf"\(key '{key}'\) covers 0\.0 %",
                   rf"key '{ref}'", r"at least 50 % \('min_overlap'\)", "not co-registered")


def test_partial_overlap_above_the_threshold_works(data, tmp_path):
    """A CT-like image moved by a quarter of the field of view still covers 75 % of the T2: fused, in T2 geometry."""
    item, bad = _bad_input(data, tmp_path, "no_overlap", "ct", case="fusion", shift=0.25)
    _infer(data, write_datalist(tmp_path, test=item), tmp_path / "out", "fusion")
    pred = _pred(tmp_path / "out", "fusion")
    ref = nib.load(data["fusion"]["t2"])
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)


# ------------------------------------------------------------------------------------------ checkpoints


def _ckpt_case(data, kind: str) -> tuple[Path, type, list[str], dict]:
    """(checkpoint folder, error, patterns, overrides) for one checkpoint kind."""
    if kind == "foreign_checkpoint":
        return data["other"], CheckpointError, [r"diffseg\.pt", r"does not fit IVAN", "missing keys"], \
            {"ckpt_path": str(data["other"] / "diffseg.pt")}
    if kind == "mismatched_checkpoint":
        return data["other"], CheckpointError, [r"ivan_c4\.pt", r"shape mismatches.*\(4, 4\) in file vs \(2, 2\)"], \
            {"ckpt_path": str(data["other"] / "ivan_c4.pt")}
    return data["ckpt_dir"], HashMismatchError, [r"model\.pt", "has sha256 [0-9a-f]{64}, expected 0{64}"], \
        {"ckpt_sha256": "0" * 64}


@pytest.mark.parametrize("kind", ["foreign_checkpoint", "mismatched_checkpoint", "hash_mismatch"])
@pytest.mark.parametrize("entry", ["inference", "evaluate"])
def test_bad_checkpoint_refused(data, tmp_path, kind, entry):
    _, exc, patterns, overrides = _ckpt_case(data, kind)
    dl = write_datalist(tmp_path, test=data["test"])
    run = partial(_evaluate if entry == "evaluate" else _infer, data, dl, tmp_path / "out", **overrides)
    _check_refused(data, tmp_path, run, exc, *patterns)


@pytest.mark.parametrize("kind", ["foreign_checkpoint", "mismatched_checkpoint", "hash_mismatch"])
def test_bad_resume_checkpoint_refused(data, tmp_path, kind):
    """resume: true with an unusable checkpoint stops before the trainer (and its log files) exists; the
    checkpoint folder is left as it was."""
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    src = {"foreign_checkpoint": data["other"] / "diffseg.pt", "mismatched_checkpoint": data["other"] / "ivan_c4.pt",
           "hash_mismatch": data["ckpt_dir"] / "model.pt"}[kind]
    (ckpt_dir / "checkpoint_epoch=2.pt").write_bytes(src.read_bytes())
    if kind == "foreign_checkpoint":  # another bundle's checkpoint has no optimiser/trainer entries
        exc, patterns = CheckpointError, [r"checkpoint_epoch=2\.pt", r"resume_ckpt", r"no entries \['optimizer'"]
    elif kind == "mismatched_checkpoint":  # a training checkpoint of another configuration
        ckpt = torch.load(src, weights_only=True)
        torch.save({**ckpt, "optimizer": {}, "lr_scheduler": {}, "trainer": {}}, ckpt_dir / "checkpoint_epoch=2.pt")
        exc, patterns = CheckpointError, [r"checkpoint_epoch=2\.pt", r"shape mismatches"]
    else:
        exc, patterns = HashMismatchError, [r"checkpoint_epoch=2\.pt", "expected f{64}"]
    dl = write_datalist(tmp_path, train=data["train"], val=data["val"])
    run = partial(_train, dl, tmp_path / "out", ckpt_dir, resume=True,
                  resume_ckpt_sha256="f" * 64 if kind == "hash_mismatch" else None)
    _check_refused(data, tmp_path, run, exc, *patterns)


@pytest.mark.parametrize("entry", ["inference", "evaluate", "resume"])
def test_wrong_task_checkpoint_refused(data, tmp_path, entry):
    """A T1 -> T2 synthesis checkpoint (same shapes: C = 2) loaded into the fusion task: one error naming both tasks,
    before any weight is loaded."""
    src = data["other"] / "ivan_1to1.pt"
    patterns = [r"ivan_1to1\.pt|checkpoint_epoch=2\.pt", r"trained for task '1to1' \(t1 -> t2",
                r"this run is task 'fusion' \(t2 \+ ct -> fused", "channel roles differ"]
    if entry == "resume":
        ckpt_dir = tmp_path / "models"
        ckpt_dir.mkdir()
        state = torch.load(src, weights_only=True)
        torch.save({**state, "optimizer": {}, "lr_scheduler": {}, "trainer": {}}, ckpt_dir / "checkpoint_epoch=2.pt")
        dl = write_datalist(tmp_path, train=data["fusion"], val=data["fusion"])
        run = partial(_train, dl, tmp_path / "out", ckpt_dir, "fusion", resume=True)
    else:
        dl = write_datalist(tmp_path, test=data["fusion"])
        run = partial(_evaluate if entry == "evaluate" else _infer, data, dl, tmp_path / "out", "fusion",
                      ckpt_path=str(src))
    _check_refused(data, tmp_path, run, CheckpointError, *patterns)


# ------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("entry", ["inference", "evaluate", "train_output_dir", "train_ckpt_dir"])
def test_unwritable_output_refused_up_front(data, tmp_path, entry):
    bad = make_unwritable_dir(tmp_path / "blocked")
    dl = write_datalist(tmp_path, test=data["test"], train=data["train"], val=data["val"])
    run, key = {
        "inference": (partial(_infer, data, dl, bad), "output_dir"),
        "evaluate": (partial(_evaluate, data, dl, bad), "output_dir"),
        "train_output_dir": (partial(_train, dl, bad, tmp_path / "models"), "output_dir"),
        "train_ckpt_dir": (partial(_train, dl, tmp_path / "out", bad), "ckpt_dir"),
    }[entry]
    _check_refused(data, tmp_path, run, OutputNotWritableError, re.escape(str(bad)), rf"\(config key '{key}'\)", "cannot be written")


def test_existing_inference_output_kept_unless_overwrite(data, tmp_path):
    """1 -> 2 writes two files per case: with only the second one present, neither is written (all or none)."""
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "avg152_1to2_pd.nii.gz"
    existing.write_bytes(b"an earlier result")
    dl = write_datalist(tmp_path, test=data["test"])
    _check_refused(data, tmp_path, partial(_infer, data, dl, out, "1to2"), OutputExistsError,
                   re.escape(existing.name), "already exists", "'overwrite'")
    assert existing.read_bytes() == b"an earlier result"
    _infer(data, dl, out, "1to2", overwrite=True)
    for m in ("t2", "pd"):
        assert nib.load(str(out / f"avg152_1to2_{m}.nii.gz")).shape == (40, 48, 12)


def test_existing_metric_file_refused(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("metric,level,mean\n")
    dl = write_datalist(tmp_path, test=data["test"])
    run = partial(_evaluate, data, dl, out)
    _check_refused(data, tmp_path, run, OutputExistsError, r"summary\.csv", "already exists", "'overwrite'")


def test_existing_checkpoints_refused_unless_resume_or_overwrite(data, tmp_path):
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    (ckpt_dir / "model.pt").write_bytes((data["ckpt_dir"] / "model.pt").read_bytes())
    dl = write_datalist(tmp_path, train=data["train"], val=data["val"])
    run = partial(_train, dl, tmp_path / "out", ckpt_dir)
    _check_refused(data, tmp_path, run, OutputExistsError, re.escape(str(ckpt_dir)), r"model\.pt", r"\(config key 'ckpt_dir'\)",
                   "'resume'", "'overwrite'")


# ------------------------------------------------------------------------------------------ command line


def test_cli_missing_source_one_error_line(data, tmp_path):
    item, bad = _bad_input(data, tmp_path, "missing_file", "t1")
    dl = write_datalist(tmp_path, test=item)
    roots = (tmp_path, data["root"])
    before = snapshot(*roots)
    res = run_bundle_cli(BUNDLE, ["inference.json", "task_1to1.json", "tiny.json"], datalist=dl,
                         output_dir=str(tmp_path / "out"), ckpt_dir=str(data["ckpt_dir"]))
    assert res.returncode != 0
    tail = "\n".join(res.stderr.strip().splitlines()[-3:])
    assert "ERROR: InputNotFoundError:" in tail and bad.name in tail and "does not exist" in tail, res.stderr[-2000:]
    assert_quiet_streams(res.stdout, res.stderr, "InputNotFoundError:")  # nothing else on either stream
    assert_nothing_written(before, *roots)
    assert not (tmp_path / "out").exists()  # the output folder this refused run created is gone
