"""maisi_ct inference.json with the tiny overlay on CPU: user mask (ControlNet path) and mask-database path."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow

from common.transforms.maisi import BODY_LABEL, MAISI_LABELS


def _workflow(bundle, ckpt_dir, out_dir, **overrides):
    wf = ConfigWorkflow(
        config_file=[str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json")],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(bundle),
        ckpt_dir=str(ckpt_dir),
        output_dir=str(out_dir),
        **overrides,
    )
    wf.initialize()
    assert not wf.check_properties()
    wf.run()
    wf.finalize()
    return sorted(out_dir.glob("sample_*_image.nii.gz"))


def _pair(image_path):
    label_path = image_path.with_name(image_path.name.replace("_image.nii.gz", "_label.nii.gz"))
    report = json.loads(image_path.with_name(image_path.name.replace("_image.nii.gz", ".json")).read_text())
    return nib.load(str(image_path)), nib.load(str(label_path)), report


def test_user_mask_on_requested_grid(maisi_bundle, maisi_masks, tiny_ckpt_dir, tmp_path):
    mask = nib.load(str(maisi_masks["grid"]))
    mask_arr = np.asarray(mask.dataobj)
    anatomy = ["liver", "spleen"]
    images = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "out", label_path=str(maisi_masks["grid"]),
                       anatomy_list=anatomy, num_output_samples=2)
    assert len(images) == 2
    img, lab, report = _pair(images[0])
    assert img.shape == (64, 64, 64) and img.get_data_dtype() == np.float32
    assert lab.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, mask.affine, atol=1e-6) and np.allclose(lab.affine, mask.affine, atol=1e-6)
    assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), [1.5, 1.5, 1.5])
    hu, label = np.asarray(img.dataobj), np.asarray(lab.dataobj)
    assert hu.min() >= -1000 and hu.max() <= 1000
    assert np.all(hu[mask_arr == 0] == -1000)
    keep = [MAISI_LABELS[a] for a in anatomy]
    expected = np.where(np.isin(mask_arr, keep) | (mask_arr == 0), mask_arr, BODY_LABEL)
    assert np.array_equal(label, expected) and MAISI_LABELS["liver"] in np.unique(label)
    assert report["quality_check_result"] in ("passed", "failed") and report["attempts"] >= 1
    assert report["seed"] == 0 and report["num_inference_steps"] == 2


def test_user_mask_resampled_to_requested_spacing(maisi_bundle, maisi_masks, tiny_ckpt_dir, tmp_path):
    images = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "out", label_path=str(maisi_masks["native"]),
                       output_size=[64, 64, 64], spacing=[2.0, 2.0, 3.0], quality_check=False)
    img, lab, report = _pair(images[0])
    assert img.shape == (64, 64, 64)
    assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), [2.0, 2.0, 3.0])
    assert np.allclose(img.affine, lab.affine)
    assert report["quality_check_result"] == "skipped"


def test_mask_database_path(maisi_bundle, tiny_ckpt_dir, tmp_path):
    images = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "out", anatomy_list=["liver"], quality_check=False)
    img, lab, _ = _pair(images[0])
    assert img.shape == (64, 64, 64) and 1 in np.unique(np.asarray(lab.dataobj))


@pytest.mark.parametrize(
    "overrides, match",
    [({"output_size": [128, 128, 128], "strict_input_check": True}, "not supported"),
     ({"spacing": [6.0, 6.0, 2.0], "strict_input_check": True, "output_size": [256, 256, 256]}, "spacing"),
     ({"spacing": [1.5, 1.0, 2.0], "strict_input_check": True, "output_size": [256, 256, 256]}, "must be equal"),
     ({"output_size": [60, 64, 64]}, "multiple of 32")],
)
def test_bad_requests_fail_clearly(maisi_bundle, tiny_ckpt_dir, tmp_path, overrides, match):
    wf = ConfigWorkflow(
        config_file=[str(maisi_bundle / "configs" / "inference.json"), str(maisi_bundle / "configs" / "tiny.json")],
        workflow_type="infer", bundle_root=str(maisi_bundle), ckpt_dir=str(tiny_ckpt_dir), output_dir=str(tmp_path), **overrides,
    )
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    cause = err.value.__cause__
    assert isinstance(cause, ValueError) and __import__("re").search(match, str(cause))


def test_evaluate_reconstruction_and_generated_qc(maisi_bundle, ct_demo, tiny_ckpt_dir, maisi_masks, tmp_path):
    gen = tmp_path / "generated"
    _workflow(maisi_bundle, tiny_ckpt_dir, gen, label_path=str(maisi_masks["grid"]), quality_check=False)
    wf = ConfigWorkflow(
        config_file=[str(maisi_bundle / "configs" / "evaluate.json"), str(maisi_bundle / "configs" / "tiny.json")],
        workflow_type="infer", bundle_root=str(maisi_bundle), datalist=str(ct_demo), ckpt_dir=str(tiny_ckpt_dir),
        output_dir=str(tmp_path / "eval"), generated_dir=str(gen),
    )
    wf.initialize()
    assert not wf.check_properties()
    wf.run()
    summary = json.loads((tmp_path / "eval" / "reconstruction_summary.json").read_text())
    assert summary["n"] == 1 and np.isfinite(summary["psnr"]) and 0 < summary["mae_hu"] <= 2000
    rows = (tmp_path / "eval" / "generated_qc.csv").read_text().splitlines()
    assert rows[0].startswith("sample,organ,median") and any(",liver," in r for r in rows[1:])


def test_totalsegmentator_label_map_through_the_bundle(maisi_bundle, tiny_ckpt_dir, tmp_path):
    """A TotalSegmentator 'total' map as label_path: refused as MAISI ids with one error naming label_format;
    with label_format totalsegmentator it is converted by name and the sample's label is a MAISI map."""
    from common.data.fetch import demo_file
    from common.transforms.maisi import DUMMY_LABELS, maisi_label_problems
    from common.utils.errors import InvalidInputError

    ts = str(demo_file("totalsegmentator/example_seg_fast_force_split.nii.gz"))
    with pytest.raises(Exception) as err:
        _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "refused", label_path=ts, quality_check=False)
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    user = [c for c in chain if isinstance(c, InvalidInputError)]
    assert user and "label_format" in str(user[0]) and "example_seg_fast_force_split" in str(user[0])
    assert not list((tmp_path / "refused").glob("sample_*"))

    images = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "out", label_path=ts, label_format="totalsegmentator",
                       anatomy_list=["liver", "spleen"], keep_all_labels=True, quality_check=False)
    img, lab, report = _pair(images[0])
    label = np.asarray(lab.dataobj)
    ids = set(np.unique(label).tolist())
    assert {MAISI_LABELS["liver"], MAISI_LABELS["spleen"], BODY_LABEL} <= ids and not ids & set(DUMMY_LABELS)
    assert maisi_label_problems(label, np.linalg.norm(lab.affine[:3, :3], axis=0)) == []
    assert report["label_format"] == "totalsegmentator" and img.shape == (64, 64, 64)
