"""A traffic and time model of the log-prob op (``token_logprobs``) on Hopper GPUs. A model, not a
measurement: no number it prints has been measured on a GPU.

    python -m grpo_kernels.ops.perf_model [--gpu h100] [--n 8192 16384 65536] [--d 4096] [--v 151936]
    python -m grpo_kernels.ops.perf_model --write-docs     # regenerate docs/performance.md's tables

From the launch configurations the library actually ships (read through :func:`_shipped_launch`,
never copied here) it computes, for every path of the op at a shape and a GPU:

- FLOPs: the matmuls the kernels and cuBLAS calls execute (tiles padded as launched);
- HBM bytes: compulsory reads and writes plus operand re-reads. For our Triton kernels the re-reads
  follow from the launch order: programs run in waves of ``SMs x CTAs/SM`` consecutive program ids
  (the hardware dispatches blocks in id order), a wave's programs step through their vocabulary
  tiles together, and every [rows, D] / [ids, D] operand block they touch goes through an LRU cache
  the size of L2. cuBLAS GEMMs are charged their compulsory traffic only (each operand read once);
- atomic and read-modify-write bytes: floating-point atomics (executed at L2, bounded by an L2
  atomic rate that NVIDIA does not document: an optimistic and a pessimistic value below) and the
  float32 accumulators that the workspace backward reads and writes back per chunk (HBM traffic);
- extra memory: what the path allocates beyond its inputs, outputs' gradients (d hidden, d weight)
  and the caller's tensors: workspaces, accumulators, partial states;
- a lower-bound time per kernel, ``max(compute, HBM, atomics)`` at sustained rates (``GEMM_SUSTAINED``
  of the dense peak with wave quantization for our kernels, ``HBM_SUSTAINED`` of the HBM peak),
  summed over the kernels of the path (no launch latency, perfect overlap inside a kernel).

Paths: the forward (which is also the no-grad pass: old / reference log-probs), the workspace
backward (issue #18's default: a d-logits kernel writes [rows, ids] d logits into a bounded
workspace, cuBLAS turns each chunk into d weight and a float32 d hidden accumulator; no atomics),
and the atomic backward (``backward="atomic"``, with ``exact=True``: two passes, five matmuls in
all; ``exact=False``: one pass, four).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from types import SimpleNamespace

import torch

MiB = 2**20
GiB = 2**30

# ---------------------------------------------------------------------------------------------
# GPUs and rates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """Peak rates from NVIDIA's H100/H200 SXM datasheets (dense, no sparsity); L2 as the CUDA
    device query reports it (50 MiB)."""

    name: str
    sms: int
    tensor_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    fp32_flops: float  # fp32 FMA (non-tensor) FLOP/s: float32 inputs use IEEE dots
    hbm_bytes_per_s: float
    l2_bytes: int
    # Floating-point atomics are executed at L2. NVIDIA documents no rate for them; the project's
    # static sm_90 analysis (issue #18) bounds it between half and all of an L2 read bandwidth of
    # about 5.5 TB/s. The lower-bound times take the optimistic value.
    l2_atomic_bytes_per_s: float = 5.5e12


H100_SXM = GPU("H100 SXM", sms=132, tensor_flops=989.4e12, fp32_flops=66.9e12, hbm_bytes_per_s=3.35e12,
               l2_bytes=50 * MiB)
H200 = GPU("H200 SXM", sms=132, tensor_flops=989.4e12, fp32_flops=66.9e12, hbm_bytes_per_s=4.8e12,
           l2_bytes=50 * MiB)
GPUS = {"h100": H100_SXM, "h200": H200}

# Sustained fractions of peak that the time bound assumes.
GEMM_SUSTAINED = 0.70  # the yardstick: "the 4-GEMM floor at 70% of peak"
HBM_SUSTAINED = 0.90  # streaming copies reach ~90% of the HBM peak
ATOMIC_PESSIMISTIC = 0.5  # the pessimistic L2 atomic rate, as a fraction of the optimistic one

# Resident CTAs per SM of our log-prob kernels at their shipped bf16 tiles: 255 registers x 256
# threads fill the register file (the sm_90 check's table; tests/test_compile_sm90.py compares).
CTAS_PER_SM = 1

# ---------------------------------------------------------------------------------------------
# The launch interface (issue #18): the one place the model reads the shipped configuration
# ---------------------------------------------------------------------------------------------

def _shipped_launch() -> SimpleNamespace:
    """The launch interface of ``grpo_kernels.ops.logprobs.launch`` that the model reads:
    ``GPU_CONFIG`` (kinds ``fwd``, ``merge``, ``dlogits``, ``bwd_atomic``), ``FORWARD_GROUP_ROWS``,
    ``BACKWARD_GROUP_ROWS``, ``FORWARD_PARTIAL_BYTES``, ``INVARIANT_SPLIT_VOCAB``,
    ``DEFAULT_WORKSPACE_BYTES``, ``ATOMIC_GRAD_CHUNK_BYTES``, ``forward_splits``, ``backward_plan``.
    A namespace (not the module), so that a test can change one name and see the model follow."""
    from grpo_kernels.ops.logprobs import launch

    names = ("GPU_CONFIG", "FORWARD_GROUP_ROWS", "BACKWARD_GROUP_ROWS", "FORWARD_PARTIAL_BYTES",
             "INVARIANT_SPLIT_VOCAB", "DEFAULT_WORKSPACE_BYTES", "ATOMIC_GRAD_CHUNK_BYTES", "forward_splits",
             "backward_plan")
    return SimpleNamespace(**{name: getattr(launch, name) for name in names}, source="grpo_kernels.ops.logprobs.launch")


# ---------------------------------------------------------------------------------------------
# Operand re-reads: launch order -> L2 (LRU) -> HBM bytes
# ---------------------------------------------------------------------------------------------


def row_fastest_order(row_blocks: int, col_groups: int):
    """A 2-D grid (row blocks, columns) with the row-block index fastest: the forward before issue #18."""
    return [(r, c) for c in range(col_groups) for r in range(row_blocks)]


