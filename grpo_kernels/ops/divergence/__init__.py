"""Fused distillation divergences from hidden states: TODO docstring."""

from grpo_kernels.ops.divergence.api import MODES, DivergenceOutput, fused_divergence
from grpo_kernels.ops.divergence.specs import sm90_compile_specs

__all__ = ["fused_divergence", "DivergenceOutput", "MODES", "sm90_compile_specs"]
