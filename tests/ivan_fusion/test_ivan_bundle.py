"""End-to-end checks of the ivan_fusion bundle on the demo cohort (simulated subjects, real avg152 test case).

Every task trains a few iterations in-process (``ConfigWorkflow``, the parser ``monai.bundle run`` uses) with
the loss falling; one training runs through ``python -m monai.bundle run`` and writes a checkpoint; inference
writes 3D NIfTI in the input geometry in forward, reverse and both directions; evaluate writes the metric files.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.fetch import demo_file

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "ivan_fusion"
TASKS = ("1to1", "2to1", "1to2", "fusion")
# the test case is cropped (real avg152 voxels, affine shifted accordingly) so CPU inference stays short
CROP = (slice(20, 60), slice(30, 78), slice(38, 50))


def _crop(src: Path, dst: Path) -> str:
    img = nib.load(str(src))
    nib.save(img.slicer[CROP], str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def datalists(brain_demo, tmp_path_factory):
    """Small datalists with absolute paths: 1 training subject, 1 validation subject, the cropped real test case,
    and the semi-synthetic T2 + CT fusion pair (cropped for the test split)."""
    root = tmp_path_factory.mktemp("ivan_data")
    d = json.loads(Path(brain_demo).read_text())
    base = Path(brain_demo).parent

    def absify(items):
        return [{k: (v if k == "id" else str(base / v)) for k, v in it.items()} for it in items]

    test = {"id": "avg152"}
    for k, v in d["test"][0].items():
        if k != "id":
            test[k] = _crop(base / v, root / f"avg152_{k}.nii.gz")
    mri = {"training": absify(d["training"][:1]), "validation": absify(d["validation"][:1]), "test": [test]}
    (root / "mri.json").write_text(json.dumps(mri))

    from common.data.fusion_demo import build_fusion_demo

    fus_json = build_fusion_demo(root, demo_file("spm/avg152T2.nii"), demo_file("spm/TPM.nii"))
    fus = json.loads(fus_json.read_text())
    item = {"id": "icbm152", **{k: str(fus_json.parent / fus["training"][0][k]) for k in ("t2", "ct")}}
    small = {"id": "icbm152", **{k: _crop(Path(item[k]), root / f"icbm152_{k}.nii.gz") for k in ("t2", "ct")}}
    (root / "fusion.json").write_text(json.dumps({"training": [item], "validation": [small], "test": [small]}))
    return {"mri": str(root / "mri.json"), "fusion": str(root / "fusion.json"), "root": root}


def _workflow(files, wtype, **overrides):
    from monai.bundle import ConfigWorkflow

    cfgs = [str(BUNDLE / "configs" / f) for f in files]
    wf = ConfigWorkflow(
        config_file=cfgs, meta_file=str(BUNDLE / "configs" / "metadata.json"), workflow_type=wtype,
        bundle_root=str(BUNDLE), **overrides,
    )
    return wf


def _run_in_process(files, wtype, record=False, start_weights=None, **overrides):
    """Run a workflow in-process; ``record``: return the training iterations' outputs; ``start_weights``: a dict
    filled with the network's weights at the first training iteration (after the checkpoint loaders ran)."""
    sys.path.insert(0, str(BUNDLE))
    try:
        wf = _workflow(files, wtype, **overrides)
        wf.initialize()
        losses = []
        if record or start_weights is not None:
            from ignite.engine import Events

            trainer = wf.parser.get_parsed_content("train#trainer")
        if record:
            trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(dict(e.state.output)))
        if start_weights is not None:
            net = wf.parser.get_parsed_content("network")
            trainer.add_event_handler(
                Events.ITERATION_STARTED(once=1),
                lambda e: start_weights.update({k: v.detach().cpu().clone() for k, v in net.state_dict().items()}),
            )
        wf.run()
        wf.finalize()
        return losses
    finally:
        sys.path.remove(str(BUNDLE))
        for m in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[m]