def grouped_order(row_blocks: int, col_groups: int, group_rows: int):
    """Groups of ``group_rows`` row blocks; inside a group the row block varies fastest, then the
    column (vocabulary split or tile): every column's weight is read while the group's hidden
    blocks sit in L2 (the kernels' ``_grouped_tile``)."""
    order = []
    for first in range(0, row_blocks, group_rows):
        rows = range(first, min(first + group_rows, row_blocks))
        order += [(r, c) for c in range(col_groups) for r in rows]
    return order


@dataclass(frozen=True)
class Operand:
    """A tensor the programs touch in blocks: ``key`` is "row" (indexed by the row block) or "col"
    (by the vocabulary tile); ``rmw`` accumulators are read and written back on a miss."""

    name: str
    block_bytes: int
    key: str
    rmw: bool = False


def simulate_l2(order, col_tiles, operands, concurrency: int, capacity: int) -> dict:
    """HBM bytes per operand when programs ``order`` [(row block, column)] run in waves of
    ``concurrency``; program (r, c) steps through the vocabulary tiles ``col_tiles[c]`` (a range),
    and at each step touches every operand's block (row operands: block r; column operands: the
    tile). LRU over whole blocks, ``capacity`` bytes; an accumulator miss costs a read and a write.
    Dirty accumulator blocks still cached at the end are written back."""
    cache: OrderedDict = OrderedDict()
    used = 0
    misses = {op.name: 0 for op in operands}
    sizes = {op.name: op.block_bytes for op in operands}
    rmw = {op.name for op in operands if op.rmw}
    for start in range(0, len(order), concurrency):
        wave = order[start:start + concurrency]
        steps = max(len(col_tiles[c]) for _, c in wave)
        for t in range(steps):
            keys = {}
            for r, c in wave:
                if t >= len(col_tiles[c]):
                    continue
                tile = col_tiles[c][t]
                for op in operands:
                    keys[(op.name, r if op.key == "row" else tile)] = None
            for key in keys:
                if key in cache:
                    cache.move_to_end(key)
                    continue
                size = sizes[key[0]]
                misses[key[0]] += size * (2 if key[0] in rmw else 1)
                cache[key] = size
                used += size
                while used > capacity:
                    _, evicted = cache.popitem(last=False)
                    used -= evicted
    return misses


@lru_cache(maxsize=256)
def _tiled_traffic(row_blocks, cols, tiles_per_col, last_col_tiles, group_rows, operands, concurrency, capacity):
    """Cached :func:`simulate_l2` of one launch (``group_rows`` None: row-fastest 2-D grid)."""
    col_tiles = [range(c * tiles_per_col, c * tiles_per_col + (last_col_tiles if c == cols - 1 else tiles_per_col))
                 for c in range(cols)]
    order = (row_fastest_order(row_blocks, cols) if group_rows is None
             else grouped_order(row_blocks, cols, group_rows))
    return simulate_l2(order, col_tiles, operands, concurrency, capacity)


# ---------------------------------------------------------------------------------------------
# Kernels and paths
# ---------------------------------------------------------------------------------------------


