"""The PyTorch path (CPU without the Triton interpreter): the kernels' arithmetic, vectorized per
group over the dense ``[num_groups, max_group_size]`` view of a :class:`GroupLayout` (padding
slots hold NaN rewards, which the statistics exclude as they exclude unscorable completions)."""

from __future__ import annotations

import math

import torch

from grpo_kernels.ops.advantages.kernels import batch_stats_from_groups
from grpo_kernels.ops.advantages.layout import GroupLayout


def grouped_stats(values, included):
    """Per-group (count, mean, M2) of ``values [num_groups, S]`` where ``included``, shifted by
    the group's largest included value as the kernel does."""
    count = included.sum(dim=1).to(values.dtype)
    shift = torch.where(included, values, torch.full_like(values, -math.inf)).amax(dim=1)
    shift = torch.where(count > 0, shift, torch.zeros_like(shift))
    shifted = torch.where(included, values - shift[:, None], torch.zeros_like(values))
    shifted_mean = shifted.sum(dim=1) / count.clamp(min=1.0)
    deviation = torch.where(included, shifted - shifted_mean[:, None], torch.zeros_like(values))
    return count, shift + shifted_mean, (deviation * deviation).sum(dim=1)


def bessel_std(count, m2):
    return torch.where(count > 1, (m2 / (count - 1.0).clamp(min=1.0)).sqrt(), torch.zeros_like(m2))


def group_advantages_torch(rewards2d, weights, keep_mask, layout: GroupLayout, scale, eps, decoupled,
                           stats_only=False):
    """The kernel's arithmetic on float64 ``rewards2d [B, K]`` and ``weights [K]`` (row order);
    returns what :func:`kernels.group_advantages_triton` returns."""
    values, _ = layout.to_dense(rewards2d, math.nan)  # [num_groups, S, K]
    scored = ~torch.isnan(values)
    included = scored.any(dim=2)
    if keep_mask is not None:
        included = included & layout.to_dense(keep_mask, False)[0]
    if decoupled:
        reward = torch.zeros_like(included, dtype=values.dtype)
        for k in range(values.shape[2]):
            component = values[:, :, k]
            uses = included & scored[:, :, k]
            count_k, mean_k, m2_k = grouped_stats(component, uses)
            z = component - mean_k[:, None]
            if scale == "group":
                z = z / (bessel_std(count_k, m2_k)[:, None] + eps)
            reward = reward + torch.where(uses, weights[k] * z, torch.zeros_like(z))
    else:
        reward = torch.where(scored, values * weights, torch.zeros_like(values)).sum(dim=2)

    count, group_mean, m2 = grouped_stats(reward, included)
    group_std = bessel_std(count, m2)
    if stats_only:
        return None, group_mean, group_std, count, m2
    if decoupled:
        batch_mean, batch_std = batch_stats_from_groups(count, group_mean, m2)
        centered = (reward - batch_mean) / (batch_std + eps)
    else:
        centered = reward - group_mean[:, None]
        if scale == "group":
            centered = centered / (group_std[:, None] + eps)
        elif scale == "batch":
            centered = centered / (batch_stats_from_groups(count, group_mean, m2)[1] + eps)
    advantages = layout.from_dense(torch.where(included, centered, torch.zeros_like(centered)))
    return advantages, group_mean, group_std, count, m2


def segment_sum_torch(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``values [B, C]`` float64 -> ``[num_groups, C]``: each group's rows summed in row order
    (``index_add_`` adds sequentially on CPU, the kernel's order)."""
    out = values.new_zeros((layout.num_groups, values.shape[1]))
    return out.index_add_(0, layout.group_of_row, values)
