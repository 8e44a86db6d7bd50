"""Benchmark of the fused log-prob kernel alone (issue: foundation), on a CUDA GPU.

    python -m benchmarks.bench_logprobs [--N 16384 --D 4096 --V 151936 --dtype bf16]

Measures, in one run and on the same inputs, forward+backward of
  - ours:   grpo_kernels.token_logprobs: the default (workspace) backward, the atomic backward's
            single pass (backward="atomic", exact=False), and that with CCE-style gradient filtering,
  - cce:    cut_cross_entropy.linear_cross_entropy(..., reduction="none") (if installed),
  - torch:  materialized logits, float32 log_softmax + gather (if it fits in memory),
and the bf16 matmul rate of one [N, D] x [D, V] product, to put the kernel against its floor:
forward+backward must do 4 matmuls of 2*N*D*V FLOPs (logits, their recompute, d hidden, d weight).

Timing, peak memory, OOM and errors go through benchmarks.measure (the suite's): peak memory is
torch.cuda.max_memory_allocated around one warm forward+backward minus what was allocated before
(the inputs), in a separate run per implementation; an OOM or an error (e.g. CCE's backward on
fp32) is recorded as the result, not a crash. Results go to
benchmarks/results/<gpu-name>/logprobs.{json,md} with the device, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

from benchmarks.measure import device_slug, measure

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 2**20


def _make_inputs(n, d, v, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (torch.randn(n, d, device="cuda", generator=gen) ).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=gen) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    grad_out = torch.randn(n, device="cuda", generator=gen)
    return hidden, weight, targets, grad_out


def _impls():
    import grpo_kernels as gk

    impls = {
        # default: workspace backward (d logits + cuBLAS GEMMs, no atomics), fp32 accumulation, 4 matmuls
        "ours": lambda h, w, t: gk.token_logprobs(h, w, t),
        # the atomic backward: single pass, d weight accumulated in bf16 (CCE's scheme), 4 matmuls
        "ours_fast": lambda h, w, t: gk.token_logprobs(h, w, t, backward="atomic", exact=False),
        # + CCE-style gradient filtering (CCE's default eps for bf16)
        "ours_fast_filtered": lambda h, w, t: gk.token_logprobs(h, w, t, backward="atomic", exact=False,
                                                                filter_eps=2.0**-12),
    }
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cce"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
    except ImportError:
        print("skip cce: cut-cross-entropy is not installed (pip install cut-cross-entropy)")

    def materialized(h, w, t):
        logits = (h @ w.t()).float()
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)

    impls["torch"] = materialized
    return impls


def _make_step(fn, input_sets):
    """Forward + backward on input set ``i``; the gradients are returned (counted in the peak)
    and freed by the caller, so no step starts with the previous step's gradients allocated."""

    def step(i):
        hidden, weight, targets, grad_out = input_sets[i % len(input_sets)]
        return torch.autograd.grad(fn(hidden, weight, targets), [hidden, weight], grad_out)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, default=16384)
    parser.add_argument("--D", type=int, default=4096)
    parser.add_argument("--V", type=int, default=151936)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--out", default=None, help="results dir (default benchmarks/results/<gpu>)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_logprobs needs a CUDA GPU; nothing measured.", file=sys.stderr)
        return 2

    n, d, v, dtype = args.N, args.D, args.V, DTYPES[args.dtype]
    gpu = torch.cuda.get_device_name()
    grad_bytes = (n * d + v * d) * torch.finfo(dtype).bits // 8
    memory_budget_mib = grad_bytes / MIB + 64

    # The floor: 4 matmuls of 2NDV FLOPs at the measured matmul rate.
    a = torch.randn(n, d, device="cuda", dtype=dtype)
    b = torch.randn(d, v, device="cuda", dtype=dtype)
    import triton.testing

    matmul_ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=1000, return_mode="median")
    matmul_tflops = 2 * n * d * v / matmul_ms / 1e9
    floor_ms = 4 * matmul_ms
    del a, b

    records = []
    input_sets = [_make_inputs(n, d, v, dtype, seed=s) for s in range(2)]  # rotated: no cache flattery
    for name, fn in _impls().items():
        m = measure(_make_step(fn, input_sets), len(input_sets), torch.device("cuda"), min_runs=10)
        record = {"impl": name, "N": n, "D": d, "V": v, "dtype": args.dtype, "status": m.status,
                  "peak_mb_above_inputs": m.peak_mb}
        if m.status == "ok":
            record.update(ms_median=round(m.ms_median, 3), ms_p20=round(m.ms_p20, 3), ms_p80=round(m.ms_p80, 3),
                          x_floor=round(m.ms_median / floor_ms, 3))
            record["peak_mb_above_inputs"] = round(m.peak_mb, 1)
        records.append(record)
        print(record, flush=True)

    meta = {
        "device": gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench_logprobs " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__,
        "matmul_ms": round(matmul_ms, 3),
        "matmul_tflops": round(matmul_tflops, 1),
        "floor_ms_4_matmuls": round(floor_ms, 3),
        "memory_budget_mib (grad(hidden)+grad(weight)+64MiB)": round(memory_budget_mib, 1),
    }
    out_dir = args.out or os.path.join(os.path.dirname(__file__), "results", device_slug(torch.device("cuda")))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "logprobs.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=2)
    lines = [f"# token_logprobs forward+backward, {gpu}", "", *(f"- {k}: {val}" for k, val in meta.items()), "",
             "| impl | ms median (p20-p80) | x floor | peak MiB above inputs | status |", "|---|---|---|---|---|"]
    for r in records:
        timing = f"{r['ms_median']} ({r['ms_p20']}-{r['ms_p80']})" if r.get("status") == "ok" else "-"
        lines.append(f"| {r['impl']} | {timing} | {r.get('x_floor', '-')} | {r.get('peak_mb_above_inputs', '-')} | "
                     f"{r['status']} |")
    with open(os.path.join(out_dir, "logprobs.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
