"""MONAI Label 0.8.5 serving the deployable diffseg bundle, as a user runs it.

Not part of the default suite (it needs the MONAI Label environment and about ten minutes of CPU):

    bash ci/setup_monailabel.sh
    .venv-monailabel/bin/python -m pytest tests_external/monailabel -v -s

The deployable bundle is built from the repository's shipped demo model
(``ci/package_bundle.py bundles/diffseg --variant demo``; ``MONAILABEL_DIFFSEG_BUNDLE=<folder>`` packs another
diffseg folder with ``configs/demo.json`` and ``models/demo/``, e.g. a retrained demo model), unpacked into a copy of MONAI Label's own
``monaibundle`` sample app, and served by ``monailabel start_server`` on 127.0.0.1 with the studies
folder holding the held-out real CT (unlabelled) and three labelled deformed copies of it. The test
calls ``/info/``, ``/infer/diffseg`` on the held-out CT (label file in the CT's shape and affine, and
the shipped model's quality: mean Dice over the 6 organs >= 0.85 against the reference labels), one
training round through ``/train/diffseg`` (one epoch, fine-tuning the shipped model as MONAI Label
does), inference again with the retrained model, and stops the server by its PID. The server imports
``common`` from the bundle folder: this repository is not on its import path. Measured times are
printed and written to ``<tmp>/monailabel_times.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ci"))

try:
    import monailabel
except ImportError:  # a wrong interpreter is an error, not a skip
    pytest.fail("MONAI Label is not installed here: run `bash ci/setup_monailabel.sh` and use "
                "`.venv-monailabel/bin/python -m pytest tests_external/monailabel`", pytrace=False)

NUM_ORGANS = 6
START_TIMEOUT_S = 600
TRAIN_TIMEOUT_S = 1800


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_app() -> Path:
    """MONAI Label's ``monaibundle`` sample app as the wheel installs it (``<prefix>/monailabel/sample-apps``)."""
    for root in (Path(sys.prefix), Path(monailabel.__file__).resolve().parents[1]):
        app = root / "monailabel" / "sample-apps" / "monaibundle"
        if (app / "main.py").is_file():
            return app
    raise FileNotFoundError(f"MONAI Label's monaibundle sample app not found under {sys.prefix}/monailabel/sample-apps")


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"monailabel start_server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(2)
    raise AssertionError(f"server not up after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _infer(url: str, image_id: str, dest: Path) -> tuple[Path, float]:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/infer/diffseg", params={"image": image_id, "output": "image"},
                      data={"params": json.dumps({"device": "cpu"})}, timeout=1800)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text[-2000:]
    dest.write_bytes(r.content)
    return dest, elapsed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from common.data.demo import build_ct_demo, build_ct_framings
    from package_bundle import package_bundle

    tmp = tmp_path_factory.mktemp("monailabel")
    app = tmp / "app"
    shutil.copytree(_sample_app(), app)
    source = Path(os.environ.get("MONAILABEL_DIFFSEG_BUNDLE", REPO / "bundles" / "diffseg"))
    zip_path = package_bundle(source, tmp / "dist", variant="demo")
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(app / "model")
    bundle = app / "model" / "diffseg"
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "common" / "__init__.py").is_file()

    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    framings = build_ct_framings(tmp / "data")
    held_out = framings.parent / "example"
    shutil.copyfile(held_out / "image.nii.gz", studies / "example.nii.gz")
    cohort = build_ct_demo(tmp / "data", n_train=3, n_val=0, seed=1)
    for entry in json.loads(cohort.read_text())["training"]:
        shutil.copyfile(cohort.parent / entry["image"], studies / f"{entry['id']}.nii.gz")
        shutil.copyfile(cohort.parent / entry["label"], studies / "labels" / "final" / f"{entry['id']}.nii.gz")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    # what the `monailabel` script runs, minus its PYTHONPATH=<venv>/..: that would be this repository
    # (.venv-monailabel lives in it) and hand the server the repository's `common` instead of the bundle's
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port), "--conf", "models", "diffseg", "--conf", "sam2", "false",
           "--conf", "zoo_source", "local", "--conf", "preload", "false"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # `common` must come from the bundle
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its workers' `python`
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    times = {}
    try:
        _wait_for_server(url, proc, log)
        times["server start (s)"] = time.perf_counter() - t0
        yield {"url": url, "tmp": tmp, "bundle": bundle, "held_out": held_out, "times": times, "log": log, "pid": proc.pid}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its train/infer workers
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        times["server stopped by PID"] = proc.pid
        (tmp / "monailabel_times.json").write_text(json.dumps(times, indent=2))
        print("\nMONAI Label times:", json.dumps(times, indent=2))


def test_info_lists_the_bundle_with_its_classes(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert "diffseg" in info["models"], list(info["models"])
    labels = info["models"]["diffseg"]["labels"]
    names = set(labels) if isinstance(labels, (dict, list)) else set()
    assert {"liver", "spleen", "kidney", "bowel", "urinary_bladder", "bone"} <= names, labels
    assert "diffseg" in info.get("trainers", {}), list(info.get("trainers", {}))


def test_infer_returns_labels_in_the_image_geometry_and_segments_well(server):
    out, elapsed = _infer(server["url"], "example", server["tmp"] / "example_seg.nii.gz")
    server["times"]["/infer/diffseg, held-out CT 122x101x112 (s)"] = elapsed
    pred, img = nib.load(str(out)), nib.load(str(server["held_out"] / "image.nii.gz"))
    assert pred.shape == img.shape
    np.testing.assert_allclose(pred.affine, img.affine, atol=1e-4)
    from common.metrics.segmentation import dice as dice_of

    p, ref = np.asarray(pred.dataobj).astype(int), np.asarray(nib.load(str(server["held_out"] / "label.nii.gz")).dataobj).astype(int)
    dice = [dice_of(p == c, ref == c) for c in range(1, NUM_ORGANS + 1)]
    server["times"]["Dice per organ, served model"] = [round(d, 3) for d in dice]
    assert np.nanmean(dice) >= 0.85, dice


def test_one_training_round_then_inference_with_the_new_model(server):
    url, model = server["url"], server["bundle"] / "models" / "model.pt"
    before = model.read_bytes()
    t0 = time.perf_counter()
    r = requests.post(f"{url}/train/diffseg", json={"max_epochs": 1, "val_split": 0.34, "device": "cpu",
                                                   "multi_gpu": False}, timeout=60)
    assert r.status_code == 200, r.text[-2000:]
    status = {}
    while time.perf_counter() - t0 < TRAIN_TIMEOUT_S:
        status = requests.get(f"{url}/train/", params={"check_if_running": "false"}, timeout=30).json()
        status = status[-1] if isinstance(status, list) else status
        if status.get("status") not in ("SUBMITTED", "RUNNING", None):
            break
        time.sleep(5)
    server["times"]["/train/diffseg, 1 epoch (s)"] = time.perf_counter() - t0
    assert status.get("status") == "DONE", json.dumps(status)[-3000:] + server["log"].read_text()[-4000:]
    assert model.read_bytes() != before, "the training round did not replace models/model.pt"
    out, elapsed = _infer(url, "example", server["tmp"] / "example_seg_retrained.nii.gz")
    server["times"]["/infer/diffseg after retraining (s)"] = elapsed
    pred = nib.load(str(out))
    assert pred.shape == nib.load(str(server["held_out"] / "image.nii.gz")).shape
