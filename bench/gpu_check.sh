#!/usr/bin/env bash
# GPU check for one lent H100/H200-class GPU, <= 8 minutes: Qwen3-VL-2B at real dims (random init, no
# download), full SFT and LoRA 20 steps each, one federated round with 2 sites on the GPU; figures to
# one JSON file. The logic is in bench/gpu_check.py (its docstring states the FLOP formula).
#
#   bash bench/gpu_check.sh [OUT.json] [extra gpu_check.py flags]     # default OUT: gpu_check.json
#   PYTHON=/path/to/python bash bench/gpu_check.sh                    # default: .venv/bin/python
#   GPU_CHECK_TIMEOUT_S=1200 bash bench/gpu_check.sh ...               # default 480 (a busy CPU needs more)
#
# Without CUDA it runs the CPU fallback (tiny dims, few steps) instead, so the script is known to work.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-gpu_check.json}"
shift $(( $# > 0 ? 1 : 0 ))
if [ ! -x "$PYTHON" ]; then
    echo "error: PYTHON=$PYTHON is not an executable python (set up with install_requirements.sh)" >&2
    exit 2
fi
# 480 s = the 8-minute budget; a run cut short still leaves the parts it finished in $OUT.
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-480}" "$PYTHON" bench/gpu_check.py --out "$OUT" "$@"
