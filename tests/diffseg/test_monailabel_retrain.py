"""Retraining as MONAI Label 0.8.5 does it, small training lists, and modality tied to data and model.

MONAI Label's ``BundleTrainTask`` (monailabel 0.8.5, ``monailabel/tasks/train/bundle.py``) reads
``configs/train.json``, inserts at position 0 of ``train#handlers`` a
``{"_target_": "CheckpointLoader", "load_path": "<bundle>/models/model.pt", "load_dict": {"model":
"$@network"}, "strict": False}`` when its option ``pretrained`` is true (the default) and that file
exists, and calls ``monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=...,
config_file=...)`` with the overrides ``bundle_root``, ``train#trainer#max_epochs``,
``train#dataset#data`` and ``validate#dataset#data`` (its datastore's image/label pairs split by
``val_split``, 0.2 by default), ``device`` (a ``torch.device``) and ``train#handlers``.
:func:`_monailabel_train` repeats exactly that on a copy of the bundle whose ``models/`` already
holds a model, with ``configs/tiny.json`` added so that it runs on a CPU, on the real demo CT cohort.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import pytest
import torch

from common.utils.errors import InvalidInputError, OutputExistsError, find_user_error

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "diffseg"


def _copy_bundle(dst: Path) -> Path:
    """A bundle folder as MONAI Label serves it (its own ``models/``), outside the repository."""
    for sub in ("configs", "scripts"):
        shutil.copytree(BUNDLE / sub, dst / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "models").mkdir()
    return dst


def _cases(ct_demo: Path, split: str) -> list[dict]:
    dl = json.loads(ct_demo.read_text())
    return [{"image": str(ct_demo.parent / c["image"]), "label": str(ct_demo.parent / c["label"])} for c in dl[split]]


def _cli_train(bundle: Path, ct_demo: Path, **overrides) -> None:
    """``python -m monai.bundle run --config_file "['configs/train.json','configs/tiny.json']" ...``, in-process."""
    from monai.bundle import run

    sys.path.insert(0, str(bundle))
    kw = dict(dataset_dir=str(ct_demo.parent), datalist=str(ct_demo), output_dir=str(bundle / "outputs"))
    kw.update(overrides)
    run(
        config_file=[str(bundle / "configs" / "train.json"), str(bundle / "configs" / "tiny.json")],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        **kw,
    )


def _monailabel_train(bundle: Path, datalist: list[dict], max_epochs: int = 1, val_split: float = 0.2,
                      extra: dict | None = None) -> None:
    """What ``BundleTrainTask.__call__`` + ``run_single_gpu`` of monailabel 0.8.5 do (pretrained true)."""
    import monai.bundle
    from monai.bundle import ConfigParser
    from monai.data import partition_dataset

    config_path = str(bundle / "configs" / "train.json")
    bundle_config = ConfigParser()
    bundle_config.read_config(config_path)
    bundle_config.config.update({"bundle_root": str(bundle)})
    train_ds, val_ds = partition_dataset(datalist, ratios=[1 - val_split, val_split], shuffle=False)
    train_handlers = bundle_config.get("train#handlers", [])
    model_pytorch = os.path.join(str(bundle), "models", "model.pt")
    if os.path.exists(model_pytorch):
        train_handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": model_pytorch,
                                  "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {
        "bundle_root": str(bundle),
        "train#trainer#max_epochs": max_epochs,
        "train#dataset#data": train_ds,
        "device": torch.device("cpu"),
        "train#handlers": train_handlers,
        "validate#dataset#data": val_ds,
    }
    overrides.update(extra or {})
    sys.path.insert(0, str(bundle))
    monai.bundle.run(
        run_id="run", init_id=None, final_id=None,
        meta_file=str(bundle / "configs" / "metadata.json"),
        # MONAI Label passes configs/train.json alone; tiny.json keeps it CPU-sized
        config_file=[config_path, str(bundle / "configs" / "tiny.json")],
        **overrides,
    )


def _state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["model"] if "model" in obj else obj


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def _expect(exc_type, run, *fragments):
    with pytest.raises(BaseException) as info:
        run()
    err = find_user_error(info.value)
    assert isinstance(err, exc_type), f"expected {exc_type.__name__} behind {info.value!r}"
    for f in fragments:
        assert f in str(err), f"{f!r} not in: {err}"
    return err


@pytest.fixture(scope="module")
def existing(ct_demo, tmp_path_factory):
    """A bundle copy whose models/ holds a model trained by a first command-line run (seed 1)."""
    bundle = _copy_bundle(tmp_path_factory.mktemp("ml") / "diffseg")
    _cli_train(bundle, ct_demo, seed=1)
    models = bundle / "models"
    assert {"model.pt", "checkpoint.pt", "model_info.json"} <= {p.name for p in models.iterdir()}
    info = json.loads((models / "model_info.json").read_text())
    assert info["modality"] == "CT" and info["num_classes"] == 7 and info["n_img"] == 1 and info["diffusion"] is True
    return bundle


def test_second_command_line_run_is_refused(existing, ct_demo):
    before = {p.name: p.read_bytes() for p in (existing / "models").iterdir()}
    _expect(OutputExistsError, lambda: _cli_train(existing, ct_demo), "already holds", "'overwrite'", "'resume'",
            "'finetune'")
    assert {p.name: p.read_bytes() for p in (existing / "models").iterdir()} == before


def test_monailabel_retrain_fine_tunes_the_existing_model(existing, ct_demo, tmp_path):
    bundle = _copy_bundle(tmp_path / "diffseg")
    shutil.copytree(existing / "models", bundle / "models", dirs_exist_ok=True)
    old = _state(bundle / "models" / "model.pt")
    # the seed-0 initialisation the retrain would start from if it ignored the existing model
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in ("train.json", "tiny.json")])
    torch.manual_seed(0)
    fresh = parser.get_parsed_content("network_def").state_dict()
    assert _max_diff(old, fresh) > 0.05

    datalist = _cases(ct_demo, "training") + _cases(ct_demo, "validation")  # what the datastore lists
    _monailabel_train(bundle, datalist)

    new = _state(bundle / "models" / "model.pt")
    assert new.keys() == old.keys() and not any(k.startswith("module.") for k in new)  # still a plain state dict
    ckpt = torch.load(bundle / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["max_epochs"] == 1  # the retrain's own run
    moved = _max_diff(new, old)
    assert 0.0 < moved < 0.05, f"weights moved by {moved} from the existing model"  # trained on from it
    assert _max_diff(new, fresh) > 0.05
    assert json.loads((bundle / "models" / "model_info.json").read_text())["modality"] == "CT"


def test_monailabel_retrain_refuses_a_model_of_another_modality(existing, ct_demo, tmp_path):
    """models/ holds a CT model; the bundle (its train.json) configured for MR: refused before any write."""
    bundle = _copy_bundle(tmp_path / "diffseg")
    shutil.copytree(existing / "models", bundle / "models", dirs_exist_ok=True)
    before = {p.name: p.read_bytes() for p in (bundle / "models").iterdir()}
    _expect(
        InvalidInputError,
        lambda: _monailabel_train(bundle, _cases(ct_demo, "training"), extra={"modality": "MR"}),
        "was trained with modality 'CT'", "(this run: 'MR', config key 'modality')", "model_info.json",
        "CheckpointLoader of 'train#handlers'",
    )
    assert {p.name: p.read_bytes() for p in (bundle / "models").iterdir()} == before
    assert not (bundle / "outputs").exists()


def test_command_line_finetune_key(existing, ct_demo, tmp_path):
    bundle = _copy_bundle(tmp_path / "diffseg")
    shutil.copytree(existing / "models", bundle / "models", dirs_exist_ok=True)
    old = _state(bundle / "models" / "model.pt")
    _expect(InvalidInputError, lambda: _cli_train(bundle, ct_demo, finetune=True, resume=True), "set only one")
    _cli_train(bundle, ct_demo, finetune=True)
    assert 0.0 < _max_diff(_state(bundle / "models" / "model.pt"), old) < 0.05


@pytest.mark.parametrize("source", ["model.pt", "checkpoint.pt"])
def test_finetune_starts_from_the_checkpoint_weights_with_a_fresh_run(existing, ct_demo, tmp_path, source):
    """``finetune`` over a ckpt_dir that holds an earlier run: accepted, and the first iteration sees exactly the
    weights of ``finetune_ckpt`` (the plain best model or the training checkpoint's 'model' entry), not the
    seed-0 initialisation, with an empty optimiser state and a trainer counting from iteration 1."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    bundle = _copy_bundle(tmp_path / "diffseg")
    shutil.copytree(existing / "models", bundle / "models", dirs_exist_ok=True)
    expected = _state(bundle / "models" / source)
    sys.path.insert(0, str(bundle))
    wf = ConfigWorkflow(
        config_file=[str(bundle / "configs" / f) for f in ("train.json", "tiny.json")],
        meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="train", bundle_root=str(bundle),
        dataset_dir=str(ct_demo.parent), datalist=str(ct_demo), output_dir=str(tmp_path / "outputs"),
        finetune=True, finetune_ckpt=str(bundle / "models" / source),
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    network = wf.parser.get_parsed_content("network")
    optimizer = wf.parser.get_parsed_content("optimizer")
    fresh = {k: v.clone() for k, v in network.state_dict().items()}  # seed-0 initialisation, before run
    seen = {}

    def first_iteration(engine):
        if not seen:
            seen.update(iteration=engine.state.iteration, optimizer_state=len(optimizer.state),
                        weights={k: v.detach().cpu().clone() for k, v in network.state_dict().items()})

    trainer.add_event_handler(Events.ITERATION_STARTED, first_iteration)
    wf.run()
    assert seen["iteration"] == 1 and seen["optimizer_state"] == 0  # a new run, not a resumed one
    assert seen["weights"].keys() == expected.keys()
    assert all(torch.equal(seen["weights"][k], expected[k]) for k in expected)  # exactly the checkpoint's weights
    assert _max_diff(seen["weights"], fresh) > 0.05  # not the initialisation
    ckpt = torch.load(bundle / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2  # the fine-tune run's own 2 iterations (resume would end at 4)
    wf.finalize()


POLICY_KEYS = ("resume", "resume_ckpt", "resume_ckpt_sha256", "finetune", "finetune_ckpt", "finetune_ckpt_sha256",
               "overwrite")


@pytest.mark.parametrize(
    "overlays",
    [("tiny.json",), ("train_baseline.json", "tiny.json"), ("demo.json",), ("train_baseline.json", "demo.json")],
    ids=["diffusion", "baseline", "demo", "baseline-demo"],
)
def test_every_training_config_applies_the_same_run_policy(overlays, tmp_path):
    """train.json with each overlay: the seven policy keys, and the first check of ``run`` refuses a ckpt_dir that
    holds checkpoints unless resume, finetune (the model must fit) or overwrite; resume + finetune refused."""
    from monai.bundle import ConfigParser

    from common.utils.errors import OutputExistsError

    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    files = [str(BUNDLE / "configs" / f) for f in ("train.json", *overlays)]
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    parser = ConfigParser()
    parser.read_config(files)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt / "model.pt")

    def first_check(**overrides):
        p = ConfigParser()
        p.read_config(files)
        p.update({"bundle_root": str(BUNDLE), "ckpt_dir": str(ckpt), "output_dir": str(tmp_path / "logs"),
                  "device": torch.device("cpu"), **overrides})
        assert all(k in p.config for k in POLICY_KEYS)
        return p.get_parsed_content("run#0")

    assert [parser[k] for k in POLICY_KEYS] == [False, "$@ckpt_dir + '/checkpoint.pt'", None, False,
                                                "$@ckpt_dir + '/model.pt'", None, False]
    _expect(OutputExistsError, first_check, "already holds", "'overwrite'", "'resume'", "'finetune'")
    first_check(overwrite=True)
    first_check(resume=True)
    first_check(finetune=True)  # model.pt fits this configuration's network
    _expect(InvalidInputError, lambda: first_check(finetune=True, resume=True), "set only one")


def test_multi_gpu_run_makes_the_same_checks_as_train():
    """multi_gpu_train.json replaces ``run`` (rank guards): its checks before training are train.json's."""
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())["run"]
    multi = json.loads((BUNDLE / "configs" / "multi_gpu_train.json").read_text())["run"]
    assert multi[:3] == train[:3]
    assert [x.split(" if dist")[0] for x in multi[3:]] == train[3:]


def test_small_training_list_trains_with_a_smaller_batch(ct_demo, tmp_path):
    """2 training cases, batch_size 8 (train.json's) with drop_last: one batch of 2 per epoch, not nothing."""
    from monai.bundle import ConfigWorkflow

    sys.path.insert(0, str(BUNDLE))
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / f) for f in ("train.json", "tiny.json")],
        meta_file=str(BUNDLE / "configs" / "metadata.json"), workflow_type="train", bundle_root=str(BUNDLE),
        dataset_dir=str(ct_demo.parent), datalist=str(ct_demo), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "outputs"), batch_size=8, epoch_length=None, max_epochs=2, val_interval=5,
        **{"train#dataset#data": _cases(ct_demo, "training")[:2]},
    )
    wf.initialize()
    with pytest.warns(UserWarning, match=r"2 case\(s\) \(2 per process\), fewer than one batch .*one batch of 2"):
        wf.run()
    loader = wf.parser.get_parsed_content("train#dataloader")
    assert loader.drop_last is False and len(loader) == 1
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 and trainer.state.epoch == 2  # one batch per epoch, two epochs
    import math

    assert math.isfinite(trainer.state.output["loss"])
    assert (tmp_path / "models" / "checkpoint.pt").is_file()
    wf.finalize()


