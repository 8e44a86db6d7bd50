#!/usr/bin/env bash
# The GPU proof in one budgeted call (issue 9), from the repository root of a CUDA machine:
#
#   bash benchmarks/gpu_session.sh --budget-s 420          # on the GPU machine (no internet)
#   bash benchmarks/gpu_session.sh --dry-run [--results-dir DIR]   # CPU, tiny shapes (CI)
#
# Options: --budget-s S (default 420): the stage caps are shares of it and sum to at most S;
#          --stages "0 1 2 3 4": which stages run (default all, in this order);
#          --results-dir DIR: where results go (default benchmarks/results/<gpu-name>/ on a GPU,
#          a new temporary folder for --dry-run, which never writes under benchmarks/results/).
#
# Stages, in order of value, each under `timeout` with its own cap, each writing its files as it
# goes (a stage that fails or runs out of time is recorded as such, and the next one runs):
#   setup   peer wheels from .whl/ (benchmarks/device_wheels.sh) into a private --target dir that
#           Python sees after the machine's own site-packages (torch/numpy are never touched)
#   0 smoke compiled correctness: every declared kernel configuration vs float64, the log-prob
#           kernel at N=4096, D=4096, V=151936 bf16 vs float32, every loss type, advantages
#   1 peers log-prob op and fused loss vs CCE / Liger / TRL 1.16 / materialized logits, ratios to
#           a bf16 matmul timed in the same run, random and realistic logits
#   2 sweep block sizes of the log-prob kernels (sm_90 compile pre-filter, GPU_CONFIG overridden)
#   3 suite benchmarks.suite --quick;   4 e2e  benchmarks.bench_e2e_step
# Results: RESULTS_DIR/{session,smoke,peers,sweep}.{md,json}, peers_time.png, suite/, e2e_step.*,
# logs/; with $OUT set, after every stage: $OUT/{session.log,session.md,session.json,smoke.md,
# peers.md,sweep.md,results.tgz} (7 files).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
budget=420
dry_run=0
results=""
stages="0 1 2 3 4"
command_line="bash benchmarks/gpu_session.sh $*"
while [ $# -gt 0 ]; do
    case $1 in
        --budget-s) budget=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --results-dir) results=$2; shift 2 ;;
        --stages) stages=$2; shift 2 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu_session.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $budget in ''|*[!0-9]*) echo "gpu_session.sh: --budget-s takes whole seconds, got '$budget'" >&2; exit 2 ;; esac
if [ "$budget" -lt 60 ]; then echo "gpu_session.sh: --budget-s must be at least 60" >&2; exit 2; fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Caps: shares (percent) of the budget, floored, so that they sum to at most the budget.
declare -A SHARE=([setup]=4 [stage0_smoke]=20 [stage1_peers]=34 [stage2_sweep]=20 [stage3_suite]=12 [stage4_e2e]=10)
declare -A CAP
for name in "${!SHARE[@]}"; do CAP[$name]=$(( budget * SHARE[$name] / 100 )); done
[ "${CAP[stage0_smoke]}" -gt 90 ] && CAP[stage0_smoke]=90  # issue 9: stage 0 <= 90 s
deadline() { echo $(( $1 * 8 / 10 - 5 )); }  # what a stage's Python may spend before writing up

