"""The demo command reruns into its own folders and never deletes anything it did not make."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ci"))

from run_demo import WORK_MARKER, fresh_work_dir  # noqa: E402


def test_previous_demo_folder_is_rebuilt(tmp_path):
    work = fresh_work_dir(tmp_path / "diffseg")
    (work / "models").mkdir()
    (work / "models" / "model.pt").write_bytes(b"old")
    again = fresh_work_dir(tmp_path / "diffseg")
    assert again == work and sorted(p.name for p in work.iterdir()) == [WORK_MARKER]


def test_foreign_folder_is_refused_and_kept(tmp_path):
    mine = tmp_path / "diffseg"
    mine.mkdir()
    (mine / "results.csv").write_text("precious\n")
    with pytest.raises(SystemExit, match="diffseg' exists and was not made by the demo"):
        fresh_work_dir(mine)
    assert (mine / "results.csv").read_text() == "precious\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fresh_work_dir(empty) == empty
