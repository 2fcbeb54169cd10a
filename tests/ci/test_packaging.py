"""Packaging round trip: zip a bundle, serve it on loopback, download it with MONAI, run it
without this repository on the import path. Also the zoo's download_large_files check."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ci"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loopback import serve_folder  # noqa: E402
from minimal_bundle import NETWORK, write_minimal_bundle  # noqa: E402
from package_bundle import package_bundle  # noqa: E402

# Runs `python -m monai.bundle ...` the way a user does from the bundle folder, after removing
# this repository (and its editable install of `common`) from the import machinery.
DRIVER = textwrap.dedent(
    """
    import os, runpy, sys
    repo = sys.argv[1]
    sys.meta_path = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    def from_repo(p):
        p = os.path.abspath(p)
        inside = p == repo or p.startswith(repo + os.sep)
        return inside and not p.startswith(os.path.abspath(sys.prefix))  # a venv may live in the repo
    sys.path = [p for p in sys.path if p and not from_repo(p)]
    sys.path.insert(0, os.getcwd())  # what `python -m` does
    sys.argv = ["monai.bundle"] + sys.argv[2:]
    try:
        runpy.run_module("monai.bundle", run_name="__main__")
    finally:
        mod = sys.modules.get("common")
        print("COMMON_FROM", getattr(mod, "__file__", None))
    """
)


def _small_ct(tmp_path: Path) -> Path:
    from common.data.fetch import demo_file

    img = nib.load(str(demo_file("totalsegmentator/example_ct.nii.gz")))
    crop = nib.Nifti1Image(np.asarray(img.dataobj)[30:62, 30:62, 40:60].astype(np.float32), img.affine)
    path = tmp_path / "case01.nii.gz"
    nib.save(crop, str(path))
    return path


def test_package_is_self_contained_and_deterministic(tmp_path):
    b = write_minimal_bundle(tmp_path / "src")
    (b / "eval").mkdir()
    (b / "eval" / "old_output.nii.gz").write_bytes(b"x")
    z1 = package_bundle(b, tmp_path / "d1")
    z2 = package_bundle(b, tmp_path / "d2")
    assert hashlib.sha256(z1.read_bytes()).digest() == hashlib.sha256(z2.read_bytes()).digest()
    names = zipfile.ZipFile(z1).namelist()
    assert all(n.startswith("mini_seg/") for n in names)
    assert "mini_seg/common/__init__.py" in names and "mini_seg/common/engines/utils.py" in names
    assert "mini_seg/configs/metadata.json" in names
    assert not any("/eval/" in n or "__pycache__" in n for n in names)


@pytest.mark.slow
def test_loopback_download_and_inference_without_repo(tmp_path):
    b = write_minimal_bundle(tmp_path / "src")
    from monai.bundle import ConfigParser

    parser = ConfigParser({"network_def": NETWORK})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), b / "models" / "model.pt")
    zip_path = package_bundle(b, tmp_path / "dist")
    ct = _small_ct(tmp_path)
    dest = tmp_path / "downloaded"
    out_dir = tmp_path / "out"
    with serve_folder(zip_path.parent) as url:
        dl = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "download", "--name", "mini_seg", "--url", f"{url}/{zip_path.name}",
             "--bundle_dir", str(dest)],
            capture_output=True, text=True, timeout=300,
        )
    assert dl.returncode == 0, dl.stderr[-3000:]
    bundle = dest / "mini_seg"
    assert (bundle / "configs" / "inference.json").is_file() and (bundle / "common" / "engines" / "utils.py").is_file()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(REPO), "run", "--config_file", "configs/inference.json",
         "--input_image", str(ct), "--output_dir", str(out_dir)],
        cwd=bundle, capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    common_from = [ln for ln in run.stdout.splitlines() if ln.startswith("COMMON_FROM")][-1]
    assert str(bundle) in common_from, common_from
    outs = list(out_dir.glob("*_seg.nii.gz"))
    assert len(outs) == 1
    pred, src = nib.load(str(outs[0])), nib.load(str(ct))
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


@pytest.mark.slow
def test_download_large_files_verifies_hashes(tmp_path):
    b = write_minimal_bundle(tmp_path / "src")
    served = tmp_path / "served"
    served.mkdir()
    payload = os.urandom(4096)
    (served / "weights.pt").write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    with serve_folder(served) as url:
        for digest, should_pass in [(good, True), ("0" * 64, False)]:
            target = b / "models" / "weights.pt"
            if target.exists():
                target.unlink()
            (b / "large_files.yml").write_text(
                f"large_files:\n  - path: models/weights.pt\n    url: {url}/weights.pt\n    hash_val: {digest}\n    hash_type: sha256\n"
            )
            res = subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(b)],
                                 capture_output=True, text=True, timeout=300)
            if should_pass:
                assert res.returncode == 0, res.stderr[-2000:]
                assert target.read_bytes() == payload
            else:
                assert res.returncode != 0
                assert "hash" in (res.stderr + res.stdout).lower()


@pytest.mark.slow
def test_diffseg_round_trip_runs_its_inference_without_repo(tmp_path, ct_demo):
    """A real bundle: packaged with (tiny) weights, downloaded from loopback, run from its folder."""
    import shutil

    from monai.bundle import ConfigParser

    src = tmp_path / "src" / "diffseg"
    shutil.copytree(REPO / "bundles" / "diffseg", src, ignore=shutil.ignore_patterns("__pycache__", "outputs", "eval", "runs"))
    parser = ConfigParser()
    parser.read_config([str(src / "configs" / "inference.json"), str(src / "configs" / "tiny.json")])
    sys.path.insert(0, str(src))
    try:
        torch.manual_seed(0)
        net = parser.get_parsed_content("network_def")
    finally:
        sys.path.remove(str(src))
    (src / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), src / "models" / "model.pt")
    zip_path = package_bundle(src, tmp_path / "dist")
    dest, out_dir = tmp_path / "downloaded", tmp_path / "out"
    with serve_folder(zip_path.parent) as url:
        dl = subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", "diffseg", "--url",
                             f"{url}/{zip_path.name}", "--bundle_dir", str(dest)], capture_output=True, text=True, timeout=300)
    assert dl.returncode == 0, dl.stderr[-3000:]
    bundle = dest / "diffseg"
    test_case = json.loads(Path(ct_demo).read_text())["test"][0]
    image = str(Path(ct_demo).parent / test_case["image"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(REPO), "run", "--config_file", "['configs/inference.json','configs/tiny.json']",
         "--data", json.dumps([{"image": image}]), "--ckpt_path", "models/model.pt", "--output_dir", str(out_dir)],
        cwd=bundle, capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert str(bundle) in [ln for ln in run.stdout.splitlines() if ln.startswith("COMMON_FROM")][-1]
    outs = list(out_dir.rglob("*.nii.gz"))
    assert len(outs) == 1, outs
    pred, ref = nib.load(str(outs[0])), nib.load(image)
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    assert np.asarray(pred.dataobj).max() < 7


def test_files_over_the_zoo_limit_stop_packaging_unless_listed_in_large_files(tmp_path, capsys):
    from package_bundle import main as package_main

    b = write_minimal_bundle(tmp_path / "src")
    big = b / "models" / "model.pt"
    with open(big, "wb") as fh:  # sparse: 26 MB on paper, nothing on disk
        fh.truncate(26 * 1024 * 1024)
    with pytest.raises(ValueError, match=r"models/model.pt \(26.0 MB\).*large_files.yml"):
        package_bundle(b, tmp_path / "dist")
    assert not (tmp_path / "dist").exists()  # nothing half-written
    assert package_main([str(b), "--out", str(tmp_path / "dist")]) == 1
    assert "models/model.pt (26.0 MB)" in capsys.readouterr().err
    (b / "large_files.yml").write_text(
        "large_files:\n  - path: models/model.pt\n    url: https://example.org/model.pt\n"
        "    hash_val: 0\n    hash_type: sha256\n"
    )
    names = zipfile.ZipFile(package_bundle(b, tmp_path / "dist")).namelist()
    assert "mini_seg/large_files.yml" in names and "mini_seg/models/model.pt" not in names


def _minimal_with_demo(root: Path) -> Path:
    """The minimal bundle with a demo overlay that widens the network, its weights in models/demo/ and a
    test-size overlay, laid out as the project's bundles ship their demo models."""
    from monai.bundle import ConfigParser

    b = write_minimal_bundle(root, with_model=False)
    inference = json.loads((b / "configs" / "inference.json").read_text())
    inference["ckpt_path"] = "$@bundle_root + '/models/model.pt'"
    inference["handlers"][0]["load_path"] = "@ckpt_path"
    (b / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    demo_net = dict(NETWORK, channels=[6, 12])
    (b / "configs" / "demo.json").write_text(json.dumps({
        "network_def": demo_net,
        "ckpt_path": "$@bundle_root + '/models/demo/model.pt'",
        "_meta_": {"network_data_format": {"inputs": {"image": {"spatial_shape": ["32*n", "32*n", "32*n"]}}}},
    }))
    (b / "configs" / "tiny.json").write_text(json.dumps({"network_def": dict(NETWORK, channels=[2, 4])}))
    (b / "models" / "demo").mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(ConfigParser({"network_def": demo_net}).get_parsed_content("network_def").state_dict(),
               b / "models" / "demo" / "model.pt")
    return b


def _variant_and_source_outputs(dep: Path, source: Path, source_configs: list[str], inputs: list[str], tmp_path: Path):
    """Run ``configs/inference.json`` alone in the deployed variant ``dep`` without this repository on the import
    path (it must use its own ``common``), and the source bundle with ``source_configs``, on the same ``inputs``
    arguments; their output files (variant, source)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", DRIVER, str(REPO), "run", "--config_file", "configs/inference.json",
                          *inputs, "--output_dir", str(tmp_path / "out_variant")],
                         cwd=dep, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert str(dep) in [ln for ln in run.stdout.splitlines() if ln.startswith("COMMON_FROM")][-1]
    src = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(source_configs),
                          "--bundle_root", str(source), *inputs, "--output_dir", str(tmp_path / "out_source")],
                         cwd=source, capture_output=True, text=True, timeout=600)
    assert src.returncode == 0, src.stdout[-2000:] + src.stderr[-3000:]
    [got_file] = list((tmp_path / "out_variant").rglob("*.nii.gz"))
    [ref_file] = list((tmp_path / "out_source").rglob("*.nii.gz"))
    return got_file, ref_file


def test_demo_variant_deploys_the_shipped_model_where_the_zoo_looks(tmp_path):
    """--variant demo: configs/inference.json alone loads the demo weights from models/model.pt (byte for byte
    the shipped file), the demo _meta_ is in metadata.json, tiny/demo overlays and models/demo/ are gone, and
    the zoo's checks pass on the unpacked bundle, exporting those weights."""
    from verify_bundle import verify_bundle

    b = _minimal_with_demo(tmp_path / "src")
    z = package_bundle(b, tmp_path / "dist", variant="demo")
    assert hashlib.sha256(z.read_bytes()).digest() == hashlib.sha256(
        package_bundle(b, tmp_path / "dist2", variant="demo").read_bytes()).digest()
    names = zipfile.ZipFile(z).namelist()
    assert "mini_seg/models/model.pt" in names
    assert not [n for n in names if "/models/demo" in n or n.endswith(("configs/demo.json", "configs/tiny.json"))]
    zipfile.ZipFile(z).extractall(tmp_path / "unpacked")
    dep = tmp_path / "unpacked" / "mini_seg"
    assert (dep / "models" / "model.pt").read_bytes() == (b / "models" / "demo" / "model.pt").read_bytes()
    meta = json.loads((dep / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["32*n", "32*n", "32*n"]
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "CT"  # deep merge keeps the rest

    from monai.bundle import ConfigParser

    merged = ConfigParser()
    merged.read_config(str(dep / "configs" / "inference.json"))
    merged["bundle_root"] = str(dep)
    assert merged.get_parsed_content("ckpt_path") == f"{dep}/models/model.pt"
    assert merged["network_def"]["channels"] == [6, 12]
    checks = {c.name: c for c in verify_bundle(dep)}
    assert all(c.ok for c in checks.values()), [f"{c.name}: {c.detail}" for c in checks.values() if not c.ok]
    assert "(models/model.pt)" in checks["7 ckpt_export (script)"].detail


def test_multi_file_demo_variant_retargets_a_folder_named_without_a_file(tmp_path):
    """A demo overlay that names its weights folder itself (``'/models/demo'``, no file name after it, as
    aldm_translation's three-file overlay does): the variant moves every file to models/, byte for byte, and
    inference.json alone reads each one there against the sha256 the overlay ships; a sibling path that only
    starts with the folder's name (``'/models/demo_notes'``) is left as it is."""
    from monai.bundle import ConfigParser
    from package_bundle import stage_demo_variant

    b = _minimal_with_demo(tmp_path / "src")
    torch.manual_seed(2)
    files = {"model.pt": None, "extra.pt": {"w": torch.randn(3, 3)}}
    torch.save(files["extra.pt"], b / "models" / "demo" / "extra.pt")
    digests = {f: hashlib.sha256((b / "models" / "demo" / f).read_bytes()).hexdigest() for f in files}
    overlay = json.loads((b / "configs" / "demo.json").read_text())
    overlay.update({
        "demo_ckpt_dir": "$@bundle_root + '/models/demo'",
        "ckpt_path": "$@demo_ckpt_dir + '/model.pt'",
        "extra_ckpt": "$@demo_ckpt_dir + '/extra.pt'",
        "notes": "$@bundle_root + '/models/demo_notes'",
        "demo_sha256": digests,
        "extra_sha256": "$@demo_sha256.get('extra.pt') if @extra_ckpt == @demo_ckpt_dir + '/extra.pt' else None",
    })
    (b / "configs" / "demo.json").write_text(json.dumps(overlay))
    dep = stage_demo_variant(b, tmp_path / "stage")
    assert sorted(p.name for p in (dep / "models").glob("*.pt")) == sorted(files)
    assert not (dep / "models" / "demo").exists() and not (dep / "configs" / "demo.json").exists()
    merged = ConfigParser()
    merged.read_config(str(dep / "configs" / "inference.json"))
    merged["bundle_root"] = str(dep)
    for f in files:
        assert (dep / "models" / f).read_bytes() == (b / "models" / "demo" / f).read_bytes()
    assert Path(merged.get_parsed_content("ckpt_path")) == dep / "models" / "model.pt"
    assert Path(merged.get_parsed_content("extra_ckpt")) == dep / "models" / "extra.pt"
    assert merged.get_parsed_content("extra_sha256") == digests["extra.pt"]
    assert merged.get_parsed_content("notes") == f"{dep}/models/demo_notes"


def test_demo_variant_refuses_what_it_cannot_deploy(tmp_path):
    b = write_minimal_bundle(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="configs/demo.json"):
        package_bundle(b, tmp_path / "dist", variant="demo")
    b = _minimal_with_demo(tmp_path / "src2")
    nested = b / "models" / "demo" / "model.pt"
    torch.save({"model": torch.load(nested, weights_only=True)}, nested)
    with pytest.raises(ValueError, match="not a plain state dict"):
        package_bundle(b, tmp_path / "dist", variant="demo")
    assert not (tmp_path / "dist").exists()


@pytest.mark.slow
def test_demo_variant_download_runs_as_the_source_with_its_overlay(tmp_path):
    """Downloaded from loopback and run with configs/inference.json alone, without this repository, the demo
    variant writes the same label map as the source bundle run with [inference.json, demo.json]."""
    b = _minimal_with_demo(tmp_path / "src")
    zip_path = package_bundle(b, tmp_path / "dist", variant="demo")
    ct = _small_ct(tmp_path)
    dest = tmp_path / "downloaded"
    with serve_folder(zip_path.parent) as url:
        dl = subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", "mini_seg", "--url",
                             f"{url}/{zip_path.name}", "--bundle_dir", str(dest)], capture_output=True, text=True, timeout=300)
    assert dl.returncode == 0, dl.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", DRIVER, str(REPO), "run", "--config_file", "configs/inference.json",
                          "--input_image", str(ct), "--output_dir", str(tmp_path / "out_variant")],
                         cwd=dest / "mini_seg", capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    src = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          "['configs/inference.json','configs/demo.json']", "--bundle_root", str(b),
                          "--input_image", str(ct), "--output_dir", str(tmp_path / "out_source")],
                         cwd=b, capture_output=True, text=True, timeout=300)
    assert src.returncode == 0, src.stdout[-2000:] + src.stderr[-3000:]
    got = np.asarray(nib.load(str(next((tmp_path / "out_variant").glob("*_seg.nii.gz")))).dataobj)
    ref = np.asarray(nib.load(str(next((tmp_path / "out_source").glob("*_seg.nii.gz")))).dataobj)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.slow
