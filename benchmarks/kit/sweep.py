"""Stage 2: block sizes of the log-prob forward and backward kernels, from measurement.

    python -m benchmarks.kit.sweep --results-dir DIR [--deadline-s 80] [--dtypes bf16 fp32] [--dry-run]

For each kernel kind (``fwd``, ``bwd``) and dtype, candidates ``(BLOCK_N, BLOCK_V, BLOCK_D,
num_warps, num_stages)`` are drawn from a grid by the kernels' budgets (accumulator tiles of at
most 128 float32 registers per thread, pipelined operand tiles within the 227 KiB of shared memory
of an sm_90 block), nearest the shipped configuration first. Each is then compiled for sm_90 in a
separate process pool (``TRITON_INTERPRET`` unset, no GPU needed): the configurations that the
override changes in ``logprobs.sm90_compile_specs()``, most-featured first, and a candidate with a
register spill, more shared memory than the limit or a compile error is dropped. Up to
``--per-kernel`` (12) survivors are timed at the stage-1 shape (N=16384, D=4096, V=151936) through
the public ``token_logprobs`` while ``grpo_kernels.ops.logprobs.GPU_CONFIG[kind][dtype]`` is
overridden at run time (no source is edited): the forward under ``torch.no_grad()`` with entropy,
the backward as forward + backward (exact, the default; forward at the shipped configuration).
``sweep.json`` / ``sweep.md`` hold every measurement and the winner per kind and dtype; set
``GPU_CONFIG`` from them. Before timing, the survivors are launched once at a tiny N in parallel
worker processes so that Triton's on-disk cache holds their binaries (same specialization: N and
every stride stay multiples of 16) and the timed process only loads them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.kit.common import Deadline, device_info, md_table, stage_device, write_json, write_text

KINDS = ("fwd", "dlogits")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_SHAPE = (16384, 4096, 151936)
DRY_SHAPE = (16, 16, 37)
SM90_MAX_SHARED = 227 * 1024
MAX_ACC_REGISTERS = 128  # float32 accumulator registers per thread, out of 255
_RESOURCE_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _budget(kind, config, itemsize):
    """(accumulator registers per thread, shared bytes of the pipelined operand tiles)."""
    block_n, block_v, block_d, warps, stages = config
    threads = warps * 32
    tiles = block_n * block_v + (block_n * block_d + block_v * block_d if kind == "bwd_atomic" else 0)
    shared = stages * (block_n + block_v) * block_d * itemsize
    return tiles / threads, shared


def candidates(kind: str, dtype: torch.dtype, baseline: tuple, count: int) -> list[tuple]:
    """The shipped configuration first, then grid points within the budgets, nearest first."""
    grid = itertools.product((64, 128, 256), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4))
    itemsize = torch.finfo(dtype).bits // 8
    scored = []
    for config in grid:
        registers, shared = _budget(kind, config, itemsize)
        if config == tuple(baseline) or not (16 <= registers <= MAX_ACC_REGISTERS and shared <= SM90_MAX_SHARED):
            continue
        distance = sum(abs(_log2(a) - _log2(b)) for a, b in zip(config, baseline))
        scored.append((distance, config))
    scored.sort()
    return [tuple(baseline)] + [config for _, config in scored[:count - 1]]


def _log2(x):
    return x.bit_length() - 1


# ---------------------------------------------------------------------------------------------
# Pre-filter: the sm_90 compiler's verdict (runs without a GPU, TRITON_INTERPRET unset)
# ---------------------------------------------------------------------------------------------


def _spec_key(spec):
    return (spec.name, tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())), spec.num_warps,
            spec.num_stages)


def specs_for(kind, dtype, config, specs_to_compile):
    """The compile specs that overriding ``GPU_CONFIG[kind][dtype]`` with ``config`` changes,
    most-featured (most true switches) first."""
    from grpo_kernels.ops import logprobs

    table = logprobs.GPU_CONFIG[kind]
    saved = table[dtype]
    probe = tuple(config) if tuple(config) != tuple(saved) else (saved[0] * 2,) + tuple(saved[1:])
    try:
        base = {spec.name: _spec_key(spec) for spec in logprobs.sm90_compile_specs()}
        table[dtype] = probe
        touched = {spec.name for spec in logprobs.sm90_compile_specs() if _spec_key(spec) != base[spec.name]}
        table[dtype] = tuple(config)
        specs = [spec for spec in logprobs.sm90_compile_specs() if spec.name in touched]
    finally:
        table[dtype] = saved
    specs.sort(key=lambda s: -sum(v is True for v in s.constexprs.values()))
    return specs[:specs_to_compile]


def _compile(spec) -> tuple[str, dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = spec.kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in spec.signature.items()
             if t.startswith("*") or t in ("i32", "i64")}
    try:
        compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as exc:  # noqa: BLE001 - a compile error rejects the candidate
        return f"compile error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}", {}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    regs, stack, static_shared, local = (int(x) for x in _RESOURCE_RE.search(dump).groups())
    usage = {"registers": regs, "local": local, "shared": compiled.metadata.shared + static_shared}
    problems = []
    if local:
        problems.append(f"spill ({local} B local)")
    if usage["shared"] > SM90_MAX_SHARED:
        problems.append(f"shared {usage['shared']} B > {SM90_MAX_SHARED} B")
    return "; ".join(problems), usage


def _prefilter_one(job):
    kind, dtype_name, config, specs_to_compile = job
    verdicts = []
    for spec in specs_for(kind, DTYPES[dtype_name], config, specs_to_compile):
        problem, usage = _compile(spec)
        verdicts.append({"spec": spec.name, "problem": problem, **usage})
    return {"kind": kind, "dtype": dtype_name, "config": list(config), "compiled": verdicts,
            "ok": bool(verdicts) and not any(v["problem"] for v in verdicts)}


def prefilter_main(jobs_path: Path, out_path: Path, processes: int) -> int:
    from concurrent.futures import ProcessPoolExecutor

    jobs = [tuple(j) for j in json.loads(jobs_path.read_text())]
    with ProcessPoolExecutor(max_workers=processes) as pool:
        results = list(pool.map(_prefilter_one, jobs))
    out_path.write_text(json.dumps(results))
    return 0


def run_prefilter(jobs, processes, timeout) -> list[dict]:
    """The compile verdicts: in a fork pool of this process when its kernels are real JIT
    functions and CUDA is not initialized yet, else in a child process without TRITON_INTERPRET."""
    from grpo_kernels.ops.utils import triton_interpreter_enabled

    if not triton_interpreter_enabled() and not torch.cuda.is_initialized():
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_prefilter_one, [tuple(j) for j in jobs], timeout=timeout))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        jobs_path, out_path = Path(tmp) / "jobs.json", Path(tmp) / "verdicts.json"
        jobs_path.write_text(json.dumps(jobs))
        subprocess.run([sys.executable, "-m", "benchmarks.kit.sweep", "--prefilter", str(jobs_path), str(out_path),
                        "--processes", str(processes)], env=env, check=True, timeout=timeout)
        return json.loads(out_path.read_text())


# ---------------------------------------------------------------------------------------------
# Timing with GPU_CONFIG overridden
# ---------------------------------------------------------------------------------------------


def _inputs(shape, dtype, device, sets=2):
    n, d, v = shape
    g = torch.Generator(device=device).manual_seed(n + v)
    out = []
    weight = (torch.randn(v, d, generator=g, device=device) * 0.02).to(dtype).requires_grad_()
    for _ in range(sets):
        hidden = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=g, device=device)
        out.append((hidden, weight, targets))
    return out


def make_step(kind, inputs):
    import grpo_kernels

    def fwd(i):
        hidden, weight, targets = inputs[i]
        with torch.no_grad():
            return grpo_kernels.token_logprobs(hidden, weight, targets, return_entropy=True)

    def fwd_bwd(i):
        hidden, weight, targets = inputs[i]
        return torch.autograd.grad(grpo_kernels.token_logprobs(hidden, weight, targets).sum(), [hidden, weight])

    return fwd if kind == "fwd" else fwd_bwd


class override:
    """``GPU_CONFIG[kind][dtype] = config`` for the ``with`` block (restored after)."""

    def __init__(self, kind, dtype, config):
        self.kind, self.dtype, self.config = kind, dtype, tuple(config)

    def __enter__(self):
        from grpo_kernels.ops import logprobs

        self.table = logprobs.GPU_CONFIG[self.kind]
        self.saved = self.table[self.dtype]
        self.table[self.dtype] = self.config

    def __exit__(self, *exc):
        self.table[self.dtype] = self.saved


def _warm_one(job):
    """Worker: launch one candidate at a tiny N (on the GPU) to fill Triton's on-disk cache."""
    kind, dtype_name, config, dim, vocab = job
    os.environ.pop("TRITON_INTERPRET", None)
    dtype = DTYPES[dtype_name]
    inputs = _inputs((64, dim, vocab), dtype, torch.device("cuda"), sets=1)
    with override(kind, dtype, config):
        make_step(kind, inputs)(0)
    torch.cuda.synchronize()
    return True