@dataclass
class Kernel:
    """One kernel (or a set of identical launches) of a path."""

    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    atomic_bytes: float = 0.0  # floating-point atomic adds (at L2)
    rmw_bytes: float = 0.0  # float32 accumulator read-modify-write through HBM (part of hbm_bytes)
    program_flops: float = 0.0  # largest program's FLOPs (our kernels: wave quantization); 0: cuBLAS
    rereads: dict = field(default_factory=dict)  # operand -> HBM bytes / operand bytes
    launches: int = 1

    def times(self, gpu: GPU, rate: float) -> dict:
        """Seconds per bound (compute, hbm, atomic), the compute one wave-quantized."""
        compute = self.flops / (rate * GEMM_SUSTAINED)
        if self.program_flops and self.flops:
            concurrency = gpu.sms * CTAS_PER_SM
            programs = self.flops / self.program_flops / self.launches
            waves = math.ceil(programs / concurrency - 1e-9)
            compute *= waves * concurrency / programs
        return {"compute": compute, "hbm": self.hbm_bytes / (gpu.hbm_bytes_per_s * HBM_SUSTAINED),
                "atomic": self.atomic_bytes / gpu.l2_atomic_bytes_per_s}

    def time(self, gpu: GPU, rate: float, atomic_fraction: float = 1.0) -> float:
        t = self.times(gpu, rate)
        return max(t["compute"], t["hbm"], t["atomic"] / atomic_fraction)


@dataclass
class Path:
    name: str
    kernels: list
    extra_bytes: float  # peak memory above inputs, gradients and caller tensors
    notes: str = ""

    def sum(self, attr):
        return sum(getattr(k, attr) for k in self.kernels)

    def time(self, gpu, rate, atomic_fraction=1.0):
        return sum(k.time(gpu, rate, atomic_fraction) for k in self.kernels)


@dataclass(frozen=True)
class Shape:
    num_rows: int
    dim: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def gemm_flops(self) -> float:
        """One [N, D] x [D, V] matmul."""
        return 2.0 * self.num_rows * self.dim * self.vocab


def _rate(gpu: GPU, dtype) -> float:
    return gpu.fp32_flops if dtype == torch.float32 else gpu.tensor_flops


