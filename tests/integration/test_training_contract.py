"""What model-zoo users rely on, checked on one training stage of every bundle.

The stage, its tiny configuration and the overrides that point it at the demo data come from the
bundle's ``contract`` entry in ``ci/demo_recipes.json``. For each bundle:

- determinism: two seeded runs end with bit-identical weights and optimiser state;
- exact resume: a run stopped after one epoch and resumed from its checkpoint ends with the same
  weights, optimiser state and learning-rate schedule as an uninterrupted two-epoch run;
- tracking: ``--tracking configs/mlflow.json`` writes ``<output_dir>/mlruns.db`` offline with
  the run's parameters, every loss term and the executed config;
- multi-GPU overlay on CPU: ``torchrun --nproc_per_node=2`` with gloo trains the two ranks on
  different samples and ends with identical weights on both.
Runs are in-process (``monai.bundle.run``), except torchrun, which needs its own processes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ci"))

from run_demo import fill_placeholders as _fmt  # noqa: E402  (the same recipes as the demo)
RECIPES = json.loads((REPO / "ci" / "demo_recipes.json").read_text())
CONTRACT = {name: r["contract"] for name, r in RECIPES.items() if "contract" in r and (REPO / "bundles" / name).is_dir()}
DATA_FIXTURE = {"ct": "ct_demo", "brain_mri": "brain_demo", "dwi": "dwi_demo"}


_PREPARED: dict[str, Path] = {}


def _prepared_datalist(name: str, request) -> Path:
    """Run the recipe's ``prepare`` commands once per session (e.g. noddi_sr's phantom cohort)."""
    if name not in _PREPARED:
        work = request.getfixturevalue("tmp_path_factory").mktemp(f"{name}_data")
        ctx = {"work": str(work), "repo": str(REPO), "python": sys.executable}
        for cmd in RECIPES[name]["prepare"]:
            subprocess.run(_fmt(cmd, ctx), cwd=REPO, check=True, capture_output=True, timeout=600)
        _PREPARED[name] = Path(_fmt(RECIPES[name]["datalist"], ctx))
    return _PREPARED[name]


def _context(name: str, request, work: Path, **extra) -> dict:
    ctx = {"work": str(work), "repo": str(REPO), "python": sys.executable, **extra}
    kind = RECIPES[name].get("data")
    if kind or RECIPES[name].get("prepare"):
        datalist = Path(request.getfixturevalue(DATA_FIXTURE[kind])) if kind else _prepared_datalist(name, request)
        ctx.update(datalist=str(datalist), data_dir=str(datalist.parent))
    return ctx


def _run_stage(name: str, ctx: dict, epochs: int, extra_args: dict | None = None, tracking: str | None = None) -> Path:
    """Run the contract stage in-process for ``epochs`` epochs; return its final checkpoint."""
    from monai.bundle import run

    spec = CONTRACT[name]
    bundle = REPO / "bundles" / name
    args = _fmt(spec["args"], ctx)
    args[spec.get("epochs_key", "max_epochs")] = epochs
    args.update(_fmt(extra_args or {}, ctx))
    # what `python -m monai.bundle run` from the bundle folder gives: the bundle root importable
    # (the conftest removes it again after the test)
    sys.path.insert(0, str(bundle))
    run(
        config_file=[str(bundle / c) for c in spec["config"]],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        tracking=tracking,
        **args,
    )
    ckpt = Path(_fmt(spec["final_ckpt"], ctx))
    assert ckpt.is_file(), f"{name}: the stage wrote no checkpoint at {ckpt}"
    return ckpt


def _flat_state(obj, prefix=""):
    """Every tensor (and number) of a nested state dict, keyed by path."""
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_state(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat_state(v, f"{prefix}/{i}"))
    elif isinstance(obj, (int, float)):
        out[prefix] = torch.tensor(obj)
    return out


def _assert_same_state(a: Path, b: Path, keys: list[str]):
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for key in keys:
        assert key in sa and key in sb, f"checkpoint lacks '{key}'"
        fa, fb = _flat_state(sa[key]), _flat_state(sb[key])
        assert fa.keys() == fb.keys(), f"'{key}' entries differ"
        assert fa, f"'{key}' holds no tensors"
        diff = {k: float((fa[k].double() - fb[k].double()).abs().max()) for k in fa if fa[k].numel()}
        bad = {k: d for k, d in diff.items() if d != 0}
        assert not bad, f"'{key}' differs: {dict(list(bad.items())[:5])}"


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Lazily computed runs shared by the tests of one bundle: {(name, label): checkpoint}."""
    cache: dict = {}

    def get(name: str, label: str) -> Path:
        if (name, label) in cache:
            return cache[(name, label)]
        work = tmp_path_factory.mktemp(f"{name}_{label}")
        ctx = _context(name, request, work)
        if label in ("two_epochs_a", "two_epochs_b"):
            ckpt = _run_stage(name, ctx, 2)
        elif label == "resumed":
            first = get(name, "one_epoch")
            resume_from = work / "resume_from.pt"
            shutil.copy(first, resume_from)
            ckpt = _run_stage(name, _context(name, request, work, resume_from=str(resume_from)), 2,
                              extra_args=CONTRACT[name].get("resume_args"))
        elif label == "one_epoch":
            ckpt = _run_stage(name, ctx, 1)
        else:
            raise KeyError(label)
        kept = tmp_path_factory.mktemp(f"{name}_{label}_ckpt") / "checkpoint.pt"
        shutil.copy(ckpt, kept)
        cache[(name, label)] = kept
        return kept

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_seeded_runs_are_identical(name, runs):
    _assert_same_state(runs(name, "two_epochs_a"), runs(name, "two_epochs_b"), CONTRACT[name]["state_keys"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_resume_continues_exactly(name, runs):
    full, resumed = runs(name, "two_epochs_a"), runs(name, "resumed")
    _assert_same_state(full, resumed, CONTRACT[name]["state_keys"])
    sf, sr = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    assert sf["trainer"]["iteration"] == sr["trainer"]["iteration"] > 0
    for key in [k for k in sf if "sched" in k]:
        assert sf[key] == sr[key], f"LR schedule '{key}' differs after resume"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_mlflow_tracking_offline(name, request, tmp_path):
    bundle = REPO / "bundles" / name
    ctx = _context(name, request, tmp_path)
    _run_stage(name, ctx, 1, tracking=str(bundle / "configs" / "mlflow.json"))
    out_dir = Path(_fmt(CONTRACT[name]["args"]["output_dir"], ctx))
    db = out_dir / "mlruns.db"
    assert db.is_file(), f"no MLflow store at {db}"
    con = sqlite3.connect(str(db))
    try:
        metric_keys = {r[0] for r in con.execute("select distinct key from metrics")}
        params = {r[0] for r in con.execute("select distinct key from params")}
        n_runs = con.execute("select count(*) from runs").fetchone()[0]
        artifact_uris = [r[0] for r in con.execute("select artifact_uri from runs")]
    finally:
        con.close()
    assert n_runs >= 1
    losses = {k for k in metric_keys if "loss" in k.lower()}
    expected = CONTRACT[name].get("tracked_terms", ["loss"])
    for term in expected:
        assert any(term in k for k in losses), f"'{term}' not tracked; metric keys: {sorted(metric_keys)}"
    assert any("lr" in k.lower() for k in metric_keys | params) or CONTRACT[name].get("no_lr_tracking"), sorted(metric_keys)
    assert params, "no parameters recorded"
    artifacts = [p for uri in artifact_uris for p in Path(uri.replace("file://", "")).rglob("*") if p.is_file()]
    assert any(p.suffix in (".json", ".yaml") for p in artifacts), f"executed config not logged as an artifact: {artifact_uris}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in CONTRACT if CONTRACT[n].get("multi_gpu", True)))
def test_multi_gpu_overlay_with_gloo(name, request, tmp_path):
    bundle = REPO / "bundles" / name
    spec = CONTRACT[name]
    ctx = _context(name, request, tmp_path)
    overlay = tmp_path / "sample_log.json"
    net = "@" + spec.get("network_id", "network")
    save_final = (
        f"$torch.save({{k: v.detach().cpu() for k, v in getattr({net}, 'module', {net}).state_dict().items()}}, "
        f"'{tmp_path / 'samples'}/final_weights_rank' + str(torch.distributed.get_rank()) + '.pt')"
    )
    overlay.write_text(json.dumps({
        "sample_logger": {"_target_": "common.engines.sample_log.SampleLogHandler", "output_dir": str(tmp_path / "samples")},
        "test_run": ["$@sample_logger.attach(@train#trainer)", "@run", save_final],
    }))
    configs = [str(bundle / c) for c in spec["config"]] + [str(bundle / "configs" / "multi_gpu_train.json"), str(overlay)]
    args = _fmt(spec["args"], ctx)
    args[spec.get("epochs_key", "max_epochs")] = 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
           "--run_id", "test_run", "--config_file", json.dumps(configs), "--bundle_root", str(bundle),
           "--meta_file", str(bundle / "configs" / "metadata.json"), "--logging_file", str(bundle / "configs" / "logging.conf")]
    for k, v in args.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    logs = {r: (tmp_path / "samples" / f"samples_rank{r}.txt") for r in (0, 1)}
    for r, f in logs.items():
        assert f.is_file() and f.read_text().strip(), f"rank {r} logged no samples"
    seen = {r: set(f.read_text().split()) - {str(r)} for r, f in logs.items()}
    assert seen[0] != seen[1], f"both ranks trained on the same samples: {seen}"
    ckpt = Path(_fmt(spec["final_ckpt"], ctx))
    assert ckpt.is_file(), "rank 0 wrote no checkpoint"
    finals = sorted((tmp_path / "samples").glob("final_weights_rank*.pt"))
    assert len(finals) == 2, f"expected the final weights of both ranks, got {finals}"
    a, b = (torch.load(f, weights_only=True) for f in finals)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"rank weights differ at {k}"
