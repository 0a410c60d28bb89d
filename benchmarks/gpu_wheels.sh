#!/usr/bin/env bash
# Build .whl/ (ignored by git): the wheels a lent GPU machine needs and lacks, at the lock's versions,
# for Python 3.12 on x86-64 Linux. The machine has torch 2.11, transformers 5.17, huggingface_hub
# 1.33, tokenizers 0.23.2, safetensors 0.8.0 and accelerate 1.15, and no network; this project
# needs transformers >= 5.23, whose 5.25 enforces huggingface_hub >= 2.4 at import and wants
# `kernels`; huggingface_hub 2.4 imports httpx2 (over httpcore2 and truststore), kernels imports
# tomlkit. tokenizers and safetensors there already satisfy transformers 5.25. bitsandbytes is
# repacked with only its CUDA 13.0 library (43 MB -> a few MB): the machine's torch is cu130.
# benchmarks/gpu_check.sh installs them there with `pip install --no-index --no-deps`.
#   PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh [folder]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEST=${1:-.whl}
# Distribution names as requirements.txt spells them; their versions come from the lock.
NEEDED="transformers huggingface-hub kernels httpx2 httpcore2 truststore tomlkit accelerate bitsandbytes"
KEEP_LIBRARY=libbitsandbytes_cuda130.so
# The call's working tree may hold 64 MiB in all; the repository itself is ~1 MB.
LIMIT_MB=40

rm -rf "$DEST" && mkdir -p "$DEST"
for name in $NEEDED; do
    pin=$(grep -iE "^${name}==" requirements.txt | head -n 1 | cut -d' ' -f1)
    [ -n "$pin" ] || { echo "gpu_wheels: $name is not in requirements.txt" >&2; exit 1; }
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$DEST" "$pin"
done

# bitsandbytes: drop every native library but the one the machine's CUDA loads; RECORD follows.
"$PYTHON" - "$DEST" "$KEEP_LIBRARY" <<'PY'
import sys
import zipfile
from pathlib import Path

folder, keep = Path(sys.argv[1]), sys.argv[2]
(wheel,) = folder.glob("bitsandbytes-*.whl")
repacked = wheel.with_suffix(".tmp")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(repacked, "w", zipfile.ZIP_DEFLATED) as target:
    def dropped(name: str) -> bool:
        return name.rsplit("/", 1)[-1].startswith("libbitsandbytes_") and not name.endswith(keep)
    kept = [item for item in source.infolist() if not dropped(item.filename)]
    if not any(item.filename.endswith(keep) for item in kept):
        sys.exit(f"gpu_wheels: {wheel.name} has no {keep}")
    for item in kept:
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
        target.writestr(item, data)
repacked.replace(wheel)
PY

total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
ls -l "$DEST"
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels, $((total / 1024 / 1024)) MiB in $DEST (limit ${LIMIT_MB} MiB)"
[ "$total" -lt $((LIMIT_MB * 1024 * 1024)) ] || { echo "gpu_wheels: over ${LIMIT_MB} MiB" >&2; exit 1; }
