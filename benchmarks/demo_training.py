"""What the demo-model drivers share: a bundle's configs as one workflow, and one training stage stopped by wall clock.

``benchmarks/noddi_sr_demo.py``, ``benchmarks/maisi_ct_demo.py`` and ``benchmarks/aldm_translation_demo.py``
train a bundle's stages with its demo overlay through the bundle's own configs, each stage stopped at the first
epoch end after its share of a wall-clock budget, and keep a learning curve of it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


class _OverridesAction(argparse.Action):
    """Each ``--set KEY=VALUE`` parsed (:func:`parse_overrides`) into one dict, so ``args.set`` is always a dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), **parse_overrides([values])})


def add_overlay_options(parser: argparse.ArgumentParser) -> None:
    """``--overlay`` (further overlays after ``demo.json``, e.g. the tests' ``tiny.json``) and ``--set KEY=VALUE``
    (config overrides in every workflow, ``args.set``: a dict) on one sub-command's parser."""
    parser.add_argument("--overlay", action="append", default=[], help="a further overlay after demo.json (tests: tiny.json)")
    parser.add_argument("--set", action=_OverridesAction, default={}, metavar="KEY=VALUE",
                        help="config override, every workflow (repeatable)")


def overlays(args) -> list[str]:
    """The overlays a driver's workflows stack on a bundle config: ``demo.json``, then ``--overlay`` in order."""
    return ["demo.json", *args.overlay]


