#!/usr/bin/env bash
# Create (or update) .venv-monailabel: MONAI Label 0.8.5 beside this project's bundles on a CPU machine,
# from PyPI alone, for the MONAI Label suite (tests_external/monailabel). Why each pin: requirements-monailabel.txt.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=${MONAILABEL_VENV:-.venv-monailabel}
if [ ! -x "$ENV/bin/python" ]; then
  "$PY" -m venv "$ENV"
fi
. "$ENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"   # first and pinned, as ci/setup.sh does
python -m pip install --quiet -r requirements-monailabel.txt
python -m pip install --quiet --no-deps "torchvision==0.16.2" "monailabel==0.8.5"
# this repository is not installed here: the server must import `common` from the deployed bundle folder
python - <<'PY'
import monai, monailabel, torch, torchvision
from monailabel.tasks.infer.bundle import BundleInferTask  # imports torchvision.utils: the reason for the pin
print(f"MONAI Label environment ready: monailabel {monailabel.__version__}, monai {monai.__version__}, "
      f"torch {torch.__version__}, torchvision {torchvision.__version__} (Python parts only)")
PY