@pytest.fixture(scope="module")
def trained(datalists):
    """Train each task for 3 epochs x 4 iterations (tiny network, learning rate 1e-3 so that a dozen steps show
    the trend); returns {task: (ckpt_dir, losses)}. Validation runs once, at the last epoch."""
    out = {}
    for task in TASKS:
        run = datalists["root"] / f"run_{task}"
        losses = _run_in_process(
            ["train.json", f"task_{task}.json", "tiny.json"], "train", record=True,
            datalist=datalists["fusion" if task == "fusion" else "mri"], output_dir=str(run / "out"),
            ckpt_dir=str(run / "models"), max_epochs=3, epoch_length=4, val_interval=3, learning_rate=1e-3,
        )
        out[task] = (run / "models", losses)
    return out


@pytest.mark.parametrize("task", TASKS)
def test_each_task_trains_with_falling_loss(trained, task):
    ckpt_dir, losses = trained[task]
    assert len(losses) == 12
    assert all({"loss", "loss_fwd", "loss_rev", "lr"} <= set(o) for o in losses)
    first = np.mean([o["loss"] for o in losses[:4]])
    last = np.mean([o["loss"] for o in losses[-4:]])
    assert np.isfinite(first) and last < first, (task, first, last)
    assert (ckpt_dir / "model.pt").is_file() and (ckpt_dir / "checkpoint_epoch=3.pt").is_file()
    state = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "task"} <= set(state)
    tasks = {"1to1": (["t1"], ["t2"]), "2to1": (["t1", "pd"], ["t2"]), "1to2": (["t1"], ["t2", "pd"]),
             "fusion": (["t2", "ct"], ["fused"])}
    assert (state["task"]["inputs"], state["task"]["targets"]) == tasks[task] and state["task"]["name"] == task
    assert state["trainer"]["iteration"] == 12 and state["trainer"]["max_epochs"] == 3


def test_monai_bundle_run_trains_and_writes_checkpoint(datalists):
    run = datalists["root"] / "run_cli"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(BUNDLE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file",
        "['configs/train.json','configs/task_2to1.json','configs/tiny.json']",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
        "--datalist", datalists["mri"], "--output_dir", str(run / "out"), "--ckpt_dir", str(run / "models"),
    ]
    res = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (run / "models" / "model.pt").is_file()
    assert "loss_fwd" in res.stdout + res.stderr and "val_psnr" in res.stdout + res.stderr
    state = torch.load(run / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 6  # tiny: 2 epochs x 3 iterations


def _infer(datalists, trained, task, direction, out_dir, extra=()):
    ckpt_dir = trained[task][0]
    _run_in_process(
        ["inference.json", f"task_{task}.json", "tiny.json", *extra], "infer",
        datalist=datalists["fusion" if task == "fusion" else "mri"], ckpt_dir=str(ckpt_dir), output_dir=str(out_dir),
        direction=direction,
    )


def test_inference_keeps_input_geometry_and_reverse_writes_sources(datalists, trained):
    out = datalists["root"] / "infer_2to1"
    ref = nib.load(json.loads(Path(datalists["mri"]).read_text())["test"][0]["t1"])
    _infer(datalists, trained, "2to1", "forward", out)
    pred = nib.load(str(out / "avg152_2to1.nii.gz"))
    assert pred.shape == ref.shape == (40, 48, 12)
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-6)
    assert pred.get_data_dtype() == np.float32
    p = pred.get_fdata()
    assert 0 <= p.min() and p.max() <= 1 and p.std() > 0
    # refuses to overwrite
    with pytest.raises(Exception) as err:
        _infer(datalists, trained, "2to1", "forward", out)
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__
    assert any(isinstance(c, FileExistsError) for c in chain)
    # reverse: from the real T2 to estimates of T1 and PD (n_in volumes)
    _infer(datalists, trained, "2to1", "reverse", out)
    for m in ("t1", "pd"):
        rev = nib.load(str(out / f"avg152_rev_{m}.nii.gz"))
        assert rev.shape == ref.shape
        np.testing.assert_allclose(rev.affine, ref.affine, atol=1e-6)
    # both: forward output and the sources reconstructed from it, in the input's voxel order
    out_both = datalists["root"] / "infer_both"
    _infer(datalists, trained, "2to1", "both", out_both)
    t1 = ref.get_fdata()
    rec = nib.load(str(out_both / "avg152_rev_t1.nii.gz")).get_fdata()
    t1n = np.clip(t1 / np.percentile(t1, 99.5), 0, 1)
    corr = np.corrcoef(rec.ravel(), t1n.ravel())[0, 1]
    corr_flipped = np.corrcoef(rec.ravel(), t1n[::-1].ravel())[0, 1]
    assert corr > 0.8 and corr > corr_flipped + 0.3, (corr, corr_flipped)


