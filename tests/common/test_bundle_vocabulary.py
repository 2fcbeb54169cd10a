"""common.bundle: the datalist, case-name, output and checkpoint policy every bundle uses."""

from __future__ import annotations

import json
import os

import pytest
import torch

from common.bundle import (
    case_name,
    check_checkpoint,
    check_outputs,
    check_run_mode,
    check_training_outputs,
    datalist_field,
    describe_case,
    file_stem,
    latest_checkpoint,
    load_datalist,
    planned_outputs,
    refuse_existing_checkpoints,
    require_cases,
    require_file,
)
from common.data.fetch import HashMismatchError, sha256sum
from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError
from common.utils.io import CheckpointError


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


# ------------------------------------------------------------------------------------------- datalists


def test_load_datalist_joins_every_path_even_missing_ones(tmp_path):
    dl = _write(tmp_path / "dl.json", {"training": [{"id": "s1", "image": "a/img.nii.gz", "bval": "a/b.bval",
                                                      "files": ["x.nii", "y.nii"], "age": 3}]})
    (item,) = load_datalist(dl, "training")
    assert item["id"] == "s1"  # never joined
    assert item["image"] == str(tmp_path / "a" / "img.nii.gz")
    assert item["bval"] == str(tmp_path / "a" / "b.bval")  # MONAI joins it only if the file exists
    assert item["files"] == [str(tmp_path / "x.nii"), str(tmp_path / "y.nii")]
    assert item["age"] == 3


def test_load_datalist_path_keys_base_dir_and_absolute_paths(tmp_path):
    dl = _write(tmp_path / "dl.json", {"testing": [{"image": "x.nii.gz", "source": "t1", "targets": ["t2"],
                                                     "label": "/abs/l.nii.gz"}]})
    (item,) = load_datalist(dl, "testing", base_dir=tmp_path / "data", path_keys=["image", "label"])
    assert item["image"] == str(tmp_path / "data" / "x.nii.gz")
    assert item["label"] == "/abs/l.nii.gz"
    assert item["source"] == "t1" and item["targets"] == ["t2"]


def test_load_datalist_decathlon_test_list_of_strings(tmp_path):
    dl = _write(tmp_path / "dl.json", {"test": ["imagesTs/a.nii.gz"]})
    assert load_datalist(dl, "test") == [{"image": str(tmp_path / "imagesTs" / "a.nii.gz")}]


def test_load_datalist_missing_file_is_empty_until_the_run_requires_it(tmp_path):
    missing = str(tmp_path / "nope.json")
    assert load_datalist(missing, "training") == []
    with pytest.raises(InputNotFoundError, match=r"nope\.json.*config key 'datalist'"):
        require_cases([], missing, "training")
    with pytest.raises(InputNotFoundError, match=r"nope\.json.*config key 'datalist'"):
        require_file(missing)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not a readable JSON"),
        ("[1, 2]", "holds a JSON list"),
        (json.dumps({"validation": []}), r"has no 'training' list \(its lists: \['validation'\]\)"),
        (json.dumps({"training": [{"image": "a"}, 3]}), "one object per case"),
        (json.dumps({"training": {"image": "a"}}), "one object per case"),
    ],
)
def test_load_datalist_refuses_what_is_not_a_datalist(tmp_path, content, match):
    path = tmp_path / "dl.json"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=match) as e:
        load_datalist(str(path), "training")
    assert str(path) in str(e.value)


def test_load_datalist_optional_list(tmp_path):
    dl = _write(tmp_path / "dl.json", {"training": []})
    assert load_datalist(dl, "validation", optional=True) == []
    with pytest.raises(InvalidInputError):
        load_datalist(dl, "validation")


def test_require_cases_names_an_empty_list(tmp_path):
    dl = _write(tmp_path / "dl.json", {"test": []})
    with pytest.raises(InvalidInputError, match=r"'test' list of datalist .* is empty.*build one"):
        require_cases(load_datalist(dl, "test"), dl, "test", hint="build one")
    assert require_cases([{"image": "a"}], dl, "test") == [{"image": "a"}]


def test_datalist_field(tmp_path):
    dl = _write(tmp_path / "dl.json", {"labels": {"1": "liver"}, "training": []})
    assert datalist_field(dl, "labels") == {"1": "liver"}
    assert datalist_field(dl, "name", "x") == "x"
    assert datalist_field(str(tmp_path / "missing.json"), "labels", {}) == {}


# ---------------------------------------------------------------------------------------------- cases


