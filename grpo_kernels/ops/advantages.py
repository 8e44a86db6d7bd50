"""Group-relative advantages (GRPO, Dr. GRPO, batch-scaled, GDPO) and GFPO keep masks.

A batch holds ``B = num_groups * group_size`` completions, the ``group_size`` completions of a
prompt stored contiguously. Per completion, the reward is the weighted sum of its reward
functions' scores, NaN components (a function that could not score) left out; a completion
whose components are all NaN, or that a GFPO ``keep_mask`` drops, is *excluded*: it takes no
part in any statistic and gets advantage 0.

Definitions (``shared/grpo-semantics.md``, section "Advantages"; TRL 1.16
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

GDPO (``multi_objective_aggregation="normalize_then_sum"``; TRL 1.16's option of that name, verl
0.9.1's ``gdpo`` estimator) normalizes each reward function within its group before the weighted
sum: ``z_k = (r_k - group_mean_k) / (group_std_k + eps)`` over the group's included completions
that function scored (``r_k - group_mean_k`` for ``scale="none"``, verl's
``norm_adv_by_std_in_grpo=False``), ``r = sum_k w_k z_k`` over the scored components, and then
``advantages = (r - batch_mean) / (batch_std + eps)`` over every included completion of the batch
(TRL; verl whitens the same ``r`` token-weighted with ``rsqrt(var + 1e-8)``). ``group_mean`` /
``group_std`` / ``zero_std`` then describe ``r``, the quantity the batch normalization is applied
to: a zero-std group is one whose completions all get the same advantage.

Precision: every statistic is computed in float64 whatever the reward dtype (the outputs are
float32, or float64 for float64 rewards), so rewards of any float32 magnitude, and float64 rewards
beyond float32's range, give exact-to-rounding advantages; weighted rewards beyond 1e150 in
magnitude, whose squared deviations would overflow float64, are rejected.

Kernel: one Triton program per block of groups computes the NaN-aware weighted reward, the
per-group mean and M2 (sum of squared deviations) and writes the advantages, all in registers,
one launch. Each chunk of a group is shifted by its largest included reward before summing, so a
group of equal rewards gets exactly zero std and exactly zero advantages; groups longer than one
chunk combine chunk statistics with Chan's parallel formula. ``scale="batch"`` needs the whole
batch's std before any advantage can be written: the kernel runs twice (statistics, then
advantages), and in between a few PyTorch ops over the ``[num_groups]`` statistics (not over the
rewards) combine them into the batch mean and std, on the device, without a host sync. GDPO runs the
same two passes; its statistics pass loops over the reward functions (group statistics of each,
then its normalized, weighted contribution accumulated into the advantages buffer, which holds
``r`` until the second pass overwrites it with the advantages).
"""

from __future__ import annotations

import math
import operator
from numbers import Real
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from grpo_kernels.ops.utils import CompileSpec, check_same_device, check_tensor, resolve_backend

SCALES = ("group", "batch", "none")
_SCALE_CODE = {"group": 0, "none": 1, "batch": 2}
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# |weighted reward| bound: squared deviations of B such values must not overflow float64.
MAX_WEIGHTED_REWARD = 1e150
REWARD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ZERO_STD_ATOL = 1e-8  # torch.isclose(std, 0)'s default atol, as TRL logs frac_reward_zero_std
# Register tile of one program: GROUPS_PER_PROGRAM x BLOCK_G rewards.
_TILE = 1024
_BLOCK_G_CHOICES = (16, 64, 256, 1024)


class GroupAdvantages(NamedTuple):
    """advantages ``[B]``; group_mean, group_std ``[B / group_size]``; zero_std ``[B / group_size]``
    bool. Float tensors are float32, float64 for float64 rewards."""

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    zero_std: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _included_rewards(
    rewards_ptr, weights_ptr, keep_ptr, rows, row_ok, num_rewards, stride_row, stride_col,
    HAS_KEEP_MASK: tl.constexpr,
):
    """Weighted reward of each completion in ``rows`` (float64) and whether it enters the statistics."""
    total = tl.zeros(rows.shape, tl.float64)
    num_scored = tl.zeros(rows.shape, tl.int32)
    for k in range(0, num_rewards):
        weight = tl.load(weights_ptr + k)
        value = tl.load(rewards_ptr + rows * stride_row + k * stride_col, mask=row_ok, other=float("nan"))
        scored = value == value  # False for NaN
        total += tl.where(scored, value * weight, 0.0)
        num_scored += scored.to(tl.int32)
    included = row_ok & (num_scored > 0)
    if HAS_KEEP_MASK:
        kept = tl.load(keep_ptr + rows, mask=row_ok, other=0) != 0
        included = included & kept
    return total, included