def test_slice_wise_inference_is_independent_per_slice():
    from monai.inferers import SliceInferer

    from common.networks.ivan import IVAN, IVANPredictor

    net = IVANPredictor(IVAN(2, num_blocks=2, growth=8, seed=0), n_in=1, n_out=1, direction="both").eval()
    x = torch.rand(1, 2, 24, 28, 7)
    perm = torch.randperm(7)
    inferer = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=3, progress=False)
    with torch.no_grad():
        y = inferer(x, net)
        y_perm = inferer(x[..., perm], net)
    assert y.shape == (1, 2, 24, 28, 7)
    torch.testing.assert_close(y_perm, y[..., perm])


def _read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_evaluate_writes_metric_files(datalists, trained):
    out = datalists["root"] / "eval_1to1"
    _run_in_process(
        ["inference.json", "evaluate.json", "task_1to1.json", "tiny.json"], "infer",
        datalist=datalists["mri"], ckpt_dir=str(trained["1to1"][0]), output_dir=str(out),
    )
    per_slice = _read_csv(out / "metrics_per_slice.csv")
    per_case = _read_csv(out / "metrics_per_case.csv")
    summary = {r["metric"]: r for r in _read_csv(out / "summary.csv")}
    assert len(per_slice) == 12 and len(per_case) == 1
    for key in ("t2_psnr", "t2_ssim", "t2_nmse", "rev_t1_psnr", "rev_t1_ssim"):
        assert key in summary and np.isfinite(float(summary[key]["mean"]))
    for key in ("t2_psnr3d", "t2_ssim3d", "t2_nmse3d", "t2_psnr3d_mask"):
        assert np.isfinite(float(per_case[0][key]))
    # per-slice PSNR is the code's 255-scale PSNR = 10 log10(1 / MSE) on [0, 1]
    r = per_slice[3]
    assert float(r["t2_psnr"]) == pytest.approx(10 * np.log10(1 / float(r["t2_mse"])), rel=1e-4)


def test_fusion_inference_and_evaluation(datalists, trained):
    out = datalists["root"] / "eval_fusion"
    _run_in_process(
        ["inference.json", "evaluate.json", "task_fusion.json", "tiny.json"], "infer",
        datalist=datalists["fusion"], ckpt_dir=str(trained["fusion"][0]), output_dir=str(out),
    )
    summary = {r["metric"]: float(r["mean"]) for r in _read_csv(out / "summary.csv")}
    for method in ("ivan", "reference", "average"):
        for m in ("ag", "sf", "en", "qmi", "qabf", "piella_q"):
            assert np.isfinite(summary[f"{method}_{m}"]), (method, m)
    assert "fused_psnr" in summary and "rev_t2_psnr" in summary and "rev_ct_psnr" in summary
    out_f = datalists["root"] / "infer_fusion"
    _infer(datalists, trained, "fusion", "forward", out_f)
    fused = nib.load(str(out_f / "icbm152_fusion.nii.gz"))
    ref = nib.load(json.loads(Path(datalists["fusion"]).read_text())["test"][0]["t2"])
    assert fused.shape == ref.shape
    np.testing.assert_allclose(fused.affine, ref.affine, atol=1e-6)


def test_resume_continues_at_the_saved_epoch(datalists, trained):
    """``resume: true`` loads the newest checkpoint (model, optimiser, scheduler, trainer) and runs only the
    remaining epochs."""
    import shutil

    src = trained["1to1"][0]
    ckpt = datalists["root"] / "resume_models"
    shutil.copytree(src, ckpt)
    losses = _run_in_process(
        ["train.json", "task_1to1.json", "tiny.json"], "train", record=True, datalist=datalists["mri"],
        output_dir=str(datalists["root"] / "resume_out"), ckpt_dir=str(ckpt), max_epochs=4, epoch_length=4,
        val_interval=100, learning_rate=1e-3, resume=True,
    )
    assert len(losses) == 4  # epoch 4 only
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 16
    assert state["lr_scheduler"]["last_epoch"] == 4


