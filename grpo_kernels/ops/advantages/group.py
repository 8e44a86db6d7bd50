"""Group-relative advantages (GRPO, Dr. GRPO, batch-scaled, GDPO) and GFPO keep masks.

A batch holds ``B`` completions in groups (the completions of one prompt): ``group_size=G``
consecutive completions each (``B = num_groups * G``, TRL's layout), or verl's ``index``, a group
id per completion (groups of any size, in any order). Per completion, the reward is the weighted
sum of its reward functions' scores, NaN components (a function that could not score) left out;
a completion whose components are all NaN, or that a GFPO ``keep_mask`` drops, is *excluded*: it
takes no part in any statistic and gets advantage 0.

Definitions (docs/semantics.md, section "Advantages"; TRL 1.16
``GRPOTrainer._generate_and_score_completions``, ``multi_objective_aggregation="sum_then_normalize"``):

- ``group_mean``: mean of the group's included rewards;
- ``group_std``: Bessel (n-1) std of the group's included rewards, always the group's own std
  whatever ``scale`` is. With fewer than two included rewards (``group_size=1``, or all but one
  completion excluded) it is defined as 0: one sample carries no relative signal. A group with
  no included reward reports mean 0 and std 0;
- ``zero_std``: ``group_std <= 1e-8`` (TRL's ``torch.isclose(std, 0)``), the groups DAPO's dynamic
  sampling drops; ``zero_std.float().mean()`` is TRL's ``frac_reward_zero_std`` for
  ``scale="group"``/``"none"`` (TRL's own metric is batch-level under ``scale="batch"``, ours stays
  per group). Where TRL's NaN std (fewer than two scorable rewards) makes it report False, we
  report True; the advantages agree (0 in both);
- ``advantages``: ``(r - group_mean) / (sigma + eps)`` with sigma the group's std (``"group"``) or
  the Bessel std of every included reward of the batch (``"batch"``: unscorable and dropped
  completions are left out, as TRL's ``nanstd`` leaves out NaN rewards); ``r - group_mean`` for
  ``"none"`` (Dr. GRPO).

GDPO (``multi_objective_aggregation="normalize_then_sum"``; TRL 1.16's option of that name)
normalizes each reward function within its group before the weighted sum: ``z_k = (r_k -
group_mean_k) / (group_std_k + eps)`` over the group's included completions that function scored
(``r_k - group_mean_k`` for ``scale="none"``, verl's ``norm_adv_by_std_in_grpo=False``), ``r =
sum_k w_k z_k`` over the scored components, and then ``advantages = (r - batch_mean) / (batch_std +
eps)`` over every included completion of the batch (TRL; verl's ``gdpo`` whitens ``r``
token-weighted with ``rsqrt(var + 1e-8)`` and gives a group of one std 1: ``estimate_advantages(
"gdpo", ...)`` follows verl). ``group_mean`` / ``group_std`` / ``zero_std`` then describe ``r``, the
quantity the batch normalization is applied to.

Precision: every statistic is computed in float64 whatever the reward dtype (the outputs are
float32, or float64 for float64 rewards), so rewards of any float32 magnitude, and float64 rewards
beyond float32's range, give exact-to-rounding advantages; weighted rewards beyond 1e150 in
magnitude, whose squared deviations would overflow float64, are rejected.

Kernels: ``kernels.py`` (one launch, two for ``scale="batch"`` and GDPO); groups are segments of
a :class:`~grpo_kernels.ops.advantages.layout.GroupLayout`, so ``index`` costs one sort of the
``[B]`` ids, one host sync (the number of groups sizes the launch) and a gather of the ``[B, K]``
rewards, and then runs the very kernel the contiguous layout runs.
"""

from __future__ import annotations

import math
import operator
from numbers import Real
from typing import NamedTuple

import torch

from grpo_kernels.ops.advantages import kernels, torch_path
from grpo_kernels.ops.advantages.layout import INDEX_DTYPES, GroupLayout
from grpo_kernels.ops.utils import check_same_device, check_tensor, resolve_backend

