"""Timing and peak memory of one step, with out-of-memory recorded instead of raised.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run) after a warm-up,
with at least ``min_runs`` timed runs; the step cycles through several input sets so that no
run finds its inputs in cache from the previous one. Peak memory comes from a separate run:
``torch.cuda.max_memory_allocated`` minus what was allocated before the step (the inputs).

CPU (smoke only): ``time.perf_counter`` around each run; no memory figure.
"""

from __future__ import annotations

import gc
import itertools
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Measurement:
    status: str  # "ok", "OOM" or "error: <message>"
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    runs: int | None = None
    peak_mb: float | None = None


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release_memory(device: torch.device, *, collect: bool = False) -> None:
    """Return cached GPU blocks; ``collect`` also runs the garbage collector (needed after an
    exception, whose traceback keeps tensors alive in reference cycles; slow with big heaps)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _failure(exc: BaseException) -> Measurement:
    if is_out_of_memory(exc):
        return Measurement("OOM")
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return Measurement(f"error: {type(exc).__name__}: {first_line}")


def _quantile(sorted_values, q):
    index = (len(sorted_values) - 1) * q
    low, high = int(index), min(int(index) + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (index - low)


def peak_memory_mb(step: Callable[[int], object], device: torch.device) -> float:
    """Peak allocation of one warm ``step(0)`` above what is allocated before it, in MiB."""
    step(0)  # compile / autotune / first-call allocations happen here, not in the measured run
    release_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = step(0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / 2**20


def time_cuda(step, num_sets, *, min_runs=10, min_rep_ms=200.0, warmup_ms=50.0):
    counter = itertools.count()

    def run():
        return step(next(counter) % num_sets)

    import triton.testing

    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    rep_ms = max(min_rep_ms, min_runs * estimate_ms)
    median, p20, p80 = triton.testing.do_bench(run, warmup=max(warmup_ms, 2 * estimate_ms), rep=rep_ms,
                                               quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80, max(1, int(rep_ms / estimate_ms))


def time_cpu(step, num_sets, *, runs=2, warmup=1):
    for i in range(warmup):
        step(i % num_sets)
    samples = []
    for i in range(runs):
        begin = time.perf_counter()
        step(i % num_sets)
        samples.append((time.perf_counter() - begin) * 1e3)
    samples.sort()
    return statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), runs


def _guarded(fn: Callable[[], object], device: torch.device):
    """``(fn(), None)``, or ``(None, failed Measurement)`` on an OOM or error; cached memory is
    freed either way, after the exception (and the tensors its traceback holds) is gone."""
    try:
        value, failure = fn(), None
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash of the suite
        value, failure = None, _failure(exc)
    release_memory(device, collect=failure is not None)
    return value, failure


def measure(step: Callable[[int], object], num_sets: int, device: torch.device, *, min_runs: int = 10,
            cpu_runs: int = 2) -> Measurement:
    """Peak memory (GPU, separate run), then timing; an OOM or error in either is the result."""
    peak = None
    if device.type == "cuda":
        peak, failure = _guarded(lambda: peak_memory_mb(step, device), device)
        if failure is not None:
            return failure
        timing, failure = _guarded(lambda: time_cuda(step, num_sets, min_runs=min_runs), device)
    else:
        timing, failure = _guarded(lambda: time_cpu(step, num_sets, runs=cpu_runs), device)
    if failure is not None:
        return failure
    median, p20, p80, runs = timing
    return Measurement("ok", median, p20, p80, runs, peak)


def device_slug(device: torch.device) -> str:
    """Folder name of a device's results, e.g. ``nvidia-h100-80gb-hbm3``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def matmul_step(inputs):
    """The matmul floor: a bf16 ``[N, D] x [D, V]`` matmul in row chunks of at most 4 GiB of
    output, one call per input set (``step(i)``, cycling inputs as the measured ops do)."""
    hidden = [inp.hidden.detach().reshape(-1, inp.hidden.shape[-1]).to(torch.bfloat16) for inp in inputs]
    weight = [inp.lm_head_weight.detach().to(torch.bfloat16) for inp in inputs]
    rows, vocab = hidden[0].shape[0], weight[0].shape[0]
    chunk = max(1, min(rows, (4 << 30) // (2 * vocab)))
    out = torch.empty(chunk, vocab, dtype=torch.bfloat16, device=hidden[0].device)

    def step(i):
        for start in range(0, rows, chunk):
            h = hidden[i][start:start + chunk]
            torch.matmul(h, weight[i].t(), out=out[: h.shape[0]])
        return out

    return step
