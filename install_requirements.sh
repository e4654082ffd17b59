#!/usr/bin/env bash
# Set up everything this example needs, on a CPU-only machine or a CUDA machine.
#
#   bash install_requirements.sh              # creates (or reuses) ./.venv
#   VENV=~/envs/fl bash install_requirements.sh
#   (inside an activated virtual environment, that environment is used instead)
#   bash install_requirements.sh --official ~/envs/qwen3vl
#       # a separate environment for a QwenLM/Qwen3-VL clone (--backend official), pinned by
#       # requirements-official.txt; prints the --qwen3vl_python to pass
#
# Installs torch/torchvision first (pinned in requirements.txt), then the rest, then flash-attn, but
# only where CUDA and nvcc are present (it is compiled against the installed torch, hence
# --no-build-isolation). Python 3.10-3.12.
set -euo pipefail
cd "$(dirname "$0")"

check_python() {
    "$1" - <<'PYEOF'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 12)):
    sys.exit(f"error: Python 3.10-3.12 is required, this is {sys.version.split()[0]}; set PYTHON=python3.11")
PYEOF
}

build_flash_attn() {  # $1: python; $2: the flash-attn requirement
    if command -v nvcc >/dev/null 2>&1 && "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "CUDA and nvcc found: building $2 (several minutes) ..."
        "$1" -m pip install --quiet "$2" --no-build-isolation
    else
        echo "Skipping flash-attn: it needs a CUDA GPU and nvcc (training uses PyTorch SDPA attention instead)."
    fi
}

if [ "${1:-}" = "--official" ]; then
    ENV_DIR="${2:-}"
    if [ -z "$ENV_DIR" ] || [ $# -ne 2 ]; then
        echo "error: usage: bash install_requirements.sh --official ENV_DIR (the folder for the new environment)" >&2
        exit 2
    fi
    if [ ! -x "$ENV_DIR/bin/python" ]; then
        echo "Creating virtual environment $ENV_DIR for the official Qwen3-VL code"
        "${PYTHON:-python3}" -m venv "$ENV_DIR"
    fi
    OPY="$(cd "$ENV_DIR" && pwd)/bin/python"
    check_python "$OPY"
    echo "Installing requirements-official.txt into $ENV_DIR (torch 2.6 with its CUDA libraries: a few GB) ..."
    "$OPY" -m pip install --quiet --upgrade pip
    "$OPY" -m pip install --quiet -r requirements-official.txt
    # flash-attn 2.7.4.post1 is the version the clone's README names, built against its torch 2.6.
    build_flash_attn "$OPY" "flash-attn==2.7.4.post1"
    echo "Done. Pass it to job.py (or python -m qwen3vl_sft.train.official): --qwen3vl_python $OPY"
    exit 0
fi

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

check_python "$PY"

pin() { grep -E "^$1==" requirements.txt; }
echo "Installing $(pin torch) $(pin torchvision) ..."
"$PY" -m pip install --quiet "$(pin torch)" "$(pin torchvision)"
echo "Installing requirements.txt ..."
"$PY" -m pip install --quiet -r requirements.txt

build_flash_attn "$PY" flash-attn
echo "Done. Activate with: source ${VENV:-$VIRTUAL_ENV}/bin/activate"
