"""The dataset builders meet a wrong folder the same way the bundles do: one clear error naming the
file, nothing written, an existing datalist kept unless ``overwrite``.

Real layouts are built from the real demo images (the folder structure of each public dataset, with
real NIfTI files in it); see also tests/common/test_datalists.py for BraTS and IXI.
"""

from __future__ import annotations

import json
import shutil

import pytest

from common.data.hcp_datalist import build_hcp_datalist
from common.data.seg_datalists import build_amos_datalist, build_msd_datalist
from common.utils.errors import InputNotFoundError, InvalidInputError, OutputExistsError
from faults import assert_nothing_written, expect_user_error, snapshot

KINDS = ("missing_file", "existing_output", "wrong_layout")


@pytest.fixture()
def msd_task(tmp_path, ct_demo):
    """A Decathlon task folder holding two real CT/label pairs of the demo cohort."""
    task = tmp_path / "Task09_Spleen"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    entries = []
    cases = sorted(p for p in ct_demo.parent.iterdir() if p.is_dir() and p.name.startswith("ct_"))[:2]
    for i, case in enumerate(cases):
        shutil.copy(case / "image.nii.gz", task / "imagesTr" / f"spleen_{i}.nii.gz")
        shutil.copy(case / "label.nii.gz", task / "labelsTr" / f"spleen_{i}.nii.gz")
        entries.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    meta = {"name": "Spleen", "labels": {"0": "background", "1": "spleen"}, "modality": {"0": "CT"}, "training": entries, "test": []}
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def test_msd_missing_folder_and_files(tmp_path, msd_task):
    expect_user_error(lambda: build_msd_datalist(tmp_path / "Task99_Absent"), r"Task99_Absent' does not exist", exc_type=InputNotFoundError)
    (msd_task / "imagesTr" / "spleen_1.nii.gz").unlink()
    before = snapshot(msd_task)
    expect_user_error(lambda: build_msd_datalist(msd_task), r"1 files listed in .*dataset.json' do not exist .*spleen_1", exc_type=InputNotFoundError)
    assert_nothing_written(before, msd_task)


def test_msd_wrong_layout(msd_task):
    meta = json.loads((msd_task / "dataset.json").read_text())
    del meta["training"]
    (msd_task / "dataset.json").write_text(json.dumps(meta))
    expect_user_error(lambda: build_msd_datalist(msd_task), r"dataset.json' has no 'training' list", exc_type=InvalidInputError)
    (msd_task / "dataset.json").write_text("{not json")
    expect_user_error(lambda: build_msd_datalist(msd_task), r"dataset.json' is not valid JSON", exc_type=InvalidInputError)


def test_msd_keeps_existing_datalist(msd_task):
    out = build_msd_datalist(msd_task)
    first = out.read_bytes()
    before = snapshot(msd_task)
    expect_user_error(lambda: build_msd_datalist(msd_task, seed=1), r"datalist_diffseg.json' already exists", exc_type=OutputExistsError)
    assert_nothing_written(before, msd_task)
    assert build_msd_datalist(msd_task, seed=0, overwrite=True).read_bytes() == first


def test_amos_and_hcp_missing_folders(tmp_path):
    expect_user_error(lambda: build_amos_datalist(tmp_path / "amos22"), r"AMOS 2022 folder .*amos22' does not exist", exc_type=InputNotFoundError)
    (tmp_path / "amos22").mkdir()
    expect_user_error(lambda: build_amos_datalist(tmp_path / "amos22"), r"dataset.json' does not exist: is .*amos22' the extracted", exc_type=InputNotFoundError)
    expect_user_error(lambda: build_hcp_datalist(tmp_path / "hcp", tmp_path / "noddi", tmp_path / "out"), r"HCP folder .*hcp' does not exist", exc_type=InputNotFoundError)
    assert not (tmp_path / "out").exists()
