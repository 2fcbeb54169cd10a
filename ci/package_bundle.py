#!/usr/bin/env python
"""Build a self-contained zip of one bundle, as the MONAI model zoo distributes them.

Usage::

    python ci/package_bundle.py bundles/<name> [--out dist] [--no-weights] [--variant demo]

The zip holds one top-level folder ``<name>/`` with the bundle's files and a copy of the shared
``common`` package at ``<name>/common/``, so the bundle runs without this repository: from the
bundle folder, ``python -m monai.bundle run --config_file configs/inference.json`` finds
``common`` next to ``configs/`` (``python -m`` puts the working directory on ``sys.path``; MONAI's
workflow adds the bundle root too). Run outputs, caches and TensorBoard/MLflow folders are left
out; ``models/`` files are included unless ``--no-weights``. A file over 25 MB (the zoo's limit) is
never packed: it must be listed in the bundle's ``large_files.yml`` (the zoo downloads it from there),
otherwise packaging stops with an error naming the file, so a zip never silently lacks its weights. Entries are written in sorted order with a fixed
timestamp, so packing the same tree twice gives the same bytes and the same sha256.

``--variant demo`` packs the deployable bundle of the shipped demo model: ``configs/demo.json`` is merged
into every config (``inference.json``, ``evaluate.json``, ``train.json`` and their overlays, each read
as MONAI reads ``[config, "configs/demo.json"]``: the overlay's top-level keys replace the config's),
its ``_meta_`` into ``metadata.json``; the weights of ``models/demo/`` move to ``models/`` (plain state
dicts, byte for byte, so the overlay's sha256 keys still hold) and the overlay's paths follow them. What a
plain move cannot express, the overlay's ``_deploy_`` section says (see :func:`stage_demo_variant`: a task
overlay merged in, a state dict taken out of a file that also records metadata, keys set last).
The zoo's tools then find the shipped model where they look for it: ``models/model.pt`` loaded by
``configs/inference.json`` alone, exported by ``ckpt_export``. Test-size overlays (``tiny.json``)
stay out: they describe another network than the shipped weights.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMON = REPO_ROOT / "common"
MAX_FILE_BYTES = 25 * 1024 * 1024
SKIP_DIRS = {"__pycache__", ".pytest_cache", "outputs", "eval", "runs", "mlruns", ".ipynb_checkpoints"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".part", ".lock"}
FIXED_TIME = (2024, 1, 1, 0, 0, 0)

DEMO_OVERLAY = "configs/demo.json"
DEMO_WEIGHTS = "models/demo"
#: overlays that set another network size than the demo weights: not part of a deployable variant
TEST_OVERLAYS = {"tiny.json"}

__all__ = ["package_bundle", "bundle_files", "stage_demo_variant"]


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


def _merge_overlay(config: dict, overlay: dict) -> dict:
    """``config`` with ``overlay`` applied as ``ConfigParser.load_config_files`` applies a later file."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(config))
    for k, v in overlay.items():
        parser[k] = copy.deepcopy(v)
    return parser.config


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = _deep_update(dict(base[k]), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _map_strings(value, fn):
    """``value`` (a config: strings, lists, dicts) with ``fn`` applied to every string."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


def _retarget(value, old: str, new: str):
    """``value`` with every string's path fragment ``old`` replaced by ``new`` wherever it is a whole path
    component (followed by ``/``, a quote or the end: ``'/models/demo/x.pt'`` and ``'/models/demo'`` alike, not
    ``'/models/demo_x'``)."""
    pattern = re.compile(re.escape(old) + r"(?=[/'\"]|$)")
    return _map_strings(value, lambda v: pattern.sub(new, v))


def stage_demo_variant(bundle: str | Path, stage_root: str | Path) -> Path:
    """Write the deployable bundle of ``bundle``'s shipped demo model to ``stage_root/<name>`` and return it.

    The overlay's optional ``_deploy_`` section (taken out, like ``_meta_``) says what a plain move of
    ``models/demo/`` cannot: ``overlays``, further configs merged after ``demo.json`` into every config and left
    out of the variant (e.g. a task overlay: a deployable bundle serves one task); ``weights``, a file of
    ``models/demo/`` -> ``{"file": name in models/, "entry": key}`` for a file that holds its state dict under an
    entry beside metadata (the entry is written as a plain state dict); ``set``, top-level config keys set last,
    where ``{sha256:<file>}`` is replaced by the digest of that file of the variant's ``models/``.

    Raises:
        FileNotFoundError: the bundle has no ``configs/demo.json`` or no weights in ``models/demo/``.
        ValueError: a ``models/demo/`` file is not a plain state dict loadable with ``weights_only=True`` (after
            its ``_deploy_`` entry is taken), or would overwrite a file of ``models/``.
    """
    import torch

    bundle = Path(bundle).resolve()
    overlay_file, weights_dir = bundle / DEMO_OVERLAY, bundle / DEMO_WEIGHTS
    weights = sorted(f for f in weights_dir.glob("*") if f.is_file() and f.suffix in {".pt", ".pth"}) if weights_dir.is_dir() else []
    if not overlay_file.is_file() or not weights:
        raise FileNotFoundError(f"'{bundle}' has no demo model to deploy: it needs {DEMO_OVERLAY} and weights in {DEMO_WEIGHTS}/")
    overlay = json.loads(overlay_file.read_text())
    meta_update = overlay.pop("_meta_", {})
    deploy = overlay.pop("_deploy_", {})
    moved = {f.name: deploy.get("weights", {}).get(f.name, {"file": f.name}) for f in weights}
    states = {}
    for f in weights:
        state = torch.load(str(f), map_location="cpu", weights_only=True)
        entry = moved[f.name].get("entry")
        if entry is not None:
            if not isinstance(state, dict) or entry not in state:
                raise ValueError(f"'{f}' has no entry '{entry}' (configs/demo.json _deploy_ weights)")
            state = states[f.name] = state[entry]
        if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"'{f}' is not a plain state dict (name -> tensor): the zoo's ckpt_export would export none of it")
        if (bundle / "models" / moved[f.name]["file"]).exists():
            raise ValueError(f"'{f}' would overwrite '{bundle / 'models' / moved[f.name]['file']}' in the demo variant: "
                             "remove one of them")
    extra = [json.loads((bundle / o).read_text()) for o in deploy.get("overlays", [])]
    overlay = _retarget(overlay, f"/{DEMO_WEIGHTS}", "/models")
    left_out = {DEMO_OVERLAY, *deploy.get("overlays", [])}

    target = Path(stage_root) / bundle.name
    if target.exists():
        shutil.rmtree(target)
    files = [(src, Path(arc).relative_to(bundle.name)) for src, arc in bundle_files(bundle, include_weights=True)]
    files = [(src, rel) for src, rel in files if not (rel.parts[0] == "common" or rel.as_posix() in left_out or
                                                      (rel.parts[0] == "configs" and rel.name in TEST_OVERLAYS))]
    for src, rel in files:  # the weights first: the settings may name their digests
        if rel.parent.as_posix() == DEMO_WEIGHTS:
            dest = target / "models" / moved[rel.name]["file"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            if rel.name in states:  # the entry alone, as a plain state dict
                torch.save(states[rel.name], str(dest))
            else:
                shutil.copyfile(src, dest)
    settings = deploy.get("set", {})
    for f in (target / "models").glob("*"):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        settings = _map_strings(settings, lambda v, key=f"{{sha256:{f.name}}}", digest=digest: v.replace(key, digest))
    for src, rel in files:
        if rel.parent.as_posix() == DEMO_WEIGHTS:
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.parts[0] == "configs" and rel.suffix == ".json":
            content = json.loads(src.read_text())
            if rel.name == "metadata.json":
                content = _deep_update(content, meta_update)
            else:
                for layer in (overlay, *extra, settings):
                    content = _merge_overlay(content, layer)
            dest.write_text(json.dumps(content, indent=4) + "\n")
        else:
            shutil.copyfile(src, dest)
    return target


def package_bundle(
    bundle: str | Path, out_dir: str | Path = "dist", include_weights: bool = True, variant: str | None = None
) -> Path:
    """Write ``<out_dir>/<name>.zip`` and return its path; ``variant="demo"``: the deployable bundle of the
    shipped demo model (see the module docstring)."""
    bundle = Path(bundle).resolve()
    if not (bundle / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"'{bundle}' is not a bundle folder: configs/metadata.json is missing")
    if variant not in (None, "demo"):
        raise ValueError(f"unknown variant {variant!r}: expected 'demo'")
    if variant == "demo":
        with tempfile.TemporaryDirectory() as stage:
            return package_bundle(stage_demo_variant(bundle, stage), out_dir, include_weights=True)
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
    parser.add_argument("--variant", choices=["demo"], default=None,
                        help="demo: the deployable bundle of the shipped demo model (configs/demo.json merged, models/demo/ in models/)")
    args = parser.parse_args(argv)
    if args.variant and args.no_weights:
        parser.error("--variant demo packs the demo weights: leave out --no-weights")
    try:
        path = package_bundle(args.bundle, args.out, include_weights=not args.no_weights, variant=args.variant)
    except (FileNotFoundError, ValueError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
