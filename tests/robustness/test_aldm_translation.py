"""Bad input and faults for the aldm_translation bundle (issue #9).

Every bad input is made from the real held-out case of the brain demo cohort (the SPM avg152
T1/T2/PD templates) and fed to the bundle's configs in-process on the tiny configuration:
inference (one source file, ``input_image``), evaluation (a datalist with a ``test`` split) and
training (stages 1 and 2). Each failing case asserts the user error class, that its message names
the file or config key and what was expected, and that nothing was written to the output and
checkpoint folders. The cases that must work (oblique/anisotropic affine, a volume smaller than the
network's grid, extreme intensities) assert an output in the input's geometry.

Extreme intensities: the bundle scales every input by its 0 and 99.5 percentiles, so MR intensities
in any unit are valid; a volume multiplied by 1e7 must give the same translation as the original.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from faults import (HELD_OUT_KINDS, CheckpointError, HashMismatchError, InputNotFoundError, InvalidInputError,
                    OutputExistsError, OutputNotWritableError, assert_in_input_geometry, assert_nothing_written,
                    expect_user_error, forget_bundle, kinds_tried, make_bad_nifti, make_held_out_input,
                    make_unwritable_dir, snapshot)

from conftest import assert_quiet_streams

BUNDLE = "aldm_translation"
REPO = Path(__file__).resolve().parents[2]
BUNDLE_DIR = REPO / "bundles" / BUNDLE
INFER = ["inference.json", "tiny.json"]
EVAL = ["evaluate.json", "tiny.json"]

#: the bad-input kinds tried on this bundle (the DWI, b-value and label kinds do not apply: the
#: bundle translates single-contrast 3D MR volumes and reads no labels)
KINDS = kinds_tried("three_d_dwi", "bval_bvec_mismatch", "labels_outside_set", "no_overlap", "wrong_task_checkpoint")

# ------------------------------------------------------------------------------ fixtures

_RUN = {}


@pytest.fixture(scope="module", autouse=True)
def _runners(bundle_runner):
    """``run_bundle`` / ``run_bundle_cli`` of the suite's conftest."""
    _RUN["in_process"], _RUN["cli"] = bundle_runner
    yield


def run_bundle(*args, **kwargs):
    return _RUN["in_process"](*args, **kwargs)


def run_bundle_cli(*args, **kwargs):
    return _RUN["cli"](*args, **kwargs)


@pytest.fixture(scope="module")
def case(brain_demo) -> dict:
    """The real test case of the demo cohort: ``{"id", "t1", "t2", "pd", "mask"}`` absolute paths."""
    entry = json.loads(brain_demo.read_text())["test"][0]
    return {k: (v if k == "id" else str(brain_demo.parent / v)) for k, v in entry.items()}


