#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a lent GPU machine: torch there, no network, no Gradio,
# transformers too old. Installs the wheels carried in .whl/ (benchmarks/gpu_wheels.sh builds them)
# into a folder of their own, put first on PYTHONPATH, then runs the five stages in what is left of
# 8 minutes. Stage files, summary.json and this log land in $OUT as they are written.
#   bash benchmarks/gpu_check.sh [gpu_check.py flags, e.g. --reduced or --stages 1,4]
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}  # a folder without wheels: use what is installed
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
    BENCH_STARTED_AT=$started
{
    echo "[$(date +%H:%M:%S)] gpu_check.sh: $(hostname), $($PYTHON --version 2>&1)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv,noheader
    fi
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        site=/tmp/gpu-check-site
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
                "$WHEELS"/*.whl; then
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
            echo "[$(date +%H:%M:%S)] installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $site"
        else
            echo "gpu_check.sh: installing $WHEELS failed; going on with what is installed"
        fi
    fi
    left=$((TOTAL_S - ($(date +%s) - started)))
    "$PYTHON" benchmarks/gpu_check.py --out "$OUT" --total-s "$left" "$@"
} 2>&1 | tee "$OUT/gpu_check.log"
