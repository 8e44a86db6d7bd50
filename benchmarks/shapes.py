"""The shapes the suite measures: named LM heads, token counts, vocabulary sizes.

A shape is one micro-batch of ``B`` completions of ``T`` tokens (``N = B * T`` rows) through an
LM head ``[V, D]``. Completions come in groups of G = 8 or 16 per prompt; a micro-batch holds
whole groups except at the smallest N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# name -> (hidden size D, vocabulary V), from the models' published configs.
HEADS = {
    "qwen2.5-1.5b": (1536, 151936),
    "llama-3.1-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma-2-2b": (2304, 256000),
}

# N from 2k to 64k tokens as (B completions, T tokens each).
N_SWEEP = [(4, 512), (8, 512), (8, 1024), (16, 1024), (16, 2048), (16, 4096)]
QUICK_N_SWEEP = [(8, 512), (16, 1024), (16, 4096)]

# Vocabulary sweep at fixed N = 16 x 1024 and D = 4096 (Llama-3.1-8B's hidden size).
V_SWEEP_D = 4096
V_SWEEP_BT = (16, 1024)
V_SWEEP = [32000, 65536, 128256, 151936, 256000]

# fp32 at one shape (the rest is bf16).
FP32_SHAPES = [("qwen2.5-1.5b", 8, 1024)]

# Group advantages: B completions of G = 16 per prompt, K = 3 reward functions.
ADVANTAGE_BATCHES = [1024, 16384, 262144]
ADVANTAGE_GROUP_SIZE = 16
ADVANTAGE_NUM_REWARDS = 3

# CPU smoke: seconds, not minutes (ours may run under the Triton interpreter).
SMOKE_HEAD = ("smoke", 32, 97)
SMOKE_BT = [(2, 8), (2, 16)]
SMOKE_ADVANTAGE_BATCHES = [64]


@dataclass(frozen=True)
class Shape:
    head: str
    B: int
    T: int
    D: int
    V: int
    dtype: torch.dtype
    sweep: str  # "N" (vs tokens at a fixed head) or "V" (vs vocabulary at fixed N and D)

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def loss_shapes(*, heads=None, quick=False, smoke=False, v_sweep=True, n_max=None) -> list[Shape]:
    """Every (head, B, T, dtype) the loss and log-prob benchmarks run, N sweep first."""
    if smoke:
        name, d, v = SMOKE_HEAD
        return [Shape(name, b, t, d, v, torch.float32, "N") for b, t in SMOKE_BT]
    shapes = []
    for head, (d, v) in HEADS.items():
        if heads and head not in heads:
            continue
        for b, t in QUICK_N_SWEEP if quick else N_SWEEP:
            if n_max is None or b * t <= n_max:
                shapes.append(Shape(head, b, t, d, v, torch.bfloat16, "N"))
    for head, b, t in FP32_SHAPES:
        if not heads or head in heads:
            d, v = HEADS[head]
            shapes.append(Shape(head, b, t, d, v, torch.float32, "N"))
    if v_sweep:
        b, t = V_SWEEP_BT
        for v in V_SWEEP:
            shapes.append(Shape(f"D{V_SWEEP_D}-V{v}", b, t, V_SWEEP_D, v, torch.bfloat16, "V"))
    return shapes
