#!/usr/bin/env python
"""Build a self-contained zip of one bundle, as the MONAI model zoo distributes them.

Usage::

    python ci/package_bundle.py bundles/<name> [--out dist] [--no-weights]

The zip holds one top-level folder ``<name>/`` with the bundle's files and a copy of the shared
``common`` package at ``<name>/common/``, so the bundle runs without this repository: from the
bundle folder, ``python -m monai.bundle run --config_file configs/inference.json`` finds
``common`` next to ``configs/`` (``python -m`` puts the working directory on ``sys.path``; MONAI's
workflow adds the bundle root too). Run outputs, caches and TensorBoard/MLflow folders are left
out; ``models/`` files are included unless ``--no-weights``. A file over 25 MB (the zoo's limit) is
never packed: it must be listed in the bundle's ``large_files.yml`` (the zoo downloads it from there),
otherwise packaging stops with an error naming the file, so a zip never silently lacks its weights. Entries are written in sorted order with a fixed
timestamp, so packing the same tree twice gives the same bytes and the same sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMON = REPO_ROOT / "common"
MAX_FILE_BYTES = 25 * 1024 * 1024
SKIP_DIRS = {"__pycache__", ".pytest_cache", "outputs", "eval", "runs", "mlruns", ".ipynb_checkpoints"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".part", ".lock"}
FIXED_TIME = (2024, 1, 1, 0, 0, 0)

__all__ = ["package_bundle", "bundle_files"]


def _keep(rel: Path, include_weights: bool) -> bool:
    if any(part in SKIP_DIRS or part.startswith("mlruns") for part in rel.parts[:-1]):
        return False
    if rel.suffix in SKIP_SUFFIXES or rel.name.startswith("."):
        return False
    if rel.parts[0] == "models" and not include_weights and rel.suffix in {".pt", ".pth", ".ts", ".onnx"}:
        return False
    return True


def _large_file_paths(bundle: Path) -> set[str]:
    """``path`` entries of ``large_files.yml`` (or ``.yaml``/``.json``), normalised to ``models/x.pt``."""
    import json

    import yaml

    for fname in ("large_files.yml", "large_files.yaml", "large_files.json"):
        f = bundle / fname
        if f.is_file():
            data = json.loads(f.read_text()) if f.suffix == ".json" else yaml.safe_load(f.read_text())
            entries = (data or {}).get("large_files", []) if isinstance(data, dict) else []
            return {Path(str(e.get("path", ""))).as_posix().removeprefix("./") for e in entries if isinstance(e, dict)}
    return set()


def bundle_files(bundle: Path, include_weights: bool = True) -> list[tuple[Path, str]]:
    """(source file, name inside the zip) pairs, sorted.

    Raises:
        ValueError: a file to be packed is over 25 MB and not listed in ``large_files.yml``.
    """
    bundle = bundle.resolve()
    name = bundle.name
    large = _large_file_paths(bundle)
    pairs, too_big = [], []
    for f in bundle.rglob("*"):
        rel = f.relative_to(bundle)
        if f.is_file() and rel.parts[0] != "common" and _keep(rel, include_weights):
            if f.stat().st_size > MAX_FILE_BYTES:
                if rel.as_posix() not in large:
                    too_big.append(f"{rel.as_posix()} ({f.stat().st_size / 2**20:.1f} MB)")
                continue
            pairs.append((f, f"{name}/{rel.as_posix()}"))
    if too_big:
        raise ValueError(
            f"{bundle}: {', '.join(too_big)} over the zoo's {MAX_FILE_BYTES // 2**20} MB file limit and not in "
            "large_files.yml: list it there (path, url, hash_val, hash_type) or remove it; nothing was packed"
        )
    for f in COMMON.rglob("*"):
        rel = f.relative_to(COMMON)
        if f.is_file() and _keep(Path("common") / rel, True) and f.stat().st_size <= MAX_FILE_BYTES:
            pairs.append((f, f"{name}/common/{rel.as_posix()}"))
    return sorted(pairs, key=lambda p: p[1])


def package_bundle(bundle: str | Path, out_dir: str | Path = "dist", include_weights: bool = True) -> Path:
    """Write ``<out_dir>/<name>.zip`` and return its path."""
    bundle = Path(bundle).resolve()
    if not (bundle / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"'{bundle}' is not a bundle folder: configs/metadata.json is missing")
    files = bundle_files(bundle, include_weights)  # raises before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{bundle.name}.zip"
    tmp = target.with_name(target.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for src, arc in files:
            info = zipfile.ZipInfo(arc, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, src.read_bytes())
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Package a bundle with the shared code it imports.")
    parser.add_argument("bundle")
    parser.add_argument("--out", default="dist")
    parser.add_argument("--no-weights", action="store_true", help="leave models/*.pt out")
    args = parser.parse_args(argv)
    try:
        path = package_bundle(args.bundle, args.out, include_weights=not args.no_weights)
    except (FileNotFoundError, ValueError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
