"""Label agreement of generated images with their conditioning masks (evaluate.json ``segmentation_model_path``),
checked with small TorchScript models that threshold bone on the real TotalSegmentator demo CT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigWorkflow

from common.data.demo import CT_LABELS
from common.transforms.maisi import BODY_LABEL, body_mask_from_ct

BONE = 6  # the demo cohort's merged bone class (all bones of the TotalSegmentator example)
THRESHOLD = 150.0  # HU


class BoneLogits(torch.nn.Module):
    """Two-channel logits, pointwise: channel 1 wins where HU > threshold (so the result is exactly HU > 150)."""

    def __init__(self, threshold: float = THRESHOLD) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.threshold - x, x - self.threshold], dim=1)


class BoneIds(torch.nn.Module):
    """One channel of label ids: 1 where HU > threshold after a 3x3x3 closing (fills the marrow), else 0."""

    def __init__(self, threshold: float = THRESHOLD) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = (x > self.threshold).float()
        b = F.max_pool3d(b, 3, 1, 1)
        return -F.max_pool3d(-b, 3, 1, 1)


def _script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def generated_pairs(ct_demo, tmp_path_factory):
    """Two generated-style pairs from the real demo CT (HU clipped to [-1000, 1000], -1000 outside the body,
    merged demo labels + body 200): ``sample_a`` with its true label, ``sample_b`` with the label shifted by
    10 voxels (30 mm) along x, i.e. a wrong conditioning mask."""
    out = tmp_path_factory.mktemp("generated")
    example = Path(ct_demo).parent / "example"
    ct = nib.load(str(example / "image.nii.gz"))
    hu = np.asarray(ct.dataobj, dtype=np.float32)
    merged = np.asarray(nib.load(str(example / "label.nii.gz")).dataobj).astype(np.uint8)
    body = body_mask_from_ct(hu)
    label = np.where((merged == 0) & body, BODY_LABEL, merged).astype(np.uint8)
    image = np.where(label > 0, np.clip(hu, -1000, 1000), -1000).astype(np.float32)
    for name, lab in (("a", label), ("b", np.roll(label, 10, axis=0))):
        nib.save(nib.Nifti1Image(image, ct.affine), str(out / f"sample_{name}_image.nii.gz"))
        nib.save(nib.Nifti1Image(lab, ct.affine), str(out / f"sample_{name}_label.nii.gz"))
    names = out / "demo_label_dict.json"
    names.write_text(json.dumps({v: k for k, v in CT_LABELS.items()}))
    return {"dir": out, "image": image, "label": label, "label_dict": names}


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_logits_model_dice_equals_hand_computed(generated_pairs, tmp_path):
    from scripts.label_agreement import label_agreement

    model = _script(BoneLogits(), tmp_path / "bone_logits.pt")
    csv_path = label_agreement(generated_pairs["dir"], model, tmp_path / "eval", label_map={"1": BONE},
                               roi_size=[64, 64, 64], label_dict_file=generated_pairs["label_dict"])
    assert csv_path == tmp_path / "eval" / "generated_label_agreement.csv"
    text = csv_path.read_text().splitlines()
    assert text[0] == "sample,organ,id,dice,voxels"
    rows = _rows(csv_path)
    # the model only produces bone: liver, spleen, ... of the conditioning labels are not scored
    assert [(r["sample"], r["organ"], r["id"]) for r in rows] == [
        ("sample_a_image.nii.gz", "bone", "6"), ("sample_b_image.nii.gz", "bone", "6")]
    image, label = generated_pairs["image"], generated_pairs["label"]
    bone_pred = image > THRESHOLD
    true_dice = _dice(bone_pred, label == BONE)
    wrong_dice = _dice(bone_pred, np.roll(label, 10, axis=0) == BONE)
    assert float(rows[0]["dice"]) == pytest.approx(true_dice, abs=1e-12)
    assert float(rows[1]["dice"]) == pytest.approx(wrong_dice, abs=1e-12)
    assert true_dice > 0.65 and wrong_dice < 0.3
    assert int(rows[0]["voxels"]) == int((label == BONE).sum())
    summary = json.loads((tmp_path / "eval" / "generated_label_agreement_summary.json").read_text())
    assert summary["n_samples"] == 2
    assert summary["per_organ"]["bone"]["n"] == 2
    assert summary["per_organ"]["bone"]["mean_dice"] == pytest.approx((true_dice + wrong_dice) / 2)


def test_label_id_model_through_evaluate_config(maisi_bundle, ct_demo, generated_pairs, tmp_path):
    # the model expects [0, 1]-scaled input: segmentation_intensity maps HU [-1000, 1000] -> [0, 1]
    model = _script(BoneIds(threshold=(THRESHOLD + 1000.0) / 2000.0), tmp_path / "bone_ids.pt")
    wf = ConfigWorkflow(
        config_file=[str(maisi_bundle / "configs" / "evaluate.json"), str(maisi_bundle / "configs" / "tiny.json")],
        workflow_type="infer", bundle_root=str(maisi_bundle), output_dir=str(tmp_path / "eval"), datalist=str(ct_demo),
        generated_dir=str(generated_pairs["dir"]), segmentation_model_path=str(model),
        segmentation_label_map={"1": BONE}, segmentation_intensity=[-1000, 1000, 0, 1],
        segmentation_roi_size=[64, 64, 64], label_dict_file=str(generated_pairs["label_dict"]),
        run=["$@label_agreement"],  # only the label agreement (the VAE part is tested elsewhere)
    )
    wf.initialize()
    wf.run()
    rows = _rows(tmp_path / "eval" / "generated_label_agreement.csv")
    dice = {r["sample"]: float(r["dice"]) for r in rows}
    assert dice["sample_a_image.nii.gz"] > 0.8  # closing fills the marrow: bone agrees with its conditioning label
    assert dice["sample_b_image.nii.gz"] < 0.3  # the shifted (wrong) label disagrees


def test_maisi_names_and_identity_map(tmp_path):
    """Default label dictionary (MAISI names) and no label map (the model outputs MAISI ids itself)."""
    from scripts.label_agreement import label_agreement

    gen = tmp_path / "gen"
    gen.mkdir()
    image = np.full((24, 24, 24), 40.0, dtype=np.float32)
    label = np.full((24, 24, 24), BODY_LABEL, dtype=np.uint8)
    image[4:12, 4:12, 4:12] = 700.0
    label[4:12, 4:12, 4:12] = 97  # sacrum
    label[14:20, 14:20, 14:20] = 1  # liver (soft tissue: the threshold model never finds it)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(gen / "sample_x_image.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(gen / "sample_x_label.nii.gz"))

    class Sacrum(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x > 250.0).float() * 97.0

    model = _script(Sacrum(), tmp_path / "sacrum.pt")
    bundle_dict = Path(__file__).resolve().parents[2] / "bundles" / "maisi_ct" / "configs" / "label_dict.json"
    label_agreement(gen, model, tmp_path / "eval", roi_size=[16, 16, 16], label_dict_file=bundle_dict)
    rows = {r["organ"]: r for r in _rows(tmp_path / "eval" / "generated_label_agreement.csv")}
    assert set(rows) == {"sacrum", "liver"}  # every conditioning id but body 200
    assert float(rows["sacrum"]["dice"]) == 1.0 and int(rows["sacrum"]["voxels"]) == 512
    assert float(rows["liver"]["dice"]) == 0.0 and rows["liver"]["id"] == "1"


def test_missing_model_is_one_clear_error(maisi_bundle, ct_demo, generated_pairs, tmp_path):
    from scripts.label_agreement import label_agreement

    missing = tmp_path / "no_such_model.pt"
    with pytest.raises(FileNotFoundError, match=r"segmentation_model_path.*no_such_model\.pt"):
        label_agreement(generated_pairs["dir"], missing, tmp_path / "eval")
    assert not (tmp_path / "eval" / "generated_label_agreement.csv").exists()
    # through the bundle the check runs at initialize, before any evaluation work
    wf = ConfigWorkflow(
        config_file=[str(maisi_bundle / "configs" / "evaluate.json"), str(maisi_bundle / "configs" / "tiny.json")],
        workflow_type="infer", bundle_root=str(maisi_bundle), output_dir=str(tmp_path / "eval"), datalist=str(ct_demo),
        generated_dir=str(generated_pairs["dir"]), segmentation_model_path=str(missing),
    )
    with pytest.raises(Exception) as err:
        wf.initialize()
    from common.utils.errors import find_user_error

    user = find_user_error(err.value)
    assert isinstance(user, FileNotFoundError) and "segmentation_model_path" in str(user) and str(missing) in str(user)


def test_without_model_nothing_is_written(generated_pairs, tmp_path):
    from scripts.label_agreement import label_agreement

    assert label_agreement(generated_pairs["dir"], None, tmp_path / "eval") is None
    assert not (tmp_path / "eval").exists()
