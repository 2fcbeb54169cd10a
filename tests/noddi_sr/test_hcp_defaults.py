"""HCP-ready defaults: the paper's three shells (6 features) by default, one clear error for a series that cannot give
them, an explicit opt-in to fewer (config key ``shells``), and a bounded validation cost of stage 3."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import MetaTensor

from common.data.dwi import GradientTableError
from common.data.noddi_phantom import PhantomConfig, hr_affine, make_subject, write_subject
from common.engines.noddi_steps import NODDISRInferer
from common.transforms.dwi import DWIFeaturesd, ScaledPairCenterCropd
from common.utils.errors import _chain

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "noddi_sr"
CONFIGS = ("inference.json", "train_cond_encoder.json", "train_diffusion.json")


def _parser(*files, **overrides):
    p = ConfigParser()
    p.read_config([str(BUNDLE / "configs" / f) for f in files])
    p.update(overrides)
    return p


@pytest.mark.parametrize("name", CONFIGS)
def test_default_shells_are_the_papers_three_with_six_features(name):
    p = _parser(name)
    assert p["shells"] == [1000, 2000, 3000]
    assert p.get_parsed_content("n_feat") == 6
    tiny = _parser(name, "tiny.json")  # the tests and the demo keep dipy's small_101D shells
    assert tiny.get_parsed_content("n_feat") == 4
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    assert meta["num_channels"] == 6 and "b=3000" in meta["channel_def"]["5"]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Two small noise-free phantom series: HCP's scheme (18 b0 + 90 x 1000/2000/3000) and the 2-shell default."""
    root = tmp_path_factory.mktemp("hcp_shells")
    out = {}
    for scheme in ("hcp", "default"):
        s = make_subject(0, seed=1, cfg=PhantomConfig(hr_spacing=8.0, hr_shape=(16, 16, 16), scheme=scheme, snr=None))
        entry = write_subject(s, root / scheme)
        out[scheme] = {k: str(root / v) for k, v in entry.items() if k in ("dwi", "bval", "bvec", "mask")}
    return out


def _features(case, **kw):
    from monai.transforms import LoadImaged

    d = LoadImaged("dwi", ensure_channel_first=True, image_only=True)(dict(case))
    return DWIFeaturesd("dwi", **kw)(d)["dwi"]


def test_hcp_series_gives_six_features_without_dropping_a_shell(series):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shell may be dropped or ignored
        f = _features(series["hcp"], shells=[1000, 2000, 3000])
    assert f.shape[0] == 6
    brain = f[0].numpy() > 0
    means = f[:3].numpy()[:, brain]
    assert means.shape[1] > 0 and np.all(np.diff(means, axis=0) < 0)  # the spherical mean falls with b on every voxel


def test_two_shell_series_is_refused_by_the_default_inference_config(series, tmp_path):
    """The paper-scale default config stops in its preflight (before any network or weight), naming file and key."""
    case = series["default"]
    sys.path.insert(0, str(BUNDLE))  # the configs' `scripts` (the suite forgets it after every test)
    try:
        wf = ConfigWorkflow(
            config_file=str(BUNDLE / "configs" / "inference.json"), meta_file=str(BUNDLE / "configs" / "metadata.json"),
            workflow_type="infer", bundle_root=str(BUNDLE), data=[case], output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "none"),
        )
        wf.initialize()
        with pytest.raises(Exception) as e:
            wf.run()
    finally:
        sys.path.remove(str(BUNDLE))
    errors = [x for x in _chain(e.value) if isinstance(x, GradientTableError)]  # MONAI wraps it in RuntimeError
    assert errors, repr(e.value)
    msg = str(errors[0])
    assert f"bval file '{case['bval']}' (key 'bval' of case" in msg
    assert "expected shell b=3000" in msg and "usable shells are [1000, 2000]" in msg
    assert "Config key 'shells' is [1000, 2000, 3000]: 6 feature channels" in msg
    assert "set 'shells' to [1000, 2000] (4 channels" in msg
    assert not any((tmp_path / "out").glob("*.nii.gz"))


