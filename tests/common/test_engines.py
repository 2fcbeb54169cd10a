"""StepTrainer, the shared optimiser step, freezing, and epoch-level reseeding."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandGaussianNoised

from common.engines import EpochSeedHandler, StepTrainer, TrainingStep, engine_device, freeze, get_device, optimizer_step, unwrap


class _Step(TrainingStep):
    def __init__(self, grad_clip=None):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.grad_clip = grad_clip
        self.seen = []

    def __call__(self, engine, batch):
        x = batch["x"] if isinstance(batch, dict) else batch
        self.seen.append(x.clone())
        loss = self.net(x).pow(2).mean() * 100
        optimizer_step(engine, loss, self.opt, grad_clip=self.grad_clip)
        return self.detach({"loss": loss, "loss_sq": loss / 2})


def test_step_trainer_runs_the_step_and_keeps_its_terms():
    step = _Step()
    trainer = StepTrainer("cpu", max_epochs=2, train_data_loader=[torch.randn(3, 4) for _ in range(3)], step=step)
    trainer.run()
    assert trainer.state.iteration == 6 and len(step.seen) == 6
    out = trainer.state.output
    assert set(out) == {"loss", "loss_sq", "lr"} and isinstance(out["loss"], float)
    assert out["lr"] == pytest.approx(0.1)
    assert out["loss_sq"] == pytest.approx(out["loss"] / 2)
    assert engine_device(trainer).type == "cpu"


def test_step_without_loss_key_is_an_error():
    class Bad(TrainingStep):
        def __call__(self, engine, batch):
            return {"total": 1.0}

    trainer = StepTrainer("cpu", max_epochs=1, train_data_loader=[torch.zeros(1)], step=Bad())
    with pytest.raises(TypeError, match="'loss' key"):
        trainer.run()


def _flat(step):
    return torch.cat([p.detach().flatten() for p in step.net.parameters()])


def test_optimizer_step_clips_the_global_norm():
    start = _flat(_Step())  # every _Step starts from the same seeded weights
    clipped, free = _Step(grad_clip=1e-3), _Step()
    x = torch.full((2, 4), 10.0)
    for step in (clipped, free):
        StepTrainer("cpu", 1, [x], step).run()
    assert float((_flat(clipped) - start).norm()) == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x max-norm
    assert float((_flat(free) - start).norm()) > 1.0


def test_freeze_and_unwrap():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net.train()
    freeze(net, None)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    wrapped = torch.nn.DataParallel(net)
    assert unwrap(wrapped) is net and unwrap(net) is net


def test_get_device_falls_back_to_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_device("cuda").type == expected
    assert get_device("cpu").type == "cpu"


@pytest.mark.parametrize("epoch_length", [None, 2])  # whole loader, or fewer batches than it holds
def test_epoch_seed_handler_makes_epochs_independent_of_history(epoch_length):
    """Epoch 2's batches (order and random augmentation) are the same whether or not epoch 1 ran."""
    data = [{"x": torch.full((1, 4), float(i))} for i in range(6)]
    per_epoch = epoch_length or len(data)

    def run(max_epochs, start_epoch):
        ds = Dataset(data, transform=Compose([RandGaussianNoised(keys="x", prob=1.0, std=1.0)]))
        loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=0)
        step = _Step()
        trainer = StepTrainer("cpu", max_epochs=max_epochs, train_data_loader=loader, step=step, epoch_length=epoch_length)
        EpochSeedHandler(seed=7).attach(trainer)
        trainer.state.epoch = start_epoch
        trainer.state.iteration = start_epoch * per_epoch
        trainer.run()
        return step.seen[-per_epoch:]

    full = run(max_epochs=2, start_epoch=0)  # epochs 1 and 2
    resumed = run(max_epochs=2, start_epoch=1)  # epoch 2 only
    assert len(full) == len(resumed) == per_epoch
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], run(max_epochs=1, start_epoch=0)[0])  # epoch 1 differs from epoch 2


@pytest.mark.parametrize("fixed_name", [None, "model.pt"])
def test_atomic_saver_keeps_the_best_model_across_improvements(tmp_path, fixed_name):
    """Key-metric checkpoints: the best one survives every improvement, under a fixed name or not."""
    from ignite.engine import Events

    from common.engines import AtomicCheckpointSaver

    step = _Step()
    trainer = StepTrainer("cpu", max_epochs=4, train_data_loader=[torch.randn(2, 4)], step=step)
    scores = iter([0.1, 0.2, 0.3, 0.25])

    @trainer.on(Events.EPOCH_COMPLETED)
    def _score(engine):
        engine.state.metrics = {"dice": next(scores)}
        engine.state.best_metric = max(getattr(engine.state, "best_metric", -1), engine.state.metrics["dice"])

    trainer.state.key_metric_name = "dice"
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": step.net}, save_key_metric=True,
                                  key_metric_name="dice", key_metric_n_saved=1, key_metric_filename=fixed_name)
    saver.attach(trainer)
    trainer.run()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1, files
    if fixed_name:
        assert files == [fixed_name]
    else:
        assert "0.3" in files[0]