def test_enough_cases_keep_full_batches():
    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    from scripts import drop_last_batch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert drop_last_batch(8, 8) is True and drop_last_batch(200, 8) is True
    with pytest.warns(UserWarning, match="one batch of 7"):
        assert drop_last_batch(7, 8) is False


# ------------------------------------------------------------------------------ modality


@pytest.fixture(scope="module")
def mr_image(brain_demo) -> Path:
    dl = json.loads(Path(brain_demo).read_text())
    path = Path(brain_demo).parent / dl["test"][0]["t1"]  # the real avg152 T1 template
    assert nib.load(str(path)).ndim == 3
    return path


def _validated(path: Path, modality: str):
    from monai.transforms import Compose, EnsureChannelFirstd

    from common.transforms import CheckedLoadImaged, ValidateImaged

    t = Compose([CheckedLoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                 ValidateImaged("image", channels=1, modality=modality)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t({"image": str(path)})
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "modality" in str(w.message)]


def test_image_statistics_contradicting_the_modality_warn(ct_demo, mr_image):
    ct = Path(_cases(ct_demo, "test")[0]["image"])
    assert _validated(ct, "CT") == [] and _validated(mr_image, "MR") == []
    mr_as_ct = _validated(mr_image, "CT")
    assert len(mr_as_ct) == 1 and mr_image.name in mr_as_ct[0] and "no voxel below -50" in mr_as_ct[0]
    ct_as_mr = _validated(ct, "MR")
    assert len(ct_as_mr) == 1 and "below -500" in ct_as_mr[0] and "set modality to 'CT'" in ct_as_mr[0]


def test_ct_model_refused_for_an_mr_run_at_inference(existing, mr_image, tmp_path):
    """models/ records CT; inference configured for MR stops with one error before any output."""
    from monai.bundle import run

    sys.path.insert(0, str(existing))
    out = tmp_path / "pred"
    _expect(
        InvalidInputError,
        lambda: run(
            config_file=[str(existing / "configs" / f) for f in ("inference.json", "tiny.json")],
            meta_file=str(existing / "configs" / "metadata.json"), bundle_root=str(existing),
            input_image=str(mr_image), modality="MR", output_dir=str(out),
        ),
        "was trained with modality 'CT'", "(this run: 'MR', config key 'modality')",
    )
    assert not out.exists() or not list(out.rglob("*.nii.gz"))


def test_mr_image_with_a_ct_run_warns_at_inference(existing, mr_image, tmp_path):
    from monai.bundle import run

    sys.path.insert(0, str(existing))
    with pytest.warns(UserWarning, match=r"no voxel below -50 .*'modality' is 'CT'"):
        run(
            config_file=[str(existing / "configs" / f) for f in ("inference.json", "tiny.json")],
            meta_file=str(existing / "configs" / "metadata.json"), bundle_root=str(existing),
            input_image=str(mr_image), output_dir=str(tmp_path / "pred"),
        )
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 1
