#!/usr/bin/env python
"""Run the MONAI model-zoo checks on one bundle folder, offline.

Usage::

    python ci/verify_bundle.py bundles/<name> [--overlay configs/tiny.json] [--skip-network]

Checks (numbers as in the project's bundle conventions):
 1. required files exist; no file over 25 MB unless listed in ``large_files.yml`` (each entry
    with ``path``, ``url``, ``hash_val`` and an explicit ``hash_type``);
 3. ``version`` is plain X.Y.Z and a key of ``changelog``;
 4. ``verify_metadata`` against the schema the metadata's ``schema`` URL names, from the offline
    copies in ``ci/schemas/`` (the zoo's ``ci/prepare_schema.py`` downloads that URL); a schema
    not kept there fails the check;
 5. ``check_properties()`` is empty for the inference config and every training config;
 6. ``verify_net_in_out`` for ``network_def`` of ``inference.json`` (extra metadata inputs are
    passed as ``extra_forward_args``);
 7. ``ckpt_export`` of ``models/model.pt`` (required, or listed in ``large_files.yml``, unless the
    bundle is on the TorchScript exclusion list; a freshly initialised checkpoint when an overlay
    changes the network) by scripting, as the zoo's ``verify_torchscript`` does (``ckpt_export`` defaults); the TorchScript model loads and matches
    eager outputs. Tracing replaces scripting only for a bundle that ``ci/bundle_custom_data.py``
    lists with the reason scripting cannot work (the zoo's ``exclude_verify_torchscript_list``),
    and such a bundle fails if scripting works after all. The check name says which path ran
    (networks with more inputs than the image, declared in the metadata as vector inputs, are
    traced with all of them as keyword inputs);
12. MONAI Label static checks for segmentation bundles.
Item 2 (``download_large_files``) and item 11 (packaging round trip) need a server: the test
suite runs them against a loopback HTTP server. ``--overlay`` merges config files (e.g. the
tiny configuration) into the configs the checks load (5, 6, 7) so they run quickly: MONAI's
``check_properties`` instantiates the trainer, i.e. the full-size networks; an overlay changes
sizes, not config ids.
Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO_ROOT / "ci" / "schemas"
MAX_FILE_BYTES = 25 * 1024 * 1024
REQUIRED_FILES = [
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
]
MODEL_FILE = "models/model.pt"
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")

__all__ = ["Check", "verify_bundle", "train_configs", "schema_file", "validate_metadata", "torchscript_exclusions"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"[{'PASS' if self.ok else 'FAIL'}] {self.name}" + (f": {self.detail}" if self.detail else "")


@contextlib.contextmanager
def _bundle_imports(bundle: Path):
    """Put the bundle root first on ``sys.path`` and isolate its ``scripts`` package."""

    def purge():
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]

    purge()
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))
        purge()


def _quiet():
    """Silence MONAI's chatty loggers and stdout while a check runs."""
    return contextlib.redirect_stdout(io.StringIO())


def train_configs(bundle: Path) -> list[list[Path]]:
    """Each training stage as the list of config files that defines it.

    A ``configs/train*.json`` that defines a top-level ``train`` section stands alone; one that
    does not (e.g. ``train_baseline.json``) is an overlay on ``configs/train.json``.
    """
    stages = []
    for cfg in sorted((bundle / "configs").glob("train*.json")):
        content = json.loads(cfg.read_text())
        if "train" in content or cfg.name == "train.json":
            stages.append([cfg])
        else:
            base = bundle / "configs" / "train.json"
            stages.append([base, cfg] if base.is_file() else [cfg])
    return stages


def schema_file(meta: dict) -> Path:
    """The offline copy of the schema that ``meta["schema"]`` names (ValueError if none is kept).

    The zoo validates each metadata against the schema its own URL names (``ci/prepare_schema.py``
    downloads it, ``ci/verify_bundle.py`` ``verify_metadata_format`` validates), so the file is
    chosen by the URL's last component, never a fixed one.
    """
    url = meta.get("schema")
    if not isinstance(url, str) or not url:
        raise ValueError("metadata has no 'schema' URL")
    path = SCHEMA_DIR / url.rstrip("/").rsplit("/", 1)[-1]
    if not path.is_file():
        kept = sorted(p.name for p in SCHEMA_DIR.glob("*.json"))
        raise ValueError(f"schema '{path.name}' of {url} is not kept in ci/schemas/ (kept: {kept})")
    return path