def _refused(exc_type, pattern, files, **overrides) -> None:
    """The in-process run stops with the user error ``exc_type`` (behind MONAI's wrapping) matching ``pattern``."""
    import re

    from common.utils.errors import find_user_error

    with pytest.raises(Exception) as err:
        _run_in_process(files, "train", **overrides)
    e = find_user_error(err.value)
    assert isinstance(e, exc_type) and re.search(pattern, str(e)), repr(err.value)


def test_finetune_starts_from_the_trained_model(datalists, trained):
    """A new run over a ckpt_dir holding an earlier run's checkpoints is refused without a flag; ``finetune: true``
    starts from the weights of ``finetune_ckpt`` (default ``<ckpt_dir>/model.pt``), not from a fresh init, with a
    fresh optimiser, schedule and epoch count; ``overwrite: true`` starts from a fresh init."""
    import shutil

    from common.utils.errors import OutputExistsError

    ckpt = datalists["root"] / "finetune_models"
    shutil.copytree(trained["1to1"][0], ckpt)
    trained_model = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)["model"]
    files = ["train.json", "task_1to1.json", "tiny.json"]
    args = dict(datalist=datalists["mri"], output_dir=str(datalists["root"] / "finetune_out"), ckpt_dir=str(ckpt),
                max_epochs=1, epoch_length=2, val_interval=100, learning_rate=1e-3)
    _refused(OutputExistsError, r"checkpoint_epoch=3\.pt.*'finetune' to true", files, **args)
    assert torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)["trainer"]["iteration"] == 12

    start: dict = {}
    losses = _run_in_process(files, "train", record=True, start_weights=start, finetune=True, **args)
    assert len(losses) == 2 and set(start) == set(trained_model)
    for k, v in trained_model.items():
        torch.testing.assert_close(start[k], v, msg=k)
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and state["lr_scheduler"]["last_epoch"] == 1  # a new run
    assert state["task"]["name"] == "1to1"

    fresh: dict = {}
    _run_in_process(files, "train", start_weights=fresh, overwrite=True, **args)
    assert any(not torch.equal(fresh[k], v) for k, v in trained_model.items())  # the check above is not vacuous


def test_finetune_refuses_another_task_and_resume_together(datalists, trained):
    """The synthesis checkpoint (T1 -> T2, same shapes) does not silently fine-tune the fusion task; ``resume`` and
    ``finetune`` together are refused; nothing is trained."""
    from common.utils.errors import InvalidInputError
    from common.utils.io import CheckpointError

    ckpt = datalists["root"] / "finetune_refused"
    files = ["train.json", "task_fusion.json", "tiny.json"]
    args = dict(datalist=datalists["fusion"], output_dir=str(datalists["root"] / "finetune_refused_out"),
                ckpt_dir=str(ckpt), finetune=True, finetune_ckpt=str(trained["1to1"][0] / "model.pt"))
    _refused(CheckpointError, r"finetune_ckpt.*trained for task '1to1'.*this run is task 'fusion'", files, **args)
    _refused(InvalidInputError, "'resume' and 'finetune' are both true", files, resume=True, **args)
    assert not list(ckpt.glob("*.pt"))


def test_sources_on_another_grid_are_resampled_to_the_first(datalists, trained):
    """A PD volume with a larger field of view (same space) is resampled onto the T1 grid before stacking."""
    root = datalists["root"]
    d = json.loads(Path(datalists["mri"]).read_text())
    big = tuple(slice(s.start - 3, s.stop + 2) for s in CROP)
    full_pd = str(Path(d["training"][0]["pd"]).parent.parent / "avg152" / "pd.nii.gz")
    nib.save(nib.load(full_pd).slicer[big], str(root / "avg152_pd_big.nii.gz"))
    d["test"][0]["pd"] = str(root / "avg152_pd_big.nii.gz")
    (root / "mri_grid.json").write_text(json.dumps(d))
    out = root / "infer_grid"
    _run_in_process(
        ["inference.json", "task_2to1.json", "tiny.json"], "infer", datalist=str(root / "mri_grid.json"),
        ckpt_dir=str(trained["2to1"][0]), output_dir=str(out), direction="forward",
    )
    ref = nib.load(d["test"][0]["t1"])
    pred = nib.load(str(out / "avg152_2to1.nii.gz"))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-6)
