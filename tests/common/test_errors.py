"""User errors reach the user as one message: through MONAI's transform wrapping, DataLoader
workers, Ignite engines and the command line; checkpoints are checked before anything is loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset
from monai.transforms import Compose

from common.data.fetch import HashMismatchError, demo_file, sha256sum
from common.engines import SafeCheckpointLoader
from common.transforms.validation import CheckedLoadImaged, ValidateImaged
from common.utils.errors import (
    InputNotFoundError,
    InvalidInputError,
    UserInputError,
    find_user_error,
    format_user_error,
)
from common.utils.io import CheckpointError


def _two_d_brain(tmp_path):
    img = nib.load(demo_file("spm/avg152T1.nii"))
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 40].astype(np.float32), img.affine), str(path))
    return path


@pytest.mark.parametrize("num_workers", [0, 1])
def test_user_error_found_through_monai_wrapping_and_workers(tmp_path, num_workers):
    """MONAI wraps a transform's error twice in 'applying transform'; a worker re-raises it as text."""
    path = _two_d_brain(tmp_path)
    ds = Dataset([{"image": str(path)}], transform=Compose([CheckedLoadImaged("image", ensure_channel_first=True), ValidateImaged("image", channels=1)]))
    with pytest.raises(RuntimeError) as info:
        next(iter(DataLoader(ds, num_workers=num_workers)))
    assert "applying transform" in str(info.value) or "DataLoader worker" in str(info.value)
    err = find_user_error(info.value)
    assert isinstance(err, InvalidInputError) and isinstance(err, ValueError)
    assert "slice.nii.gz" in str(err) and "spatial" in str(err), str(err)
    assert format_user_error(err).startswith("ERROR: InvalidInputError: ")


def test_no_user_error_behind_a_bug():
    try:
        try:
            raise KeyError("x")
        except KeyError as e:
            raise RuntimeError("applying transform") from e
    except RuntimeError as e:
        assert find_user_error(e) is None


def test_builtin_types_still_catchable():
    assert issubclass(InputNotFoundError, FileNotFoundError) and issubclass(InvalidInputError, ValueError)
    assert issubclass(CheckpointError, UserInputError) and issubclass(HashMismatchError, UserInputError)


def test_command_line_ends_with_one_message(tmp_path):
    """An uncaught user error prints one ERROR line (exit 1); a bug keeps its traceback."""
    path = _two_d_brain(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        from monai.data import Dataset
        from monai.transforms import Compose
        from common.transforms.validation import CheckedLoadImaged, ValidateImaged
        import logging
        from common.utils.errors import install_excepthook
        install_excepthook(command_line=sys.argv[3] == "cli"); install_excepthook(command_line=sys.argv[3] == "cli")
        logging.basicConfig(stream=sys.stderr)  # handlers created after the hook, as the engines create theirs
        logging.getLogger().addHandler(logging.FileHandler(sys.argv[2]))

        def load():
            Dataset([{{"image": {str(path)!r}}}], Compose([CheckedLoadImaged("image", ensure_channel_first=True), ValidateImaged("image")]))[0]

        try:  # what Ignite and StatsHandler do with a failing run: log it with its traceback, re-raise
            if sys.argv[1] == "bug":
                raise KeyError("bug")
            load()
        except Exception as e:
            logging.getLogger("engine").error(f"Engine run is terminating due to exception: {{e}}")  # Ignite: no exc_info
            logging.getLogger("engine").exception(f"Exception: {{e}}")  # StatsHandler: with the traceback
            raise
    """)
    env_root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    log = tmp_path / "run.log"
    run = lambda arg, env=None, mode="cli": subprocess.run([sys.executable, "-c", code, arg, str(log), mode], capture_output=True, text=True, cwd=env_root, env=env)
    user = run("user")
    assert user.returncode == 1
    last = user.stderr.strip().splitlines()
    assert last[-2].startswith("ERROR: InvalidInputError: ") and "holds a 2D image" in last[-2] and "slice.nii.gz" in last[-2], user.stderr
    # the one message: neither log record reaches the terminal; the log file keeps both, one line each
    assert user.stderr.count("ERROR") == 1 and "Traceback" not in user.stderr and "engine" not in user.stderr, user.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and "Traceback" not in log.read_text(), lines
    assert lines[0].startswith("Engine run is terminating due to exception: applying transform"), lines
    assert lines[1].startswith("Exception: applying transform"), lines
    # outside the bundle command line (a server, a notebook) nothing prints the message at exit: the records stay, one line each
    served = run("user", mode="server")
    assert served.stderr.count("Traceback") == 0 and served.stderr.count("ERROR:engine:") == 2, served.stderr
    bug = run("bug")
    assert bug.returncode == 1 and "KeyError: 'bug'" in bug.stderr
    assert bug.stderr.count("Traceback") == 2 and "Engine run is terminating" in bug.stderr  # a bug keeps everything
    import os

    full = run("user", env=dict(os.environ, MEDGEN_TRACEBACK="1"))
    assert full.returncode == 1 and full.stderr.count("Traceback") >= 2 and "Engine run is terminating" in full.stderr


class _Net(torch.nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, c, 3)


def _engine():
    return Engine(lambda e, b: None)


def test_safe_checkpoint_loader(tmp_path):
    good = tmp_path / "model.pt"
    torch.save({"network": _Net().state_dict()}, good)
    net = _Net()
    SafeCheckpointLoader(str(good), {"network": net}, sha256=sha256sum(good))(_engine())
    assert torch.equal(net.conv.weight, torch.load(good, weights_only=True)["network"]["conv.weight"])

    before = _Net().state_dict()
    target = _Net()
    target.load_state_dict(before)
    other = tmp_path / "other.pt"
    torch.save({"network": _Net(c=8).state_dict()}, other)
    with pytest.raises(CheckpointError, match=r"other\.pt' entry 'network'.*shape mismatches.*conv\.weight"):
        SafeCheckpointLoader(str(other), {"network": target})(_engine())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded

    with pytest.raises(CheckpointError, match=r"has no entries \['network', 'optimizer'\] \(it has \['unet'\]\).*another bundle"):
        torch.save({"unet": _Net().state_dict()}, tmp_path / "foreign.pt")
        SafeCheckpointLoader(str(tmp_path / "foreign.pt"), {"network": target, "optimizer": torch.optim.SGD(target.parameters(), 0.1)})(_engine())
    with pytest.raises(HashMismatchError, match="model.pt' has sha256"):
        SafeCheckpointLoader(str(good), {"network": target}, sha256="0" * 64)(_engine())
    with pytest.raises(InputNotFoundError, match="absent.pt' does not exist"):
        SafeCheckpointLoader(str(tmp_path / "absent.pt"), {"network": target})(_engine())
    (tmp_path / "broken.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="broken.pt' cannot be read"):
        SafeCheckpointLoader(str(tmp_path / "broken.pt"), {"network": target})(_engine())