@triton.jit
def _reward_function_chunk(
    rewards_ptr, weights_ptr, keep_ptr, groups, group_ok, member, group_size, k, num_rewards, stride_row,
    stride_col, HAS_KEEP_MASK: tl.constexpr,
):
    """GDPO: one [GROUPS_PER_PROGRAM, BLOCK_G] chunk of reward function k's column: the row ids,
    which exist, which completions take part in the statistics, and the raw values (NaN off-row)."""
    rows = groups[:, None] * group_size + member[None, :]
    row_ok = group_ok[:, None] & (member[None, :] < group_size)
    _, included = _included_rewards(
        rewards_ptr, weights_ptr, keep_ptr, rows, row_ok, num_rewards, stride_row, stride_col, HAS_KEEP_MASK,
    )
    value = tl.load(rewards_ptr + rows * stride_row + k * stride_col, mask=row_ok, other=float("nan"))
    return rows, row_ok, included, value


@triton.jit
def _merge_chunk(count, mean, m2, value, included):
    """Fold one ``[GROUPS, BLOCK_G]`` chunk into the running per-group (count, mean, M2).

    The chunk is shifted by its largest included value first, so equal values get exactly zero
    M2 and exactly their value as mean; chunks merge by Chan et al.'s formula, whose weight ratio
    is exactly 1 on the first chunk (a one-chunk group keeps its chunk mean bit for bit).
    """
    chunk_count = tl.sum(included.to(tl.float64), axis=1)
    shift = tl.max(tl.where(included, value, float("-inf")), axis=1)
    shift = tl.where(chunk_count > 0, shift, 0.0)
    shifted = tl.where(included, value - shift[:, None], 0.0)
    shifted_mean = tl.sum(shifted, axis=1) / tl.maximum(chunk_count, 1.0)
    deviation = tl.where(included, shifted - shifted_mean[:, None], 0.0)
    chunk_m2 = tl.sum(deviation * deviation, axis=1)
    chunk_mean = shift + shifted_mean
    new_count = count + chunk_count
    ratio = chunk_count / tl.maximum(new_count, 1.0)
    delta = chunk_mean - mean
    return new_count, mean + delta * ratio, m2 + chunk_m2 + delta * delta * count * ratio


