"""The official inference path on replica files: the official mask database (zip + JSON with paths relative to the
unzipped folder), retrieval and next-mask retry, user masks (MAISI semantics, TotalSegmentator maps). The configs'
scheduler, scale factor and tensor splitting are in ``test_maisi_config_binding.py``."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from common.data.maisi_masks import MaskCandidateQueue, ensure_mask_folder, find_masks, load_mask_db
from common.networks import maisi as M
from common.transforms.maisi import BODY_LABEL, MAISI_LABELS, MaisiUserMaskd, body_region_from_mask
from common.utils.errors import InvalidInputError

HERE = Path(__file__).parent
REF = json.loads((HERE / "monai14_reference.json").read_text())
DB_NAME = "all_masks_flexible_size_and_spacing_4000"


@pytest.fixture(scope="module")
def official_db(maisi_masks, tmp_path_factory) -> dict[str, Path]:
    """The official database layout: ``datasets/<DB_NAME>.zip`` holding ``<DB_NAME>/Task06/labelsTr/...`` and the
    JSON with ``./Task06/...`` names (relative to the unzipped folder, not to the JSON's folder)."""
    root = tmp_path_factory.mktemp("official_db")
    grid = nib.load(str(maisi_masks["grid"]))
    entries = []
    with zipfile.ZipFile(root / f"{DB_NAME}.zip", "w") as zf:
        for i, name in enumerate(["./Task06/labelsTr/lung_001.nii.gz", "./Task03/labelsTr/liver_007.nii.gz"]):
            src = root / f"m{i}.nii.gz"
            nib.save(grid, str(src))
            zf.write(src, f"{DB_NAME}/{name[2:]}")
            arr = np.asarray(grid.dataobj)
            entries.append({"pseudo_label_filename": name, "spacing": [1.5, 1.5, 1.5], "dim": [64, 64, 64],
                            "label_list": sorted(int(v) for v in np.unique(arr) if v),
                            "top_region_index": [0, 0, 1, 0], "bottom_region_index": [0, 0, 1, 0]})
            src.unlink()
    (root / "candidate_masks.json").write_text(json.dumps(entries))
    return {"root": root, "json": root / "candidate_masks.json", "dir": root / DB_NAME}


def test_mask_paths_resolve_against_the_unzipped_folder(official_db, tmp_path):
    entries = load_mask_db(official_db["json"], official_db["dir"])
    assert entries[0]["pseudo_label_filename"] == str(official_db["dir"] / "Task06" / "labelsTr" / "lung_001.nii.gz")
    # unzip on first use: into place atomically, no partial folder left, the second call reuses it
    dest = tmp_path / DB_NAME
    (tmp_path / f"{DB_NAME}.zip").write_bytes((official_db["root"] / f"{DB_NAME}.zip").read_bytes())
    assert ensure_mask_folder(dest) == dest and (dest / "Task06" / "labelsTr" / "lung_001.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME, f"{DB_NAME}.zip"]
    # a damaged archive leaves nothing behind
    bad = tmp_path / "bad" / f"{DB_NAME}.zip"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InvalidInputError, match="cannot be unzipped"):
        ensure_mask_folder(bad.with_suffix(""))
    assert [p.name for p in bad.parent.iterdir()] == [bad.name]
    # a large_files.yml hash that does not match is refused before extraction
    yml = tmp_path / "lf" / "large_files.yml"
    yml.parent.mkdir()
    (yml.parent / "datasets").mkdir()
    z = yml.parent / "datasets" / f"{DB_NAME}.zip"
    z.write_bytes(bad.read_bytes())
    yml.write_text(f'large_files:\n  - path: "datasets/{DB_NAME}.zip"\n    url: "u"\n    hash_val: "{"0" * 32}"\n'
                   '    hash_type: "md5"\n')
    from common.data.fetch import HashMismatchError

    with pytest.raises(HashMismatchError, match="mask archive"):
        ensure_mask_folder(z.with_suffix(""), large_files=yml)
    assert not z.with_suffix("").exists()


def _db(n_exact: int, n_other: int, labels=(1, 3, 200)) -> list[dict]:
    db = [{"pseudo_label_filename": f"/e{i}.nii.gz", "spacing": [1.5, 1.5, 2.0], "dim": [256, 256, 256],
           "label_list": list(labels)} for i in range(n_exact)]
    db += [{"pseudo_label_filename": f"/o{i}.nii.gz", "spacing": [1.0 + 0.1 * i, 1.0 + 0.1 * i, 2.0],
            "dim": [256, 256, 200], "label_list": list(labels)} for i in range(n_other)]
    return db


def test_retrieval_follows_the_official_rule():
    args = (["liver"], [1.5, 1.5, 2.0], [256, 256, 256])
    # enough exact matches: only those, shuffled by the seed (all of them can come first)
    firsts = {find_masks(_db(6, 3), *args, num=2, seed=s)[0]["label"] for s in range(12)}
    assert firsts <= {f"/e{i}.nii.gz" for i in range(6)} and len(firsts) > 2
    # too few exact: the closest, masks far too small dropped, at most max(2n, 5), label survival checked
    db = _db(1, 8) + [{"pseudo_label_filename": "/tiny.nii.gz", "spacing": [1.5, 1.5, 2.0], "dim": [128, 128, 128],
                       "label_list": [1, 200]}]
    picks = find_masks(db, *args, num=2, seed=0)
    assert len(picks) == 5 and "/tiny.nii.gz" not in {p["label"] for p in picks}
    assert not any(p["exact_match"] for p in picks)
    lost = find_masks(db, *args, num=2, seed=0, survives=lambda item: item["label"] not in ("/e0.nii.gz", "/o0.nii.gz"))
    assert {p["label"] for p in lost}.isdisjoint({"/e0.nii.gz", "/o0.nii.gz"})
    with pytest.raises(ValueError, match="keeps all of"):  # num=2: one exact match is too few, closest path
        find_masks(db, *args, num=2, survives=lambda item: False)
    # body regions (DDPM): a mask whose regions do not cover the request is not a candidate
    regional = [dict(e, top_region_index=[0, 1, 0, 0], bottom_region_index=[0, 0, 1, 0]) for e in _db(3, 0)]
    assert len(find_masks(regional, *args, body_region=["abdomen"])) == 3
    with pytest.raises(ValueError, match="body region"):
        find_masks(regional, *args, body_region=["pelvis"])


def test_queue_moves_to_the_next_mask_and_stops_at_the_limit():
    q = MaskCandidateQueue([{"label": f"m{i}"} for i in range(5)], num=2)
    seen = []
    outcomes = iter([False, True, False, False, False])  # QC of the samples drawn from m0 .. m4
    for item in q:
        seen.append(item["label"])
        q.decide(next(outcomes))
    # m0 failed -> dropped, m1 kept, m2 failed with 3 left for 1 missing -> dropped, m3 failed with 2 left -> dropped,
    # m4: the last candidate for the last missing sample is kept although it failed
    assert seen == ["m0", "m1", "m2", "m3", "m4"] and q.decisions == [False, True, False, False, True]
    q = MaskCandidateQueue([{"label": "u"}] * 3, num=3)  # a user mask: every sample kept
    assert [q.decide(False) for _ in q] == [True, True, True]



def _liver_with_tumour(shape=(48, 48, 48)) -> torch.Tensor:
    vol = torch.full((1, *shape), BODY_LABEL, dtype=torch.uint8)
    vol[0, 8:40, 8:40, 8:40] = MAISI_LABELS["liver"]
    vol[0, 4:44, 4:8, 4:44] = MAISI_LABELS["spleen"]  # a neighbour that is not the tumour's host
    vol[0, 12:17, 12:17, 12:17] = MAISI_LABELS["hepatic tumor"]
    return vol


def test_database_masks_are_augmented_as_the_official_sampler_does(maisi_bundle, maisi_masks):
    """AugmentMaskd: a tumour moves inside its host organ (>= 80 % inside, its old place filled with the host,
    other labels untouched); a tumour-free mask is zoomed by 0.99-1.01; only items flagged by the database."""
    from monai.data import MetaTensor
    from scripts.inference import mask_requests

    from common.transforms.maisi import AugmentMaskd

    liver, tumour = MAISI_LABELS["liver"], MAISI_LABELS["hepatic tumor"]
    vol = _liver_with_tumour()
    old = vol[0] == tumour
    outs = []
    for seed in (0, 1):
        out = AugmentMaskd("label", seed=seed)({"label": MetaTensor(vol.clone()), "augment": True})["label"]
        assert isinstance(out, MetaTensor) and out.dtype == torch.uint8 and out.shape == vol.shape
        new = out[0] == tumour
        assert not torch.equal(new, old) and new.sum() >= 0.8 * old.sum()  # moved, not lost
        assert bool((vol[0][new] == liver).float().mean() >= 0.8) and bool(torch.isin(vol[0][new], torch.tensor([liver, tumour])).all())
        assert bool((out[0][old & ~new] == liver).all())  # the old place becomes the host
        other = ~torch.isin(vol[0], torch.tensor([liver, tumour]))
        assert torch.equal(out[0][other], vol[0][other])
        outs.append(out)
    assert not torch.equal(outs[0], outs[1])
    again = AugmentMaskd("label", seed=0)({"label": MetaTensor(vol.clone()), "augment": True})["label"]
    assert torch.equal(again, outs[0])  # seeded
    # no flag (a user's mask): untouched
    assert torch.equal(AugmentMaskd("label", seed=0)({"label": MetaTensor(vol.clone())})["label"], vol)
    # tumour-free: a zoom within 1 %, same size (an axis long enough for 1 % to be a voxel; as with the official
    # RandZoom, a factor in [1, 1 + 1/160) leaves this mask as it is)
    free = torch.full((1, 160, 24, 24), BODY_LABEL, dtype=torch.uint8)
    free[0, 20:140, 4:20, 4:20] = liver
    zoomed = [AugmentMaskd("label", seed=s)({"label": MetaTensor(free.clone()), "augment": True})["label"] for s in range(8)]
    assert all(z.shape == free.shape for z in zoomed) and any(not torch.equal(z, free) for z in zoomed)
    for z in zoomed:
        extent = torch.nonzero(z[0] == liver)[:, 0]
        assert abs(int(extent.max() - extent.min() + 1) - 120) <= 2  # 120 voxels x [0.99, 1.01]
    # the bundle flags database candidates for augmentation, never a user's mask
    assert mask_requests(str(maisi_masks["grid"]), None, [], [1.5] * 3, [64] * 3, 2, 0) == [{"label": str(maisi_masks["grid"])}] * 2

def test_totalsegmentator_map_refused_as_maisi_and_converted_by_name(maisi_bundle):
    from monai.data import MetaTensor

    from common.data.fetch import demo_file

    seg = nib.load(str(demo_file("totalsegmentator/example_seg_fast_force_split.nii.gz")))
    arr = np.asarray(seg.dataobj).astype(np.int16)
    classes = json.loads((maisi_bundle / "configs" / "totalsegmentator_classes.json").read_text())
    lab = MetaTensor(torch.as_tensor(arr[None]), affine=torch.as_tensor(seg.affine),
                     meta={"filename_or_obj": "ts_seg.nii.gz"})
    with pytest.raises(InvalidInputError) as err:
        MaisiUserMaskd("label", class_map=classes)({"label": lab})
    msg = str(err.value)
    assert "ts_seg.nii.gz" in msg and f"no body label {BODY_LABEL}" in msg and "label_format" in msg
    assert "2 (dummy1" in msg  # TotalSegmentator 2 = kidney_right would be read as MAISI dummy1
    out = np.asarray(MaisiUserMaskd("label", "totalsegmentator", classes)({"label": lab})["label"][0])
    ts = {v: int(k) for k, v in classes.items()}
    assert np.array_equal(out[arr == ts["spleen"]], np.full((arr == ts["spleen"]).sum(), MAISI_LABELS["spleen"]))
    assert np.all(out[arr == ts["kidney_left"]] == MAISI_LABELS["left kidney"])
    assert BODY_LABEL in np.unique(out) and np.all(out[arr > 0] != 0)
    assert body_region_from_mask(out) is not None
    with pytest.raises(InvalidInputError, match=r"ids \[150\]"):
        MaisiUserMaskd("label", "totalsegmentator", classes)({"label": lab.clone().fill_(150)})


def test_maisi_semantics_pass_for_a_real_maisi_mask_and_catch_wrong_voxel_size(maisi_masks):
    from monai.data import MetaTensor

    img = nib.load(str(maisi_masks["grid"]))
    lab = MetaTensor(torch.as_tensor(np.asarray(img.dataobj)[None]), affine=torch.as_tensor(img.affine))
    MaisiUserMaskd("label")({"label": lab})  # a real MAISI mask passes
    big = MetaTensor(lab.as_tensor().clone(), affine=torch.diag(torch.tensor([20.0, 20.0, 20.0, 1.0])))
    with pytest.raises(InvalidInputError, match=r"implausible organ volumes.*1 \(liver\)"):
        MaisiUserMaskd("label")({"label": big})


def _replicas(out: Path, version: str) -> float:
    """Tiny networks under the official file names of ``version`` as the official code saves them: a raw VAE state
    dict, ``{epoch, loss, num_train_timesteps, unet_state_dict, scale_factor}`` with a MetaTensor scale factor,
    ``{epoch, loss (tensor), controlnet_state_dict}``; the DDPM files with the unused out_proj keys MONAI 1.4 wrote.
    Returns the scale factor."""
    from monai.data import MetaTensor

    torch.manual_seed(2)
    unet = M.maisi_diffusion_unet(version, tiny=True, device="cpu").state_dict()
    cn = M.maisi_controlnet(version, tiny=True, device="cpu").state_dict()
    if version == "ddpm":
        for state, name in ((unet, "diffusion_unet_ddpm_tiny"), (cn, "controlnet_ddpm_tiny")):
            for k, shape in REF["layouts"][name].items():
                state.setdefault(k, torch.zeros(shape))
    names = {"rflow": ("autoencoder_v1.pt", "diff_unet_3d_rflow-ct.pt", "controlnet_3d_rflow-ct.pt"),
             "ddpm": ("autoencoder_epoch273.pt", "input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt",
                      "controlnet-20datasets-e20wl100fold0bc_noi_dia_fsize_current.pt")}[version]
    torch.save(M.maisi_autoencoder(tiny=True, device="cpu").state_dict(), out / names[0])
    torch.save({"epoch": 1, "loss": 0.1, "num_train_timesteps": 1000, "unet_state_dict": unet,
                "scale_factor": MetaTensor(torch.tensor(0.8), meta={"filename_or_obj": "x", "dim": np.arange(3)})},
               out / names[1])
    torch.save({"epoch": 1, "loss": torch.tensor(0.2), "controlnet_state_dict": cn}, out / names[2])
    return 0.8


def _workflow(bundle, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=[str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json")],
                        workflow_type="infer", bundle_root=str(bundle), **overrides)
    wf.initialize()
    return wf


@pytest.mark.parametrize("version", ["rflow", "ddpm"])
def test_generates_from_the_official_zipped_database(maisi_bundle, official_db, tmp_path, version):
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    scale = _replicas(ckpt, version)
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / f"{DB_NAME}.zip").write_bytes((official_db["root"] / f"{DB_NAME}.zip").read_bytes())
    out = tmp_path / "out"
    wf = _workflow(maisi_bundle, version=version, ckpt_dir=str(ckpt), output_dir=str(out), num_inference_steps=2,
                   mask_db=str(official_db["json"]), mask_db_dir=str(datasets / DB_NAME), anatomy_list=["liver"],
                   output_size=[64, 64, 64], spacing=[1.5, 1.5, 1.5], num_output_samples=1, quality_check=True,
                   keep_all_labels=True)
    wf.run()
    assert (datasets / DB_NAME / "Task03" / "labelsTr" / "liver_007.nii.gz").is_file()
    assert wf.parser.get_parsed_content("inferer").scale_factor == pytest.approx(scale)
    images = sorted(out.glob("sample_*_image.nii.gz"))
    reports = [json.loads(p.read_text()) for p in out.glob("sample_*.json")]
    assert len(images) == 1 and len(reports) == 1
    report = reports[0]
    assert report["kept"] and report["mask"].endswith((".nii.gz",)) and DB_NAME in report["mask"]
    assert 1 <= report["masks_tried"] <= 5 and report["attempts"] == 1  # next mask, not a redraw
    if version == "ddpm":
        label = np.asarray(nib.load(str(images[0]).replace("_image.nii.gz", "_label.nii.gz")).dataobj)
        top, bottom = body_region_from_mask(label)  # the mask the sample was conditioned on (augmented)
        assert report["top_region_index"] == top and report["bottom_region_index"] == bottom
    else:  # the rflow UNet has no body-region input
        assert "top_region_index" not in report



#: a quality-check table no CT can pass (liver median must lie in [5000, 6000] HU)
_IMPOSSIBLE_QC = {"liver": {"sigma_6_low": 5000.0, "percentile_0_5": 5000.0, "sigma_6_high": 6000.0, "percentile_99_5": 6000.0}}


def test_failed_quality_check_moves_to_the_next_database_mask_and_redraws_a_user_mask(
        maisi_bundle, official_db, maisi_masks, tmp_path):
    """Official rule in a bundle run: a database sample failing the quality check is dropped and the next mask is
    used (no redraw on the same mask); the last candidate for the last missing sample is kept, marked failed.
    A user's mask has no next mask: its noise is redrawn up to max_try times."""
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    _replicas(ckpt, "rflow")
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / f"{DB_NAME}.zip").write_bytes((official_db["root"] / f"{DB_NAME}.zip").read_bytes())
    common = dict(ckpt_dir=str(ckpt), num_inference_steps=2, output_size=[64, 64, 64], spacing=[1.5, 1.5, 1.5],
                  num_output_samples=1, quality_check=True, quality_statistics=_IMPOSSIBLE_QC, max_try=2)
    out = tmp_path / "db"
    wf = _workflow(maisi_bundle, output_dir=str(out), mask_db=str(official_db["json"]), mask_db_dir=str(datasets / DB_NAME),
                   anatomy_list=["liver"], **common)
    draws = []
    inferer = wf.parser.get_parsed_content("inferer")
    original = inferer.sample_latent
    inferer.sample_latent = lambda mask, *a, **k: (draws.extend(mask.meta["filename_or_obj"]), original(mask, *a, **k))[1]
    wf.run()
    queue = wf.parser.get_parsed_content("dataset")
    assert len(queue.data) == 2 and queue.tried == 2 and queue.decisions == [False, True]
    assert draws == [item["label"] for item in queue.data]  # one draw per mask, the second mask after the first failed
    reports = [json.loads(p.read_text()) for p in out.glob("sample_*.json")]
    assert len(reports) == 1 and len(list(out.glob("sample_*_image.nii.gz"))) == 1  # the dropped sample is not written
    report = reports[0]
    assert report["mask"] == queue.data[1]["label"] and report["masks_tried"] == 2 and report["attempts"] == 1
    assert report["kept"] and report["quality_check_result"] == "failed"

    out = tmp_path / "user"
    wf = _workflow(maisi_bundle, output_dir=str(out), label_path=str(maisi_masks["grid"]), **common)
    wf.run()
    (report,) = [json.loads(p.read_text()) for p in out.glob("sample_*.json")]
    assert report["attempts"] == 2 and report["quality_check_result"] == "failed" and report["masks_tried"] == 1


