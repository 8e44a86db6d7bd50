#!/usr/bin/env bash
# Download, on a machine with PyPI access, exactly the wheels that the GPU machine lacks for the
# kit's stages 1-4, into the ignored .whl/ at the repository root:
#
#   bash benchmarks/device_wheels.sh            # then the GPU call carries .whl (gpu_session.sh installs it)
#
# The GPU image (python 3.12, torch 2.11, triton 3.6, transformers, accelerate, numpy 2.5, pandas,
# pyarrow, xxhash, fsspec, huggingface-hub, pyyaml, jinja2, psutil, matplotlib; see
# /work/.library/device/KINDS.md) has no trl, liger-kernel, cut-cross-entropy or datasets. What
# they need at import that the image lacks, read from their METADATA (Requires-Dist):
#   liger-kernel 0.8.5, cut-cross-entropy 25.1.1: torch, triton only;
#   trl 1.16.0: datasets (trl.trainer.utils imports it: the `trl` impl and TRL's nanstd for the
#     advantages comparison; `trl_fused` needs only trl.kernels and, should datasets fail to import
#     there, reads TRL's chunk-size constant from TRL's source);
#   datasets 5.2.0: dill (< 0.4.2) and multiprocess (< 0.70.20), the rest is in the image.
# All are pure Python (datasets' heavy dependency, pyarrow, is already there), so nothing is
# stubbed: about 1 MiB in all. --no-deps: pip pulls nothing else (no torch, no numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    trl==1.16.0
    liger-kernel==0.8.5
    cut-cross-entropy==25.1.1
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
)
PY=${PYTHON:-python3}
rm -rf .whl
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
total=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
echo "wheels: $(ls .whl | wc -l) files, $((total / 1024)) KiB"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then echo "device_wheels.sh: over 60 MiB" >&2; exit 1; fi
# What one device call sends: tracked + untracked-not-ignored files, plus the carried .whl.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
echo "working tree that travels: $((tree / 1024)) KiB + .whl $((total / 1024)) KiB = $(((tree + total) / 1024)) KiB (limit 65536 KiB)"
if [ $((tree + total)) -gt $((64 * 1024 * 1024)) ]; then echo "device_wheels.sh: tree + .whl over 64 MiB" >&2; exit 1; fi