@triton.jit
def _bessel_std(count, m2):
    return tl.where(count > 1.0, tl.sqrt(m2 / tl.maximum(count - 1.0, 1.0)), 0.0)


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,  # [B, K] fp64, strided
    weights_ptr,  # [K] fp64
    keep_ptr,  # [B] bool (read only when HAS_KEEP_MASK)
    scalars_ptr,  # [3] fp64: eps, then the batch (mean, std) (read by the advantage pass of SCALE 2 / GDPO)
    advantages_ptr,  # [B] fp64 (GDPO: holds the normalized sum r between the passes)
    group_mean_ptr,  # [num_groups] fp64
    group_std_ptr,  # [num_groups] fp64
    group_count_ptr,  # [num_groups] fp64 (written only when the batch statistics are needed)
    group_m2_ptr,  # [num_groups] fp64 (idem)
    num_groups,
    group_size,
    num_rewards,
    stride_row,
    stride_col,
    SCALE: tl.constexpr,  # 0: group std, 1: none, 2: batch std (read from scalars_ptr)
    DECOUPLED: tl.constexpr,  # GDPO: normalize each reward function, then sum, then batch-normalize
    WRITE_ADVANTAGES: tl.constexpr,  # False: statistics pass of scale="batch" / GDPO
    HAS_KEEP_MASK: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    groups = tl.program_id(0) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    group_ok = groups < num_groups
    members = tl.arange(0, BLOCK_G)
    TWO_PASS: tl.constexpr = (SCALE == 2) or DECOUPLED
    eps = tl.load(scalars_ptr)  # float64: a Python float argument would arrive as fp32

    if DECOUPLED and not WRITE_ADVANTAGES:
        # r = sum_k w_k z_k, accumulated in advantages_ptr one reward function at a time.
        for k in range(0, num_rewards):
            weight = tl.load(weights_ptr + k)
            count_k = tl.zeros((GROUPS_PER_PROGRAM,), tl.float64)
            mean_k = tl.zeros((GROUPS_PER_PROGRAM,), tl.float64)
            m2_k = tl.zeros((GROUPS_PER_PROGRAM,), tl.float64)
            for start in range(0, group_size, BLOCK_G):
                rows, row_ok, included, value = _reward_function_chunk(
                    rewards_ptr, weights_ptr, keep_ptr, groups, group_ok, start + members, group_size, k,
                    num_rewards, stride_row, stride_col, HAS_KEEP_MASK,
                )
                count_k, mean_k, m2_k = _merge_chunk(count_k, mean_k, m2_k, value, included & (value == value))
            std_k = _bessel_std(count_k, m2_k)
            for start in range(0, group_size, BLOCK_G):
                rows, row_ok, included, value = _reward_function_chunk(
                    rewards_ptr, weights_ptr, keep_ptr, groups, group_ok, start + members, group_size, k,
                    num_rewards, stride_row, stride_col, HAS_KEEP_MASK,
                )
                z = value - mean_k[:, None]
                if SCALE == 0:
                    z = z / (std_k[:, None] + eps)
                contribution = tl.where(included & (value == value), weight * z, 0.0)
                previous = tl.load(advantages_ptr + rows, mask=row_ok & (k > 0), other=0.0)
                tl.store(advantages_ptr + rows, previous + contribution, mask=row_ok)

    count = tl.zeros((GROUPS_PER_PROGRAM,), tl.float64)
    mean = tl.zeros((GROUPS_PER_PROGRAM,), tl.float64)
    m2 = tl.zeros((GROUPS_PER_PROGRAM,), tl.float64)
    for start in range(0, group_size, BLOCK_G):
        member = start + members
        rows = groups[:, None] * group_size + member[None, :]
        row_ok = group_ok[:, None] & (member[None, :] < group_size)
        reward, included = _included_rewards(
            rewards_ptr, weights_ptr, keep_ptr, rows, row_ok, num_rewards, stride_row, stride_col,
            HAS_KEEP_MASK,
        )
        if DECOUPLED:
            reward = tl.load(advantages_ptr + rows, mask=row_ok, other=0.0)
        count, mean, m2 = _merge_chunk(count, mean, m2, reward, included)
    std = _bessel_std(count, m2)

    # The advantage pass of a two-pass mode recomputes the statistics (cheaper than a round trip
    # through memory) but leaves writing them to the statistics pass.
    if (not TWO_PASS) or (not WRITE_ADVANTAGES):
        tl.store(group_mean_ptr + groups, mean, mask=group_ok)
        tl.store(group_std_ptr + groups, std, mask=group_ok)
        if TWO_PASS:
            tl.store(group_count_ptr + groups, count, mask=group_ok)
            tl.store(group_m2_ptr + groups, m2, mask=group_ok)

    if WRITE_ADVANTAGES:
        for start in range(0, group_size, BLOCK_G):
            member = start + members
            rows = groups[:, None] * group_size + member[None, :]
            row_ok = group_ok[:, None] & (member[None, :] < group_size)
            reward, included = _included_rewards(
                rewards_ptr, weights_ptr, keep_ptr, rows, row_ok, num_rewards, stride_row,
                stride_col, HAS_KEEP_MASK,
            )
            if DECOUPLED:
                reward = tl.load(advantages_ptr + rows, mask=row_ok, other=0.0)
                centered = (reward - tl.load(scalars_ptr + 1)) / (tl.load(scalars_ptr + 2) + eps)
            else:
                centered = reward - mean[:, None]
                if SCALE == 0:
                    centered = centered / (std[:, None] + eps)
                elif SCALE == 2:
                    centered = centered / (tl.load(scalars_ptr + 2) + eps)
            tl.store(advantages_ptr + rows, tl.where(included, centered, 0.0), mask=row_ok)


def _launch_config(group_size: int) -> tuple[int, int]:
    """(BLOCK_G, GROUPS_PER_PROGRAM): the smallest chunk holding a group, up to 1024 members
    (longer groups loop over chunks), and as many groups as fill a 1024-reward tile."""
    block_g = next(b for b in _BLOCK_G_CHOICES if b >= group_size or b == _BLOCK_G_CHOICES[-1])
    return block_g, _TILE // block_g


