"""What the model card says about inputs and outputs, checked on the real demo CT (tiny network).

Where predictions land (``<output_dir>/<folders below dataset_dir>/<case>_seg.nii.gz``), one file
through ``input_image`` or ``data``, an NRRD input, and evaluation against a label map of another
class set (TotalSegmentator's, merged with ``label_mapping``). Weights are a seeded, untrained
``network_def``: these tests are about files and geometry, not about segmentation quality.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "diffseg"
INFER = ["inference.json", "tiny.json"]


def _run(configs, **overrides) -> None:
    from monai.bundle import run

    sys.path.insert(0, str(BUNDLE))
    run(config_file=[str(BUNDLE / "configs" / c) for c in configs], meta_file=str(BUNDLE / "configs" / "metadata.json"),
        bundle_root=str(BUNDLE), **overrides)


@pytest.fixture(scope="module")
def setup(ct_demo, tmp_path_factory):
    from monai.bundle import ConfigParser

    root = tmp_path_factory.mktemp("diffseg_io")
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in INFER])
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    test = json.loads(Path(ct_demo).read_text())["test"][0]
    return {"root": root, "ckpt_dir": str(root / "models"), "image": Path(ct_demo).parent / test["image"],
            "label": Path(ct_demo).parent / test["label"], "label_total": Path(ct_demo).parent / test["label_total"]}


def _seg(path: Path) -> np.ndarray:
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj)
    assert arr.dtype == np.uint8
    return arr


def test_outputs_keep_the_folders_below_dataset_dir(setup, tmp_path):
    data = tmp_path / "data"
    (data / "imagesTs").mkdir(parents=True)
    shutil.copy(setup["image"], data / "imagesTs" / "case01.nii.gz")
    _run(INFER, dataset_dir=str(data), ckpt_dir=setup["ckpt_dir"], output_dir=str(tmp_path / "out"))
    assert [p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.nii.gz")] == [
        "imagesTs/case01_seg.nii.gz"
    ]


def test_one_file_by_input_image_or_data_and_nrrd(setup, tmp_path):
    import itk

    src = tmp_path / "scans"
    src.mkdir()
    shutil.copy(setup["image"], src / "case01.nii.gz")
    itk.imwrite(itk.imread(str(setup["image"])), str(src / "case01.nrrd"))

    _run(INFER, input_image=str(src / "case01.nii.gz"), ckpt_dir=setup["ckpt_dir"], output_dir=str(tmp_path / "a"))
    assert [p.name for p in (tmp_path / "a").rglob("*.nii.gz")] == ["case01_seg.nii.gz"]  # directly in output_dir
    ref = nib.load(str(setup["image"]))
    pred = nib.load(str(tmp_path / "a" / "case01_seg.nii.gz"))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    labels = _seg(tmp_path / "a" / "case01_seg.nii.gz")
    assert len(np.unique(labels)) > 1

    # the same file through 'data' (a list of cases) outside dataset_dir: <output_dir>/<its folder>/
    _run(INFER, data=[{"image": str(src / "case01.nii.gz")}], ckpt_dir=setup["ckpt_dir"], output_dir=str(tmp_path / "b"))
    assert [p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*.nii.gz")] == [
        "scans/case01_seg.nii.gz"
    ]
    np.testing.assert_array_equal(_seg(tmp_path / "b" / "scans" / "case01_seg.nii.gz"), labels)

    # NRRD (read by ITK): the same voxels and geometry, so the same labels in the same grid
    _run(INFER, input_image=str(src / "case01.nrrd"), ckpt_dir=setup["ckpt_dir"], output_dir=str(tmp_path / "c"))
    nrrd_pred = nib.load(str(tmp_path / "c" / "case01_seg.nii.gz"))
    assert nrrd_pred.shape == ref.shape
    np.testing.assert_allclose(nrrd_pred.affine, ref.affine, atol=1e-4)
    assert (np.asarray(nrrd_pred.dataobj) != labels).mean() < 1e-3


def _per_case(path: Path) -> list[tuple[str, str, str]]:
    with open(path) as fh:
        return [(r["class"], r["dice"], r["hd95"]) for r in csv.DictReader(fh)]


def test_evaluate_against_another_class_set_with_label_mapping(setup, ct_demo, tmp_path):
    """TotalSegmentator's label map of the test CT, merged by label_mapping, scores exactly as the
    demo's merged label map does."""
    from common.data.demo import CT_CLASS_MERGE

    base = json.loads(Path(ct_demo).read_text())
    merged = dict(base, test=[{"image": str(setup["image"]), "label": str(setup["label"])}])
    total = dict(base, test=[{"image": str(setup["image"]), "label": str(setup["label_total"])}])
    (tmp_path / "merged.json").write_text(json.dumps(merged))
    (tmp_path / "total.json").write_text(json.dumps(total))
    mapping = {str(c): list(v) for c, v in CT_CLASS_MERGE.items()}
    (tmp_path / "mapping.json").write_text(json.dumps(mapping))
    assert np.asarray(nib.load(str(setup["label_total"])).dataobj).max() > 6  # another class set

    kw = dict(dataset_dir=str(tmp_path), ckpt_dir=setup["ckpt_dir"])
    evaluate = INFER[:1] + ["evaluate.json", "tiny.json"]
    _run(evaluate, datalist_file=str(tmp_path / "merged.json"), output_dir=str(tmp_path / "m"), **kw)
    _run(evaluate, datalist_file=str(tmp_path / "total.json"), output_dir=str(tmp_path / "t"), label_mapping=mapping, **kw)
    _run(evaluate, datalist_file=str(tmp_path / "total.json"), output_dir=str(tmp_path / "f"),
         label_mapping=str(tmp_path / "mapping.json"), **kw)
    reference = _per_case(tmp_path / "m" / "metrics_per_case.csv")
    assert len(reference) == 6
    assert _per_case(tmp_path / "t" / "metrics_per_case.csv") == reference
    assert _per_case(tmp_path / "f" / "metrics_per_case.csv") == reference

    # without the mapping the other class set is refused, naming the file
    from common.utils.errors import InvalidInputError, find_user_error

    with pytest.raises(BaseException) as info:
        _run(evaluate, datalist_file=str(tmp_path / "total.json"), output_dir=str(tmp_path / "x"), **kw)
    err = find_user_error(info.value)
    assert isinstance(err, InvalidInputError) and "label_total" in str(err) and "outside the class set" in str(err)