def test_case_names():
    assert file_stem("/d/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert file_stem("/d/a.b.nrrd") == "a.b"
    assert file_stem("/d/case7/image.nii.gz") == "case7"  # <case>/image.nii.gz layout
    assert case_name({"id": "/data/s3/", "image": "/x/y.nii.gz"}) == "s3"
    assert case_name({"image": "/x/y.nii.gz"}) == "y"
    assert case_name({"dwi": "/x/dwi_lr.nii.gz"}, 0, image_keys=("dwi",)) == "dwi_lr"
    assert case_name({"other": 1}, 4) == "case_004"
    assert case_name("/x/z.mha") == "z"
    assert describe_case({"id": "s1"}, 2) == "'s1' (#2)" and describe_case({}, 2) == "#2"


def test_case_name_of_a_loaded_image():
    from monai.data import MetaTensor

    img = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": "/d/c9/label.nii.gz"})
    assert case_name({"label": img, "image": None}, image_keys=("label", "image")) == "c9"


# -------------------------------------------------------------------------------------------- outputs


def test_planned_outputs_and_collisions(tmp_path):
    items = [{"id": "a", "image": "x.nii.gz"}, {"image": "/d/b.nii.gz"}]
    planned = planned_outputs(items, tmp_path, ["t2", "t1"])
    assert sorted(p.name for p in planned) == ["a_t1.nii.gz", "a_t2.nii.gz", "b_t1.nii.gz", "b_t2.nii.gz"]
    with pytest.raises(InvalidInputError, match=r"cases 'a' \(#0\) and 'a' \(#1\) would both write"):
        planned_outputs([{"id": "a"}, {"id": "a"}], tmp_path, ["seg"])


def test_check_outputs_refuses_existing_planned_and_pattern_files(tmp_path):
    out = tmp_path / "out"
    planned = planned_outputs([{"id": "a"}], out, ["seg"])
    assert check_outputs(out, False, planned).is_dir()  # created, nothing there yet
    next(iter(planned)).write_text("x")
    with pytest.raises(OutputExistsError, match=r"a_seg\.nii\.gz.*'overwrite'"):
        check_outputs(out, False, planned)
    check_outputs(out, True, planned)  # overwrite: allowed
    next(iter(planned)).unlink()
    (out / "sub").mkdir()
    (out / "sub" / "q_seg.nii.gz").write_text("x")  # found in a subfolder too
    with pytest.raises(OutputExistsError, match=r"sub/q_seg\.nii\.gz"):
        check_outputs(out, False, planned, patterns=["*_seg.nii.gz"])
    check_outputs(out, False, planned, patterns=["*.csv"])


# ---------------------------------------------------------------------------------------- checkpoints


def test_new_run_refuses_an_earlier_runs_checkpoints(tmp_path):
    ckpt = tmp_path / "models"
    check_training_outputs(ckpt, tmp_path / "logs", ["vqgan*.pt"])  # nothing there: fine, folders made
    assert ckpt.is_dir() and (tmp_path / "logs").is_dir()
    (ckpt / "encoder.pt").write_text("x")  # another stage's file is not this stage's
    check_training_outputs(ckpt, None, ["vqgan*.pt"])
    (ckpt / "vqgan_checkpoint_5.pt").write_text("x")
    with pytest.raises(OutputExistsError, match=r"vqgan_checkpoint_5\.pt' already exists.*'overwrite'.*'resume'.*'finetune'"):
        check_training_outputs(ckpt, None, ["vqgan*.pt"])
    for flags in ({"resume": True}, {"overwrite": True}, {"finetune": True}):
        check_training_outputs(ckpt, None, ["vqgan*.pt"], **flags)
    refuse_existing_checkpoints(tmp_path / "absent")


def test_resume_and_finetune_together_are_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="'resume' and 'finetune' are both true"):
        check_run_mode(resume=True, finetune=True)
    with pytest.raises(InvalidInputError, match="both true"):
        check_training_outputs(tmp_path, None, resume=True, finetune=True, overwrite=True)


def test_check_checkpoint(tmp_path):
    net = torch.nn.Linear(2, 3)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "optimizer": {}}, path)
    ckpt = check_checkpoint(path, sha256sum(path), entries=["model", "optimizer"], network=net, network_entry="model")
    assert set(ckpt) == {"model", "optimizer"}
    with pytest.raises(InputNotFoundError, match=r"missing\.pt.*config key 'finetune_ckpt'"):
        check_checkpoint(tmp_path / "missing.pt", key="finetune_ckpt")
    with pytest.raises(HashMismatchError, match=r"config key 'resume_ckpt_sha256'"):
        check_checkpoint(path, "0" * 64)
    with pytest.raises(CheckpointError, match=r"no entries \['trainer'\]"):
        check_checkpoint(path, entries=["model", "trainer"])
    with pytest.raises(CheckpointError, match="does not fit Linear"):
        check_checkpoint(path, network=torch.nn.Linear(2, 4), network_entry="model")
    plain = tmp_path / "model.pt"
    torch.save(net.state_dict(), plain)  # a plain state dict (shipped weights, models/model.pt)
    check_checkpoint(plain, network=net, network_entry="model", key="finetune_ckpt")


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path, "model.pt") == os.path.join(tmp_path, "model.pt")
    for n in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={n}.pt").write_text("x")
    assert latest_checkpoint(tmp_path, "model.pt").endswith("checkpoint_epoch=10.pt")
    (tmp_path / "vqgan_checkpoint_3.pt").write_text("x")
    assert latest_checkpoint(tmp_path, "vqgan.pt", "vqgan_checkpoint_*.pt").endswith("vqgan_checkpoint_3.pt")
