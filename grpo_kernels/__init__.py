"""grpo-kernels: fused Triton kernels for GRPO-family RL post-training.

Public API::

    token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False)                    # [..., D] -> [...] float32
    token_logprobs(hidden, weight, targets_or_None, outputs=("entropy", "topk", ...), topk=k)
                                                            # -> TokenStats (every statistic, one pass)
    group_advantages(rewards, group_size, *, scale="group", eps=1e-4, reward_weights=None,
                     keep_mask=None)                        # -> GroupAdvantages (or index=: verl's group ids)
    estimate_advantages(name, token_level_rewards, response_mask, *, index=None, ...)
                                                            # verl's estimators -> TokenAdvantages
    gfpo_keep_mask(scores, group_size, k)                   # GFPO: top-k per group
    grpo_loss(logprobs, completion_mask, advantages, ...)   # loss from [B, T] log-probs
    validate_loss_options(**options)                        # check loss options, no tensors
    fused_linear_grpo_loss(hidden, lm_head_weight, completion_ids, completion_mask, advantages, ...)
    FusedLinearGRPOLoss(...)                                # drop-in for LigerFusedLinearGRPOLoss
    fused_divergence(student_hidden, student_weight, *, teacher_hidden=..., teacher_weight=..., beta=...,
                     mode="full" | "teacher_topk" | "student_topk", ...)  # -> DivergenceOutput
"""

from grpo_kernels import _triton_compat

_triton_compat.apply()  # before any kernel runs under the CPU interpreter

from grpo_kernels._version import __version__
from grpo_kernels.ops.logprobs import TokenStats, token_logprobs
from grpo_kernels.ops.advantages import GroupAdvantages, gfpo_keep_mask, group_advantages
from grpo_kernels.ops.advantages import TokenAdvantages, estimate_advantages
from grpo_kernels.ops.grpo_loss import grpo_loss, validate_loss_options
from grpo_kernels.ops.fused_linear_grpo import fused_linear_grpo_loss
from grpo_kernels.ops.divergence import DivergenceOutput, fused_divergence
from grpo_kernels.nn import FusedLinearGRPOLoss

__all__ = [
    "token_logprobs",
    "TokenStats",
    "GroupAdvantages",
    "group_advantages",
    "gfpo_keep_mask",
    "TokenAdvantages",
    "estimate_advantages",
    "grpo_loss",
    "validate_loss_options",
    "fused_linear_grpo_loss",
    "FusedLinearGRPOLoss",
    "fused_divergence",
    "DivergenceOutput",
]