def validate_metadata(meta_file: str | Path) -> Path:
    """MONAI's ``verify_metadata`` of ``meta_file`` against :func:`schema_file`, offline.

    ``verify_metadata`` downloads nothing when the target file exists (no hash is given). Raises
    ValueError naming the failing rule; returns the schema used.
    """
    from monai.bundle import verify_metadata

    schema = schema_file(json.loads(Path(meta_file).read_text()))
    with _quiet():
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    return schema


def torchscript_exclusions() -> dict[str, str]:
    """Bundle name -> why ``torch.jit.script`` cannot export its network (``ci/bundle_custom_data.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bundle_custom_data", REPO_ROOT / "ci" / "bundle_custom_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.exclude_verify_torchscript)


def _check_files(bundle: Path) -> list[Check]:
    out = []
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    stages = train_configs(bundle)
    if not stages:
        missing.append("configs/train*.json")
    out.append(Check("1 required files", not missing, f"missing {missing}" if missing else f"{len(REQUIRED_FILES)} files + {len(stages)} training config(s)"))

    listed: set[str] = set()
    problems = []
    lf = bundle / "large_files.yml"
    if lf.is_file():
        import yaml

        data = yaml.safe_load(lf.read_text()) or {}
        for entry in data.get("large_files", []):
            for key in ("path", "url", "hash_val", "hash_type"):
                if not entry.get(key):
                    problems.append(f"large_files.yml entry {entry.get('path', '?')} lacks '{key}'")
            listed.add(str(Path(entry.get("path", "")).as_posix()).lstrip("./"))
    big = []
    for f in bundle.rglob("*"):
        if f.is_file() and f.stat().st_size > MAX_FILE_BYTES:
            rel = f.relative_to(bundle).as_posix()
            if rel not in listed:
                big.append(f"{rel} ({f.stat().st_size / 2**20:.1f} MB)")
    if big:
        problems.append(f"files over 25 MB not in large_files.yml: {big}")
    out.append(Check("1 large files", not problems, "; ".join(problems) if problems else f"{len(listed)} listed in large_files.yml"))

    # the zoo's verify_torchscript exports models/model.pt (ckpt_export's ckpt_file): it must be there, or come
    # from large_files.yml, unless the bundle is on the exclusion list (the zoo then skips the export)
    reason = torchscript_exclusions().get(bundle.name)
    if (bundle / MODEL_FILE).is_file() or MODEL_FILE in listed:
        out.append(Check("1 models/model.pt", True, "shipped" if (bundle / MODEL_FILE).is_file() else "in large_files.yml"))
    elif reason:
        out.append(Check("1 models/model.pt", True, "not exported by the zoo (ci/bundle_custom_data.py lists the bundle)"))
    else:
        out.append(Check("1 models/model.pt", False, "missing: the zoo's verify_torchscript exports models/model.pt; ship "
                         "the weights (ci/package_bundle.py --variant demo builds a bundle with its demo model there) or "
                         "list them in large_files.yml"))
    return out


def _check_metadata(bundle: Path) -> list[Check]:
    meta_file = bundle / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text())
    except Exception as e:
        return [Check("3 metadata readable", False, f"{meta_file}: {e}")]
    out = []
    version = meta.get("version", "")
    errs = []
    if not VERSION_RE.match(str(version)):
        errs.append(f"version '{version}' is not X.Y.Z")
    if version not in meta.get("changelog", {}):
        errs.append(f"version '{version}' not in changelog")
    for key in ("monai_version", "pytorch_version", "numpy_version"):
        if not VERSION_RE.match(str(meta.get(key, ""))):
            errs.append(f"{key} '{meta.get(key)}' is not plain X.Y.Z")
    out.append(Check("3 version/changelog", not errs, "; ".join(errs) or version))

    try:
        schema = validate_metadata(meta_file)
        out.append(Check("4 verify_metadata", True, f"schema {schema.name}"))
    except Exception as e:
        msg = getattr(e, "message", None) or str(e).splitlines()[0]
        out.append(Check("4 verify_metadata", False, msg))
    fmt = meta.get("network_data_format", {})
    first_in = next(iter(fmt.get("inputs", {})), None)
    first_out = next(iter(fmt.get("outputs", {})), None)
    ok = first_in == "image" and first_out == "pred"
    out.append(Check("4 zoo I/O names", ok, f"first input '{first_in}', first output '{first_out}' (expected image/pred)"))
    return out


def _check_properties(bundle: Path, overlays: list[Path] = ()) -> list[Check]:
    from monai.bundle import ConfigWorkflow

    out = []
    meta = str(bundle / "configs" / "metadata.json")
    logging_file = str(bundle / "configs" / "logging.conf")
    jobs = [("infer", [bundle / "configs" / "inference.json"])] + [("train", s) for s in train_configs(bundle)]
    for wtype, files in jobs:
        label = "+".join(f.name for f in files)
        files = list(files) + list(overlays)
        try:
            with _quiet():
                wf = ConfigWorkflow(
                    config_file=[str(f) for f in files],
                    meta_file=meta,
                    logging_file=logging_file,
                    workflow_type=wtype,
                    bundle_root=str(bundle),
                )
                wf.initialize()
                missing = wf.check_properties()
            out.append(Check(f"5 check_properties {wtype} {label}", not missing, f"missing {missing}" if missing else ""))
        except Exception as e:
            out.append(Check(f"5 check_properties {wtype} {label}", False, f"{type(e).__name__}: {e}"))
    return out


def _fake_input(meta: dict, n: int = 1, any_size: int = 16):
    """Random input of the metadata's image shape, with MONAI's "16*n" / "x**p" / "*" conventions."""
    import torch
    from monai.bundle.scripts import _get_fake_spatial_shape

    spec = meta["network_data_format"]["inputs"]["image"]
    shape = _get_fake_spatial_shape(spec["spatial_shape"], p=1, n=n, any=any_size)
    return torch.rand(1, int(spec["num_channels"]), *shape)


def _extra_inputs(meta: dict) -> dict:
    """The network's other inputs, built from their metadata description (name -> tensor).

    A diffusion UNet, for instance, takes ``timesteps`` and conditions beside the image; the
    metadata lists them as inputs with ``spatial_shape: []`` (a vector per sample). Values are the
    middle of the declared ``value_range`` (integers for integer dtypes).
    """
    import torch

    extras = {}
    for name, spec in list(meta["network_data_format"]["inputs"].items())[1:]:
        if spec.get("spatial_shape"):
            raise ValueError(f"extra input '{name}' has a spatial shape; only vector inputs are supported")
        dtype = getattr(torch, spec.get("dtype", "float32"))
        lo, hi = (spec.get("value_range") or [0, 1])[:2]
        value = (float(lo) + float(hi)) / 2
        channels = int(spec.get("num_channels", 1))
        shape = (1,) if channels == 1 else (1, channels)
        extras[name] = torch.full(shape, value).to(dtype) if dtype.is_floating_point else torch.full(shape, int(value), dtype=dtype)
    return extras


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_network(bundle: Path, overlays: list[Path], tmp_dir: Path) -> list[Check]:
    """Checks 6 and 7. An overlay that changes the network's I/O (e.g. fewer classes in the tiny
    configuration) carries the changed metadata entries under a top-level ``_meta_`` key; MONAI
    replaces ``_meta_`` with ``metadata.json`` in normal runs, so the key only matters here."""
    import torch
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

    out = []
    configs = [str(bundle / "configs" / "inference.json")] + [str(o) for o in overlays]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for o in overlays:
        meta = _deep_merge(meta, json.loads(Path(o).read_text()).get("_meta_", {}))
    meta_file = tmp_dir / "metadata.json"
    meta_file.write_text(json.dumps(meta))
    try:
        with _quiet():
            extras = _extra_inputs(meta)
            verify_net_in_out(
                net_id="network_def", meta_file=str(meta_file), config_file=configs, device="cpu", n=1, any=16,
                extra_forward_args=extras, bundle_root=str(bundle),
            )
        out.append(Check("6 verify_net_in_out", True, "network_def" + (f" with {sorted(extras)}" if extras else "")))
    except Exception as e:
        out.append(Check("6 verify_net_in_out", False, f"{type(e).__name__}: {e}"))

    reason = torchscript_exclusions().get(bundle.name)
    with tempfile.TemporaryDirectory() as tmp:
        ts_file, ckpt_file = Path(tmp) / "model.ts", Path(tmp) / "model.pt"
        name = "7 ckpt_export (script)"
        try:
            parser = ConfigParser()
            parser.read_config(configs)
            parser.read_meta(str(meta_file))
            parser["bundle_root"] = str(bundle)
            net = parser.get_parsed_content("network_def").eval()
            shipped = bundle / MODEL_FILE
            if shipped.is_file() and not overlays:
                # the zoo exports the shipped weights; ckpt_export loads them strictly into network_def
                ckpt_file = shipped
                state = torch.load(str(shipped), map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or set(state) != set(net.state_dict()):
                    # ckpt_export's default key_in_ckpt "" copies the matching keys only: from a nested
                    # {"model": ...} checkpoint it would export untrained weights without a word
                    found = sorted(state)[:3] if isinstance(state, dict) else type(state).__name__
                    out.append(Check(name, False, f"models/model.pt is not the bare state dict of network_def (keys "
                                     f"{found}...): the zoo's ckpt_export would copy none of its weights"))
                    return out
                net.load_state_dict(state)
            else:
                torch.save(net.state_dict(), ckpt_file)
            x = _fake_input(meta)
            extras = _extra_inputs(meta)
            kwargs = None
            if extras:
                import inspect

                first = next(iter(inspect.signature(net.forward).parameters))
                kwargs = {first: x, **extras}
            script_error = ""
            try:
                # the zoo's ci/verify_bundle.py verify_torchscript: ckpt_export with its defaults,
                # i.e. torch.jit.script, no use_trace
                with _quiet():
                    ckpt_export(
                        net_id="network_def", filepath=str(ts_file), ckpt_file=str(ckpt_file), meta_file=str(meta_file),
                        config_file=configs, bundle_root=str(bundle),
                    )
            except Exception as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                script_error = f"{type(e).__name__}: {' '.join(lines[:2])[:300]}"
            if reason and not script_error:
                out.append(Check(name, False, "torch.jit.script exports the network, but ci/bundle_custom_data.py declares "
                                 f"that it cannot ({reason}): remove the entry"))
                return out
            if script_error and not reason:
                out.append(Check(name, False, f"torch.jit.script failed ({script_error}); make the network scriptable, or "
                                 "declare in ci/bundle_custom_data.py why it cannot be (the zoo's exclude_verify_torchscript_list)"))
                return out
            if script_error:
                name = "7 ckpt_export (trace)"
                if kwargs:
                    # ckpt_export traces with the image alone; a multi-input network is traced with
                    # every input the metadata declares, in its forward order
                    torch.jit.trace(net, example_kwarg_inputs=kwargs).save(str(ts_file))
                else:
                    with _quiet():
                        ckpt_export(
                            net_id="network_def", filepath=str(ts_file), ckpt_file=str(ckpt_file), meta_file=str(meta_file),
                            config_file=configs, use_trace=True, input_shape=list(x.shape), bundle_root=str(bundle),
                        )
            ts = torch.jit.load(str(ts_file), map_location="cpu")
            with torch.no_grad():
                ref, got = (net(**kwargs), ts(**kwargs)) if kwargs else (net(x), ts(x))
            ref = ref if torch.is_tensor(ref) else ref[0]
            got = got if torch.is_tensor(got) else got[0]
            err = float((ref - got).abs().max())
            detail = f"TorchScript vs eager max |diff| {err:.2e}" + (" (models/model.pt)" if ckpt_file == bundle / MODEL_FILE else "")
            if script_error:
                detail += f"; traced, not scripted, as ci/bundle_custom_data.py declares: {reason}"
            out.append(Check(name, err < 1e-4, detail))
        except Exception as e:
            out.append(Check(name, False, f"{type(e).__name__}: {e}"))
    return out


def _check_monai_label(bundle: Path) -> list[Check]:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    if "segmentation" not in meta.get("task", "").lower():
        return []
    problems = []
    infer = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in ("network_def", "preprocessing", "inferer", "postprocessing"):
        if key not in infer:
            problems.append(f"inference.json lacks '{key}'")
    pre = infer.get("preprocessing", {})
    transforms = pre.get("transforms", []) if isinstance(pre, dict) else []
    if not transforms or "LoadImaged" not in str(transforms[0].get("_target_", "")):
        problems.append("inference preprocessing must start with LoadImaged")
    for t in transforms:
        target = str(t.get("_target_", ""))
        keys = t.get("keys", [])
        keys = [keys] if isinstance(keys, str) else keys
        if target.split(".")[-1] == "Spacingd" and ("image" in keys or "@image_key" in str(keys)):
            problems.append("Spacingd on key 'image' in inference preprocessing crashes MONAI Label 0.8.5 + MONAI 1.6.1")
    pred = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    if not pred.get("channel_def"):
        problems.append("metadata output 'pred' lacks channel_def")
    train = json.loads((bundle / "configs" / "train.json").read_text()) if (bundle / "configs" / "train.json").is_file() else {}
    flat = json.dumps(train)
    if "network" not in train:
        problems.append("train.json lacks top-level 'network'")
    for path in (("train", "dataset", "data"), ("train", "handlers"), ("train", "trainer", "max_epochs"), ("validate", "dataset", "data")):
        node = train
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if node is None and "#".join(path) not in flat:
            problems.append(f"train.json lacks '{'#'.join(path)}'")
    return [Check("12 MONAI Label static checks", not problems, "; ".join(problems))]


def verify_bundle(bundle: str | Path, overlays: list[str | Path] = (), skip_network: bool = False) -> list[Check]:
    """Run every check and return the results (never raises for a failing check)."""
    bundle = Path(bundle).resolve()
    overlays = [Path(o) if Path(o).is_absolute() else bundle / o for o in overlays]
    logging.getLogger().setLevel(logging.WARNING)
    checks: list[Check] = []
    def check_properties(b: Path) -> list[Check]:
        return _check_properties(b, overlays)

    steps = [_check_files, _check_metadata, check_properties, _check_monai_label]
    with _bundle_imports(bundle):
        for step in steps:
            try:
                checks.extend(step(bundle))
            except Exception as e:
                checks.append(Check(step.__name__, False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        if not skip_network and (bundle / "configs" / "inference.json").is_file():
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    checks.extend(_check_network(bundle, overlays, Path(tmp)))
            except Exception as e:
                checks.append(Check("network checks", False, f"{type(e).__name__}: {e}"))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", help="bundle folder, e.g. bundles/diffseg")
    parser.add_argument("--overlay", action="append", default=[], help="config overlay for the network checks (repeatable)")
    parser.add_argument("--skip-network", action="store_true", help="skip verify_net_in_out and ckpt_export")
    args = parser.parse_args(argv)
    if not (Path(args.bundle) / "configs").is_dir():
        print(f"'{args.bundle}' is not a bundle folder (no configs/)", file=sys.stderr)
        return 1
    checks = verify_bundle(args.bundle, args.overlay, args.skip_network)
    for c in checks:
        print(c)
    failed = [c for c in checks if not c.ok]
    print(f"{Path(args.bundle).name}: {len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