@pytest.fixture(scope="module")
def train_case(brain_demo) -> dict:
    entry = json.loads(brain_demo.read_text())["training"][0]
    return {k: (v if k == "id" else str(brain_demo.parent / v)) for k, v in entry.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """Tiny checkpoints of the three stages (fresh weights), laid out as training writes them, plus
    a foreign one (another bundle's ``{"model": ...}``) and one of another configuration."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import BasicUNet

    root = tmp_path_factory.mktemp("aldm_ckpt")
    models = root / "models"
    models.mkdir()
    forget_bundle(BUNDLE_DIR)
    sys.path.insert(0, str(BUNDLE_DIR))
    try:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE_DIR / "configs" / c) for c in INFER])
        parser.update({"bundle_root": str(BUNDLE_DIR), "device": "$torch.device('cpu')"})
        torch.manual_seed(0)
        net = parser.get_parsed_content("network")
        ema = parser.get_parsed_content("diffusion_model")
        torch.save({"autoencoder": net.autoencoder.state_dict()}, models / "autoencoder.pt")
        torch.save({"spade": net.spade.state_dict()}, models / "spade.pt")
        torch.save({"ema": ema.state_dict(), "step": {"scale_factor": torch.tensor(1.0)}}, models / "diffusion.pt")
        # the same generator built with the 'light'-like width of 16: other shapes
        parser["spade_nf"] = 16
        parser["spade_hidden"] = 16
        other = parser.get_parsed_content("spade_def", lazy=False)
    finally:
        forget_bundle(BUNDLE_DIR)
    torch.save({"spade": other.state_dict()}, root / "spade_nf16.pt")
    foreign = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    torch.save({"model": foreign.state_dict()}, root / "checkpoint.pt")
    return {"dir": models, "mismatched": root / "spade_nf16.pt", "foreign": root / "checkpoint.pt"}


def _infer(ckpts, out, **overrides) -> None:
    kw = {"ckpt_dir": str(ckpts["dir"]), "output_dir": str(out), "dataset_dir": str(Path(out).parent), "progress": False}
    run_bundle(BUNDLE, INFER, **{**kw, **overrides})


def _outputs(out: Path, stem: str, targets=("t2", "pd")) -> list[Path]:
    return [out / f"{stem}_t12{t}.nii.gz" for t in targets]


@pytest.fixture(scope="module")
def baseline(case, ckpts, tmp_path_factory) -> dict:
    """Translation of the untouched T1 into T2 and PD (the reference of the cases that must work)."""
    out = tmp_path_factory.mktemp("aldm_base") / "out"
    _infer(ckpts, out, input_image=case["t1"])
    stem = Path(case["t1"]).name.split(".")[0]
    return {t: nib.load(p).get_fdata(dtype=np.float32) for t, p in zip(("t2", "pd"), _outputs(out, stem))}


def _assert_in_input_geometry(src: Path, out: Path, stem: str) -> list[np.ndarray]:
    img = nib.load(src)
    files = _outputs(out, stem)
    assert sorted(out.iterdir()) == sorted(files), sorted(out.iterdir())
    arrays = []
    for f in files:
        o = nib.load(f)
        assert o.shape == img.shape, (o.shape, img.shape)
        np.testing.assert_allclose(o.affine, img.affine, atol=1e-5)
        data = o.get_fdata(dtype=np.float32)
        assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0 and data.max() > 0.0
        arrays.append(data)
    return arrays


# ------------------------------------------------------------------------------ inference: bad files

FILE_KINDS = {
    # kind: (error class, regexes beyond the file name)
    "missing_file": (InputNotFoundError, [r"does not exist", r"input_image"]),
    "truncated_gzip": (InvalidInputError, [r"truncated gzip"]),
    "corrupt_header": (InvalidInputError, [r"corrupt NIfTI header", r"expected 348"]),
    "two_d": (InvalidInputError, [r"2D image", r"expected a 3D image"]),
    "four_d": (InvalidInputError, [r"3 volumes/channels", r"expected a 3D image \(1 channel\)"]),
    "nan": (InvalidInputError, [r"64 NaN", r"expected finite values"]),
    "inf": (InvalidInputError, [r"1 Inf", r"expected finite values"]),
    "all_zero": (InvalidInputError, [r"all-zero", r"expected an image with contrast"]),
}


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_inference_refuses_bad_source_file(kind, case, ckpts, tmp_path):
    bad = make_bad_nifti(kind, case["t1"], tmp_path / f"{kind}_t1.nii.gz")
    out = tmp_path / "out"
    before = snapshot(tmp_path, ckpts["dir"])
    exc_type, patterns = FILE_KINDS[kind]
    expect_user_error(lambda: _infer(ckpts, out, input_image=str(bad)), bad.name, *patterns, exc_type=exc_type)
    assert_nothing_written(before, tmp_path, ckpts["dir"])


def test_inference_refuses_a_two_channel_source(case, tmp_path, ckpts):
    """wrong_channels: T1 and T2 stacked in one file where one contrast is expected."""
    t1, t2 = nib.load(case["t1"]), nib.load(case["t2"])
    bad = tmp_path / "t1_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([t1.get_fdata(), t2.get_fdata()], -1).astype(np.float32), t1.affine), bad)
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(
        lambda: _infer(ckpts, tmp_path / "out", input_image=str(bad)),
        bad.name, r"2 volumes/channels", r"expected a 3D image \(1 channel\)", exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path, ckpts["dir"])


LAST_CASE_FAULTS = {
    "four_d": [r"3 volumes/channels", r"expected a 3D image \(1 channel\)"],
    "single_slice": [r"single slice .*along axis 2", r"expected a 3D volume"],
}


@pytest.mark.parametrize("last", list(LAST_CASE_FAULTS))
def test_multi_case_inference_refuses_a_bad_last_case_before_the_first_output(last, case, tmp_path, ckpts):
    """Two good cases and a 4D series or a single slice last: every case's header is checked before the first
    translation is written."""
    if last == "four_d":
        bad = make_bad_nifti("four_d", case["t1"], tmp_path / "last_t1.nii.gz")
    else:
        bad = make_held_out_input(last, case["t1"], tmp_path / "last_t1.nii.gz")
    goods = [shutil.copy(case["t1"], tmp_path / f"good{i}_t1.nii.gz") for i in range(2)]
    cases = [{"id": f"good{i}", "t1": str(g)} for i, g in enumerate(goods)] + [{"id": "last", "t1": str(bad)}]
    dl = tmp_path / "inference_datalist.json"
    dl.write_text(json.dumps({"testing": cases}))
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(
        lambda: _infer(ckpts, tmp_path / "out", datalist=str(dl), source="t1", targets=["t2"]),
        bad.name, *LAST_CASE_FAULTS[last], exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path, ckpts["dir"])  # in particular no translation of the good cases


@pytest.mark.parametrize("kind", [k for k in HELD_OUT_KINDS if k != "single_slice"])
def test_held_out_input_is_translated_in_the_input_geometry(kind, case, ckpts, tmp_path):
    """NRRD, a DICOM series folder and 7 mm slices: every translation in the input's own grid, named after the
    file or folder."""
    src = make_held_out_input(kind, case["t1"], tmp_path / "in" / "case_t1.nii.gz")
    out = tmp_path / "out"
    _infer(ckpts, out, input_image=str(src))
    files = _outputs(out, "case_t1")
    assert sorted(out.iterdir()) == sorted(files), sorted(out.iterdir())
    for f in files:
        data = assert_in_input_geometry(f, src).astype(np.float32)
        assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0 and data.std() > 0


def test_single_slice_is_refused_as_not_a_volume(case, ckpts, tmp_path):
    """The 3D autoencoder has no context in one slice: refused before any output, naming the file and the axis."""
    src = make_held_out_input("single_slice", case["t1"], tmp_path / "in" / "case_t1.nii.gz")
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(lambda: _infer(ckpts, tmp_path / "out", input_image=str(src)), src.name,
                      r"single slice .*along axis 2", r"expected a 3D volume", exc_type=InvalidInputError)
    assert_nothing_written(before, tmp_path, ckpts["dir"])


def test_inference_refuses_a_datalist_entry_without_the_source_contrast(case, tmp_path, ckpts):
    """wrong_channels (missing modality): the case lists T2 and PD but T1 is the requested source."""
    dl = tmp_path / "inference_datalist.json"
    dl.write_text(json.dumps({"testing": [{"id": "avg152", "t2": case["t2"], "pd": case["pd"]}]}))
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(
        lambda: _infer(ckpts, tmp_path / "out", datalist=str(dl), source="t1", targets=["t2"]),
        dl.name, r"id 'avg152'", r"no source image", r"'t1' file", exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path, ckpts["dir"])


@pytest.mark.parametrize(
    "overrides, patterns",
    [
        ({"targets": ["t2", "T3"]}, [r"unknown modality 'T3'", r"config key 'targets'", r"expected one of \['t1', 't2', 'pd'\]"]),
        ({"source": "t1w"}, [r"unknown modality 't1w'", r"config key 'source'", r"expected one of"]),
        ({"targets": ["flair"]}, [r"unknown modality 'flair'", r"'targets'", r"trained on"]),  # not in the tiny model
    ],
    ids=["target", "source", "not_trained"],
)
def test_inference_refuses_unknown_modality(overrides, patterns, case, ckpts, tmp_path):
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(lambda: _infer(ckpts, tmp_path / "out", input_image=case["t1"], **overrides), *patterns, exc_type=InvalidInputError)
    assert_nothing_written(before, tmp_path, ckpts["dir"])


def test_inference_refuses_unknown_modality_in_a_datalist_entry(case, ckpts, tmp_path):
    dl = tmp_path / "inference_datalist.json"
    dl.write_text(json.dumps({"testing": [{"image": case["t1"], "source": "t1", "targets": ["t3"]}]}))
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(
        lambda: _infer(ckpts, tmp_path / "out", datalist=str(dl)),
        r"unknown modality 't3'", r"'targets' of entry 0", dl.name, exc_type=InvalidInputError,
    )
    assert_nothing_written(before, tmp_path, ckpts["dir"])


# ------------------------------------------------------------------------------ inference: must work


def test_inference_extreme_intensities_give_the_same_translation(case, ckpts, baseline, tmp_path):
    """Intensities x 1e7 (another scanner unit): percentile scaling makes it the same input."""
    src = make_bad_nifti("extreme_intensity", case["t1"], tmp_path / "extreme_t1.nii.gz")
    assert np.nanmax(nib.load(src).get_fdata()) > 1e6
    out = tmp_path / "out"
    _infer(ckpts, out, input_image=str(src))
    arrays = _assert_in_input_geometry(src, out, "extreme_t1")
    for tgt, got in zip(("t2", "pd"), arrays):
        np.testing.assert_allclose(got, baseline[tgt], atol=1e-4, err_msg=tgt)


def test_inference_oblique_anisotropic_input_keeps_its_geometry(case, ckpts, baseline, tmp_path):
    src = make_bad_nifti("oblique_anisotropic", case["t1"], tmp_path / "oblique_t1.nii.gz")
    out = tmp_path / "out"
    # modality names are case-insensitive: "T1" and "T2" are the model's t1 and t2
    _infer(ckpts, out, input_image=str(src), source="T1", targets="T2,pd")
    arrays = _assert_in_input_geometry(src, out, "oblique_t1")
    assert all(a.std() > 0 for a in arrays)


def test_inference_pads_a_volume_smaller_than_the_model_grid(case, ckpts, tmp_path):
    """12^3 voxels where the tiny model works on 32^3 (the paper model on 192x192x144): padded to
    the grid and cropped back, the output has the input's shape and affine."""
    src = make_bad_nifti("too_small", case["t1"], tmp_path / "small_t1.nii.gz", size=12)
    assert nib.load(src).shape == (12, 12, 12)
    out = tmp_path / "out"
    _infer(ckpts, out, input_image=str(src))
    _assert_in_input_geometry(src, out, "small_t1")


# ------------------------------------------------------------------------------ inference: checkpoints and outputs


@pytest.mark.parametrize("kind", ["foreign_checkpoint", "mismatched_checkpoint", "hash_mismatch"])
def test_inference_refuses_bad_checkpoint(kind, case, ckpts, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ckpts["dir"], models)
    overrides = {}
    if kind == "foreign_checkpoint":
        shutil.copy(ckpts["foreign"], models / "autoencoder.pt")
        exc, patterns = CheckpointError, [r"autoencoder\.pt", r"does not fit VQGAN", r"another bundle"]
    elif kind == "mismatched_checkpoint":
        shutil.copy(ckpts["mismatched"], models / "spade.pt")
        exc, patterns = CheckpointError, [r"spade\.pt", r"entry 'spade'", r"shape mismatches", r"another configuration"]
    else:
        overrides["diffusion_sha256"] = "0" * 64
        exc, patterns = HashMismatchError, [r"diffusion\.pt", r"expected 0{64}"]
    before = snapshot(tmp_path)
    expect_user_error(
        lambda: _infer({"dir": models}, tmp_path / "out", input_image=case["t1"], **overrides), *patterns, exc_type=exc
    )
    assert_nothing_written(before, tmp_path)


def test_inference_refuses_an_unwritable_output_folder(case, ckpts, tmp_path):
    out = make_unwritable_dir(tmp_path / "out")
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(
        lambda: _infer(ckpts, out, input_image=case["t1"]),
        r"output folder \(config key 'output_dir'\)", r"'.*out'", r"cannot be written", exc_type=OutputNotWritableError,
    )
    assert_nothing_written(before, tmp_path, ckpts["dir"])


def test_inference_keeps_an_existing_output_unless_overwrite(case, ckpts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stem = Path(case["t1"]).name.split(".")[0]
    old = out / f"{stem}_t12pd.nii.gz"
    old.write_bytes(b"an earlier result")
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(
        lambda: _infer(ckpts, out, input_image=case["t1"]),
        old.name, r"already exists", r"'overwrite'", exc_type=OutputExistsError,
    )
    assert_nothing_written(before, tmp_path, ckpts["dir"])  # the other target was not written either
    _infer(ckpts, out, input_image=case["t1"], overwrite=True)
    _assert_in_input_geometry(Path(case["t1"]), out, stem)


def test_cli_reports_one_error_and_exits_non_zero(case, ckpts, tmp_path):
    bad = make_bad_nifti("nan", case["t1"], tmp_path / "nan_t1.nii.gz")
    out = tmp_path / "out"
    before = snapshot(tmp_path, ckpts["dir"])
    proc = run_bundle_cli(
        BUNDLE, INFER, input_image=str(bad), ckpt_dir=str(ckpts["dir"]), output_dir=str(out), dataset_dir=str(tmp_path), progress=False
    )
    assert proc.returncode != 0
    tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
    assert "ERROR: InvalidInputError:" in tail and bad.name in tail and "NaN" in tail, proc.stderr[-3000:]
    assert_quiet_streams(proc.stdout, proc.stderr, "InvalidInputError:")  # nothing else on either stream
    assert_nothing_written(before, tmp_path, ckpts["dir"])
    assert not out.exists()  # the output folder this refused run created is gone


# ------------------------------------------------------------------------------ evaluation


def _evaluate(ckpts, datalist: Path, out: Path, **overrides) -> None:
    kw = {"ckpt_dir": str(ckpts["dir"]), "output_dir": str(out), "dataset_dir": str(datalist.parent), "datalist": str(datalist)}
    run_bundle(BUNDLE, EVAL, **{**kw, **overrides})


@pytest.mark.parametrize("kind", ["missing_file", "nan", "wrong_channels"])
def test_evaluation_refuses_a_bad_test_case(kind, case, ckpts, tmp_path):
    """A bad target file (missing, NaN) or a case with a single contrast: one error, no metrics file
    and no montage, although the first directions were evaluated."""
    entry = {"id": "avg152", "t1": case["t1"], "t2": case["t2"], "pd": case["pd"], "mask": case["mask"]}
    if kind == "wrong_channels":
        entry = {"id": "avg152", "t1": case["t1"], "mask": case["mask"]}
        exc, patterns = InvalidInputError, [r"id 'avg152'", r"\['t1'\] of the modalities", r"expected at least two"]
    else:
        entry["pd"] = str(make_bad_nifti(kind, case["pd"], tmp_path / f"{kind}_pd.nii.gz"))
        exc, patterns = (InputNotFoundError, [r"does not exist"]) if kind == "missing_file" else (InvalidInputError, [r"NaN"])
        patterns.append(Path(entry["pd"]).name)
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"test": [entry]}))
    out = tmp_path / "metrics"
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(lambda: _evaluate(ckpts, dl, out, mode="spade_only"), *patterns, exc_type=exc)
    assert_nothing_written(before, tmp_path, ckpts["dir"])


