"""Session fixtures shared by the whole suite: real demo data built once and cached.

The demo cohorts (see ``common.data.demo``) are built from package-shipped real images into
``<cache>/test-demo/`` and reused across sessions; a lock file keeps parallel test processes from
building the same cohort twice. Sizes are the small ones the tests need (4 training subjects, 2
validation subjects, the real held-out test case).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Tests are CPU-only and share 2 cores: one intra-op thread per process keeps subprocess runs
# from oversubscribing the machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

DEMO_KW = {"n_train": 4, "n_val": 2, "seed": 0}


def _keep_absl_off_the_capture_stream() -> None:
    """absl (pulled in by tensorboard, which MONAI imports) makes one handler at import, on whatever
    ``sys.stderr`` is then: under pytest that is the session's capture file. Every bundle run that loads
    its ``logging.conf`` (``fileConfig``) closes all existing handlers, and absl's handler closes its stream
    unless it is the *current* ``sys.stderr``; inside a ``capfd`` test it is not, so the session's capture
    file was closed and pytest failed on it ("I/O operation on closed file", then "lost sys.stderr"). Pointing the handler at the real
    stderr, which absl never closes, keeps the capture intact; a user's own process is unaffected."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


_keep_absl_off_the_capture_stream()


@pytest.fixture(autouse=True)
def _no_python_sigchld_handler_between_tests():
    """After each test, SIGCHLD goes back to its default (ignored, nothing runs).

    A multi-worker DataLoader installs a Python SIGCHLD handler for the rest of the process (PyTorch's
    worker-death check); every later child process of the suite (command-line runs, torchrun) then interrupts the
    main thread with a Python signal handler when it exits. On this project's CI machine the suite died several
    times with SIGSEGV (si_code SI_KERNEL: the kernel failed to deliver a signal frame) exactly there, while the
    main thread waited for such a child, at different tests; the cause is not understood (see the notes of issue
    #20). No DataLoader iterator outlives a test, so nothing needs the handler between tests."""
    yield
    if signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, None):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _demo_root() -> Path:
    from common.data.fetch import cache_dir

    root = Path(os.environ.get("MEDGEN_TEST_DEMO_DIR", cache_dir() / "test-demo"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(kind: str):
    from common.data import demo

    root = _demo_root()
    with _locked(root / f".{kind}.lock"):
        if kind == "brain_mri":
            return demo.build_brain_mri_demo(root, **DEMO_KW)
        if kind == "ct":
            return demo.build_ct_demo(root, **DEMO_KW)
        return demo.build_dwi_demo(root)


@pytest.fixture(scope="session")
def brain_demo() -> Path:
    """Datalist JSON of the simulated multi-contrast brain cohort (test = real avg152 triple)."""
    return Path(_build("brain_mri"))


@pytest.fixture(scope="session")
def ct_demo() -> Path:
    """Datalist JSON of the deformed CT cohort with merged organ labels (test = original CT)."""
    return Path(_build("ct"))


@pytest.fixture(scope="session")
def dwi_demo() -> Path:
    """JSON describing dipy's real acquisition schemes and the real smoke-test DWI."""
    return Path(_build("dwi"))


@pytest.fixture(scope="session")
def demo_sizes() -> dict:
    """The arguments the demo fixtures build their cohorts with."""
    return dict(DEMO_KW)


@pytest.fixture(scope="session")
def bundles_dir() -> Path:
    return BUNDLES_DIR


def bundle_names() -> list[str]:
    return sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file()) if BUNDLES_DIR.is_dir() else []


@pytest.fixture(autouse=True)
def _isolate_bundle_scripts():
    """Each bundle has its own ``scripts`` package; forget any imported one around every test.

    MONAI's workflow puts the bundle root on ``sys.path`` and configs ``$import scripts``: in one
    pytest process the first bundle's ``scripts`` would otherwise shadow every other bundle's.
    """

    def purge():
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
        sys.path[:] = [p for p in sys.path if not p or Path(p).resolve().parent != BUNDLES_DIR]

    purge()
    yield
    purge()