SCALES = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# |weighted reward| bound: squared deviations of B such values must not overflow float64.
MAX_WEIGHTED_REWARD = 1e150
REWARD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ZERO_STD_ATOL = 1e-8  # torch.isclose(std, 0)'s default atol, as TRL logs frac_reward_zero_std


class GroupAdvantages(NamedTuple):
    """advantages ``[B]``; group_mean, group_std ``[num_groups]``; zero_std ``[num_groups]`` bool.
    Float tensors are float32, float64 for float64 rewards. With ``index``, group ``g`` is the
    ``g``-th smallest id (``torch.unique(index)`` order)."""

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    zero_std: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _check_group_size(group_size, batch: int, what: str) -> int:
    group_size = as_int("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if batch % group_size != 0:
        raise ValueError(
            f"the batch size ({batch} {what}) must be a multiple of group_size={group_size}: "
            "each prompt owns group_size consecutive completions"
        )
    return group_size


def group_layout(batch: int, device, group_size=None, index=None, *, what: str = "completions",
                 reference_name: str = "rewards", reference=None) -> GroupLayout:
    """The :class:`GroupLayout` of exactly one of ``group_size`` (contiguous groups) and ``index``
    (``[B]`` int32/int64 group ids), after checking it against a batch of ``batch`` rows."""
    if (group_size is None) == (index is None):
        raise ValueError("give exactly one of group_size (contiguous groups of that size) and index "
                         "(a group id per row, verl's index)")
    if index is None:
        return GroupLayout.contiguous(batch, _check_group_size(group_size, batch, what), device)
    check_tensor("index", index, dtypes=INDEX_DTYPES, ndim=1)
    if index.shape[0] != batch:
        raise ValueError(f"index must have shape [B]=[{batch}] (a group id per row), got {tuple(index.shape)}")
    if reference is not None:
        check_same_device(**{reference_name: reference, "index": index})
    if index.device.type == "meta":
        raise ValueError("index on the meta device: the number of groups depends on its values; "
                         "use group_size for shape inference")
    return GroupLayout.from_index(index)


def reward_weights_tensor(reward_weights, num_rewards: int, device) -> torch.Tensor:
    if reward_weights is None:
        return torch.ones(num_rewards, dtype=torch.float64, device=device)
    if isinstance(reward_weights, torch.Tensor):
        check_tensor("reward_weights", reward_weights, ndim=1)
        if not reward_weights.is_floating_point() and reward_weights.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"reward_weights must be a float tensor, got {reward_weights.dtype}")
        weights = reward_weights.detach().to(device=device, dtype=torch.float64)
    else:
        try:
            values = list(reward_weights)
        except TypeError:
            values = None
        if values is None or any(isinstance(w, (bool, str)) or not isinstance(w, Real) for w in values):
            raise TypeError(
                f"reward_weights must be a sequence of numbers or a 1-D tensor, got {reward_weights!r}")
        weights = torch.tensor([float(w) for w in values], dtype=torch.float64, device=device)
    if weights.numel() != num_rewards:
        raise ValueError(
            f"reward_weights has {weights.numel()} entries but rewards has {num_rewards} reward "
            "function(s) (rewards [B] counts as one)"
        )
    if weights.device.type != "meta" and not bool(torch.isfinite(weights).all()):
        raise ValueError(f"reward_weights must be finite, got {weights.tolist()}")
    return weights


def check_eps(name: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"{name} must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{name} must be finite and > 0 (it keeps zero-std groups finite), got {eps}")
    return eps


def _check_reward_range(rewards64: torch.Tensor, weights: torch.Tensor) -> None:
    """One host sync: no +-inf reward, and every weighted reward small enough to square in float64."""
    largest = float(rewards64.abs().nan_to_num(nan=0.0, posinf=math.inf).amax())
    if math.isinf(largest):
        raise ValueError("rewards must be finite or NaN (NaN = could not score); got +-inf")
    bound = largest * float(weights.abs().sum())
    if bound > MAX_WEIGHTED_REWARD:
        raise ValueError(
            f"rewards x reward_weights reach {bound:.3g} in magnitude; group_advantages supports up to "
            f"{MAX_WEIGHTED_REWARD:.0e} (squared deviations must fit in float64): rescale the rewards")