@pytest.mark.parametrize("kind", ["existing_output", "unwritable_output", "hash_mismatch"])
def test_evaluation_refuses_bad_outputs_and_checkpoints(kind, case, ckpts, tmp_path):
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"test": [{"id": "avg152", "t1": case["t1"], "t2": case["t2"]}]}))
    out, overrides = tmp_path / "metrics", {}
    if kind == "existing_output":
        out.mkdir()
        (out / "summary.json").write_text("{}")
        exc, patterns = OutputExistsError, [r"summary\.json", r"already exists", r"'overwrite'"]
    elif kind == "unwritable_output":
        make_unwritable_dir(out)
        exc, patterns = OutputNotWritableError, [r"metrics'", r"config key 'output_dir'"]
    else:
        overrides["autoencoder_sha256"] = "f" * 64
        exc, patterns = HashMismatchError, [r"autoencoder\.pt", r"expected f{64}"]
    before = snapshot(tmp_path, ckpts["dir"])
    expect_user_error(lambda: _evaluate(ckpts, dl, out, mode="spade_only", **overrides), *patterns, exc_type=exc)
    assert_nothing_written(before, tmp_path, ckpts["dir"])


# ------------------------------------------------------------------------------ training

LOGS = [r"events\.out\.tfevents"]  # TensorBoard opens its event file when the trainer is built