def _kernel_modes() -> list[tuple[int, bool, bool]]:
    """(SCALE, DECOUPLED, WRITE_ADVANTAGES) triples that dispatch launches."""
    return [(0, False, True), (1, False, True), (2, False, False), (2, False, True),
            (0, True, False), (0, True, True), (1, True, False), (1, True, True)]


def _group_advantages_triton(rewards2d, weights, keep_mask, group_size, scale, eps, decoupled):
    """rewards2d ``[B, K]`` and weights ``[K]`` float64; returns float64 (advantages, mean, std)."""
    device = rewards2d.device
    batch, num_rewards = rewards2d.shape
    num_groups = batch // group_size
    f64 = dict(dtype=torch.float64, device=device)
    advantages = torch.empty(batch, **f64)
    group_mean = torch.empty(num_groups, **f64)
    group_std = torch.empty(num_groups, **f64)
    scale_code = _SCALE_CODE[scale]
    two_pass = scale_code == 2 or decoupled
    scalars = torch.tensor([eps, 0.0, 0.0], **f64)
    if two_pass:
        group_count = torch.empty(num_groups, **f64)
        group_m2 = torch.empty(num_groups, **f64)
    else:
        group_count = group_m2 = group_mean  # never touched by these modes
    block_g, groups_per_program = _launch_config(group_size)
    grid = (triton.cdiv(num_groups, groups_per_program),)
    has_keep = keep_mask is not None
    keep_arg = keep_mask if has_keep else advantages

    def launch(write_advantages: bool):
        _group_advantages_kernel[grid](
            rewards2d, weights, keep_arg, scalars, advantages, group_mean, group_std,
            group_count, group_m2, num_groups, group_size, num_rewards,
            rewards2d.stride(0), rewards2d.stride(1),
            SCALE=scale_code, DECOUPLED=decoupled, WRITE_ADVANTAGES=write_advantages,
            HAS_KEEP_MASK=has_keep, GROUPS_PER_PROGRAM=groups_per_program, BLOCK_G=block_g,
            num_warps=4, num_stages=1,
        )

    if two_pass:
        launch(False)
        scalars[1:].copy_(torch.stack(_batch_stats_from_groups(group_count, group_mean, group_m2)))
    launch(True)
    return advantages, group_mean, group_std


def _batch_stats_from_groups(count, mean, m2) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, Bessel std) of every included value of the batch from per-group (count, mean, M2).

    M2_batch = sum_g M2_g + sum_g n_g (mean_g - mean_batch)^2; the group means are shifted by
    one of them first so that a batch of equal values gets exactly their value as mean and
    exactly zero std. Mean 0 without included values, std 0 with fewer than two. 0-d tensors of
    the dtype and device of the inputs.
    """
    total = count.sum()
    nonempty = count > 0
    reference = torch.where(nonempty, mean, torch.full_like(mean, -math.inf)).amax()
    reference = torch.where(total > 0, reference, torch.zeros_like(reference))
    shifted = torch.where(nonempty, mean - reference, torch.zeros_like(mean))
    shifted_mean = (count * shifted).sum() / total.clamp(min=1.0)
    spread = torch.where(nonempty, shifted - shifted_mean, torch.zeros_like(mean))
    m2_batch = m2.sum() + (count * spread * spread).sum()
    variance = m2_batch / (total - 1.0).clamp(min=1.0)
    return reference + shifted_mean, torch.where(total > 1, variance.sqrt(), torch.zeros_like(variance))


# ---------------------------------------------------------------------------------------------
# PyTorch path (CPU without the Triton interpreter): the same arithmetic, vectorized per group
# ---------------------------------------------------------------------------------------------


def _grouped_stats(values, included):
    """Per-group (count, mean, M2) of ``values [num_groups, G]`` where ``included``, shifted by
    the group's largest included value as the kernel does."""
    count = included.sum(dim=1).to(values.dtype)
    shift = torch.where(included, values, torch.full_like(values, -math.inf)).amax(dim=1)
    shift = torch.where(count > 0, shift, torch.zeros_like(shift))
    shifted = torch.where(included, values - shift[:, None], torch.zeros_like(values))
    shifted_mean = shifted.sum(dim=1) / count.clamp(min=1.0)
    deviation = torch.where(included, shifted - shifted_mean[:, None], torch.zeros_like(values))
    return count, shift + shifted_mean, (deviation * deviation).sum(dim=1)


def _bessel_std_torch(count, m2):
    return torch.where(count > 1, (m2 / (count - 1.0).clamp(min=1.0)).sqrt(), torch.zeros_like(m2))