if [ $dry_run -eq 1 ]; then
    # The torch paths on CPU, except for stage 0, which runs our Triton kernels interpreted (the
    # sweep's sm_90 pre-filter compiles for real; its timings take the torch path here).
    export TRITON_INTERPRET=0
    if [ -z "$results" ]; then results=$(mktemp -d -t grpo-kit-dry-XXXXXX); fi
    case $(realpath -m "$results")/ in "$ROOT"/benchmarks/results/*)
        echo "gpu_session.sh: a dry run never writes under benchmarks/results/ (got $results)" >&2; exit 2 ;;
    esac
    dry=--dry-run
    interpret=TRITON_INTERPRET=1
else
    unset TRITON_INTERPRET
    dry=""
    interpret=""
    if [ -z "$results" ]; then
        gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
        [ -n "$gpu" ] || gpu=$($PY -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null)
        if [ -z "$gpu" ]; then echo "gpu_session.sh: no CUDA GPU found (use --dry-run on CPU)" >&2; exit 2; fi
        slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
        results="$ROOT/benchmarks/results/$slug"
    fi
fi
mkdir -p "$results/logs"
results=$(realpath "$results")
: > "$results/stages.tsv"
LOG="$results/logs/session.log"
exec > >(tee "$LOG") 2>&1
planned="setup=${CAP[setup]}"
for s in $stages; do
    case $s in 0) planned+=",stage0_smoke=${CAP[stage0_smoke]}" ;; 1) planned+=",stage1_peers=${CAP[stage1_peers]}" ;;
        2) planned+=",stage2_sweep=${CAP[stage2_sweep]}" ;; 3) planned+=",stage3_suite=${CAP[stage3_suite]}" ;;
        4) planned+=",stage4_e2e=${CAP[stage4_e2e]}" ;; *) echo "unknown stage $s" >&2; exit 2 ;; esac
done
echo "== GPU kit: budget ${budget}s, caps ${planned}; results in $results"

summarize() {
    $PY -m benchmarks.kit.session "$results" --budget-s "$budget" --caps "$planned" --command "$command_line" \
        ${dry:+--dry-run} || echo "(session summary failed)"
}

copy_out() {  # at most 8 files, each well under 16 MiB
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    for f in session.md session.json smoke.md peers.md sweep.md; do
        [ -f "$results/$f" ] && cp "$results/$f" "$OUT/$f"
    done
    cp "$LOG" "$OUT/session.log" 2>/dev/null
    tar -czf "$OUT/results.tgz" -C "$(dirname "$results")" "$(basename "$results")" 2>/dev/null
    if [ "$(stat -c %s "$OUT/results.tgz" 2>/dev/null || echo 0)" -gt $((15 * 1024 * 1024)) ]; then
        tar -czf "$OUT/results.tgz" --exclude='*.png' --exclude=logs -C "$(dirname "$results")" "$(basename "$results")"
    fi
}

run_stage() {  # name, command...: runs under timeout with the stage's cap, records its outcome
    local name=$1; shift
    local cap=${CAP[$name]}
    local begin end rc status
    echo "== $name (cap ${cap}s): $*"
    begin=$(date +%s%N)
    timeout -k 2 $(( cap > 8 ? cap - 3 : cap )) "$@" > "$results/logs/$name.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    case $rc in
        0) status=ok ;;
        124|137) status="timeout (cap ${cap}s)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    tail -n 12 "$results/logs/$name.log"
    local tenths=$(( (end - begin) / 100000000 ))  # integer arithmetic: no bc or awk needed
    printf '%s\t%s\t%d.%d\t%s\t%s\n' "$name" "$cap" $((tenths / 10)) $((tenths % 10)) "$status" "$rc" \
        >> "$results/stages.tsv"
    echo "== $name: $status"
    summarize
    copy_out
}

setup() {
    if [ $dry_run -eq 0 ] && compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
        local site=${GRPO_KIT_PEER_SITE:-/tmp/grpo-kit-site}
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$ROOT"/.whl/*.whl || return 1
        echo "peer wheels installed into $site: $(ls "$ROOT"/.whl | tr '\n' ' ')"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    return 0
}
# Python appends this after its own site-packages (benchmarks/__init__.py): the image's torch,
# triton and numpy always win over anything a wheel might bring.
export GRPO_KERNELS_PEER_SITE=${GRPO_KIT_PEER_SITE:-/tmp/grpo-kit-site}
export -f setup
export ROOT dry_run PY

run_stage setup bash -c setup
for s in $stages; do
    case $s in
        0) run_stage stage0_smoke env $interpret $PY -m benchmarks.kit.smoke --results-dir "$results" $dry \
               --deadline-s "$(deadline "${CAP[stage0_smoke]}")" ;;
        1) run_stage stage1_peers $PY -m benchmarks.kit.peers --results-dir "$results" $dry \
               --deadline-s "$(deadline "${CAP[stage1_peers]}")" ;;
        2) run_stage stage2_sweep $PY -m benchmarks.kit.sweep --results-dir "$results" $dry \
               --deadline-s "$(deadline "${CAP[stage2_sweep]}")" ;;
        3) if [ $dry_run -eq 1 ]; then
               run_stage stage3_suite $PY -m benchmarks.suite --smoke --impls torch ours --out "$results/suite"
           else
               run_stage stage3_suite $PY -m benchmarks.suite --quick --no-v-sweep --n-max 16384 --out "$results/suite"
           fi ;;
        4) if [ $dry_run -eq 1 ]; then
               run_stage stage4_e2e $PY -m benchmarks.bench_e2e_step --smoke --cpu --out "$results"
           else
               run_stage stage4_e2e $PY -m benchmarks.bench_e2e_step --min-runs 3 --out "$results"
           fi ;;
    esac
done
echo "== done; results in $results"
cat "$results/session.md"
copy_out
# Exit status: 0 when every stage finished ok.
! cut -f4 "$results/stages.tsv" | grep -qv '^ok$'
