"""MAISI mask generation from ``controllable_anatomy_size`` (spec maisi_ct section 4.2c): anatomy-size lookup,
124 -> 132 remap, post-processing of generated masks and the bundle's generation path with the tiny overlay.

The official files (networks, ``all_anatomy_size_conditions.json``, ``label_dict_124_to_132.json``) are not
available offline: the tests write small stand-ins in the official formats into a temporary folder.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from common.inferers.maisi_mask import (
    ANATOMY_SIZE_ORDER,
    anatomy_size_condition,
    load_anatomy_size_conditions,
    load_label_remap,
    remap_decoder_channels,
    requested_tumor_label,
)
from common.transforms.maisi import BODY_LABEL, MAISI_LABELS, post_process_generated_mask

NAMES = {v: k for k, v in MAISI_LABELS.items()}


# ---------------------------------------------------------------- anatomy-size condition
CONDITIONS = [
    [0.5, 0.5, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1],
    [0.1, 0.9, 0.2, 0.3, 0.4, -1, -1, -1, -1, 0.2],
    [0.2, 0.3, 0.2, 0.3, 0.4, -1, -1, 0.6, -1, -1],
    [0.2, 0.3, 0.2, 0.3, 0.4, -1, -1, 0.6, -1, -1],  # duplicate of row 2: ties go to the first row
]


def test_nearest_condition_and_user_overwrite():
    table = np.asarray(CONDITIONS, dtype=float)
    # liver 0.8: row 1 (|0.9 - 0.8| = 0.1) is nearest; the user's 0.8 overwrites its liver slot
    assert anatomy_size_condition([["liver", 0.8]], table) == [0.1, 0.8, 0.2, 0.3, 0.4, -1, -1, -1, -1, 0.2]
    # liver 0.35 + hepatic tumor 0.5: row 0 costs 0.15 + 1.5, row 2 0.05 + 0.1 (row 3 ties, comes later)
    assert anatomy_size_condition([["liver", 0.35], ["hepatic tumor", 0.5]], table) == \
        [0.2, 0.35, 0.2, 0.3, 0.4, -1, -1, 0.5, -1, -1]
    # a user -1 is a value: "no bone lesion" prefers rows without one, and the slot stays -1
    assert anatomy_size_condition([["bone lesion", -1], ["liver", 0.85]], table) == \
        [0.5, 0.85, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1]
    assert requested_tumor_label([0.2, 0.35, 0.2, 0.3, 0.4, -1, -1, 0.5, -1, -1]) == 26
    assert requested_tumor_label(CONDITIONS[0]) is None
    assert ANATOMY_SIZE_ORDER.index("bone lesion") == 9 and ANATOMY_SIZE_ORDER[0] == "gallbladder"
    with pytest.raises(ValueError, match="cannot be size-controlled"):
        anatomy_size_condition([["spleen", 0.5]], table)


def test_conditions_file_format(tmp_path):
    good = tmp_path / "cond.json"
    good.write_text(json.dumps([{"organ_size": row} for row in CONDITIONS]))
    assert load_anatomy_size_conditions(good).shape == (4, 10)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"organ_size": [0.5] * 9}]))
    with pytest.raises(ValueError, match="10-value"):
        load_anatomy_size_conditions(bad)


# ---------------------------------------------------------------- 124 -> 132 remap
def _write_remap(path, n_channels=125):
    """Stand-in in the official format ``name -> [decoder_channel, maisi_label]``: channel 0 background, the
    last channel body (200), the channels between them the first MAISI ids (dummies skipped)."""
    ids = sorted(v for k, v in MAISI_LABELS.items() if not k.startswith("dummy"))[: n_channels - 2]
    table = {"background": [0, 0], **{NAMES[i]: [c, i] for c, i in enumerate(ids, 1)}, "body": [n_channels - 1, BODY_LABEL]}
    path.write_text(json.dumps(table, indent=4))
    return path


def test_remap_known_argmax_map(tmp_path):
    lut = load_label_remap(_write_remap(tmp_path / "remap.json"))
    assert lut.shape == (125,) and lut[0] == 0 and lut[124] == BODY_LABEL
    # channels 0, 1, 2 (spleen after liver: the first gap), 124 (body)
    channels = torch.tensor([[[0, 1], [2, 124]], [[3, 15], [16, 17]]])
    got = remap_decoder_channels(channels, lut)
    assert got.dtype == torch.uint8
    assert got.tolist() == [[[0, 1], [3, 200]], [[4, 17], [19, 22]]]
    with pytest.raises(ValueError, match=r"\[0, 124\]"):
        remap_decoder_channels(torch.tensor([125]), lut)


def test_remap_file_must_cover_every_channel_once(tmp_path):
    p = tmp_path / "remap.json"
    p.write_text(json.dumps({"background": [0, 0], "liver": [2, 1]}))
    with pytest.raises(ValueError, match="channels must be 0..1"):
        load_label_remap(p)
    p.write_text(json.dumps({"background": [0, 0], "liver": [1, 150]}))
    with pytest.raises(ValueError, match="150"):
        load_label_remap(p)


# ---------------------------------------------------------------- post-processing
def _body_phantom():
    vol = np.zeros((40, 40, 40), dtype=np.uint8)
    vol[4:36, 4:36, 4:36] = BODY_LABEL
    return vol


def test_post_process_cleans_generated_mask():
    vol = _body_phantom()
    vol[38, 38, 38] = BODY_LABEL  # stray body voxel outside the body -> background
    vol[8:20, 8:20, 8:20] = 1  # liver with a one-voxel hole -> closed
    vol[14, 14, 14] = BODY_LABEL
    vol[12:14, 12:14, 12:14] = 25  # hepatic vessel -> liver
    vol[24:30, 24:30, 24:30] = 3  # spleen, plus a far island -> body
    vol[8:10, 30:32, 30:32] = 3
    vol[24:27, 8:11, 24:27] = 128  # bone lesion not requested -> body
    vol[24:27, 14:17, 24:27] = 24  # pancreatic tumour not requested -> pancreas
    vol[30:33, 8:11, 8:11] = 132  # airway kept
    out = post_process_generated_mask(vol)
    assert out.dtype == np.uint8 and out.shape == vol.shape
    assert out[38, 38, 38] == 0
    assert out[14, 14, 14] == 1 and np.all(out[12:14, 12:14, 12:14] == 1)
    assert np.all(out[24:30, 24:30, 24:30] == 3) and np.all(out[8:10, 30:32, 30:32] == BODY_LABEL)
    assert not np.isin(out, [128, 24, 25]).any()
    assert np.all(out[24:27, 8:11, 24:27] == BODY_LABEL) and np.all(out[24:27, 14:17, 24:27] == 4)
    assert np.all(out[30:33, 8:11, 8:11] == 132)
    assert set(np.unique(out)) <= {0, 1, 3, 4, 132, BODY_LABEL}


def test_post_process_keeps_requested_tumour():
    vol = _body_phantom()
    vol[8:20, 8:20, 8:20] = 4  # pancreas holding the requested tumour
    vol[10:14, 10:14, 10:14] = 24
    vol[26:28, 26:28, 26:28] = 24  # a second, smaller tumour island -> body (only the largest is kept)
    out = post_process_generated_mask(vol, target_tumor_label=24)
    assert np.all(out[10:14, 10:14, 10:14] == 24)
    assert np.all(out[26:28, 26:28, 26:28] == BODY_LABEL)
    # bone lesions are not reduced to one component
    vol = _body_phantom()
    vol[8:11, 8:11, 8:11] = 128
    vol[26:29, 26:29, 26:29] = 128
    out = post_process_generated_mask(vol, target_tumor_label=128)
    assert np.all(out[8:11, 8:11, 8:11] == 128) and np.all(out[26:29, 26:29, 26:29] == 128)
    with pytest.raises(ValueError, match="target_tumor_label"):
        post_process_generated_mask(vol, target_tumor_label=1)


# ---------------------------------------------------------------- bundle: generation path (tiny overlay)
@pytest.fixture(scope="module")
def mask_files(tmp_path_factory, maisi_bundle):
    """Tiny random mask VAE / DM in the official checkpoint layouts + stand-in condition and remap tables."""
    from monai.bundle import ConfigParser

    out = tmp_path_factory.mktemp("maisi_mask_files")
    parser = ConfigParser()
    parser.read_config([str(maisi_bundle / "configs" / "inference.json"), str(maisi_bundle / "configs" / "tiny.json")])
    parser["controllable_anatomy_size"] = [["liver", 0.5]]
    parser["device"] = "$torch.device('cpu')"
    torch.manual_seed(0)
    ae, dm = parser.get_parsed_content("mask_autoencoder_def"), parser.get_parsed_content("mask_diffusion_def")
    torch.save(ae.state_dict(), out / "mask_generation_autoencoder.pt")  # official layout: raw state dict
    torch.save({"unet_state_dict": dm.state_dict(), "scale_factor": torch.tensor(1.0055984258651733)},
               out / "mask_generation_diffusion_unet.pt")
    (out / "conditions.json").write_text(json.dumps([{"organ_size": row} for row in CONDITIONS]))
    _write_remap(out / "label_dict_124_to_132.json")
    return {
        "mask_generation_autoencoder_path": str(out / "mask_generation_autoencoder.pt"),
        "mask_generation_diffusion_unet_path": str(out / "mask_generation_diffusion_unet.pt"),
        "mask_generation_conditions_path": str(out / "conditions.json"),
        "mask_generation_label_remap_path": str(out / "label_dict_124_to_132.json"),
    }


def _workflow(bundle, ckpt_dir, out_dir, **overrides):
    return ConfigWorkflow(
        config_file=[str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json")],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type="infer", bundle_root=str(bundle), ckpt_dir=str(ckpt_dir), output_dir=str(out_dir), **overrides,
    )


def _run(bundle, ckpt_dir, out_dir, **overrides):
    wf = _workflow(bundle, ckpt_dir, out_dir, **overrides)
    wf.initialize()
    assert not wf.check_properties()
    wf.run()
    wf.finalize()
    images = sorted(out_dir.glob("sample_*_image.nii.gz"))
    assert len(images) == 1
    label = images[0].with_name(images[0].name.replace("_image.nii.gz", "_label.nii.gz"))
    return nib.load(str(images[0])), nib.load(str(label))


@pytest.mark.filterwarnings("ignore:the mask DM was trained")
def test_bundle_generates_mask_image_pair_deterministically(maisi_bundle, tiny_ckpt_dir, mask_files, tmp_path):
    request = dict(
        controllable_anatomy_size=[["liver", 0.35], ["hepatic tumor", 0.5]],
        output_size=[64, 64, 32], spacing=[2.0, 2.0, 3.0], quality_check=False, seed=3,
        **mask_files,
    )
    img, lab = _run(maisi_bundle, tiny_ckpt_dir, tmp_path / "a", **request)
    assert img.shape == (64, 64, 32) and lab.shape == (64, 64, 32)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), [2.0, 2.0, 3.0]) and np.allclose(img.affine, lab.affine)
    assert lab.get_data_dtype() == np.uint8
    label, hu = np.asarray(lab.dataobj), np.asarray(img.dataobj)
    # the written label keeps the size-controlled anatomy (liver 1, hepatic tumour 26); other organs -> body
    assert set(np.unique(label).tolist()) <= {0, 1, 26, BODY_LABEL} and (label == BODY_LABEL).any()
    assert np.all(hu[label == 0] == -1000) and hu.min() >= -1000 and hu.max() <= 1000
    # the raw generated mask (tiny latent 8^3 -> 32^3 at 1.5 mm, MAISI ids) and the condition used are kept
    masks = sorted((tmp_path / "a" / "generated_masks").glob("generated_mask_*.nii.gz"))
    assert len(masks) == 1
    raw = nib.load(str(masks[0]))
    assert raw.shape == (32, 32, 32) and np.allclose(np.diag(raw.affine)[:3], 1.5)
    raw_ids = set(np.unique(np.asarray(raw.dataobj)).tolist())
    assert raw_ids <= {0, BODY_LABEL, *MAISI_LABELS.values()} and len(raw_ids) > 10
    info = json.loads(masks[0].with_name(masks[0].name.replace(".nii.gz", ".json")).read_text())
    assert info["condition"] == [0.2, 0.35, 0.2, 0.3, 0.4, -1, -1, 0.5, -1, -1] and info["target_tumor_label"] == 26
    # same seed -> bit-identical image and label
    img2, lab2 = _run(maisi_bundle, tiny_ckpt_dir, tmp_path / "b", **request)
    assert np.array_equal(np.asarray(img2.dataobj), hu) and np.array_equal(np.asarray(lab2.dataobj), label)


@pytest.mark.parametrize("missing", ["mask_generation_conditions_path", "mask_generation_label_remap_path"])
def test_missing_official_file_fails_clearly(maisi_bundle, tiny_ckpt_dir, mask_files, tmp_path, missing):
    files = dict(mask_files, **{missing: str(tmp_path / "absent.json")})
    wf = _workflow(maisi_bundle, tiny_ckpt_dir, tmp_path / "out", controllable_anatomy_size=[["liver", 0.5]], **files)
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    cause = err.value.__cause__
    assert isinstance(cause, FileNotFoundError)
    msg = str(cause)
    assert "absent.json" in msg and missing in msg and "large_files.yml" in msg
    entry = {"mask_generation_conditions_path": "datasets/all_anatomy_size_conditions.json",
             "mask_generation_label_remap_path": "configs/label_dict_124_to_132.json"}[missing]
    assert entry in msg and msg.count("config key") == 1


def test_official_files_checked_against_large_files(maisi_bundle, mask_files, tmp_path):
    """A mask-generation file that a large_files.yml entry names is refused when its hash differs."""
    import hashlib
    import shutil

    from monai.bundle import ConfigParser

    from common.data.fetch import HashMismatchError

    root = tmp_path / "bundle"
    (root / "datasets").mkdir(parents=True)
    cond = root / "datasets" / "all_anatomy_size_conditions.json"
    shutil.copy(mask_files["mask_generation_conditions_path"], cond)
    good = hashlib.md5(cond.read_bytes()).hexdigest()

    def generator(md5):
        (root / "large_files.yml").write_text(
            f"large_files:\n  - path: datasets/all_anatomy_size_conditions.json\n    url: http://127.0.0.1/x\n"
            f"    hash_val: {md5}\n    hash_type: md5\n"
        )
        parser = ConfigParser()
        parser.read_config([str(maisi_bundle / "configs" / "inference.json"), str(maisi_bundle / "configs" / "tiny.json")])
        parser.update({**mask_files, "mask_generation_conditions_path": str(cond), "controllable_anatomy_size": [["liver", 0.5]],
                       "large_files": str(root / "large_files.yml"), "device": "$torch.device('cpu')", "bundle_root": str(maisi_bundle)})
        return parser.get_parsed_content("mask_generator")

    generator(good).load()  # the right file passes
    with pytest.raises(HashMismatchError, match=r"all_anatomy_size_conditions.json' has md5 .*expected 0{32} \(large_files.yml entry"):
        generator("0" * 32).load()