def _cdiv(a, b):
    return -(-a // b)


def _row_vectors_bytes(num_rows: int) -> int:
    # O(N) float32 state: log-probs, lse, entropy, target logits, the backward's compacted row
    # index, lse, mean logit and incoming gradients: ~8 vectors of N.
    return 8 * 4 * num_rows


def _launch_traffic(shape, gpu, config, rows, ids, group_rows, tiles_per_col, extra_operands=()):
    """HBM bytes per operand of one grid of (row block, column) programs over ``rows`` x ``ids``."""
    block_n, block_v = config.block_n, config.block_v
    row_blocks, tiles = _cdiv(rows, block_n), _cdiv(ids, block_v)
    cols = _cdiv(tiles, tiles_per_col)
    operands = (Operand("hidden", block_n * shape.dim * shape.elem, "row"),
                Operand("weight", block_v * shape.dim * shape.elem, "col")) + tuple(extra_operands)
    last = tiles - (cols - 1) * tiles_per_col
    return _tiled_traffic(row_blocks, cols, tiles_per_col, last, group_rows, operands,
                          gpu.sms * CTAS_PER_SM, gpu.l2_bytes)


def _rereads(traffic, shape, rows, ids):
    sizes = {"hidden": rows * shape.dim * shape.elem, "weight": ids * shape.dim * shape.elem}
    return {name: traffic[name] / sizes[name] for name in ("hidden", "weight")}


def forward_path(shape: Shape, gpu: GPU, launch=None, group_rows="shipped") -> Path:
    """The forward kernel (one program per row block x vocabulary split, every split's tiles in
    turn; rows in chunks whose per-split partial states fit ``FORWARD_PARTIAL_BYTES``) and the merge
    of the split partials. ``group_rows``: "shipped" (the interface's ``FORWARD_GROUP_ROWS``) or
    None (row-block-fastest 2-D grid, the forward before issue #18)."""
    launch = launch or _shipped_launch()
    config = launch.GPU_CONFIG["fwd"][shape.dtype]
    group = launch.FORWARD_GROUP_ROWS if group_rows == "shipped" else group_rows
    per_split, splits = launch.forward_splits(shape.num_rows, shape.vocab, shape.dtype, device_type="cuda",
                                              batch_invariant=True, num_sms=gpu.sms)
    tiles_per_split = per_split // config.block_v
    # the driver's row chunks: 3 float32 partial states per row and split
    row_chunk = max(config.block_n, launch.FORWARD_PARTIAL_BYTES // (12 * splits) // config.block_n * config.block_n)
    tile_flops = 2.0 * config.block_n * config.block_v * shape.dim
    tiles = _cdiv(shape.vocab, config.block_v)
    fwd = Kernel("forward kernel", program_flops=tiles_per_split * tile_flops, launches=0)
    rereads = {"hidden": 0.0, "weight": 0.0}
    for rows, count in _chunk_sizes(shape.num_rows, row_chunk):
        traffic = _launch_traffic(shape, gpu, config, rows, shape.vocab, group, tiles_per_split)
        fwd.launches += count
        fwd.flops += count * _cdiv(rows, config.block_n) * tiles * tile_flops
        fwd.hbm_bytes += count * (sum(traffic.values()) + 12 * rows * splits)
        for name, factor in _rereads(traffic, shape, shape.num_rows, shape.vocab).items():
            rereads[name] += count * factor
    fwd.hbm_bytes += 8 * shape.num_rows  # targets in, target logits out
    fwd.rereads = rereads
    merge = Kernel("merge of split partials", hbm_bytes=12 * shape.num_rows * splits + 8 * shape.num_rows)
    # one chunk's partial states, two while the next chunk's are allocated
    partials = 12 * min(shape.num_rows, row_chunk) * splits * (2 if shape.num_rows > row_chunk else 1)
    raster = "row-block fastest" if group is None else f"groups of {group} row blocks"
    return Path("forward", [fwd, merge], extra_bytes=partials + _row_vectors_bytes(shape.num_rows),
                notes=f"{splits} splits of {per_split} ids, raster: {raster}")


def workspace_backward_path(shape: Shape, gpu: GPU, launch=None, workspace_bytes=None) -> Path:
    """Vocabulary chunks outer, row chunks inner: the d-logits kernel writes [rows, ids] d logits
    (input dtype) into the workspace, then cuBLAS ``grad_weight[v0:v1] = dlogits.T @ hidden`` and
    ``grad_hidden_acc (float32) += dlogits @ W[v0:v1]``; at the end the accumulator is cast into d
    hidden. No atomics."""
    launch = launch or _shipped_launch()
    config = launch.GPU_CONFIG["dlogits"][shape.dtype]
    plan = launch.backward_plan(shape.num_rows, shape.vocab, shape.dim, shape.dtype, workspace_bytes)
    n, d, v, e = shape.num_rows, shape.dim, shape.vocab, shape.elem
    row_chunks, vocab_chunks = _cdiv(n, plan.rows_per_chunk), _cdiv(v, plan.ids_per_chunk)
    tile_flops = 2.0 * config.block_n * config.block_v * d

    # d-logits launches: one per (vocabulary chunk, row chunk); each full-size launch alike.
    dlogits = Kernel("d-logits kernel (recompute, store d logits)", launches=row_chunks * vocab_chunks,
                     program_flops=tile_flops)
    rereads = {"hidden": 0.0, "weight": 0.0}
    for rows, row_count in _chunk_sizes(n, plan.rows_per_chunk):
        for ids, id_count in _chunk_sizes(v, plan.ids_per_chunk):
            traffic = _launch_traffic(shape, gpu, config, rows, ids, launch.BACKWARD_GROUP_ROWS, 1)
            count = row_count * id_count
            programs = _cdiv(rows, config.block_n) * _cdiv(ids, config.block_v)
            dlogits.flops += count * programs * tile_flops
            dlogits.hbm_bytes += count * (sum(traffic.values()) + rows * ids * e)
            rereads["hidden"] += count * traffic["hidden"] / (n * d * e)
            rereads["weight"] += count * traffic["weight"] / (v * d * e)
    dlogits.rereads = rereads

    workspace_reads = n * v * e  # each GEMM reads every d logit once
    # Float32 accumulators: the first product is written, the later ones read-modify-written.
    # d weight: K = rows. One row chunk: each row written once in the weight's dtype; several
    # (16-bit weights): summed over the row chunks in a float32 [ids, D] buffer, then copied.
    weight_acc = row_chunks > 1 and shape.dtype != torch.float32
    weight_rmw = v * d * 4 * (2 * row_chunks - 1) if weight_acc else 0
    grad_weight = Kernel("d weight GEMMs (cuBLAS, dlogits^T @ hidden)", flops=2.0 * n * d * v,
                         hbm_bytes=workspace_reads + vocab_chunks * n * d * e + weight_rmw
                         + (v * d * (4 + e) if weight_acc else v * d * e),
                         rmw_bytes=weight_rmw)
    # d hidden: a float32 [N, D] accumulator (the gradient itself for float32 inputs).
    hidden_rmw = n * d * 4 * (2 * vocab_chunks - 1)
    grad_hidden = Kernel("d hidden GEMMs (cuBLAS addmm into float32)", flops=2.0 * n * d * v,
                         hbm_bytes=workspace_reads + row_chunks * v * d * e + hidden_rmw, rmw_bytes=hidden_rmw)
    zero = Kernel("zero d hidden, d weight (the op allocates them zeroed)", hbm_bytes=n * d * e + v * d * e)
    kernels = [zero, dlogits, grad_weight, grad_hidden]
    if shape.dtype != torch.float32:
        kernels.append(Kernel("d hidden accumulator -> input dtype", hbm_bytes=n * d * (4 + e)))
    extra = (plan.workspace_bytes + plan.accumulator_bytes + plan.gathered_hidden_bytes
             + _row_vectors_bytes(n))
    return Path("backward, workspace", kernels, extra_bytes=extra,
                notes=(f"{plan.rows_per_chunk} rows x {plan.ids_per_chunk} ids per chunk "
                       f"({row_chunks} x {vocab_chunks} chunks), workspace {plan.workspace_bytes / MiB:.0f} MiB, "
                       f"accumulators {plan.accumulator_bytes / MiB:.0f} MiB"))


def _chunk_sizes(total, chunk):
    """[(size, how many)] of ``total`` cut into ``chunk``-sized pieces."""
    full, rest = divmod(total, chunk)
    return [(chunk, full)] * (full > 0) + [(rest, 1)] * (rest > 0)


def atomic_backward_path(shape: Shape, gpu: GPU, launch=None, exact=True) -> Path:
    """The atomic backward (``backward="atomic"``): pass 1 over row chunks recomputes each logit tile
    and atomically adds ``d logits @ W`` into a float32 [rows, D] chunk buffer (and, ``exact=False``,
    ``d logits^T @ h`` into d weight in its dtype); with ``exact=True`` pass 2 over vocabulary chunks
    recomputes the logits again and atomically adds d weight into a float32 [ids, D] chunk buffer."""
    launch = launch or _shipped_launch()
    config = launch.GPU_CONFIG["bwd_atomic"][shape.dtype]
    n, d, v, e = shape.num_rows, shape.dim, shape.vocab, shape.elem
    chunk = launch.ATOMIC_GRAD_CHUNK_BYTES
    rows_per_chunk = max(config.block_n, chunk // (4 * d) // config.block_n * config.block_n)
    ids_per_chunk = max(config.block_v, chunk // (4 * d) // config.block_v * config.block_v)
    weight_in_pass_1 = not exact or shape.dtype == torch.float32
    tile_flops = 2.0 * config.block_n * config.block_v * d
    group = launch.BACKWARD_GROUP_ROWS
    kernels = [Kernel("zero d hidden, d weight (the op allocates them zeroed)", hbm_bytes=n * d * e + v * d * e)]

    dots = 3 if weight_in_pass_1 else 2
    pass1 = Kernel(f"pass 1: recompute + d hidden{' + d weight' if weight_in_pass_1 else ''} (atomics)",
                   program_flops=dots * tile_flops, launches=0)
    extra_ops = [Operand("grad_hidden_acc", config.block_n * d * 4, "row", rmw=True)]
    if weight_in_pass_1:
        extra_ops.append(Operand("grad_weight", config.block_v * d * e, "col", rmw=True))
    rereads = {"hidden": 0.0, "weight": 0.0}
    for rows, count in _chunk_sizes(n, rows_per_chunk):
        traffic = _launch_traffic(shape, gpu, config, rows, v, group, 1, tuple(extra_ops))
        programs = _cdiv(rows, config.block_n) * _cdiv(v, config.block_v)
        pass1.launches += count
        pass1.flops += count * programs * dots * tile_flops
        pass1.atomic_bytes += count * programs * (config.block_n * d * 4 + (config.block_v * d * e
                                                                             if weight_in_pass_1 else 0))
        # chunk buffer zeroed, then cast and copied into d hidden
        pass1.hbm_bytes += count * (sum(traffic.values()) + rows * d * 4 + rows * d * (4 + e))
        pass1.rmw_bytes += count * sum(traffic[op.name] for op in extra_ops)
        rereads["hidden"] += count * traffic["hidden"] / (n * d * e)
        rereads["weight"] += count * traffic["weight"] / (v * d * e)
    pass1.rereads = rereads
    kernels.append(pass1)
    if not weight_in_pass_1:
        pass2 = Kernel("pass 2: recompute + d weight (float32 atomics)", program_flops=2 * tile_flops, launches=0)
        op = Operand("grad_weight_acc", config.block_v * d * 4, "col", rmw=True)
        rereads = {"hidden": 0.0, "weight": 0.0}
        for ids, count in _chunk_sizes(v, ids_per_chunk):
            traffic = _launch_traffic(shape, gpu, config, n, ids, group, 1, (op,))
            programs = _cdiv(n, config.block_n) * _cdiv(ids, config.block_v)
            pass2.launches += count
            pass2.flops += count * programs * 2 * tile_flops
            pass2.atomic_bytes += count * programs * config.block_v * d * 4
            pass2.hbm_bytes += count * (sum(traffic.values()) + ids * d * 4 + ids * d * (4 + e))
            pass2.rmw_bytes += count * traffic[op.name]
            rereads["hidden"] += count * traffic["hidden"] / (n * d * e)
            rereads["weight"] += count * traffic["weight"] / (v * d * e)
        pass2.rereads = rereads
        kernels.append(pass2)
    # Two float32 chunk buffers at once (the next is allocated while the previous is referenced)
    # and the previous one's copy in the input dtype.
    extra = 2 * chunk + chunk * e // 4 + _row_vectors_bytes(n)
    name = "backward, atomic, exact=" + str(bool(exact))
    return Path(name, kernels, extra_bytes=extra,
                notes=f"{rows_per_chunk}-row / {ids_per_chunk}-id float32 chunk buffers, raster groups of {group}")


# ---------------------------------------------------------------------------------------------
# The model's table
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    path: str
    gemms: float
    flops: float
    hbm_gb: float
    atomic_gb: float
    rmw_gb: float
    extra_mib: float
    time_ms: float
    time_pessimistic_ms: float
    x_floor: float
    notes: str = ""


def model(shape: Shape, gpu: GPU = H100_SXM, launch=None, workspace_bytes=None) -> dict:
    """Every path at ``shape`` on ``gpu``: {"rows": [Row], "paths": {name: Path}, "floor_ms": {...}}."""
    launch = launch or _shipped_launch()
    rate = _rate(gpu, shape.dtype)
    one_gemm = shape.gemm_flops / (rate * GEMM_SUSTAINED)
    forward = forward_path(shape, gpu, launch)
    ungrouped = forward_path(shape, gpu, launch, group_rows=None)
    ungrouped.name = "forward, row-block-fastest raster (before issue #18)"
    backwards = [workspace_backward_path(shape, gpu, launch, workspace_bytes),
                 atomic_backward_path(shape, gpu, launch, exact=True),
                 atomic_backward_path(shape, gpu, launch, exact=False)]
    rows = []

    def add(name, paths, floor_gemms, extra, notes=""):
        kernels = [k for p in paths for k in p.kernels]
        whole = Path(name, kernels, extra)
        t = whole.time(gpu, rate) * 1e3
        rows.append(Row(name, whole.sum("flops") / shape.gemm_flops, whole.sum("flops"), whole.sum("hbm_bytes") / 1e9,
                        whole.sum("atomic_bytes") / 1e9, whole.sum("rmw_bytes") / 1e9, extra / MiB, t,
                        whole.time(gpu, rate, ATOMIC_PESSIMISTIC) * 1e3, t / (floor_gemms * one_gemm * 1e3), notes))

    add("no-grad pass = forward", [forward], 1, forward.extra_bytes, forward.notes)
    add(ungrouped.name, [ungrouped], 1, ungrouped.extra_bytes, ungrouped.notes)
    for backward in backwards:
        add(backward.name, [backward], 3, backward.extra_bytes, backward.notes)
    for backward in backwards:
        # peak: the forward's partial states are freed before the backward; its outputs live on
        add("fwd+bwd, " + backward.name.split(", ", 1)[1], [forward, backward], 4,
            max(forward.extra_bytes, backward.extra_bytes))
    return {"rows": rows, "paths": {p.name: p for p in [forward, ungrouped, *backwards]},
            "floor_ms": {"one GEMM": one_gemm * 1e3, "4 GEMMs": 4 * one_gemm * 1e3}, "launch_source": launch.source}


TARGETS_N = (8192, 16384)


def targets(gpu: GPU = H100_SXM, dim=4096, vocab=151936, dtype=torch.bfloat16, launch=None) -> list[dict]:
    """Issue #18's numbers, by the model: fwd+bwd <= 1.1x the 4-GEMM floor at 70% (N = 8192 and
    16384), the no-grad pass <= 1.05x one GEMM, forward HBM <= 12 GB at N=16384, no float atomics in
    the default backward, extra memory <= 512 MiB at N=16384 with the default workspace."""
    launch = launch or _shipped_launch()
    found = []
    for n in TARGETS_N:
        rows = {r.path: r for r in model(Shape(n, dim, vocab, dtype), gpu, launch)["rows"]}
        for path in ("fwd+bwd, workspace", "fwd+bwd, atomic, exact=True", "fwd+bwd, atomic, exact=False"):
            found.append({"target": f"N={n} {path} <= 1.1x the 4-GEMM floor", "value": rows[path].x_floor,
                          "limit": 1.1, "unit": "x"})
        forward = rows["no-grad pass = forward"]
        found.append({"target": f"N={n} no-grad pass <= 1.05x one GEMM", "value": forward.x_floor, "limit": 1.05,
                      "unit": "x"})
        if n == 16384:
            found.append({"target": "N=16384 forward HBM traffic <= 12 GB", "value": forward.hbm_gb, "limit": 12.0,
                          "unit": "GB"})
            found.append({"target": "N=16384 default backward: float atomics", "value":
                          rows["backward, workspace"].atomic_gb, "limit": 0.0, "unit": "GB"})
            found.append({"target": "N=16384 fwd+bwd extra memory (default workspace) <= 512 MiB",
                          "value": rows["fwd+bwd, workspace"].extra_mib, "limit": 512.0, "unit": "MiB"})
    for t in found:
        t["met"] = t["value"] <= t["limit"] + 1e-12
    return found


WORKSPACE_KNOB_MIB = (32, 64, 128, 256, 512, 1024)


def workspace_trade(shape: Shape, gpu: GPU = H100_SXM, launch=None) -> list[dict]:
    """fwd+bwd time and extra memory of the workspace backward per workspace size."""
    launch = launch or _shipped_launch()
    rate = _rate(gpu, shape.dtype)
    forward = forward_path(shape, gpu, launch)
    floor = 4 * shape.gemm_flops / (rate * GEMM_SUSTAINED)
    trade = []
    for mib in WORKSPACE_KNOB_MIB:
        backward = workspace_backward_path(shape, gpu, launch, mib * MiB)
        t = forward.time(gpu, rate) + backward.time(gpu, rate)
        trade.append({"workspace_mib": mib, "notes": backward.notes, "time_ms": t * 1e3, "x_floor": t / floor,
                      "rmw_gb": backward.sum("rmw_bytes") / 1e9,
                      "extra_mib": max(forward.extra_bytes, backward.extra_bytes) / MiB})
    return trade


FORWARD_GROUPS = (None, 4, 8, 16, 32, 64)


def forward_group_trade(shape: Shape, gpu: GPU = H100_SXM, launch=None) -> list[dict]:
    """Forward HBM traffic and time per raster group size (None: row-block fastest)."""
    launch = launch or _shipped_launch()
    rate = _rate(gpu, shape.dtype)
    trade = []
    for group in FORWARD_GROUPS:
        path = forward_path(shape, gpu, launch, group_rows=group)
        trade.append({"group_rows": group, "hbm_gb": path.sum("hbm_bytes") / 1e9,
                      "rereads": path.kernels[0].rereads, "time_ms": path.time(gpu, rate) * 1e3})
    return trade


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def shape_markdown(shape: Shape, gpu: GPU, launch=None) -> str:
    result = model(shape, gpu, launch)
    floor = result["floor_ms"]
    head = (f"**N={shape.num_rows}, D={shape.dim}, V={shape.vocab}, {str(shape.dtype)[6:]}, {gpu.name}** "
            f"(model). One GEMM 2NDV = {shape.gemm_flops / 1e12:.1f} TFLOP: {floor['one GEMM']:.1f} ms at "
            f"{GEMM_SUSTAINED:.0%} of peak; the 4-GEMM floor: {floor['4 GEMMs']:.1f} ms.")
    rows = [[r.path, f"{r.gemms:.2f}", f"{r.hbm_gb:.1f}", f"{r.atomic_gb:.0f}" if r.atomic_gb else "0",
             f"{r.rmw_gb:.1f}", f"{r.extra_mib:.0f}", f"{r.time_ms:.1f}"
             + (f" ({r.time_pessimistic_ms:.1f})" if r.time_pessimistic_ms > r.time_ms * 1.0005 else ""),
             f"{r.x_floor:.2f}", r.notes] for r in result["rows"]]
    table = _table(["path", "GEMMs", "HBM GB", "float atomics GB (L2)", "RMW GB", "extra MiB",
                    "lower bound ms (atomics at half rate)", "x floor", "launch"], rows)
    kernels = []
    for path in result["paths"].values():
        for k in path.kernels:
            if not k.flops and k.hbm_bytes < 1e8:
                continue
            times = k.times(gpu, _rate(gpu, shape.dtype))
            bound = max(times, key=times.get)
            rereads = ", ".join(f"{op} x{f:.1f}" for op, f in k.rereads.items()) or "-"
            kernels.append([path.name, k.name, k.launches, f"{k.flops / shape.gemm_flops:.2f}",
                            f"{k.hbm_bytes / 1e9:.1f}", rereads, f"{k.atomic_bytes / 1e9:.0f}" if k.atomic_bytes else "0",
                            f"{k.time(gpu, _rate(gpu, shape.dtype)) * 1e3:.1f}", bound])
    detail = _table(["path", "kernel", "launches", "GEMMs", "HBM GB", "operand reads from HBM (x its size)",
                     "float atomics GB", "ms", "bound"], kernels)
    return "\n\n".join([head, table, "Per kernel:", detail])


DEFAULT_SHAPES = (8192, 16384, 65536)


def report_markdown(gpu: GPU = H100_SXM, ns=DEFAULT_SHAPES, dim=4096, vocab=151936, dtype=torch.bfloat16) -> str:
    launch = _shipped_launch()
    parts = [f"Launch configuration read from: {launch.source}.", ""]
    for n in ns:
        parts += [shape_markdown(Shape(n, dim, vocab, dtype), gpu, launch), ""]
    trade_shape = Shape(16384, dim, vocab, dtype)
    trade = workspace_trade(trade_shape, gpu, launch)
    parts += [f"**The workspace knob** (`backward_plan(..., workspace_bytes)`), fwd+bwd at N=16384 on {gpu.name} "
              "(model):", "",
              _table(["workspace MiB", "chunks", "fwd+bwd ms", "x floor", "accumulator RMW GB", "extra MiB"],
                     [[t["workspace_mib"], t["notes"].split(", workspace")[0], f"{t['time_ms']:.1f}",
                       f"{t['x_floor']:.3f}", f"{t['rmw_gb']:.1f}", f"{t['extra_mib']:.0f}"] for t in trade]), ""]
    groups = forward_group_trade(trade_shape, gpu, launch)
    parts += [f"**The forward's raster group** (`FORWARD_GROUP_ROWS`, shipped: {launch.FORWARD_GROUP_ROWS}), forward "
              f"at N=16384 on {gpu.name} (model):", "",
              _table(["row blocks per group", "HBM GB", "hidden / weight read from HBM (x its size)", "ms"],
                     [["none (row-block fastest)" if g["group_rows"] is None else g["group_rows"],
                       f"{g['hbm_gb']:.1f}", f"x{g['rereads']['hidden']:.1f} / x{g['rereads']['weight']:.1f}",
                       f"{g['time_ms']:.1f}"] for g in groups]), ""]
    parts += [f"**Issue #18's numbers, by the model** ({gpu.name}):", "",
              _table(["target", "model", "met"],
                     [[t["target"], f"{t['value']:.{3 if t['unit'] == 'x' else 1}f} {t['unit']}",
                       "yes" if t["met"] else "**no**"] for t in targets(gpu, dim, vocab, dtype, launch)])]
    return "\n".join(parts).rstrip() + "\n"


DOCS_BEGIN = "<!-- model tables: generated by `python -m grpo_kernels.ops.perf_model --write-docs` -->"
DOCS_END = "<!-- end of generated model tables -->"
DOCS_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "performance.md")


def docs_markdown() -> str:
    return "\n".join([f"### {gpu.name}\n\n" + report_markdown(gpu, DEFAULT_SHAPES if key == "h100" else (16384,))
                      for key, gpu in GPUS.items()])


def docs_in_sync(path=DOCS_PATH, *, write=False) -> bool:
    """Whether ``path`` (docs/performance.md) holds :func:`docs_markdown` between the markers;
    with ``write``, make it so."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin, end = text.index(DOCS_BEGIN) + len(DOCS_BEGIN), text.index(DOCS_END)
    wanted = text[:begin] + "\n\n" + docs_markdown() + "\n" + text[end:]
    if write and wanted != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(wanted)
    return wanted == text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--write-docs", action="store_true", help="regenerate docs/performance.md's tables")
    args = parser.parse_args(argv)
    if args.write_docs:
        docs_in_sync(write=True)
        print(f"wrote {os.path.normpath(DOCS_PATH)}")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print("A MODEL, not a measurement: lower-bound times at sustained rates "
          f"(GEMMs {GEMM_SUSTAINED:.0%} of peak, HBM {HBM_SUSTAINED:.0%}).\n")
    print(report_markdown(GPUS[args.gpu], args.n, args.d, args.v, dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
