"""I/O safety of the shared package: atomic writes, no silent overwrite, careful checkpoint loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from common.data.fetch import HashMismatchError, sha256sum
from common.utils.io import (
    CheckpointError,
    atomic_write,
    check_writable_dir,
    load_checkpoint,
    load_state_into,
    refuse_overwrite,
)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind
    with atomic_write(target, "w") as fh:
        fh.write("new")
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_refuse_overwrite_names_file_and_key(tmp_path):
    f = tmp_path / "case_t1.nii.gz"
    refuse_overwrite(f, overwrite=False)  # absent: fine
    f.write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"case_t1\.nii\.gz.*'overwrite'"):
        refuse_overwrite(f, overwrite=False)
    refuse_overwrite(f, overwrite=True)


def test_unwritable_dir_is_reported_for_a_file_in_the_way(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(PermissionError, match="outputs.*cannot be written"):
        check_writable_dir(blocker / "run1")


def test_load_checkpoint_checks_hash_and_format(tmp_path):
    net = torch.nn.Conv3d(1, 2, 3)
    good = tmp_path / "model.pt"
    torch.save({"model": net.state_dict()}, good)
    digest = sha256sum(good)
    assert set(load_checkpoint(good, sha256=digest)) == {"model"}
    with pytest.raises(HashMismatchError, match="model.pt"):
        load_checkpoint(good, sha256="0" * 64)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    # an arbitrary pickled object is refused by weights_only loading
    evil = tmp_path / "evil.pt"
    torch.save({"model": net.state_dict(), "obj": _Picklable()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(evil)


class _Picklable:
    pass


def test_load_state_into_explains_mismatch():
    small, big = torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(1, 4, 3)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*another bundle"):
        load_state_into(small, big.state_dict(), source="models/model.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_into(torch.nn.Sequential(small, torch.nn.ReLU(), torch.nn.Conv3d(2, 2, 1)), {}, source="x")
    load_state_into(small, torch.nn.Conv3d(1, 2, 3).state_dict())


WRITER = textwrap.dedent(
    """
    import sys, torch
    from common.engines import AtomicCheckpointSaver, StepTrainer, TrainingStep
    out = sys.argv[1]
    net = torch.nn.Linear(2048, 2048)  # 16 MB of weights: each save takes a while
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    class Step(TrainingStep):
        def __call__(self, engine, batch):
            opt.zero_grad(); loss = net(batch).pow(2).mean(); loss.backward(); opt.step()
            return self.detach({"loss": loss})
    trainer = StepTrainer("cpu", 10_000, [torch.randn(2, 2048)], Step())
    saver = AtomicCheckpointSaver(save_dir=out, save_dict={"model": net, "optimizer": opt, "trainer": trainer},
                                  save_interval=1, epoch_level=True, n_saved=1)
    saver.attach(trainer)
    trainer.run()
    """
)


@pytest.mark.slow
def test_killed_during_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob("checkpoint_epoch=*.pt")):
            time.sleep(0.05)
        assert list(tmp_path.glob("checkpoint_epoch=*.pt")), "the writer never saved a checkpoint"
        # wait until a temporary file shows up (a write in progress) and kill the process right then
        deadline = time.time() + 60
        while time.time() < deadline and not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finals = sorted(tmp_path.glob("checkpoint_epoch=*.pt"))
    assert finals, "no checkpoint left after the kill"
    for f in finals:
        ckpt = load_checkpoint(f)
        assert {"model", "optimizer", "trainer"} <= set(ckpt)
        assert ckpt["model"]["weight"].shape == (2048, 2048)
        assert ckpt["trainer"]["iteration"] >= 1


def test_check_state_fits_looks_through_dataparallel():
    """Checkpoints hold the wrapped network's keys: a DataParallel/DDP wrapper must not turn every key into a mismatch."""
    from common.utils.io import check_state_fits

    net = torch.nn.Conv3d(1, 4, 3)
    check_state_fits(torch.nn.DataParallel(net), net.state_dict(), "checkpoint 'model.pt'")
    with pytest.raises(CheckpointError, match=r"model.pt' does not fit Conv3d: 2 shape mismatches"):
        check_state_fits(torch.nn.DataParallel(net), torch.nn.Conv3d(1, 8, 3).state_dict(), "checkpoint 'model.pt'")


def test_output_folders_a_refused_run_created_are_removed_at_exit(tmp_path):
    """``check_writable_dir`` remembers the folders it creates; when a user error ends the process (the excepthook)
    those still empty go (deepest first), while a folder that received an output, or that existed before, stays."""
    from common.utils import io

    others = set(io._CREATED_DIRS)  # folders of other tests of this session: not this test's to remove
    io._CREATED_DIRS.clear()
    existing = tmp_path / "existing"
    existing.mkdir()
    refused = io.check_writable_dir(existing / "run" / "outputs")  # creates run/ and run/outputs/
    kept = io.check_writable_dir(tmp_path / "done")
    (kept / "image_seg.nii.gz").write_bytes(b"x")
    assert refused.is_dir() and {existing / "run", refused} <= io._CREATED_DIRS
    io._remove_empty_created_dirs()  # what the excepthook runs after printing the one message
    assert not (existing / "run").exists() and existing.is_dir()
    assert (kept / "image_seg.nii.gz").is_file() and not io._CREATED_DIRS
    io._CREATED_DIRS.update(others)
