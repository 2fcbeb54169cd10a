"""A minimal but real bundle written into a temporary folder, to test the CI tools themselves.

It segments a CT with a small MONAI UNet: LoadImaged -> ... -> SaveImaged, a SupervisedTrainer
config, metadata with the zoo's input/output names. Nothing here is a stub: the tools under test
run its configs for real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
    "version": "0.1.0",
    "changelog": {"0.1.0": "first version"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.4.6",
    "required_packages_version": {"nibabel": "5.4.2"},
    "task": "CT segmentation (test bundle)",
    "description": "minimal bundle used to test the CI tools",
    "authors": "project",
    "copyright": "project",
    "references": [],
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                             "spatial_shape": ["16*n", "16*n", "16*n"], "dtype": "float32", "value_range": [0, 1],
                             "is_patch_data": False, "channel_def": {"0": "image"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                             "spatial_shape": ["16*n", "16*n", "16*n"], "dtype": "float32", "value_range": [0, 1],
                             "is_patch_data": False, "channel_def": {"0": "background", "1": "liver"}}},
    },
}

NETWORK = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
           "channels": [4, 8], "strides": [2], "num_res_units": 0}

INFERENCE = {
    # common.engines is imported on purpose: the packaging test checks that the shared package
    # travels inside the zip and is imported from there.
    "imports": ["$import os", "$import torch", "$import numpy", "$import common"],
    "bundle_root": ".",
    "dataset_dir": "$@bundle_root + '/data'",
    "output_dir": "$@bundle_root + '/eval'",
    "input_image": "",
    "device": "$common.engines.get_device('cpu')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True},
        {"_target_": "DivisiblePadd", "keys": "image", "k": 16},
    ]},
    "dataset": {"_target_": "Dataset", "data": [{"image": "@input_image"}], "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False},
    ]},
    "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'", "load_dict": {"model": "@network"}}],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing", "val_handlers": "@handlers"},
    "initialize": ["$monai.utils.set_determinism(seed=0)"],
    "run": ["$@evaluator.run()"],
}

TRAIN = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "dataset_dir": "$@bundle_root + '/data'",
    "device": "$torch.device('cpu')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "train": {
        "preprocessing": {"_target_": "Compose", "transforms": []},
        "dataset": {"_target_": "Dataset", "data": [], "transform": "@train#preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 1},
        "handlers": [],
        "inferer": {"_target_": "SimpleInferer"},
        "trainer": {"_target_": "SupervisedTrainer", "device": "@device", "max_epochs": 1, "train_data_loader": "@train#dataloader",
                    "network": "@network", "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 1e-3},
                    "loss_function": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
                    "inferer": "@train#inferer", "train_handlers": "@train#handlers"},
    },
    "validate": {"dataset": {"_target_": "Dataset", "data": []}, "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                 "val_data_loader": "@train#dataloader", "network": "@network"}},
    "initialize": ["$monai.utils.set_determinism(seed=0)"],
    "run": ["$@train#trainer.run()"],
}

LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def write_minimal_bundle(root: Path, name: str = "mini_seg", with_model: bool = True) -> Path:
    """The bundle in ``root/name``; ``with_model``: ``models/model.pt`` holds the bare state dict of a seeded
    ``network_def``, as the zoo ships weights."""
    b = Path(root) / name
    if b.exists():
        shutil.rmtree(b)
    (b / "configs").mkdir(parents=True)
    (b / "docs").mkdir()
    (b / "models").mkdir()
    (b / "LICENSE").write_text("Apache-2.0\n")
    (b / "docs" / "README.md").write_text("# minimal bundle\n")
    for fname, content in [("metadata.json", METADATA), ("inference.json", INFERENCE), ("train.json", TRAIN),
                           ("evaluate.json", {"run": []}), ("multi_gpu_train.json", {})]:
        (b / "configs" / fname).write_text(json.dumps(content, indent=2))
    (b / "configs" / "logging.conf").write_text(LOGGING)
    if with_model:
        import torch
        from monai.bundle import ConfigParser

        torch.manual_seed(0)
        torch.save(ConfigParser({"network_def": NETWORK}).get_parsed_content("network_def").state_dict(),
                   b / "models" / "model.pt")
    return b