def test_remap_transform_and_bad_mappings(tmp_path):
    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    from scripts import RemapLabelsd

    from common.utils.errors import InputNotFoundError, InvalidInputError

    lab = torch.tensor([[[[0, 5, 2], [3, 9, 200]]]])
    out = RemapLabelsd("label", {"1": [5], "3": [2, 3]})({"label": lab})["label"]
    assert out.tolist() == [[[[0, 1, 3], [3, 0, 0]]]]  # unnamed values (9, 200) become background
    assert RemapLabelsd("label", None)({"label": lab})["label"] is lab
    with pytest.raises(InvalidInputError, match="maps value 2 to both class 1 and class 3"):
        RemapLabelsd("label", {"1": [2], "3": [2]})
    with pytest.raises(InputNotFoundError, match="does not exist"):
        RemapLabelsd("label", str(tmp_path / "missing.json"))


def test_training_noise_is_drawn_on_the_training_device():
    """On the CPU the noise comes from the step's CPU generator (unchanged sequence); the state of an
    accelerator's generator loaded from a checkpoint survives a save on a CPU-only machine."""
    from common.engines.diffseg_step import DiffSegStep
    from common.losses.segmentation import SegmentationLoss
    from common.networks.diffseg_unet import DiffSegUNet

    net = DiffSegUNet(in_channels=4, out_channels=3, channels=(4, 8, 8, 16))
    step = DiffSegStep(net, torch.optim.SGD(net.parameters(), lr=0.1), SegmentationLoss(), num_classes=3, seed=5)
    like = torch.zeros(2, 3, 4, 4, 4)
    expected = torch.randn(like.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(step._noise(like), expected)
    assert step.noise_generator("cpu") is step.generator and step.device_generator is None
    cuda_state = torch.Generator().manual_seed(7).get_state()  # same layout as a saved device state
    state = dict(step.state_dict(), device_generator=cuda_state, device_type="cuda")
    step.load_state_dict(state)
    saved = step.state_dict()
    assert saved["device_type"] == "cuda" and torch.equal(saved["device_generator"], cuda_state)
