"""Demo-data fetch: exact versions, sha256-verified, cached, repaired when tampered with."""

from __future__ import annotations

import shutil

import nibabel as nib
import pytest

from common.data import fetch
from common.data.fetch import SOURCES, HashMismatchError, demo_file, fetch_source, sha256sum


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_fetching_twice_gives_identical_verified_files(name):
    folder = fetch_source(name)
    first = {k: sha256sum(folder / k) for k in SOURCES[name].members}
    again = fetch_source(name)
    assert again == folder
    second = {k: sha256sum(again / k) for k in SOURCES[name].members}
    assert first == second == {k: digest for k, (_, digest) in SOURCES[name].members.items()}


def test_tampered_cache_is_repaired(tmp_path, monkeypatch):
    # a private cache seeded with the verified archive, so the repair needs no network
    src = SOURCES["dipy"]
    (tmp_path / "wheelhouse").mkdir()
    shutil.copy(fetch.cache_dir() / "wheelhouse" / src.archive, tmp_path / "wheelhouse" / src.archive)
    folder = fetch_source("dipy", root=tmp_path)
    victim = folder / "small_25.bval"
    victim.write_text("0 0 0\n")
    fetch_source("dipy", root=tmp_path)
    assert sha256sum(victim) == src.members["small_25.bval"][1]


def test_wrong_archive_is_refused(tmp_path):
    src = SOURCES["dipy"]
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / src.archive).write_bytes(b"not the wheel")
    # the bad archive is discarded and downloaded again; a bad download would raise
    folder = fetch_source("dipy", root=tmp_path)
    assert sha256sum(tmp_path / "wheelhouse" / src.archive) == src.archive_sha256
    assert (folder / "small_101D.nii.gz").is_file()


def test_hash_check_raises_with_the_file_name(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    with pytest.raises(HashMismatchError, match="x.bin"):
        fetch._check(f, "0" * 64, "test")


def test_demo_files_are_real_images():
    t1 = nib.load(str(demo_file("spm/avg152T1.nii")))
    assert t1.shape == (91, 109, 91)
    ct = nib.load(str(demo_file("totalsegmentator/example_ct.nii.gz")))
    assert ct.shape == (122, 101, 112)
    with pytest.raises(KeyError, match="unknown demo file"):
        demo_file("spm/avg999.nii")