def test_atomic_saver_keeps_the_final_checkpoint_on_bad_input(tmp_path):
    """save_final: a crash (a bug) still saves the last state, a user error leaves the folder as it was."""
    from common.engines import AtomicCheckpointSaver
    from common.utils.errors import InvalidInputError

    def run(exc):
        step = _Step()

        def data():
            yield torch.randn(2, 4)
            raise exc

        trainer = StepTrainer("cpu", max_epochs=1, train_data_loader=data(), step=step, epoch_length=2)
        saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": step.net}, save_final=True, final_filename="final.pt")
        saver.attach(trainer)
        with pytest.raises(type(exc)):
            trainer.run()

    (tmp_path / "final.pt").write_bytes(b"previous run")
    run(InvalidInputError("case 'x.nii.gz' holds NaN"))
    assert (tmp_path / "final.pt").read_bytes() == b"previous run"
    run(KeyError("a bug"))
    assert (tmp_path / "final.pt").read_bytes() != b"previous run"
    assert "weight" in torch.load(tmp_path / "final.pt", weights_only=True)  # one object: saved as its bare state dict


@pytest.mark.parametrize("max_epochs, expected", [(1, [1]), (3, [2, 3]), (4, [2, 4]), (5, [2, 4, 5])])
def test_last_epoch_is_validated_when_the_interval_skips_it(max_epochs, expected):
    """A run of max_epochs 1 with interval 2 (one MONAI Label training round) validates once, at its end, so a
    best-metric model exists; a run ending on a multiple of the interval is not validated twice."""
    from ignite.engine import Engine, Events
    from monai.engines import SupervisedEvaluator

    from common.engines import LastEpochValidationHandler

    validated = []
    data = DataLoader(Dataset([{"image": torch.zeros(1, 2), "label": torch.zeros(1, 2)}]), batch_size=1)
    validator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=torch.nn.Identity())
    trainer = Engine(lambda e, b: None)
    validator.add_event_handler(Events.COMPLETED, lambda e: validated.append(trainer.state.epoch))
    LastEpochValidationHandler(validator=validator, interval=2, epoch_level=True).attach(trainer)
    trainer.run([0, 1], max_epochs=max_epochs)
    assert validated == expected


def test_autocast_takes_the_precision_from_the_engines_amp_kwargs():
    """AMP on a CUDA engine autocasts in the dtype of ``amp_kwargs`` (bf16 for ALDM's light.json, float16 by
    default); off, or on the CPU, nothing is autocast."""
    import warnings
    from types import SimpleNamespace

    from common.engines.trainers import autocast

    def engine(amp, kwargs, device="cuda"):
        return SimpleNamespace(amp=amp, amp_kwargs=kwargs, state=SimpleNamespace(device=torch.device(device)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the context is still built with its dtype
        assert autocast(engine(True, {"dtype": torch.bfloat16})).fast_dtype == torch.bfloat16
        assert autocast(engine(True, {})).fast_dtype == torch.float16
    assert not hasattr(autocast(engine(False, {"dtype": torch.bfloat16})), "fast_dtype")
    assert not hasattr(autocast(engine(True, {"dtype": torch.bfloat16}, "cpu")), "fast_dtype")


def test_aldm_precision_defaults_follow_the_spec():
    """Paper scale: fp32 (AMP off); light.json: bf16 autocast where a GPU is available."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    bundle = Path(__file__).resolve().parents[2] / "bundles" / "aldm_translation"
    for config in ("train_autoencoder.json", "train_spade.json", "train_diffusion.json", "inference.json", "evaluate.json"):
        for overlays, amp, kwargs in (([], False, {}), (["light.json"], torch.cuda.is_available(), {"dtype": torch.bfloat16})):
            parser = ConfigParser()
            parser.read_config([str(bundle / "configs" / c) for c in [config, *overlays]])
            parser["bundle_root"] = str(bundle)
            assert parser.get_parsed_content("amp") is amp, (config, overlays)
            assert parser.get_parsed_content("amp_kwargs") == kwargs, (config, overlays)
            text = json.dumps(parser.get())
            assert text.count('"amp_kwargs": "@amp_kwargs"') == text.count('"amp": "@amp"') >= 1, config
