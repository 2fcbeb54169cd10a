#!/usr/bin/env python
"""The main job: run bundles end to end on the real demo data and write a report.

Usage::

    python ci/run_demo.py                      # every bundle that has a recipe
    python ci/run_demo.py --bundle diffseg     # one bundle (repeatable)
    python ci/run_demo.py --out reports/demo --keep-going
    python ci/run_demo.py --bundle diffseg --train  # retrain a bundle's shipped demo models (long)

For each bundle, the steps of its recipe (``ci/demo_recipes.json``) run through
``python -m monai.bundle run`` exactly as a user would run them, from the bundle folder, with the
demo datalist passed on the command line. A bundle that ships demo models (``models/demo/``,
``configs/demo.json``) runs inference and evaluation with them; ``--train`` runs its
``train_steps`` instead (training from scratch, then the same evaluation of the new weights).
Bundles without shipped models train briefly with the tiny configuration. The report
(``<out>/report.md``) lists what ran with timings and exit status, the metrics the evaluate step
wrote, and PNG previews (orthogonal slices) of inputs, outputs and references. It opens with one
table, a row per bundle: task, test image, headline metric (with its bar), the baselines measured
beside it, wall time. ``<out>/summary.json`` carries the same per bundle (``task``, ``test_image``,
``wall_seconds``, ``headline``: every headline metric with its threshold, baselines marked
``"baseline": true``) and each step's exit status.
The demo data are built first (``common.data.demo``): simulated brain MRI for training with the
real avg152 triple held out, deformed CT with the original held out, dipy's real DWI schemes.
Exit status 0 when every step of every requested bundle succeeded.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "ci" / "demo_recipes.json"


def fill_placeholders(value, ctx: dict):
    """Fill ``{placeholders}`` in strings, lists and dicts (recipes of ``ci/demo_recipes.json``)."""
    if isinstance(value, str):
        return value.format(**ctx)
    if isinstance(value, list):
        return [fill_placeholders(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, ctx) for k, v in value.items()}
    return value


def _context(data: dict[str, Path], work: Path, recipe: dict) -> dict:
    """Placeholders: {work}, {repo}, {python}, {data_dir}, {datalist}, {test_<key>} of the first test case.

    The datalist is a demo cohort (``"data": "ct" | "brain_mri" | "dwi"``) or a file the recipe's
    ``prepare`` commands write (``"datalist": "{work}/phantom/datalist.json"``).
    """
    ctx = {"work": str(work), "repo": str(REPO), "python": sys.executable}
    kind = recipe.get("data")
    if kind or recipe.get("datalist"):
        datalist = Path(data[kind]) if kind else Path(fill_placeholders(recipe["datalist"], ctx))
        ctx.update(datalist=str(datalist), data_dir=str(datalist.parent))
        if not datalist.is_file():
            return ctx
        content = json.loads(datalist.read_text())
        if kind == "dwi":
            smoke = content.get("smoke", {})
            for k, v in smoke.items():
                ctx[f"test_{k}"] = str(datalist.parent / v)
        else:
            for k, v in (content.get("test") or [{}])[0].items():
                ctx[f"test_{k}"] = str(datalist.parent / v) if isinstance(v, str) and (datalist.parent / v).exists() else v
    return ctx


def cli_args(args: dict) -> list[str]:
    """``{key: value}`` as ``monai.bundle run`` arguments: strings as they are, anything else as a Python literal.
    ``monai.bundle run`` parses its arguments with fire, which reads ``True`` / ``['t2', 'pd']`` but keeps JSON's
    ``false`` as the (truthy) string "false"."""
    out = []
    for k, v in args.items():
        out += [f"--{k}", v if isinstance(v, str) else repr(v)]
    return out


def _run_step(bundle_dir: Path, step: dict, ctx: dict, log_dir: Path) -> dict:
    configs = [str(bundle_dir / c) for c in step["config"]]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs), "--bundle_root", str(bundle_dir)]
    cmd += cli_args(fill_placeholders(step.get("args", {}), ctx))
    log = log_dir / f"{step['name']}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=bundle_dir, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - t0
    tail = log.read_text().splitlines()[-15:] if proc.returncode else []
    return {"name": step["name"], "rc": proc.returncode, "seconds": seconds, "log": log, "tail": tail,
            "command": "python -m monai.bundle run --config_file " + shlex.quote(json.dumps(step["config"]))}


def _metrics_markdown(paths: list[str]) -> list[str]:
    lines = []
    for pattern in paths:
        for path in sorted(glob.glob(pattern, recursive=True)):
            lines.append(f"\n`{Path(path).name}`\n")
            if path.endswith(".csv"):
                with open(path) as fh:
                    rows = list(csv.reader(fh))
                if not rows:
                    continue
                rows = rows[:1] + rows[1:25]
                lines.append("| " + " | ".join(rows[0]) + " |")
                lines.append("|" + "---|" * len(rows[0]))
                for r in rows[1:]:
                    lines.append("| " + " | ".join(_short(x) for x in r) + " |")
            elif path.endswith(".json"):
                flat = _flatten(json.loads(Path(path).read_text()))
                lines.append("| metric | value |")
                lines.append("|---|---|")
                for k, v in list(flat.items())[:40]:
                    lines.append(f"| {k} | {_short(v)} |")
    return lines


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}." if not isinstance(v, (int, float, str)) else f"{prefix}{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:10]):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def _short(x) -> str:
    try:
        return f"{float(x):.4g}"
    except (TypeError, ValueError):
        return str(x)


def _previews(recipe: dict, ctx: dict, out_dir: Path) -> list[tuple[str, Path]]:
    from common.utils.preview import save_montage

    made = []
    for i, spec in enumerate(recipe.get("previews", [])):
        vols = {}
        for title, pattern in fill_placeholders(spec["volumes"], ctx).items():
            hits = sorted(glob.glob(pattern, recursive=True))
            if hits:
                vols[title] = hits[0]
        if not vols:
            continue
        png = out_dir / f"preview_{i}.png"
        save_montage(vols, png, labels=spec.get("labels", []), title=spec.get("title"))
        made.append((spec.get("title", png.stem), png))
    return made


#: written into every demo work folder: only folders carrying it are ever deleted by a re-run
WORK_MARKER = ".demo-work-folder"


def fresh_work_dir(work: Path) -> Path:
    """An empty work folder for one bundle's demo. A previous demo's folder (with the marker) is
    replaced, since the demo's training steps refuse to overwrite checkpoints; any other existing
    non-empty folder is refused, never deleted."""
    if work.exists():
        if not (work / WORK_MARKER).is_file() and any(work.iterdir()):
            raise SystemExit(f"'{work}' exists and was not made by the demo; choose another --out or remove it")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("made by ci/run_demo.py; deleted and rebuilt by the next demo run\n")
    return work


def recipe_steps(recipe: dict, train: bool) -> list[dict]:
    """The steps a run executes: ``train_steps`` with ``--train`` where the recipe has them
    (bundles shipping demo models), ``steps`` otherwise."""
    return recipe.get("train_steps", recipe["steps"]) if train else recipe["steps"]


def headline(spec: dict, ctx: dict) -> dict:
    """One headline number of a bundle from a metrics CSV of its run.

    ``spec``: ``name``, ``csv`` (path with placeholders), ``where`` (column -> value filters),
    ``column`` reduced over the matching rows (NaN left out) by ``reduce`` (``mean``, default, or
    ``min``), optional ``threshold`` (the value must be at least that), ``baseline`` (true: a baseline's
    number, shown beside the method's in the report's opening table).
    """
    path = Path(fill_placeholders(spec["csv"], ctx))
    value = None
    if path.is_file():
        with open(path) as fh:
            rows = [r for r in csv.DictReader(fh) if all(r.get(k) == str(v) for k, v in spec.get("where", {}).items())]
        values = [float(r[spec["column"]]) for r in rows if r.get(spec["column"], "") not in ("", "nan")]
        if values:
            value = min(values) if spec.get("reduce") == "min" else sum(values) / len(values)
    out = {"name": spec["name"], "value": value}
    if spec.get("baseline"):
        out["baseline"] = True
    if "threshold" in spec:
        out["threshold"] = spec["threshold"]
        out["meets_threshold"] = value is not None and value >= spec["threshold"]
    return out


def _fmt(value) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def summary_table(summary: dict) -> list[str]:
    """The report's opening table: one row per bundle of ``summary`` (as written to summary.json).

    The headline cell is the bundle's first headline metric that is not a baseline, with its bar; the
    baselines cell lists the baseline headlines that follow it (the same metric, same test image)."""
    lines = ["| bundle | task | test image | headline metric | baselines | wall time (s) |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        heads = s.get("headline", [])
        first = next((i for i, h in enumerate(heads) if not h.get("baseline")), None)
        if first is None:
            head_cell, base_cell = "none: pipeline check only (no shipped model)", "-"
        else:
            h = heads[first]
            head_cell = f"{h['name']}: **{_fmt(h['value'])}**"
            if "threshold" in h:
                head_cell += f" (bar >= {h['threshold']}: {'met' if h.get('meets_threshold') else 'NOT met'})"
            bases = []
            for b in heads[first + 1:]:
                if not b.get("baseline"):
                    break
                bases.append(f"{b['name']}: {_fmt(b['value'])}")
            base_cell = "; ".join(bases) or "-"
        failed = [k for k, rc in s.get("steps", {}).items() if rc]
        if failed:
            head_cell += f" (steps failed: {', '.join(failed)})"
        lines.append(f"| {name} | {s.get('task', '')} | {s.get('test_image', '')} | {head_cell} | {base_cell} | "
                     f"{s.get('wall_seconds', 0):.0f} |")
    return lines


def run_demo(bundles: list[str] | None, out: Path, keep_going: bool = True, train: bool = False) -> int:
    from common.data import demo

    recipes = json.loads(RECIPES.read_text())
    names = bundles or [n for n in sorted(recipes) if (REPO / "bundles" / n / "configs").is_dir()]
    unknown = [n for n in names if n not in recipes]
    if unknown:
        raise SystemExit(f"no demo recipe for {unknown} in {RECIPES.name}; known: {sorted(recipes)}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = demo.build_all(out / "data", n_train=6, n_val=1, seed=0)
    data_seconds = time.perf_counter() - t0
    lines = [
        "# Demo report",
        "",
        f"Demo data built in {data_seconds:.1f} s (`common.data.demo.build_all`): simulated brain MRI "
        "(test: real SPM avg152 T1/T2/PD), deformed TotalSegmentator CT (test: the original CT), dipy DWI schemes.",
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPU cores.",
        "",
        "| bundle | step | status | seconds | command |",
        "|---|---|---|---|---|",
    ]
    sections, failures, summary = [], 0, {}
    for name in names:
        recipe = recipes[name]
        bundle_dir = REPO / "bundles" / name
        work = fresh_work_dir(out / name)
        ctx = _context(data, work, recipe)
        results = []
        bundle_t0 = time.perf_counter()
        for i, cmd in enumerate(recipe.get("prepare", []) + (recipe.get("train_prepare", []) if train else [])):
            t1 = time.perf_counter()
            log = work / f"prepare_{i}.log"
            with open(log, "w") as fh:
                rc = subprocess.run(fill_placeholders(cmd, ctx), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
            lines.append(f"| {name} | prepare | {'ok' if rc == 0 else f'FAILED (exit {rc})'} | {time.perf_counter() - t1:.1f} | "
                         f"`{' '.join(str(c) for c in cmd[1:])}` |")
            if rc:
                failures += 1
        ctx = _context(data, work, recipe)  # the prepared datalist's test case
        steps = recipe_steps(recipe, train)
        for step in steps:
            print(f"[{name}] {step['name']} ...", flush=True)
            res = _run_step(bundle_dir, step, ctx, work)
            results.append(res)
            status = "ok" if res["rc"] == 0 else f"FAILED (exit {res['rc']})"
            print(f"[{name}] {step['name']}: {status} in {res['seconds']:.1f} s", flush=True)
            lines.append(f"| {name} | {step['name']} | {status} | {res['seconds']:.1f} | `{res['command']}` |")
            if res["rc"]:
                failures += 1
                if not keep_going:
                    break
        sec = [f"\n## {name}\n", recipe.get("description", "")]
        for res in results:
            if res["rc"]:
                sec += [f"\n**{res['name']} failed**; last lines of `{res['log'].relative_to(out)}`:\n", "```", *res["tail"], "```"]
        sec += _metrics_markdown(fill_placeholders(recipe.get("metrics", []), ctx))
        try:
            for title, png in _previews(recipe, ctx, work):
                sec.append(f"\n{title}\n\n![{title}]({png.relative_to(out).as_posix()})\n")
        except Exception as e:  # a preview must never hide the run's own result
            sec.append(f"\n(preview failed: {type(e).__name__}: {e})\n")
        sections += sec
        summary[name] = {
            "task": recipe.get("task", ""),
            "test_image": recipe.get("test_image", ""),
            "wall_seconds": round(time.perf_counter() - bundle_t0, 1),
            "trained_here": bool(train and "train_steps" in recipe),
            "steps": {r["name"]: r["rc"] for r in results},
            "headline": [headline(h, ctx) for h in recipe.get("headline", [])],
        }
        if failures and not keep_going:
            break
    lines += ["", f"Total {time.perf_counter() - t0:.1f} s."] + sections
    lines = lines[:2] + summary_table(summary) + [""] + lines[2:]  # the table opens the report
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"report: {report}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run bundles end to end on the demo data and write a report.")
    parser.add_argument("--bundle", action="append", help="bundle name (repeatable); default: all with a recipe")
    parser.add_argument("--out", default=str(REPO / "reports" / "demo"), help="report folder")
    parser.add_argument("--stop-on-failure", action="store_true", help="stop at the first failing step")
    parser.add_argument(
        "--train", action="store_true",
        help="bundles with shipped demo models: retrain them from scratch (long: see each model card) instead of "
        "running the shipped weights",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return run_demo(args.bundle, Path(args.out), keep_going=not args.stop_on_failure, train=args.train)


if __name__ == "__main__":
    sys.exit(main())