def test_diffseg_demo_variant_checks_downloads_and_segments_as_shipped(tmp_path, ct_demo):
    """The real deployable bundle of the shipped diffseg demo model: packed with ``--variant demo``, downloaded
    from loopback by ``monai.bundle download``, it passes the zoo's checks as ``ci/verify_bundle.py`` implements
    them (full mode: the scripted export of ``models/model.pt``), and ``configs/inference.json`` alone, without
    this repository on the import path, writes the same label map of the held-out real CT as the source bundle
    run with ``[inference.json, demo.json]``: a label map in the CT's geometry that segments its organs."""
    from verify_bundle import verify_bundle

    from common.metrics.segmentation import dice

    source = REPO / "bundles" / "diffseg"
    zip_path = package_bundle(source, tmp_path / "dist", variant="demo")
    dest = tmp_path / "downloaded"
    with serve_folder(zip_path.parent) as url:
        dl = subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", "diffseg", "--url",
                             f"{url}/{zip_path.name}", "--bundle_dir", str(dest)], capture_output=True, text=True, timeout=300)
    assert dl.returncode == 0, dl.stderr[-3000:]
    dep = dest / "diffseg"
    assert (dep / "models" / "model.pt").read_bytes() == (source / "models" / "demo" / "model.pt").read_bytes()

    checks = {c.name: c for c in verify_bundle(dep)}
    assert all(c.ok for c in checks.values()), [f"{c.name}: {c.detail}" for c in checks.values() if not c.ok]
    assert "(models/model.pt)" in checks["7 ckpt_export (script)"].detail

    case = json.loads(Path(ct_demo).read_text())["test"][0]
    ct, reference = Path(ct_demo).parent / case["image"], Path(ct_demo).parent / case["label"]
    got_file, ref_file = _variant_and_source_outputs(dep, source, ["configs/inference.json", "configs/demo.json"],
                                                     ["--input_image", str(ct)], tmp_path)
    got = nib.load(str(got_file))
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(nib.load(str(ref_file)).dataobj))
    image = nib.load(str(ct))
    assert got.shape == image.shape
    np.testing.assert_allclose(got.affine, image.affine, atol=1e-5)
    # the organs, not just a file: per-organ Dice against the reference labels on the CT's own grid
    pred, ref = np.asarray(got.dataobj).astype(int), np.asarray(nib.load(str(reference)).dataobj).astype(int)
    per_organ = [dice(pred == c, ref == c) for c in np.unique(ref) if c]
    assert len(per_organ) >= 5 and np.mean(per_organ) > 0.85, per_organ


