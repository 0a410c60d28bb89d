#!/usr/bin/env bash
# One run on a borrowed GPU machine (torch installed, no network, no Gradio): install the wheels
# carried in .whl/ (git ignores it; see README "GPU speed"), profile the decode step at the
# published size, then run the engine benchmark. Each part has its own time limit and prints
# as it goes, so a run cut short still reports what it measured.
#   bash benchmarks/gpu_run.sh [gpu_speed.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-index --find-links .whl .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 180 python benchmarks/profile_step.py --published --device cuda --dtype bfloat16 --steps 5 \
    || echo "profile_step.py stopped early (exit $?)"
exec timeout 480 python benchmarks/gpu_speed.py "$@"
