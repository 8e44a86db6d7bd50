"""Run the benchmark suite and write kernels.json, kernels.md and the plots.

    python -m benchmarks.suite                      # full suite on the GPU
    python -m benchmarks.suite --quick              # 3 token counts per head
    python -m benchmarks.suite --heads llama-3.1-8b --impls liger ours
    python -m benchmarks.suite --smoke --out /tmp/bench-smoke   # tiny shapes, CPU works

Output: ``benchmarks/results/<gpu-name>/`` (GPU runs only; a CPU run needs ``--smoke`` and
writes to ``--out`` or a temporary directory, never next to the GPU results).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Our kernels then run under Triton's interpreter (set before grpo_kernels imports triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import impls as impls_module  # noqa: E402
from benchmarks import report, shapes  # noqa: E402
from benchmarks.measure import Measurement, device_slug, matmul_step, measure, release_memory  # noqa: E402

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
OPS = ("loss_fwd_bwd", "logprobs_nograd", "logprobs_fwd_bwd", "advantages")
# FLOPs counted per op, in units of 2*N*D*V (one [N, D] x [D, V] matmul): forward + backward of
# the fused loss = 4 (logits, recomputed logits, d hidden, d weight), the log-prob pass = 1.
MATMULS_PER_OP = {"loss_fwd_bwd": 4, "logprobs_fwd_bwd": 4, "logprobs_nograd": 1}
ROTATIONS = 3  # input sets the timed runs cycle through
SHARED_WEIGHT_BYTES = 64 * 2**20  # beyond this (> H100's 50 MB L2) one LM head serves every input set


def _record(shape_fields: dict, impl: str, op: str, m, **extra) -> dict:
    return {"impl": impl, "op": op, **shape_fields, "ms_median": m.ms_median, "ms_p20": m.ms_p20,
            "ms_p80": m.ms_p80, "runs": m.runs, "peak_mb": m.peak_mb, "status": m.status, **extra}


def _shape_fields(shape) -> dict:
    return {"head": shape.head, "sweep": shape.sweep, "B": shape.B, "T": shape.T, "N": shape.N, "D": shape.D,
            "V": shape.V, "dtype": shape.dtype_name}


def _check(impl, op, inp):
    """Deviation from the float32 reference on one input set: |loss - reference loss| for the
    loss, max |log p - reference| over completion tokens for the log-prob pass. A benchmark of
    implementations that compute different things would compare nothing."""
    if op == "logprobs_nograd":
        got = impl.logprobs(inp.for_nograd_pass())
        return float((got.float() - inp.reference_logprobs)[inp.completion_mask.bool()].abs().max())
    if op == "loss_fwd_bwd":
        reference = impls_module.eager_grpo_loss(inp.reference_logprobs, inp.completion_mask, inp.advantages,
                                                 inp.old_logprobs, inp.ref_logprobs, **impls_module.LOSS_OPTIONS)[0]
        with torch.no_grad():
            return float((impl.loss(inp).float() - reference).abs())
    return None


def run_loss_benchmarks(shape_list, impl_list, device, ops, *, min_runs, cpu_runs, log=print, checkpoint=None):
    """Records of every (shape, impl, op); ``checkpoint(records)`` after every measurement (so that
    a run stopped by a time cap keeps what it measured)."""
    records = []
    for shape in shape_list:
        fields = _shape_fields(shape)
        log(f"[bench] {shape.head} B={shape.B} T={shape.T} N={shape.N} D={shape.D} V={shape.V} {shape.dtype_name}")
        try:
            weight_bytes = shape.V * shape.D * shape.dtype.itemsize
            inputs = impls_module.make_inputs(shape, device, seed=shape.N + shape.V, rotations=ROTATIONS,
                                              share_weight=weight_bytes > SHARED_WEIGHT_BYTES)
        except torch.OutOfMemoryError:
            log("[bench]   inputs do not fit: every impl recorded as OOM")
            release_memory(device, collect=True)
            for impl in impl_list:
                for op in ops:
                    records.append(_record(fields, impl.name, op, Measurement("OOM")))
            continue

        nograd_inputs = [inp.for_nograd_pass() for inp in inputs]
        matmul_ms = None
        if device.type == "cuda":
            m = measure(matmul_step(inputs), ROTATIONS, device, min_runs=min_runs)
            matmul_ms = m.ms_median
            flops = 2.0 * shape.N * shape.D * shape.V
            records.append(_record(fields, "cublas", "matmul_bf16", m,
                                   tflops=flops / (m.ms_median * 1e9) if m.ms_median else None))
            log(f"[bench]   matmul_bf16 cublas: {_describe(m)}")

        for impl in impl_list:
            for op in ops:
                fn = {"loss_fwd_bwd": impl.loss, "logprobs_nograd": impl.logprobs,
                      "logprobs_fwd_bwd": impl.logprobs_loss}.get(op)
                if op == "advantages" or (fn is None and impl.skip_reason is None):
                    continue  # this impl has no such op (e.g. logprobs_fwd_bwd is ours only)
                if impl.skip_reason is not None:
                    if op not in ("loss_fwd_bwd", "logprobs_nograd"):
                        continue
                    records.append(_record(fields, impl.name, op, Measurement(f"skipped: {impl.skip_reason}")))
                    continue
                if op in ("loss_fwd_bwd", "logprobs_fwd_bwd"):
                    def step(i, fn=fn):
                        inp = inputs[i]
                        return torch.autograd.grad(fn(inp), [inp.hidden, inp.lm_head_weight])
                else:
                    def step(i, fn=fn):
                        return fn(nograd_inputs[i])
                m = measure(step, ROTATIONS, device, min_runs=min_runs, cpu_runs=cpu_runs)
                extra = {}
                if m.status == "ok":
                    # Useful work only: the completion tokens (lengths T/2..T). Impls that skip
                    # padded rows are not credited with FLOPs they never did, and impls that
                    # compute the padding pay for it in time, so the column compares like with like.
                    active = int(inputs[0].completion_mask.sum())
                    flops = MATMULS_PER_OP[op] * 2.0 * active * shape.D * shape.V
                    extra["active_tokens"] = active
                    extra["tflops"] = flops / (m.ms_median * 1e9)
                    if matmul_ms:
                        extra["roofline_frac"] = (flops / m.ms_median) / (2.0 * shape.N * shape.D * shape.V / matmul_ms)
                    check_failed = False
                    try:
                        extra["check_abs_err"] = _check(impl, op, inputs[0])
                    except Exception as exc:  # noqa: BLE001 - e.g. OOM of the check itself
                        extra["check_abs_err"] = None
                        check_failed = True
                        log(f"[bench]   {op} {impl.name}: value check failed ({type(exc).__name__})")
                    release_memory(device, collect=check_failed)
                records.append(_record(fields, impl.name, op, m, **extra))
                log(f"[bench]   {op} {impl.name}: {_describe(m)}"
                    + (f", |err| {extra['check_abs_err']:.2e}" if extra.get("check_abs_err") is not None else ""))
                if checkpoint is not None:
                    checkpoint(records)
        del inputs, nograd_inputs
        release_memory(device, collect=True)
    return records


def run_advantage_benchmarks(batches, device, names, *, min_runs, cpu_runs, log=print):
    records = []
    fns = impls_module.build_advantage_impls(names)
    group_size, num_rewards = shapes.ADVANTAGE_GROUP_SIZE, shapes.ADVANTAGE_NUM_REWARDS
    weights = torch.tensor([1.0, 0.5, 2.0][:num_rewards], device=device)
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        reward_sets = []
        for _ in range(ROTATIONS):
            rewards = torch.randn(batch, num_rewards, generator=generator)
            rewards[torch.rand(batch, num_rewards, generator=generator) < 0.05] = float("nan")
            reward_sets.append(rewards.to(device))
        fields = {"head": "-", "sweep": "B", "B": batch, "T": None, "N": batch, "D": None, "V": None,
                  "dtype": "float32", "G": group_size, "K": num_rewards}
        expected = impls_module.trl_group_advantages(reward_sets[0].clone(), weights, group_size)[0] \
            if "trl" in fns else None
        for name, fn in fns.items():
            m = measure(lambda i, fn=fn: fn(reward_sets[i], weights, group_size), ROTATIONS, device,
                        min_runs=min_runs, cpu_runs=cpu_runs)
            extra = {}
            if m.status == "ok" and expected is not None:
                extra["check_abs_err"] = float((fn(reward_sets[0], weights, group_size) - expected).abs().max())
            records.append(_record(fields, name, "advantages", m, **extra))
            log(f"[bench] advantages B={batch} G={group_size} K={num_rewards} {name}: {_describe(m)}")
    return records


def _describe(m) -> str:
    if m.status != "ok":
        return m.status
    peak = f", peak {m.peak_mb:.0f} MB" if m.peak_mb is not None else ""
    return f"{m.ms_median:.3f} ms (p20 {m.ms_p20:.3f}, p80 {m.ms_p80:.3f}, {m.runs} runs){peak}"


def environment(device, impl_list, argv) -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "impls": {impl.name: {"version": impl.version, "description": impl.description,
                              "skipped": impl.skip_reason} for impl in impl_list},
        "loss_options": impls_module.LOSS_OPTIONS,
        "command": "python -m benchmarks.suite " + " ".join(argv),
    }


def run_suite(*, device=None, out_dir=None, smoke=False, quick=False, heads=None, impl_names=None, ops=OPS,
              v_sweep=True, n_max=None, min_runs=10, cpu_runs=2, plots=True, argv=(), log=print) -> Path:
    """Run the benchmarks and write ``kernels.json``, ``kernels.md``, ``environment.json`` and the
    PNG plots into ``out_dir``; returns ``out_dir``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not smoke:
        raise SystemExit("the full suite needs a CUDA GPU; on CPU run the smoke version: --smoke")
    if out_dir is None:
        out_dir = RESULTS_ROOT / device_slug(device) if device.type == "cuda" and not smoke else \
            Path(tempfile.mkdtemp(prefix="grpo-kernels-bench-"))
    out_dir = Path(out_dir)
    if device.type != "cuda" and out_dir.resolve().is_relative_to(RESULTS_ROOT.resolve()):
        raise SystemExit(f"refusing to write CPU numbers under {RESULTS_ROOT} (GPU results only)")
    out_dir.mkdir(parents=True, exist_ok=True)

    if device.type == "cuda":
        import torch._dynamo.config as dynamo_config

        # Liger's compiled chunk function sees a new shape per sweep point: let it recompile
        # instead of silently falling back to eager after the default 8.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 256))

    names = tuple(impl_names or impls_module.IMPL_NAMES)
    impl_list = impls_module.build_impls(device, names)
    for impl in impl_list:
        if impl.skip_reason:
            log(f"[bench] {impl.name}: skipped - {impl.skip_reason}")

    records = []
    env = environment(device, impl_list, argv)
    loss_ops = [op for op in ops if op != "advantages"]
    if loss_ops:
        shape_list = shapes.loss_shapes(heads=heads, quick=quick, smoke=smoke, v_sweep=v_sweep and not smoke,
                                        n_max=n_max)
        records += run_loss_benchmarks(shape_list, impl_list, device, loss_ops, min_runs=min_runs,
                                       cpu_runs=cpu_runs, log=log,
                                       checkpoint=lambda so_far: report.write_all(so_far, env, out_dir, plots=False))
    if "advantages" in ops:
        batches = shapes.SMOKE_ADVANTAGE_BATCHES if smoke else shapes.ADVANTAGE_BATCHES
        records += run_advantage_benchmarks(batches, device, names, min_runs=min_runs, cpu_runs=cpu_runs, log=log)

    report.write_all(records, env, out_dir, plots=plots)
    log(f"[bench] wrote {out_dir}/kernels.json, kernels.md, environment.json" + (" and plots" if plots else ""))
    return out_dir


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output directory (default: benchmarks/results/<gpu-name>)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU); writes to --out or a tmp dir")
    parser.add_argument("--quick", action="store_true", help="3 token counts per head instead of 6")
    parser.add_argument("--heads", nargs="+", choices=list(shapes.HEADS), help="only these heads (N sweep)")
    parser.add_argument("--impls", nargs="+", choices=list(impls_module.IMPL_NAMES), help="only these impls")
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--no-v-sweep", action="store_true", help="skip the vocabulary sweep")
    parser.add_argument("--n-max", type=int, help="skip token counts above this")
    parser.add_argument("--min-runs", type=int, default=10, help="least number of timed runs per point (GPU)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    run_suite(out_dir=args.out, smoke=args.smoke, quick=args.quick, heads=args.heads, impl_names=args.impls,
              ops=tuple(args.ops), v_sweep=not args.no_v_sweep, n_max=args.n_max, min_runs=args.min_runs,
              plots=not args.no_plots, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