def test_bundle_drops_database_masks_whose_requested_label_does_not_survive_resampling(maisi_bundle, maisi_masks, tmp_path):
    """Closest-match path: the bundle's own preprocessing decides survival. A mask whose liver is one voxel at an
    odd index (gone after nearest resampling to 3 mm) is not a candidate; the mask with a real liver is used."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    img = nib.load(str(maisi_masks["grid"]))
    arr = np.asarray(img.dataobj).astype(np.uint8)
    liver = MAISI_LABELS["liver"]
    assert (arr == liver).sum() > 100
    speck = np.where(arr == liver, BODY_LABEL, arr).astype(np.uint8)
    speck[33, 33, 33] = liver
    resampled = Spacing(pixdim=(3.0, 3.0, 3.0), mode="nearest")(MetaTensor(torch.as_tensor(speck[None]), affine=torch.as_tensor(img.affine)))
    assert liver not in torch.unique(resampled)  # precondition: the speck does not survive
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    entries = []
    for name, data in (("a_speck.nii.gz", speck), ("b_liver.nii.gz", arr)):
        nib.save(nib.Nifti1Image(data, img.affine), str(db_dir / name))
        entries.append({"pseudo_label_filename": name, "spacing": [1.5, 1.5, 1.5], "dim": [64, 64, 64],
                        "label_list": sorted(int(v) for v in np.unique(data) if v)})
    (db_dir / "db.json").write_text(json.dumps(entries))
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    _replicas(ckpt, "rflow")
    out = tmp_path / "out"
    wf = _workflow(maisi_bundle, ckpt_dir=str(ckpt), output_dir=str(out), mask_db=str(db_dir / "db.json"),
                   anatomy_list=["liver"], output_size=[64, 64, 64], spacing=[3.0, 3.0, 3.0], num_output_samples=1,
                   quality_check=False)
    queue = wf.parser.get_parsed_content("dataset")
    assert [Path(item["label"]).name for item in queue.data] == ["b_liver.nii.gz"]
    wf.run()
    (report,) = [json.loads(p.read_text()) for p in out.glob("sample_*.json")]
    assert Path(report["mask"]).name == "b_liver.nii.gz"
