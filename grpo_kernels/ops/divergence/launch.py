"""Launch configuration of the divergence kernels: one table and the functions that read it,
shared by the drivers, the sm_90 compile specs and the cost model (plain Python on shapes and
dtypes, no tensors).

The tiles depend on both heads' dtypes (see ``GPU_CONFIG``): two heads' tiles live on chip at
once (the teacher's accumulator next to the student's transformed tile), so they are smaller
than the log-prob kernels'; every configuration compiles for sm_90 without a register spill,
aligned or not (``specs``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from grpo_kernels.ops.logprobs.launch import (
    INTERPRETER_CONFIG,
    LaunchConfig,
    backward_plan,
    dot_precision,
    forward_splits,
)

__all__ = ["GPU_CONFIG", "DTYPE_PAIRS", "launch_config", "dot_precision", "forward_splits", "CostModel", "cost_model"]

# Tiles by the heads' dtypes; BLOCK_D is both heads' step along their hidden dimension. Both heads
# 16-bit: [128, 64] tiles at 8 warps (32 float32 registers per tile and thread, two heads' tiles
# live at once: half the log-prob kernels' [128, 128]), BLOCK_D 32 (64, the log-prob kernels',
# spills 400-760 B where no argument is 16-divisible; the MACs per loaded element are set by the
# [BLOCK_N, BLOCK_V] tile either way), three stages. A float32 head (an IEEE float32 dot: FMA,
# operands in registers) next to the other: [64, 32] tiles at 4 warps and no software pipelining;
# with more, ptxas spills 12-900 B where no argument is 16-divisible (odd D or strides), and the
# FMA dot, not the pipeline, bounds the speed there.
_SIXTEEN_BIT = LaunchConfig(128, 64, 32, 8, 3)
_WITH_FLOAT32 = LaunchConfig(64, 32, 32, 4, 1)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (student dtype, teacher dtype) pairs; None: no teacher tile (the top-k forms' student-only kernels)
DTYPE_PAIRS = [(s, t) for s in _DTYPES for t in (None, *_DTYPES)]


def _tiles(student: torch.dtype, teacher: torch.dtype | None) -> LaunchConfig:
    return _WITH_FLOAT32 if torch.float32 in (student, teacher) else _SIXTEEN_BIT


GPU_CONFIG: dict[str, dict[tuple, LaunchConfig]] = {
    # the forward (online statistics of both heads) and the JSD's second pass: BLOCK_N rows x one
    # vocabulary split per program, looping over its BLOCK_V tiles
    "fwd": {pair: _tiles(*pair) for pair in DTYPE_PAIRS},
    "jsd": {pair: _tiles(*pair) for pair in DTYPE_PAIRS if pair[1] is not None},
    # the backward's d-logits kernel: one [BLOCK_N, BLOCK_V] tile per program
    "dlogits": {pair: _tiles(*pair) for pair in DTYPE_PAIRS},
    # the merge of the forward's splits and the ordered sum of the JSD's: rows per program only
    "merge": {pair: LaunchConfig(128, 1, 1, 4, 1) for pair in DTYPE_PAIRS},
}


def launch_config(kind: str, student_dtype: torch.dtype, teacher_dtype: torch.dtype | None,
                  device_type: str = "cuda") -> LaunchConfig:
    """The configuration of ``kind`` (a ``GPU_CONFIG`` key) for these heads' dtypes (``teacher_dtype``
    None: no teacher tile); under the interpreter (``device_type != "cuda"``) the log-prob
    package's small tiles."""
    if device_type != "cuda":
        return INTERPRETER_CONFIG
    return GPU_CONFIG[kind][(student_dtype, teacher_dtype)]


class CostModel(NamedTuple):
    """What one forward + backward of :func:`grpo_kernels.fused_divergence` costs, from the launch
    plan (a model, not a measurement)."""

    matmul_flops: int  # every [rows x D] @ [D x V] product, forward, recomputes and gradient GEMMs
    forward_partial_bytes: int  # float32 per-split states (and the JSD's per-split sums)
    workspace_bytes: int  # the backward's d-logits buffer (logprobs.launch.backward_plan)
    accumulator_bytes: int  # the backward's float32 d-hidden (and d-bias) accumulators
    dlogits_traffic_bytes: int  # d logits written once, read by both gradient GEMMs
    accumulator_traffic_bytes: int  # the float32 d-hidden accumulator's read + write per vocabulary chunk


def cost_model(num_rows: int, vocab: int, student_dim: int, teacher_dim: int, dtype: torch.dtype = torch.bfloat16,
               *, mode: str = "full", beta: float = 0.0, workspace_bytes: int | None = None) -> CostModel:
    """The modelled cost of ``num_rows`` active rows (all contiguous, both heads ``dtype``, on a GPU).

    Matmuls, in units of ``2 N V D``: ``"full"``: forward ``D_s + D_t`` (both heads' tiles), a
    JSD's second pass again ``D_s + D_t``, backward ``D_s + D_t`` (recompute) ``+ 2 D_s`` (d hidden,
    d weight); ``"teacher_topk"``: ``D_s`` forward, ``3 D_s`` backward; ``"student_topk"``: the
    top-k selection ``D_s``, then ``D_s + D_t`` forward and ``3 D_s`` backward.
    """
    per_dim = 2 * num_rows * vocab
    jsd = mode == "full" and 0.0 < beta < 1.0
    student_units = {"full": 4 + jsd, "teacher_topk": 4, "student_topk": 5}[mode]
    teacher_units = {"full": 2 + jsd, "teacher_topk": 0, "student_topk": 1}[mode]
    _, splits = forward_splits(num_rows, vocab, dtype)
    states = 7 if mode != "teacher_topk" else 3
    teacher_dtype = None if mode == "teacher_topk" else dtype
    plan = backward_plan(num_rows, vocab, student_dim, dtype, workspace_bytes,
                         tiles=GPU_CONFIG["dlogits"][(dtype, teacher_dtype)][:2])
    elem = torch.empty(0, dtype=dtype).element_size()
    vocab_chunks = -(-vocab // plan.ids_per_chunk)
    return CostModel(
        matmul_flops=per_dim * (student_units * student_dim + teacher_units * teacher_dim),
        forward_partial_bytes=4 * num_rows * splits * (states + 2 * jsd),
        workspace_bytes=plan.workspace_bytes,
        accumulator_bytes=plan.accumulator_bytes,
        dlogits_traffic_bytes=3 * num_rows * vocab * elem,
        accumulator_traffic_bytes=8 * num_rows * student_dim * vocab_chunks,
    )