# ---------------------------------------------------------------------------------------------
# Dispatch: the kernels, or their PyTorch twins
# ---------------------------------------------------------------------------------------------


def _uses_triton(device, backend: str) -> bool:
    return resolve_backend(device, backend) == "triton"


def group_statistics(values: torch.Tensor, layout: GroupLayout, *, backend: str = "auto"):
    """Per-group (count, mean, Bessel std) ``[num_groups]`` float64 of ``values [B]`` (float64;
    NaN entries are left out; std 0 below two values; mean 0 for an empty group)."""
    weights = torch.ones(1, dtype=torch.float64, device=values.device)
    run = kernels.group_advantages_triton if _uses_triton(values.device, backend) else torch_path.group_advantages_torch
    _, mean, std, count, _ = run(values[:, None], weights, None, layout, "none", 1.0, False, stats_only=True)
    return count, mean, std


def segment_sum(values: torch.Tensor, layout: GroupLayout, *, backend: str = "auto") -> torch.Tensor:
    """``values [B, C]`` float64 -> ``[num_groups, C]`` float64: each group's rows summed, in row order."""
    if _uses_triton(values.device, backend):
        return kernels.segment_sum_triton(values, layout)
    return torch_path.segment_sum_torch(values, layout)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    index: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-4,
    reward_weights=None,
    keep_mask: torch.Tensor | None = None,
    multi_objective_aggregation: str = "sum_then_normalize",
    backend: str = "auto",
) -> GroupAdvantages:
    """Group-relative advantages of a batch of ``B`` completions.

    Args:
        rewards: ``[B]`` or ``[B, K]`` (K reward functions) float tensor; NaN = could not score.
        group_size: completions per prompt (G), stored contiguously: completion ``i`` belongs to
            group ``i // G``; ``B % G == 0``.
        index: instead of ``group_size``, verl's ``index``: ``[B]`` int32/int64, the group id of
            each completion (any ids, groups of any size, in any order). Group ``g`` of the
            outputs is the ``g``-th smallest id. Costs one host sync (the number of groups).
        scale: ``"group"`` (per-group std), ``"batch"`` (std of the whole batch, mean still per
            group) or ``"none"`` (Dr. GRPO: no division). Under ``"normalize_then_sum"``:
            ``"group"`` divides each reward function's centered scores by its group std,
            ``"none"`` only centers them (verl's ``norm_adv_by_std_in_grpo=False``; TRL has no
            such variant), ``"batch"`` is refused.
        eps: added to every std before dividing (> 0). TRL uses 1e-4, verl 1e-6.
        reward_weights: ``K`` weights (sequence or 1-D tensor); default all 1.
        keep_mask: ``[B]`` bool (GFPO, see :func:`gfpo_keep_mask`): statistics over kept
            completions only; the others get advantage 0.
        multi_objective_aggregation: ``"sum_then_normalize"`` (weighted sum of the reward
            functions, then the group normalization; TRL's default) or ``"normalize_then_sum"``
            (GDPO: each function normalized within its group, then the weighted sum, then a
            batch normalization; TRL's option of that name).
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else PyTorch),
            ``"triton"`` or ``"torch"``.

    Returns:
        :class:`GroupAdvantages` (advantages ``[B]``, group_mean / group_std ``[num_groups]``,
        float32, or float64 for float64 rewards; zero_std ``[num_groups]`` bool). See the module
        docstring for the exact definitions (std of fewer than two rewards is 0; a group with no
        included reward has mean 0, std 0; under GDPO the statistics are those of the normalized
        sum). Not differentiable (rewards carry no gradient in GRPO). Meta tensors (with
        ``group_size``) give the output shapes.
    """
    check_tensor("rewards", rewards, dtypes=REWARD_DTYPES)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(rewards.shape)}")
    rewards2d = rewards.detach() if rewards.dim() == 2 else rewards.detach()[:, None]
    batch, num_rewards = rewards2d.shape
    if num_rewards == 0:
        raise ValueError("rewards [B, K] needs at least one reward function (K >= 1), got K=0")
    if not isinstance(scale, str) or scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not isinstance(multi_objective_aggregation, str) or multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
            f"got {multi_objective_aggregation!r}")
    decoupled = multi_objective_aggregation == "normalize_then_sum"
    if decoupled and scale == "batch":
        raise ValueError(
            "scale='batch' does not combine with multi_objective_aggregation='normalize_then_sum': "
            "GDPO normalizes each reward function within its group ('group', or 'none' to only "
            "center) and always normalizes the sum over the batch")
    eps = check_eps("eps", eps)
    if keep_mask is not None:
        check_tensor("keep_mask", keep_mask, dtypes=(torch.bool,), ndim=1)
        if keep_mask.shape[0] != batch:
            raise ValueError(f"keep_mask must have shape [B]=[{batch}], got {tuple(keep_mask.shape)}")
        check_same_device(rewards=rewards, keep_mask=keep_mask)
        keep_mask = keep_mask.contiguous()
    if rewards2d.numel() >= 2**31:
        raise ValueError(f"rewards has {rewards2d.numel()} entries; at most 2**31 - 1 are supported")
    resolve_backend(rewards.device if rewards.device.type != "meta" else torch.device("cpu"), backend)
    weights = reward_weights_tensor(reward_weights, num_rewards, rewards.device)
    layout = group_layout(batch, rewards.device, group_size, index, reference=rewards)
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if rewards.device.type == "meta":  # shape inference
        stats = torch.empty(layout.num_groups, dtype=out_dtype, device="meta")
        return GroupAdvantages(torch.empty(batch, dtype=out_dtype, device="meta"), stats, stats.clone(),
                               stats.bool())
    if batch == 0:
        empty = torch.zeros(0, dtype=out_dtype, device=rewards.device)
        return GroupAdvantages(empty, empty.clone(), empty.clone(), empty.bool())
    # Rewards are a few KB: float64 everywhere costs nothing and keeps one kernel specialization.
    rewards64 = rewards2d.double()
    _check_reward_range(rewards64, weights)
    run = kernels.group_advantages_triton if _uses_triton(rewards.device, backend) else torch_path.group_advantages_torch
    advantages, group_mean, group_std, _, _ = run(rewards64, weights, keep_mask, layout, scale, eps, decoupled)
    return GroupAdvantages(
        advantages.to(out_dtype), group_mean.to(out_dtype), group_std.to(out_dtype), group_std <= ZERO_STD_ATOL)


def gfpo_keep_mask(scores: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """GFPO filter: keep the ``k`` highest-scoring completions of each group.

    scores ``[B]`` float (higher is better, e.g. ``-length`` or reward per token); NaN ranks
    below every number. Ties go to the lower index. Returns ``[B]`` bool with exactly ``k``
    True per group, for ``group_advantages(..., keep_mask=...)``.
    """
    check_tensor("scores", scores, dtypes=REWARD_DTYPES + (torch.int32, torch.int64), ndim=1)
    group_size = _check_group_size(group_size, scores.shape[0], "scores")
    k = as_int("k", k)
    if not 1 <= k <= group_size:
        raise ValueError(f"k must be in [1, group_size={group_size}], got {k}")
    grouped = scores.detach().view(-1, group_size)
    if grouped.is_floating_point():
        grouped = grouped.double()  # exact for every float dtype; -inf below any finite score
        grouped = torch.where(torch.isnan(grouped), torch.full_like(grouped, -math.inf), grouped)
    # A stable descending sort keeps tied scores in index order, so the lower index wins.
    order = torch.sort(grouped, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(order, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], True)
    return keep.view(-1)
