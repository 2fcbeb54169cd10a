#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv: CPU torch pinned to the
# bundles' metadata, the MONAI extras the bundles use, test tools, and the shared `common`
# package installed editable. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch pulled in by MONAI would fetch several GB of CUDA wheels.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -r requirements-dev.txt
# optional AMICO (dmri-amico, NODDI fitting): the tests of noddi_sr check the forward model and the phantom with it
python -m pip install --quiet -r requirements-amico.txt
# optional OpenVINO (fast CPU network passes, diffseg's runtime: auto): its tests compare it with eager PyTorch
python -m pip install --quiet -r requirements-openvino.txt
python -m pip install --quiet --no-deps -e .
python - <<'PY'
from importlib.metadata import version
import amico, monai, torch, ignite
# OpenVINO's version from its metadata: importing it would send a usage event (common.inferers.openvino hides that)
print(f"environment ready: torch {torch.__version__}, monai {monai.__version__}, ignite {ignite.__version__}, "
      f"dmri-amico {amico.__version__}, openvino {version('openvino')}")
PY