def test_opting_into_fewer_shells_is_explicit(series, tmp_path):
    """shells = [1000, 2000]: the 2-shell series passes the checks and gives 4 features; a 3-shell series is used with
    the configured two and a warning names the shell left out."""
    sys.path.insert(0, str(BUNDLE))
    try:
        from scripts import check_cases
    finally:
        sys.path.remove(str(BUNDLE))
    check_cases([series["default"]], shells=[1000, 2000])
    with pytest.raises(GradientTableError, match="Config key 'shells'"):
        check_cases([series["default"]], shells=[1000, 2000, 3000])
    assert _features(series["default"], shells=[1000, 2000]).shape[0] == 4
    with pytest.warns(UserWarning, match=r"shells \[3000\] are not among the expected"):
        assert _features(series["hcp"], shells=[1000, 2000]).shape[0] == 4


def test_scaled_centre_crop_keeps_lr_and_hr_aligned():
    aff_lr = np.array([[2.5, 0.1, 0, -80.0], [0, 2.5, 0, -100.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    lr = MetaTensor(torch.arange(68 * 86 * 68, dtype=torch.float32).reshape(1, 68, 86, 68), affine=torch.as_tensor(aff_lr))
    hr_vals = torch.repeat_interleave(torch.repeat_interleave(torch.repeat_interleave(lr.as_tensor(), 2, 1), 2, 2), 2, 3)
    hr = MetaTensor(hr_vals, affine=torch.as_tensor(hr_affine(aff_lr)))
    out = ScaledPairCenterCropd("lr", "hr", [50, 50, 50], scale=2)({"lr": lr, "hr": hr})
    assert out["lr"].shape[1:] == (50, 50, 50) and out["hr"].shape[1:] == (100, 100, 100)
    # HR voxels 2i, 2i+1 belong to LR voxel i: the crops hold the same values, and the affines stay a x2 pair
    np.testing.assert_array_equal(out["hr"][0, ::2, ::2, ::2].numpy(), out["lr"][0].numpy())
    assert float(out["lr"][0, 0, 0, 0]) == float(lr[0, 9, 18, 9])
    np.testing.assert_allclose(out["hr"].affine.numpy(), hr_affine(out["lr"].affine.numpy()), atol=1e-5)
    whole = ScaledPairCenterCropd("lr", "hr", None)({"lr": lr, "hr": hr})
    assert whole["lr"].shape == lr.shape and whole["hr"].shape == hr.shape
    small = ScaledPairCenterCropd("lr", "hr", [50, 50, 50])({"lr": lr[:, :40, :40, :40], "hr": hr[:, :80, :80, :80]})
    assert small["lr"].shape[1:] == (40, 40, 40)  # an axis no larger than the roi is kept whole


def test_validation_windows_are_bounded_at_paper_scale():
    """Stage 3 validates on a centred LR crop (val_roi) with val_ddim_steps: 8 windows instead of 36 on an HCP volume."""
    p = _parser("train_diffusion.json")
    assert p["val_ddim_steps"] == 25 and p["val_roi"] == [50, 50, 50]
    assert "@validate#crop" in p["validate"]["preprocessing"]["transforms"]
    inferer = NODDISRInferer(roi_size=p.get_parsed_content("lr_patch"), overlap=p["val_overlap"], sampler=None)
    lr_shape = (68, 86, 68)  # HCP 136 x 172 x 136 at 1.25 mm, LR 2.5 mm
    counts = {}
    for name, roi in (("whole", None), ("val_roi", p["val_roi"])):
        crop = ScaledPairCenterCropd("image", [], roi)
        x = crop({"image": torch.zeros(6, *lr_shape)})["image"]
        counts[name] = inferer.count_windows(x.shape[1:], channels=6)
    assert counts == {"whole": 36, "val_roi": 8}
    # UNet evaluations per validation subject: 36 x 100 (spec) -> 8 x 25
    assert counts["whole"] * 100 / (counts["val_roi"] * p["val_ddim_steps"]) == 18.0