def warm_cache(jobs, processes, deadline):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_warm_one, job) for job in jobs]
    left = deadline.left()
    wait(futures, timeout=None if left == float("inf") else max(1.0, left * 0.5))
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()


def time_candidate(kind, dtype, config, inputs, device, min_runs):
    from benchmarks.measure import measure

    with override(kind, dtype, config):
        return measure(make_step(kind, inputs), len(inputs), device, min_runs=min_runs, cpu_runs=1)


def write_results(out_dir, meta, rows, winners):
    write_json(out_dir / "sweep.json", {"meta": meta, "winners": winners, "rows": rows})
    lines = [f"# Stage 2: log-prob kernel block sizes, {meta['device']}", "",
             f"{meta['date']}; N={meta['N']}, D={meta['D']}, V={meta['V']}. Command: `{meta['command']}`.", "",
             "`fwd`: `token_logprobs(..., return_entropy=True)` under no_grad; `dlogits`: forward + backward (default) with "
             "the forward at the shipped configuration. Config = (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages); "
             "registers / shared from the sm_90 compile of the most-featured configurations it changes.", ""]
    if winners:
        lines += ["## Winners", "", md_table(["kind", "dtype", "shipped", "shipped ms", "winner", "winner ms", "gain"],
                                             [[w["kind"], w["dtype"], w["shipped"], w["shipped_ms"], w["winner"],
                                               w["winner_ms"], w["gain"]] for w in winners]), ""]
        lines += ["Set in `grpo_kernels/ops/logprobs/launch.py`:", "", "```python"]
        lines += [f"GPU_CONFIG[{w['kind']!r}][torch.{_torch_name(w['dtype'])}] = {tuple(w['winner'])}"
                  for w in winners]
        lines += ["```", ""]
    lines += ["## Every candidate", "", md_table(
        ["kind", "dtype", "config", "compile", "regs", "shared B", "ms median (p20-p80)", "status"],
        [[r["kind"], r["dtype"], tuple(r["config"]), r.get("compile", ""), r.get("registers"), r.get("shared"),
          f"{r['ms_median']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f})" if r.get("ms_median") else "",
          r["status"]] for r in rows])]
    write_text(out_dir / "sweep.md", "\n".join(lines) + "\n")