@pytest.mark.slow
def test_ivan_demo_variant_deploys_the_fusion_model_and_fuses_as_shipped(tmp_path, brain_demo):
    """ivan_fusion ships its fusion weights inside a file that records the task (``{"model", "task"}``) and needs
    its task overlay: the variant (``_deploy_`` of its demo.json) merges ``task_fusion.json`` into every config,
    writes the ``model`` entry as ``models/model.pt`` (a plain state dict, the network's own tensors), which
    ``configs/inference.json`` alone loads against its sha256. The unpacked zip passes the zoo's checks as
    ``ci/verify_bundle.py`` implements them (the scripted export of models/model.pt) and, without this repository
    on the import path, fuses the real avg152 T2 + CT-like pair exactly as the source bundle does with
    ``[inference.json, demo.json, task_fusion.json]``."""
    from verify_bundle import verify_bundle

    source = REPO / "bundles" / "ivan_fusion"
    z = package_bundle(source, tmp_path / "dist", variant="demo")
    names = zipfile.ZipFile(z).namelist()
    assert "ivan_fusion/models/model.pt" in names and not [n for n in names if "/models/demo" in n]
    assert not [n for n in names if n.endswith(("configs/demo.json", "configs/task_fusion.json", "configs/tiny.json"))]
    zipfile.ZipFile(z).extractall(tmp_path / "unpacked")
    dep = tmp_path / "unpacked" / "ivan_fusion"
    shipped = torch.load(source / "models" / "demo" / "fusion.pt", map_location="cpu", weights_only=True)
    deployed = torch.load(dep / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert deployed.keys() == shipped["model"].keys()
    assert all(torch.equal(deployed[k], shipped["model"][k]) for k in deployed)
    inference = json.loads((dep / "configs" / "inference.json").read_text())
    assert inference["task"] == {"name": "fusion", "inputs": ["t2", "ct"], "targets": ["fused"]}
    assert inference["ckpt_sha256"] == hashlib.sha256((dep / "models" / "model.pt").read_bytes()).hexdigest()
    assert "_deploy_" not in inference

    checks = {c.name: c for c in verify_bundle(dep)}
    assert all(c.ok for c in checks.values()), [f"{c.name}: {c.detail}" for c in checks.values() if not c.ok]
    assert "(models/model.pt)" in checks["7 ckpt_export (script)"].detail

    case = json.loads(Path(brain_demo).read_text())["test"][0]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"id": "avg152", **{k: str(Path(brain_demo).parent / case[k]) for k in ("t2", "ct")}}]}))
    got_file, ref_file = _variant_and_source_outputs(
        dep, source, ["configs/inference.json", "configs/demo.json", "configs/task_fusion.json"],
        ["--datalist", str(datalist)], tmp_path)
    assert got_file.name == ref_file.name
    got = nib.load(str(got_file))
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(nib.load(str(ref_file)).dataobj))
    t2 = nib.load(str(Path(brain_demo).parent / case["t2"]))
    assert got.shape == t2.shape and np.abs(np.asarray(got.dataobj)).max() > 0
    np.testing.assert_allclose(got.affine, t2.affine, atol=1e-5)
