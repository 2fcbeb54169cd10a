"""Shared pieces of the robustness suite: the fault makers (``faults.py``) importable by the bundle
tests, and two ways to run a bundle config: in-process (fast, the exception is inspected) and through
``python -m monai.bundle run`` (exit status and the one message on stderr, nothing about it on stdout).

Every test of the suite also checks both output streams of its own process (``capfd``: file-descriptor level,
so it sees the logging handlers' streams too): a refused in-process run logs no traceback, whatever the kind (its
log records stay, one line each: outside the command line nothing else would tell the caller's console). The
command-line tests check that the one ``ERROR:`` message is all the terminal shows (``assert_quiet_streams``)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _config_files(bundle: Path, configs) -> list[str]:
    configs = [configs] if isinstance(configs, (str, os.PathLike)) else list(configs)
    return [str(c) if Path(c).is_absolute() else str(bundle / "configs" / c) for c in configs]


def run_bundle(bundle: str | Path, configs, **overrides) -> None:
    """``monai.bundle.run`` in this process, from the bundle folder's point of view (its ``scripts``
    importable; the suite's autouse fixture forgets them again after the test)."""
    from monai.bundle import run

    bundle = REPO / "bundles" / bundle if not Path(bundle).is_absolute() else Path(bundle)
    sys.path.insert(0, str(bundle))
    run(
        config_file=_config_files(bundle, configs),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        **overrides,
    )


def run_bundle_cli(bundle: str | Path, configs, timeout: int = 600, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` in a subprocess started in the bundle folder, as a user runs it;
    overrides are passed as ``--key value`` with JSON values."""
    bundle = REPO / "bundles" / bundle if not Path(bundle).is_absolute() else Path(bundle)
    files = _config_files(bundle, configs)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files) if len(files) > 1 else files[0],
           "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bundle), str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    env.pop("MEDGEN_TRACEBACK", None)
    return subprocess.run(cmd, cwd=str(bundle), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def bundle_runner():
    """``(run_bundle, run_bundle_cli)``."""
    return run_bundle, run_bundle_cli


_ERROR_RECORD = re.compile(r" - ERROR - |^ERROR:", re.MULTILINE)


def assert_quiet_streams(stdout: str, stderr: str, allowed_error: str | None = None) -> None:
    """No traceback on either stream and no ERROR record; ``allowed_error``: the one message of the command line
    (``ERROR: <class>:``), allowed once and only as the last lines of stderr."""
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        assert "Traceback" not in text, f"traceback on {name}:\n{text[-3000:]}"
    assert not _ERROR_RECORD.search(stdout), f"error record on stdout:\n{stdout[-3000:]}"
    errors = _ERROR_RECORD.findall(stderr)
    if allowed_error is None:
        assert not errors, f"error record on stderr:\n{stderr[-3000:]}"
    else:
        tail = "\n".join(stderr.strip().splitlines()[-3:])
        assert len(errors) == 1 and f"ERROR: {allowed_error}" in tail, stderr[-3000:]


# A handler that an earlier test's run bound to that test's capture stream (closed since) cannot emit; logging would
# print "--- Logging error ---" with a traceback of its own, an artefact of the test session, not bundle output.
logging.raiseExceptions = False


@pytest.fixture(autouse=True)
def no_traceback_on_the_terminal(capfd):
    """After every test of the suite: no traceback of a refused run reached this process's stdout or stderr."""
    yield
    out, err = capfd.readouterr()
    for name, text in (("stdout", out), ("stderr", err)):
        assert "Traceback" not in text, f"traceback on {name}:\n{text[-3000:]}"
