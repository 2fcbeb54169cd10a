"""SampleLogHandler on a StepTrainer: per-rank logs of the samples each iteration trained on."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd
from torch.utils.data import DistributedSampler

from common.data.fetch import demo_file
from common.engines import StepTrainer, TrainingStep
from common.engines.sample_log import SampleLogHandler, read_sample_logs, sample_ids


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Six 12^3 crops of the real avg152T1 brain, one file each, with ids."""
    src = nib.load(demo_file("spm/avg152T1.nii"))
    arr = np.asanyarray(src.dataobj).astype(np.float32)
    folder = tmp_path_factory.mktemp("crops")
    items = []
    for i in range(6):
        x0, y0, z0 = 20 + 6 * i, 30 + 4 * i, 30 + 3 * i
        path = folder / f"crop{i}.nii.gz"
        nib.save(nib.Nifti1Image(arr[x0 : x0 + 12, y0 : y0 + 12, z0 : z0 + 12], src.affine), str(path))
        items.append({"image": str(path), "id": f"subj-{i:02d}"})
    return items


class _Step(TrainingStep):
    """One Adam step of a 3D conv autoencoder-ish map on the batch."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Conv3d(1, 1, 3, padding=1)
        self.opt = torch.optim.Adam(self.net.parameters(), 1e-3)

    def __call__(self, engine, batch):
        x = batch["image"].to(engine.state.device)
        loss = torch.nn.functional.mse_loss(self.net(x), x)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return self.detach({"loss": loss})


def _trainer(items, out_dir, key=None, sampler=None, epochs=2):
    xform = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), ScaleIntensityd("image")])
    loader = DataLoader(Dataset(items, xform), batch_size=2, sampler=sampler, shuffle=sampler is None, num_workers=0)
    return StepTrainer("cpu", epochs, loader, _Step(), train_handlers=[SampleLogHandler(out_dir, key=key)])


def test_logs_file_names_of_every_batch(tmp_path, crops, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    _trainer(crops, tmp_path / "logs").run()
    logs = read_sample_logs(tmp_path / "logs")
    assert list(logs) == [0] and (tmp_path / "logs" / "samples_rank0.txt").is_file()
    rows = logs[0]
    assert len(rows) == 12  # 6 samples x 2 epochs
    assert [r[1] for r in rows] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]  # global iteration
    for epoch in (1, 2):  # every file once per epoch
        assert sorted(r[2] for r in rows if r[0] == epoch) == sorted(c["image"] for c in crops)


def test_two_ranks_train_on_disjoint_samples(tmp_path, crops, monkeypatch):
    """Two ranks of one job (run one after the other here) with a DistributedSampler."""
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        sampler = DistributedSampler(crops, num_replicas=2, rank=rank, shuffle=True, seed=0)
        trainer = _trainer(crops, tmp_path, key="id", sampler=sampler, epochs=1)
        trainer.run()
    logs = read_sample_logs(tmp_path)
    assert sorted(logs) == [0, 1]
    ids = {r: {row[2] for row in rows} for r, rows in logs.items()}
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == {c["id"] for c in crops}


def test_sample_ids_errors_name_the_keys():
    with pytest.raises(KeyError, match=r"no key 'subject_id'.*\['id', 'image'\]"):
        sample_ids({"image": torch.zeros(1), "id": ["a"]}, key="subject_id")
    with pytest.raises(KeyError, match=r"no sample identifiers in the batch.*\['image'\]"):
        sample_ids({"image": torch.zeros(2, 1)})
    assert sample_ids({"id": torch.tensor([4, 7])}) == ["4", "7"]