def parse_overrides(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` config overrides of a driver's command line (VALUE parsed as JSON where it is JSON, else a
    string, e.g. ``adv_weight=0`` or ``warmup=$lambda epoch: max(0.1, 1 - epoch / 60)``), as ``monai.bundle run
    --KEY``."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def bundle_workflow(bundle: Path, files, wtype: str, **overrides):
    """``ConfigWorkflow`` of ``bundle/configs/<files>`` (later files override earlier ones), initialised."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(bundle / "configs" / f) for f in files],
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type=wtype,
        bundle_root=str(bundle),
        **overrides,
    )
    wf.initialize()
    return wf


def loss_value(output) -> float:
    """The training loss of a step's output: a number, a dict with ``loss``, or a list of either."""
    if isinstance(output, (list, tuple)):
        output = output[0]
    if isinstance(output, dict):
        output = output.get("loss", next(iter(output.values())))
    return float(output)


def train_stage(bundle: Path, files, stage: str, out: Path, budget_s: float, prepare_first: bool = False,
                **overrides) -> dict:
    """One stage (``files``: its config and the demo overlay) stopped at the first epoch end after ``budget_s``.

    Weights go to ``out/models``, logs to ``out/out_<stage>``; the learning curve (training loss every 10
    iterations, the validation PSNR wherever the config validated) to ``out/curves_<stage>.json`` and is returned.
    ``prepare_first`` runs the config's ``prepare_data`` before the trainer is built, for stages whose dataset is a
    file that ``prepare_data`` writes (the config's run list then reuses the parsed result).
    """
    from ignite.engine import Events

    t0 = time.perf_counter()
    wf = bundle_workflow(bundle, files, "train", ckpt_dir=str(out / "models"), output_dir=str(out / f"out_{stage}"),
                         overwrite=True, **overrides)
    if prepare_first:
        wf.parser.get_parsed_content("prepare_data")
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator") if "validate" in wf.parser else None
    curve = {"iteration": [], "loss": [], "seconds": [], "val_iteration": [], "val_psnr": [], "val_seconds": []}

    @trainer.on(Events.ITERATION_COMPLETED(every=10))
    def _log(engine):
        curve["iteration"].append(engine.state.iteration)
        curve["loss"].append(loss_value(engine.state.output))
        curve["seconds"].append(time.perf_counter() - t0)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _budget(engine):  # attached after the config's validation handler, so it sees this epoch's metric
        validated = evaluator is not None and evaluator.state is not None and evaluator.state.epoch == engine.state.epoch
        psnr = evaluator.state.metrics.get("val_psnr") if validated else None  # MONAI evaluators run at the trainer's epoch
        if psnr is not None:
            curve["val_iteration"].append(engine.state.iteration)
            curve["val_psnr"].append(float(psnr))
            curve["val_seconds"].append(time.perf_counter() - t0)
        loss = curve["loss"][-1] if curve["loss"] else loss_value(engine.state.output)
        print(f"[{stage}] epoch {engine.state.epoch} it {engine.state.iteration} loss {loss:.4f} val_psnr {psnr} "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        if time.perf_counter() - t0 >= budget_s:
            engine.terminate()

    wf.run()
    wf.finalize()
    curve["wall_s"] = time.perf_counter() - t0
    curve["iterations"] = int(trainer.state.iteration)
    curve["best_val_psnr"] = max(curve["val_psnr"]) if curve["val_psnr"] else None
    (out / f"curves_{stage}.json").write_text(json.dumps(curve))
    return curve


def train_baseline(loader, step, validate, save, budget_s: float, val_every: int, name: str,
                   started: float | None = None) -> dict:
    """An in-run baseline trained for ``budget_s`` wall seconds, as the drivers' ``baseline`` sub-commands do.

    ``step(batch) -> loss`` is one training step; ``validate() -> PSNR`` runs every ``val_every`` iterations and
    once more when the budget is spent; ``save(iteration)`` keeps the weights whenever validation improves.
    ``started``: the ``time.perf_counter()`` the budget counts from (default now; a driver that builds its data
    first passes its own start, as :func:`train_stage` counts its workflow's setup). Returns the learning curve in
    the layout of :func:`train_stage` (training loss every 10 iterations, every validation), with ``wall_s``,
    ``iterations`` and ``best_val_psnr``.
    """
    t0 = time.perf_counter() if started is None else started
    curve = {"iteration": [], "loss": [], "seconds": [], "val_iteration": [], "val_psnr": [], "val_seconds": []}
    best, it, losses = -float("inf"), 0, []
    done = False
    while not done:
        for batch in loader:
            losses.append(float(step(batch)))
            it += 1
            recent = sum(losses[-10:]) / len(losses[-10:])
            if it % 10 == 0:
                curve["iteration"].append(it)
                curve["loss"].append(recent)
                curve["seconds"].append(time.perf_counter() - t0)
            done = time.perf_counter() - t0 >= budget_s
            if it % val_every == 0 or done:
                v = float(validate())
                curve["val_iteration"].append(it)
                curve["val_psnr"].append(v)
                curve["val_seconds"].append(time.perf_counter() - t0)
                print(f"[{name}] it {it} loss {recent:.4f} val_psnr {v:.2f} {time.perf_counter() - t0:.0f}s", flush=True)
                if v > best:
                    best = v
                    save(it)
            if done:
                break
    curve["wall_s"] = time.perf_counter() - t0
    curve["iterations"] = it
    curve["best_val_psnr"] = best
    return curve


def plot_learning_curves(curves: dict, png: Path) -> None:
    """``curves``: stage name -> curve (``iteration``/``loss``, ``val_iteration``/``val_psnr``, ``wall_s``) as the
    drivers write them; one column per stage, training loss above (log scale where it stays positive: adversarial
    stages go negative), validation PSNR below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(curves), figsize=(4 * len(curves), 6), squeeze=False)
    for i, (name, c) in enumerate(curves.items()):
        axes[0, i].plot(c["iteration"], c["loss"], lw=0.8)
        axes[0, i].set_title(f"{name}: training loss")
        if c["loss"] and min(c["loss"]) > 0:
            axes[0, i].set_yscale("log")
        axes[1, i].plot(c["val_iteration"], c["val_psnr"], "o-", ms=3)
        axes[1, i].set_title(f"{name}: validation PSNR (dB)")
        axes[1, i].set_xlabel(f"iteration ({c.get('wall_s', 0) / 60:.0f} min)")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