def _train(config: str, datalist: Path, models: Path, **overrides) -> None:
    kw = {"dataset_dir": str(datalist.parent), "datalist": str(datalist), "ckpt_dir": str(models),
          "output_dir": str(datalist.parent / "runs")}
    run_bundle(BUNDLE, [config, "tiny.json"], **{**kw, **overrides})


def _training_list(tmp_path: Path, entry: dict) -> Path:
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [entry]}))
    return dl


@pytest.mark.parametrize("kind", ["wrong_channels", "missing_file", "nan", "all_zero"])
def test_training_refuses_a_bad_case(kind, train_case, tmp_path):
    """Stage 1 on one case with a missing modality or a bad PD file: no checkpoint is written."""
    entry = {k: train_case[k] for k in ("id", "t1", "t2", "pd")}
    if kind == "wrong_channels":
        del entry["pd"]
        exc, patterns = InvalidInputError, [r"id 'sim_000'", r"no \['pd'\] image", r"missing modality", r"'modalities'"]
    else:
        entry["pd"] = str(make_bad_nifti(kind, train_case["pd"], tmp_path / f"{kind}_pd.nii.gz"))
        exc = InputNotFoundError if kind == "missing_file" else InvalidInputError
        patterns = [Path(entry["pd"]).name, {"missing_file": "does not exist", "nan": "NaN", "all_zero": "all-zero"}[kind]]
    dl = _training_list(tmp_path, entry)
    models = tmp_path / "models"
    before = snapshot(tmp_path)
    expect_user_error(lambda: _train("train_autoencoder.json", dl, models), *patterns, exc_type=exc)
    assert_nothing_written(before, tmp_path, allow=LOGS)


