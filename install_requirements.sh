#!/usr/bin/env bash
# Set up everything this example needs, on a CPU-only machine or a CUDA machine.
#
#   bash install_requirements.sh              # creates (or reuses) ./.venv
#   VENV=~/envs/fl bash install_requirements.sh
#   (inside an activated virtual environment, that environment is used instead)
#
# Installs torch/torchvision first (pinned in requirements.txt), then the rest, then flash-attn, but
# only where CUDA and nvcc are present (it is compiled against the installed torch, hence
# --no-build-isolation). Python 3.10-3.12.
set -euo pipefail
cd "$(dirname "$0")"

if [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
    echo "Using the active virtual environment $VIRTUAL_ENV"
else
    VENV="${VENV:-.venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "Creating virtual environment $VENV"
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    echo "Using virtual environment $VENV"
fi

"$PY" - <<'PYEOF'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 12)):
    sys.exit(f"error: Python 3.10-3.12 is required, this is {sys.version.split()[0]}; set PYTHON=python3.11")
PYEOF

pin() { grep -E "^$1==" requirements.txt; }
echo "Installing $(pin torch) $(pin torchvision) ..."
"$PY" -m pip install --quiet "$(pin torch)" "$(pin torchvision)"
echo "Installing requirements.txt ..."
"$PY" -m pip install --quiet -r requirements.txt

if command -v nvcc >/dev/null 2>&1 && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "CUDA and nvcc found: building flash-attn (several minutes) ..."
    "$PY" -m pip install --quiet flash-attn --no-build-isolation
else
    echo "Skipping flash-attn: it needs a CUDA GPU and nvcc (training falls back to PyTorch SDPA attention)."
fi
echo "Done. Activate with: source ${VENV:-$VIRTUAL_ENV}/bin/activate"
