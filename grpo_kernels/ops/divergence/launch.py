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

from grpo_kernels.ops.logprobs.launch import INTERPRETER_CONFIG, LaunchConfig, dot_precision, forward_splits

__all__ = ["GPU_CONFIG", "BLOCK_D", "launch_config", "head_block_d", "dot_precision", "forward_splits"]

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