def _torch_name(dtype_name):
    return str(DTYPES[dtype_name]).replace("torch.", "")


def compute_winners(rows):
    winners = []
    for kind in KINDS:
        for dtype_name in DTYPES:
            timed = [r for r in rows if r["kind"] == kind and r["dtype"] == dtype_name and r.get("ms_median")]
            shipped = [r for r in timed if r.get("shipped")]
            if not timed or not shipped:
                continue
            best = min(timed, key=lambda r: r["ms_median"])
            winners.append({"kind": kind, "dtype": dtype_name, "shipped": shipped[0]["config"],
                            "shipped_ms": round(shipped[0]["ms_median"], 3), "winner": best["config"],
                            "winner_ms": round(best["ms_median"], 3),
                            "gain": f"{100 * (1 - best['ms_median'] / shipped[0]['ms_median']):.1f}%"})
    return winners


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path)
    parser.add_argument("--deadline-s", type=float, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--per-kernel", type=int, default=12, help="candidates timed per kernel and dtype")
    parser.add_argument("--specs-per-candidate", type=int, default=2, help="compile specs checked per candidate")
    parser.add_argument("--processes", type=int, default=None, help="compile / warm-up processes")
    parser.add_argument("--min-runs", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="CPU: 1 candidate per kernel, tiny shape")
    parser.add_argument("--prefilter", nargs=2, type=Path, metavar=("JOBS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    processes = args.processes or max(1, min(16, (os.cpu_count() or 2)))
    if args.prefilter:
        return prefilter_main(*args.prefilter, processes)
    if args.results_dir is None:
        parser.error("--results-dir is required")

    deadline = Deadline(args.deadline_s)
    # No CUDA call before the compile pre-filter: it forks (see run_prefilter).
    n, d, v = DRY_SHAPE if args.dry_run else GPU_SHAPE
    per_kernel = 1 if args.dry_run else args.per_kernel
    specs_per_candidate = 1 if args.dry_run else args.specs_per_candidate
    dtypes = ["fp32"] if args.dry_run else args.dtypes
    from grpo_kernels.ops import logprobs

    rows = []
    # Candidates by budget, one and a half times what is timed: the compiler drops some.
    jobs = []
    for dtype_name in dtypes:
        for kind in KINDS:
            baseline = logprobs.GPU_CONFIG[kind][DTYPES[dtype_name]]
            for config in candidates(kind, DTYPES[dtype_name], baseline, per_kernel + per_kernel // 2):
                jobs.append((kind, dtype_name, list(config), specs_per_candidate))
    print(f"[sweep] compiling {len(jobs)} candidates for sm_90 ({processes} processes)", flush=True)
    try:
        left = deadline.left()
        verdicts = run_prefilter(jobs, processes, timeout=None if left == float("inf") else max(10.0, left * 0.4))
    except (subprocess.SubprocessError, OSError, TimeoutError) as exc:
        verdicts = [{"kind": k, "dtype": t, "config": c, "compiled": [], "ok": False,
                     "error": f"prefilter failed: {type(exc).__name__}"} for k, t, c, _ in jobs]
    device = stage_device(args.dry_run)
    meta = {**device_info(device), "N": n, "D": d, "V": v,
            "command": "python -m benchmarks.kit.sweep " + " ".join(argv if argv is not None else sys.argv[1:])}
    chosen = []
    for dtype_name in dtypes:
        for kind in KINDS:
            baseline = list(logprobs.GPU_CONFIG[kind][DTYPES[dtype_name]])
            taken = 0
            for verdict in (x for x in verdicts if x["kind"] == kind and x["dtype"] == dtype_name):
                worst = max(verdict["compiled"], key=lambda c: c.get("registers", 0), default={})
                row = {"kind": kind, "dtype": dtype_name, "config": verdict["config"],
                       "shipped": verdict["config"] == baseline,
                       "compile": "ok" if verdict["ok"] else (verdict.get("error") or "; ".join(
                           c["problem"] for c in verdict["compiled"] if c["problem"]) or "nothing compiled"),
                       "registers": worst.get("registers"), "shared": worst.get("shared"),
                       "status": "rejected by the compiler" if not verdict["ok"] else "not reached"}
                if verdict["ok"] and taken < per_kernel:
                    taken += 1
                    chosen.append(row)
                elif verdict["ok"]:
                    row["status"] = "not timed (enough candidates)"
                rows.append(row)
    write_results(args.results_dir, meta, rows, [])
    if device.type == "cuda" and chosen:
        warm_cache([(r["kind"], r["dtype"], r["config"], d, v) for r in chosen], processes, deadline)
    for dtype_name in dtypes:
        group = [r for r in chosen if r["dtype"] == dtype_name]
        if not group or deadline.expired():
            continue
        inputs = _inputs((n, d, v), DTYPES[dtype_name], device)
        for row in group:
            if deadline.expired():
                break
            m = time_candidate(row["kind"], DTYPES[dtype_name], row["config"], inputs, device, args.min_runs)
            row.update(status=m.status, ms_median=m.ms_median, ms_p20=m.ms_p20, ms_p80=m.ms_p80, runs=m.runs)
            print(f"[sweep] {row['kind']} {dtype_name} {tuple(row['config'])}: {m.status} {m.ms_median}", flush=True)
            write_results(args.results_dir, meta, rows, compute_winners(rows))
        del inputs
    winners = compute_winners(rows)
    write_results(args.results_dir, meta, rows, winners)
    for w in winners:
        print(f"[sweep] winner {w['kind']} {w['dtype']}: {tuple(w['winner'])} {w['winner_ms']} ms "
              f"(shipped {tuple(w['shipped'])} {w['shipped_ms']} ms, {w['gain']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
