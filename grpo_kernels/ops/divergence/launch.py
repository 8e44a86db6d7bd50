"""Launch configuration of the divergence kernels: one table and the functions that read it,
shared by the drivers, the sm_90 compile specs and the cost model (plain Python on shapes and
dtypes, no tensors).

The tiles are the student's dtype's; each head's BLOCK_D is its own dtype's (a float32 teacher
next to a bf16 student gets the float32 step). Two heads' tiles live on chip at once (the
teacher's accumulator next to the student's transformed tile), so the tiles are half the
log-prob kernels' ``[128, 128]``: ``[128, 64]`` at 8 warps holds 32 float32 registers per
tile and thread.
"""

from __future__ import annotations

import torch

from typing import NamedTuple

from grpo_kernels.ops.logprobs.launch import (
    INTERPRETER_CONFIG,
    LaunchConfig,
    backward_plan,
    dot_precision,
    forward_splits,
)

__all__ = ["GPU_CONFIG", "BLOCK_D", "launch_config", "head_block_d", "dot_precision", "forward_splits", "CostModel",
           "cost_model"]

GPU_CONFIG: dict[str, dict[torch.dtype, LaunchConfig]] = {
    # forward (online statistics of both heads) and the JSD's second pass: BLOCK_N rows x one
    # vocabulary split per program, looping over its BLOCK_V tiles
    "fwd": {
        torch.bfloat16: LaunchConfig(128, 64, 64, 8, 3),
        torch.float16: LaunchConfig(128, 64, 64, 8, 3),
        torch.float32: LaunchConfig(64, 64, 32, 4, 2),
    },
    "jsd": {
        torch.bfloat16: LaunchConfig(128, 64, 64, 8, 3),
        torch.float16: LaunchConfig(128, 64, 64, 8, 3),
        torch.float32: LaunchConfig(64, 64, 32, 4, 2),
    },
    # the merge of the forward's splits and the ordered sum of the JSD's: rows per program only
    "merge": {dtype: LaunchConfig(128, 1, 1, 4, 1) for dtype in (torch.bfloat16, torch.float16, torch.float32)},
    # the backward's d-logits kernel: one [BLOCK_N, BLOCK_V] tile per program
    "dlogits": {
        torch.bfloat16: LaunchConfig(128, 64, 64, 8, 3),
        torch.float16: LaunchConfig(128, 64, 64, 8, 3),
        torch.float32: LaunchConfig(64, 64, 32, 4, 2),
    },
}
# A head's step along its hidden dimension, by its dtype (a float32 operand tile costs twice the
# shared memory of a 16-bit one).
BLOCK_D = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 32}


def launch_config(kind: str, student_dtype: torch.dtype, device_type: str = "cuda") -> LaunchConfig:
    """The configuration of ``kind`` (a ``GPU_CONFIG`` key) for a student of ``student_dtype``;
    under the interpreter (``device_type != "cuda"``) the log-prob package's small tiles."""
    if device_type != "cuda":
        return INTERPRETER_CONFIG
    return GPU_CONFIG[kind][student_dtype]


def head_block_d(dtype: torch.dtype, device_type: str = "cuda") -> int:
    """BLOCK_D of a head whose hidden states have ``dtype``."""
    return INTERPRETER_CONFIG.block_d if device_type != "cuda" else BLOCK_D[dtype]


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
    """The modelled cost of ``num_rows`` active rows (all contiguous, student ``dtype`` on a GPU).

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
    plan = backward_plan(num_rows, vocab, student_dim, dtype, workspace_bytes,
                         tiles=GPU_CONFIG["dlogits"][dtype][:2])
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
