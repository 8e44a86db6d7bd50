#!/usr/bin/env bash
# Every GPU check this project owes, in one command on a CUDA machine (repository root):
#
#   bash benchmarks/gpu_session.sh [tests|logprobs|suite-quick|e2e|all]   (default: all)
#
# 1. the test suite with the kernels compiled on the GPU (no interpreter);
# 2. the log-prob kernel against CCE, materialized logits and the matmul floor;
# 3. the peer suite, quick (3 token counts per head);
# 4. the end-to-end policy-update step.
# Logs go to $OUT (default /tmp/gpu-session); results to benchmarks/results/<gpu-name>/ (and a
# copy under $OUT). With no internet there, peers travel as wheels: put trl, liger-kernel,
# cut-cross-entropy, datasets (and what datasets needs that the machine lacks) in .whl/ and they
# are installed into /tmp/site first (see benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/device.txt"
status=0
run() {  # name, command...
    local name=$1; shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc"
    [ $rc -eq 0 ] || status=1
}
case $what in tests|all) run tests python3 -m pytest tests -q -p no:cacheprovider -x ;; esac
case $what in logprobs|all) run logprobs python3 -m benchmarks.bench_logprobs ;; esac
case $what in suite-quick|all) run suite python3 -m benchmarks.suite --quick ;; esac
case $what in e2e|all) run e2e python3 -m benchmarks.bench_e2e_step ;; esac
tar -czf "$OUT/results.tgz" benchmarks/results 2>/dev/null
exit $status