@pytest.mark.parametrize("kind", ["foreign_checkpoint", "mismatched_checkpoint", "hash_mismatch", "existing_output", "unwritable_output"])
def test_training_refuses_bad_checkpoints_and_outputs(kind, train_case, ckpts, tmp_path):
    """Stage 2 (SPADE) loads the stage-1 autoencoder; stage 3 the autoencoder and SPADE."""
    dl = _training_list(tmp_path, {k: train_case[k] for k in ("id", "t1", "t2", "pd")})
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(ckpts["dir"] / "autoencoder.pt", models)  # the output of stage 1
    config, overrides = "train_spade.json", {}
    if kind == "foreign_checkpoint":
        overrides["autoencoder_ckpt"] = str(ckpts["dir"] / "spade.pt")  # another stage's checkpoint
        exc, patterns = CheckpointError, [r"spade\.pt", r"no entry 'autoencoder'", r"another training stage"]
    elif kind == "mismatched_checkpoint":
        config, overrides["spade_ckpt"] = "train_diffusion.json", str(ckpts["mismatched"])
        exc, patterns = CheckpointError, [r"spade_nf16\.pt", r"shape mismatches"]
    elif kind == "hash_mismatch":
        overrides["autoencoder_sha256"] = "1" * 64
        exc, patterns = HashMismatchError, [r"autoencoder\.pt", r"expected 1{64}"]
    elif kind == "existing_output":  # spade.pt of an earlier run, no 'resume'
        shutil.copy(ckpts["dir"] / "spade.pt", models)
        exc, patterns = OutputExistsError, [r"spade\.pt", r"already exists", r"'resume'", r"'overwrite'"]
    else:
        overrides["autoencoder_ckpt"] = str(models / "autoencoder.pt")
        models = make_unwritable_dir(tmp_path / "no_models")
        exc, patterns = OutputNotWritableError, [r"no_models", r"config key 'ckpt_dir'"]
    before = snapshot(tmp_path)
    expect_user_error(lambda: _train(config, dl, models, **overrides), *patterns, exc_type=exc)
    assert_nothing_written(before, tmp_path)