def _group_advantages_torch(rewards2d, weights, keep_mask, group_size, scale, eps, decoupled):
    """The kernel's arithmetic on float64 ``rewards2d [B, K]`` and ``weights [K]``."""
    values = rewards2d
    scored = ~torch.isnan(values)
    included = scored.any(dim=1)
    if keep_mask is not None:
        included = included & keep_mask
    included = included.view(-1, group_size)
    if decoupled:
        reward = torch.zeros_like(included, dtype=values.dtype)
        for k in range(values.shape[1]):
            component = values[:, k].view(-1, group_size)
            uses = included & scored[:, k].view(-1, group_size)
            count_k, mean_k, m2_k = _grouped_stats(component, uses)
            z = component - mean_k[:, None]
            if scale == "group":
                z = z / (_bessel_std_torch(count_k, m2_k)[:, None] + eps)
            reward = reward + torch.where(uses, weights[k] * z, torch.zeros_like(z))
    else:
        reward = torch.where(scored, values * weights, torch.zeros_like(values)).sum(dim=1).view(-1, group_size)

    count, group_mean, m2 = _grouped_stats(reward, included)
    group_std = _bessel_std_torch(count, m2)
    if decoupled:
        batch_mean, batch_std = _batch_stats_from_groups(count, group_mean, m2)
        centered = (reward - batch_mean) / (batch_std + eps)
    else:
        centered = reward - group_mean[:, None]
        if scale == "group":
            centered = centered / (group_std[:, None] + eps)
        elif scale == "batch":
            centered = centered / (_batch_stats_from_groups(count, group_mean, m2)[1] + eps)
    advantages = torch.where(included, centered, torch.zeros_like(centered)).reshape(-1)
    return advantages, group_mean, group_std


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _check_group_size(group_size, batch: int, what: str) -> int:
    group_size = _as_int("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if batch % group_size != 0:
        raise ValueError(
            f"the batch size ({batch} {what}) must be a multiple of group_size={group_size}: "
            "each prompt owns group_size consecutive completions"
        )
    return group_size


def _reward_weights_tensor(reward_weights, num_rewards: int, device) -> torch.Tensor:
    if reward_weights is None:
        return torch.ones(num_rewards, dtype=torch.float64, device=device)
    if isinstance(reward_weights, torch.Tensor):
        check_tensor("reward_weights", reward_weights, ndim=1)
        if not reward_weights.is_floating_point() and reward_weights.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"reward_weights must be a float tensor, got {reward_weights.dtype}")
        weights = reward_weights.detach().to(device=device, dtype=torch.float64)
    else:
        try:
            weights = torch.tensor([float(w) for w in reward_weights], dtype=torch.float64, device=device)
        except (TypeError, ValueError):
            raise TypeError(
                f"reward_weights must be a sequence of numbers or a 1-D tensor, got {reward_weights!r}"
            ) from None
    if weights.numel() != num_rewards:
        raise ValueError(
            f"reward_weights has {weights.numel()} entries but rewards has {num_rewards} reward "
            "function(s) (rewards [B] counts as one)"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"reward_weights must be finite, got {weights.tolist()}")
    return weights


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-4,
    reward_weights=None,
    keep_mask: torch.Tensor | None = None,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> GroupAdvantages:
    """Group-relative advantages of a batch of ``B = num_groups * group_size`` completions.

    Args:
        rewards: ``[B]`` or ``[B, K]`` (K reward functions) float tensor; NaN = could not score.
            Completion ``i`` belongs to group ``i // group_size``.
        group_size: completions per prompt (G); ``B % G == 0``.
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
            batch normalization; TRL's option of that name, verl's ``gdpo``).

    Returns:
        :class:`GroupAdvantages` (advantages ``[B]``, group_mean / group_std ``[B / G]``, float32,
        or float64 for float64 rewards; zero_std ``[B / G]`` bool). See the module docstring for
        the exact definitions (std of fewer than two rewards is 0; a group with no included reward
        has mean 0, std 0; under GDPO the statistics are those of the normalized sum). Not
        differentiable (rewards carry no gradient in GRPO).
    """
    check_tensor("rewards", rewards, dtypes=REWARD_DTYPES)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(rewards.shape)}")
    rewards2d = rewards.detach() if rewards.dim() == 2 else rewards.detach()[:, None]
    batch, num_rewards = rewards2d.shape
    if num_rewards == 0:
        raise ValueError("rewards [B, K] needs at least one reward function (K >= 1), got K=0")
    group_size = _check_group_size(group_size, batch, "completions")
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
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be finite and > 0 (it keeps zero-std groups finite), got {eps}")
    if keep_mask is not None:
        check_tensor("keep_mask", keep_mask, dtypes=(torch.bool,), ndim=1)
        if keep_mask.shape[0] != batch:
            raise ValueError(f"keep_mask must have shape [B]=[{batch}], got {tuple(keep_mask.shape)}")
        check_same_device(rewards=rewards, keep_mask=keep_mask)
        keep_mask = keep_mask.contiguous()
    if rewards2d.numel() >= 2**31:
        raise ValueError(f"rewards has {rewards2d.numel()} entries; at most 2**31 - 1 are supported")
    weights = _reward_weights_tensor(reward_weights, num_rewards, rewards.device)
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if batch == 0:
        empty = torch.zeros(0, dtype=out_dtype, device=rewards.device)
        return GroupAdvantages(empty, empty.clone(), empty.clone(), empty.bool())
    # Rewards are a few KB: float64 everywhere costs nothing and keeps one kernel specialization.
    rewards64 = rewards2d.double()
    _check_reward_range(rewards64, weights)
    if resolve_backend(rewards.device) == "triton":
        advantages, group_mean, group_std = _group_advantages_triton(
            rewards64, weights, keep_mask, group_size, scale, eps, decoupled
        )
    else:
        advantages, group_mean, group_std = _group_advantages_torch(
            rewards64, weights, keep_mask, group_size, scale, eps, decoupled
        )
    return GroupAdvantages(
        advantages.to(out_dtype), group_mean.to(out_dtype), group_std.to(out_dtype), group_std <= ZERO_STD_ATOL)


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


