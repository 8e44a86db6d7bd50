"""CPU benchmark of the fused linear + GRPO loss: time and peak RSS, each run in a fresh process.

``python -m benchmarks.bench_cpu --cpu`` measures forward + backward (``torch.autograd.grad`` of
the loss w.r.t. hidden and the LM head) of the dapo loss (beta 0.04, Liger's defaults, see
``benchmarks.impls``), fp32, at the shapes of issue 15, for:

- ``torch``: eager, materialized ``[N, V]`` logits (the yardstick: 3 matmuls);
- ``liger``: Liger-Kernel ``LigerFusedLinearGRPOLoss(compiled=False)``;
- ``trl_fused``: TRL 1.16's streamed LM head (``ChunkedLogProbFunction``, what its GRPOTrainer runs);
- ``ours``: ``grpo_kernels.fused_linear_grpo_loss`` on its PyTorch backend.

With ``--ops``, also issue 19's head operations (``benchmarks.heads``: ``stats_fwd_bwd``,
``stats_fwd``, ``divergence_fwd_bwd``, ``divergence_fwd``) for ``ours``, ``trl_fused`` (TRL 1.16's
``ChunkedLogProbFunction`` / ``ChunkedDivergenceFunction``: its torch folds on CPU) and ``torch``
(materialized logits), on the same inputs (the teacher: ``heads.teacher_of``).

A peer that is not installed is skipped with a message. Every (impl, shape) runs in its own
process: inputs are built, RSS is read, the high-water mark is reset (``/proc/self/clear_refs``
"5"), one step runs, and ``VmHWM`` minus the RSS before it is the peak above the inputs (it
includes the two gradients the step returns; ``peak_over_grads_mib`` subtracts them). Further
steps in the same process give the time (median). ``--repeats`` runs the whole table again, in
new processes, to show the spread (a shared machine is noisy). Results go to
``benchmarks/results/cpu-<cpu-model>/`` (``cpu.json``, ``cpu.md``) with machine, method, command
and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# issue 15's table: (N, D, V), fp32
CPU_SHAPES = [(1024, 512, 32000), (4096, 512, 32000), (4096, 512, 128000)]
CPU_IMPLS = ("torch", "liger", "trl_fused", "ours")
CPU_OPS = ("loss", "stats_fwd_bwd", "stats_fwd", "divergence_fwd_bwd", "divergence_fwd")
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def cpu_slug() -> str:
    return "cpu-" + (re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or "unknown")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _inputs(num_rows: int, dim: int, vocab: int):
    """One completion batch of 8 rows x N/8 tokens, every token a completion token (so that every
    impl does the same FLOPs), fp32."""
    from benchmarks.impls import Inputs, reference_logprobs

    generator = torch.Generator().manual_seed(0)
    batch, length = 8, num_rows // 8
    hidden = torch.randn(batch, length, dim, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) * 0.02).requires_grad_()
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    advantages = torch.randn(batch, generator=generator)
    current = reference_logprobs(hidden.detach(), weight.detach(), ids, max_chunk_bytes=64 << 20)
    old = current + 0.05 * torch.randn(batch, length, generator=generator)
    ref = current + 0.1 * torch.randn(batch, length, generator=generator)
    return Inputs(hidden, weight, ids, mask, advantages, old, ref, current)


def worker(impl_name: str, num_rows: int, dim: int, vocab: int, runs: int, op: str = "loss") -> dict:
    """One (impl, shape, op) in this (fresh) process: peak RSS of the first step, then timed steps."""
    from benchmarks import heads
    from benchmarks.impls import build_impls

    if op == "loss":
        (impl,) = build_impls(torch.device("cpu"), names=(impl_name,))
    else:
        (impl,) = heads.build_head_impls(torch.device("cpu"), names=(impl_name,))
    record = {"impl": impl_name, "op": op, "N": num_rows, "D": dim, "V": vocab, "threads": torch.get_num_threads(),
              "version": impl.version}
    if impl.skip_reason:
        return {**record, "status": f"skipped: {impl.skip_reason}"}
    inputs = _inputs(num_rows, dim, vocab)
    params = [inputs.hidden, inputs.lm_head_weight]
    needs_grad = op == "loss" or heads.HEAD_OPS[op][1]
    grad_bytes = sum(p.numel() * p.element_size() for p in params) if needs_grad else 0
    if op != "loss":
        heads.teacher_of(inputs)  # built before the measurement, as an input
        head_step = heads.head_step(impl, op, [inputs])

    def step():
        if op != "loss":
            return head_step(0)
        grads = torch.autograd.grad(impl.loss(inputs), params)
        return grads

    rss_before = _status_kib("VmRSS")
    _reset_high_water_mark()
    start = time.perf_counter()
    grads = step()
    first_s = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM") - rss_before
    del grads
    times = [first_s]
    for _ in range(runs - 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    timed = times[1:] or times  # the first step also pays first-touch page faults
    return {**record, "status": "ok", "s_median": statistics.median(timed), "s_first": first_s,
            "s_all": times, "peak_mib": peak_kib / 1024, "grads_mib": grad_bytes / 2**20,
            "peak_over_grads_mib": peak_kib / 1024 - grad_bytes / 2**20}


def _run_in_fresh_process(impl: str, shape, runs: int, timeout: float, op: str = "loss") -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_cpu", "--worker", impl, ",".join(map(str, shape)),
               "--runs", str(runs), "--worker-op", op]
    n, d, v = shape
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "op": op, "N": n, "D": d, "V": v, "status": f"error: over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:200]
        return {"impl": impl, "op": op, "N": n, "D": d, "V": v, "status": f"error: {tail}"}
    return json.loads(lines[-1])


def _cell(records: list[dict]) -> str:
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return records[0]["status"] if records else "-"
    times = [r["s_median"] for r in ok]
    peaks = [r["peak_mib"] for r in ok]
    return f"{_range(times, '{:.2f}')} s / {_range(peaks, '{:.0f}')} MiB"


def _range(values, fmt: str) -> str:
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def _matching(records, impl, shape, ok_only=False, op="loss"):
    return [r for r in records if r["impl"] == impl and (r["N"], r["D"], r["V"]) == tuple(shape)
            and r.get("op", "loss") == op and (r["status"] == "ok" or not ok_only)]


def _head_tables(records, environment) -> list[str]:
    """One table per head operation that was run: impls x shapes."""
    from benchmarks import heads

    lines = []
    for op in [op for op in CPU_OPS[1:] if any(r.get("op") == op for r in records)]:
        impls = [i for i in heads.HEAD_IMPLS if any(r.get("op") == op and r["impl"] == i for r in records)]
        lines += ["", f"## {op} (`benchmarks.heads`)", "", "| N, D, V | " + " | ".join(impls) + " |",
                  "|---|" + "---|" * len(impls)]
        for n, d, v in environment["shapes"]:
            lines.append(f"| {n}, {d}, {v} | " + " | ".join(_cell(_matching(records, impl, (n, d, v), op=op))
                                                            for impl in impls) + " |")
    return lines


def write_report(records: list[dict], environment: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cpu.json").write_text(json.dumps({"environment": environment, "records": records}, indent=1))
    impls = list(environment["impls"])
    with_loss = "loss" in environment.get("ops", ["loss"])
    lines = [
        "# CPU: fused linear + GRPO loss, forward + backward (fp32)" if with_loss else
        "# CPU: the head operations of issue 19 (fp32)",
        "",
        f"Machine: {environment['cpu']}, {environment['cores']} cores, torch {environment['torch']} "
        f"({environment['threads']} threads); load average before the run {environment['loadavg_before']}, "
        f"after {environment['loadavg_after']}.",
        f"Date: {environment['date']}. Command: `{environment['command']}`.",
        "",
        ("Method: loss dapo, beta 0.04, epsilon 0.2/0.2, temperature 1 (Liger's defaults), every token a "
         "completion token; `torch.autograd.grad(loss, [hidden, weight])`. " if with_loss else
         "Method: `benchmarks.heads` (every token a completion token; the forward + backward ops take "
         "`torch.autograd.grad` of their loss w.r.t. hidden and the LM head). ")
        + "Each (impl, shape) in a fresh "
        "process; peak = VmHWM - VmRSS before the first step, the high-water mark reset just before it "
        "(/proc/self/clear_refs 5): RSS above the inputs, including the two gradients returned. Time: "
        f"median of the steps after the first, or the first when only one ran ({environment['runs']} "
        "steps per process). "
        f"{environment['repeats']} repetition(s), each in new processes; a range is min-max over them.",
    ]
    if not with_loss:
        lines += _head_tables(records, environment)
        path = out_dir / "cpu.md"
        path.write_text("\n".join(lines) + "\n")
        return path
    lines += [
        "",
        "| N, D, V | " + " | ".join(impls) + " | ours: peak over grads |",
        "|---|" + "---|" * (len(impls) + 1),
    ]
    for n, d, v in environment["shapes"]:
        cells = [_cell(_matching(records, impl, (n, d, v))) for impl in impls]
        ours = _matching(records, "ours", (n, d, v), ok_only=True)
        over = (f"{_range([r['peak_over_grads_mib'] for r in ours], '{:.0f}')} MiB "
                f"(grads {ours[0]['grads_mib']:.0f} MiB)") if ours else "-"
        lines.append(f"| {n}, {d}, {v} | " + " | ".join(cells) + f" | {over} |")
    ratio_lines = []
    for n, d, v in environment["shapes"]:
        def median_time(impl):
            ok = [r["s_median"] for r in _matching(records, impl, (n, d, v), ok_only=True)]
            return statistics.median(ok) if ok else None
        ours, eager = median_time("ours"), median_time("torch")
        if ours and eager:
            ratio_lines.append(f"- {n}, {d}, {v}: ours / eager = {ours / eager:.2f} (medians over repetitions)")
    lines += ["", *ratio_lines, ""]
    skipped = sorted({f"{r['impl']}: {r['status']}" for r in records if r["status"].startswith("skipped")})
    lines += [f"- {s}" for s in skipped]
    lines += _head_tables(records, environment)
    path = out_dir / "cpu.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the CPU table and write it into benchmarks/results/")
    parser.add_argument("--impls", nargs="+", default=list(CPU_IMPLS), choices=CPU_IMPLS)
    parser.add_argument("--ops", nargs="+", default=["loss"], choices=CPU_OPS,
                        help="the fused loss (default) and/or issue 19's head operations (for ours, trl_fused and "
                             "torch: the --impls among them)")
    parser.add_argument("--shapes", nargs="+", default=None, help="N,D,V triples (default: issue 15's three)")
    parser.add_argument("--runs", type=int, default=2, help="steps per process (the first gives the peak)")
    parser.add_argument("--peer-runs", type=int, default=None,
                        help="steps per process for liger and trl_fused (default: --runs)")
    parser.add_argument("--append", action="store_true",
                        help="add to the results folder's cpu.json instead of replacing it")
    parser.add_argument("--repeats", type=int, default=1, help="repetitions of the whole table")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/cpu-<model>)")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "N,D,V"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-op", default="loss", choices=CPU_OPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        impl, shape = args.worker
        print(json.dumps(worker(impl, *map(int, shape.split(",")), runs=max(1, args.runs), op=args.worker_op)),
              flush=True)
        return
    if not args.cpu:
        parser.error("pass --cpu to run the CPU benchmark (it takes minutes)")
    shapes = [tuple(map(int, s.split(","))) for s in args.shapes] if args.shapes else CPU_SHAPES
    environment = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.bench_cpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "loadavg_before": " ".join(f"{x:.1f}" for x in os.getloadavg()), "impls": args.impls,
        "shapes": shapes, "repeats": args.repeats,
        "runs": f"{args.runs}" + (f" (liger, trl_fused: {args.peer_runs})" if args.peer_runs else ""),
    }
    from benchmarks.heads import HEAD_IMPLS

    environment["ops"] = args.ops
    records = []
    for repeat in range(args.repeats):
        for shape in shapes:
            for op in args.ops:
                for impl in args.impls:
                    if op != "loss" and impl not in HEAD_IMPLS:
                        continue
                    runs = args.runs if impl in ("torch", "ours") or args.peer_runs is None else args.peer_runs
                    record = _run_in_fresh_process(impl, shape, runs, args.timeout, op=op)
                    record["repeat"] = repeat
                    records.append(record)
                    result = record["status"]
                    if result == "ok":
                        result = (f"{record['s_median']:.2f} s, peak {record['peak_mib']:.0f} MiB "
                                  f"(grads {record['grads_mib']:.0f})")
                    print(f"[bench_cpu] {op} {impl:9s} N={shape[0]} D={shape[1]} V={shape[2]}: {result}", flush=True)
    environment["loadavg_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    out_dir = args.out or RESULTS / cpu_slug()
    if args.append and (out_dir / "cpu.json").exists():
        previous = json.loads((out_dir / "cpu.json").read_text())
        records = previous["records"] + records
        old = previous["environment"]
        environment = {
            **environment,
            "command": f"{old['command']}; then {environment['command']}",
            "date": f"{old['date']} and {environment['date']}",
            "loadavg_before": f"{old['loadavg_before']}; {environment['loadavg_before']}",
            "loadavg_after": f"{old['loadavg_after']}; {environment['loadavg_after']}",
            "impls": [i for i in CPU_IMPLS if i in set(old["impls"]) | set(environment["impls"])],
            "shapes": [tuple(s) for s in old["shapes"]] + [s for s in environment["shapes"]
                                                            if list(s) not in old["shapes"]],
            "runs": f"{old['runs']}; {environment['runs']}",
        }
    path = write_report(records, environment, out_dir)
    print(f"[bench_cpu] wrote {path}")


if __name__ == "__main__":
    main()