def gfpo_keep_mask(scores: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """GFPO filter: keep the ``k`` highest-scoring completions of each group.

    scores ``[B]`` float (higher is better, e.g. ``-length`` or reward per token); NaN ranks
    below every number. Ties go to the lower index. Returns ``[B]`` bool with exactly ``k``
    True per group, for ``group_advantages(..., keep_mask=...)``.
    """
    check_tensor("scores", scores, dtypes=REWARD_DTYPES + (torch.int32, torch.int64), ndim=1)
    group_size = _check_group_size(group_size, scores.shape[0], "scores")
    k = _as_int("k", k)
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


def sm90_compile_specs() -> list[CompileSpec]:
    """Every configuration ``group_advantages`` launches on a GPU: each group-size bucket x
    (scale, aggregation, pass) x keep mask (rewards and weights are cast to fp64 before the launch)."""
    specs = []
    for block_g in _BLOCK_G_CHOICES:
        for scale_code, decoupled, write_advantages in _kernel_modes():
            for has_keep in (False, True):
                signature = {
                    "rewards_ptr": "*fp64", "weights_ptr": "*fp64",
                    "keep_ptr": "*i1" if has_keep else "*fp64", "scalars_ptr": "*fp64",
                    "advantages_ptr": "*fp64", "group_mean_ptr": "*fp64", "group_std_ptr": "*fp64",
                    "group_count_ptr": "*fp64", "group_m2_ptr": "*fp64",
                    "num_groups": "i32", "group_size": "i32", "num_rewards": "i32",
                    "stride_row": "i32", "stride_col": "i32",
                    "SCALE": "constexpr", "DECOUPLED": "constexpr", "WRITE_ADVANTAGES": "constexpr",
                    "HAS_KEEP_MASK": "constexpr", "GROUPS_PER_PROGRAM": "constexpr",
                    "BLOCK_G": "constexpr",
                }
                constexprs = {
                    "SCALE": scale_code, "DECOUPLED": decoupled, "WRITE_ADVANTAGES": write_advantages,
                    "HAS_KEEP_MASK": has_keep, "GROUPS_PER_PROGRAM": _TILE // block_g,
                    "BLOCK_G": block_g,
                }
                mode = {0: "group", 1: "none", 2: "batch"}[scale_code]
                name = (
                    f"group_advantages[{'gdpo-' if decoupled else ''}{mode}"
                    f"{'' if write_advantages else '-stats'}{'-keep' if has_keep else ''},G<={block_g}]"
                )
                specs.append(CompileSpec(name, _group_advantages_kernel, signature, constexprs, 4, 1))
    return specs
