"""The Triton kernels of the advantages package, over groups given as segments (``layout.py``).

``_group_advantages_kernel``: one program per block of groups computes the NaN-aware weighted
reward, the per-group mean and M2 (sum of squared deviations) and writes the advantages, all in
registers, one launch. Group ``g`` is the rows ``offsets[g]:offsets[g + 1]`` of the (group-
ordered) rewards: contiguous equal groups (``group_size``) and verl's ``index`` (rows sorted by
group id once, and the ``[B, K]`` rewards, a few KB, gathered into that order by PyTorch before
the launch) run the same code. Each chunk of a group is shifted by its largest included reward before summing, so a
group of equal rewards gets exactly zero std and exactly zero advantages; groups longer than one
chunk combine chunk statistics with Chan's parallel formula. ``scale="batch"`` and GDPO need the
whole batch's statistics before any advantage can be written: the kernel runs twice (statistics,
then advantages), and in between a few PyTorch ops over the ``[num_groups]`` statistics combine
them into the batch mean and std, on the device, without a host sync. GDPO's statistics pass
loops over the reward functions (group statistics of each, then its normalized, weighted
contribution accumulated into the advantages buffer, which holds ``r`` until the second pass
overwrites it with the advantages). The statistics pass alone is also the per-group (count,
mean, M2) of any ``[B]`` values (``group_statistics``).

``_segment_sum_kernel``: per group, the float64 sum of its rows of a ``[B, C]`` tensor (the
Optimal Token Baseline's per-timestep sums, OPO's length-weighted mean). One program per (group,
column block) adds its group's rows in row order: no atomics, deterministic, and the same order
of additions as the PyTorch path's ``index_add_`` on CPU. It gathers rows through ``order`` in
the kernel (the token tensors are too large to permute on the host side for nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.ops.advantages.layout import GroupLayout
from grpo_kernels.ops.utils import CompileSpec

SCALE_CODE = {"group": 0, "none": 1, "batch": 2}
# Register tile of one program: GROUPS_PER_PROGRAM x BLOCK_G rewards.
_TILE = 1024
BLOCK_G_CHOICES = (16, 64, 256, 1024)
BLOCK_C_CHOICES = (16, 64, 256, 1024)


# ---------------------------------------------------------------------------------------------
# Group statistics and advantages
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
def _chunk_rows(group_start, group_rows, group_ok, member):
    """Row ids of one [GROUPS_PER_PROGRAM, BLOCK_G] chunk of segments, and which exist."""
    rows = group_start[:, None] + member[None, :]
    row_ok = group_ok[:, None] & (member[None, :] < group_rows[:, None])
    return rows, row_ok


@triton.jit
def _reward_function_chunk(
    rewards_ptr, weights_ptr, keep_ptr, group_start, group_rows, group_ok, member, k, num_rewards, stride_row,
    stride_col, HAS_KEEP_MASK: tl.constexpr,
):
    """GDPO: one [GROUPS_PER_PROGRAM, BLOCK_G] chunk of reward function k's column: the row ids,
    which exist, which completions take part in the statistics, and the raw values (NaN off-row)."""
    rows, row_ok = _chunk_rows(group_start, group_rows, group_ok, member)
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
    rewards_ptr,  # [B, K] fp64, strided, rows in group order
    weights_ptr,  # [K] fp64
    keep_ptr,  # [B] bool (read only when HAS_KEEP_MASK)
    scalars_ptr,  # [3] fp64: eps, then the batch (mean, std) (read by the advantage pass of SCALE 2 / GDPO)
    offsets_ptr,  # [num_groups + 1] int64: group g is rows offsets[g] .. offsets[g + 1] - 1
    advantages_ptr,  # [B] fp64 (GDPO: holds the normalized sum r between the passes)
    group_mean_ptr,  # [num_groups] fp64
    group_std_ptr,  # [num_groups] fp64
    group_count_ptr,  # [num_groups] fp64 (written only when the batch statistics are needed)
    group_m2_ptr,  # [num_groups] fp64 (idem)
    num_groups,
    max_group_size,
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
    group_start = tl.load(offsets_ptr + groups, mask=group_ok, other=0)
    group_rows = tl.load(offsets_ptr + groups + 1, mask=group_ok, other=0) - group_start
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
            for start in range(0, max_group_size, BLOCK_G):
                rows, row_ok, included, value = _reward_function_chunk(
                    rewards_ptr, weights_ptr, keep_ptr, group_start, group_rows, group_ok, start + members, k,
                    num_rewards, stride_row, stride_col, HAS_KEEP_MASK,
                )
                count_k, mean_k, m2_k = _merge_chunk(count_k, mean_k, m2_k, value, included & (value == value))
            std_k = _bessel_std(count_k, m2_k)
            for start in range(0, max_group_size, BLOCK_G):
                rows, row_ok, included, value = _reward_function_chunk(
                    rewards_ptr, weights_ptr, keep_ptr, group_start, group_rows, group_ok, start + members, k,
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
    for start in range(0, max_group_size, BLOCK_G):
        rows, row_ok = _chunk_rows(group_start, group_rows, group_ok, start + members)
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
        for start in range(0, max_group_size, BLOCK_G):
            rows, row_ok = _chunk_rows(group_start, group_rows, group_ok, start + members)
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


def _launch_config(max_group_size: int) -> tuple[int, int]:
    """(BLOCK_G, GROUPS_PER_PROGRAM): the smallest chunk holding the largest group, up to 1024
    members (longer groups loop over chunks), and as many groups as fill a 1024-reward tile."""
    block_g = next(b for b in BLOCK_G_CHOICES if b >= max_group_size or b == BLOCK_G_CHOICES[-1])
    return block_g, _TILE // block_g


def kernel_modes() -> list[tuple[int, bool, bool]]:
    """(SCALE, DECOUPLED, WRITE_ADVANTAGES) triples that dispatch launches."""
    return [(0, False, True), (1, False, True), (2, False, False), (2, False, True),
            (0, True, False), (0, True, True), (1, True, False), (1, True, True)]


def group_advantages_triton(rewards2d, weights, keep_mask, layout: GroupLayout, scale, eps, decoupled,
                            stats_only=False):
    """rewards2d ``[B, K]`` and weights ``[K]`` float64, in row order; returns float64
    (advantages [B] in row order, group mean, group std, group count, group M2), the last two
    None unless the mode needs them. ``stats_only``: the statistics pass alone (advantages None)."""
    device = rewards2d.device
    batch, num_rewards = rewards2d.shape
    num_groups = layout.num_groups
    rewards2d = layout.permute(rewards2d)
    keep_mask = None if keep_mask is None else layout.permute(keep_mask)
    f64 = dict(dtype=torch.float64, device=device)
    advantages = torch.empty(batch, **f64)
    group_mean = torch.empty(num_groups, **f64)
    group_std = torch.empty(num_groups, **f64)
    scale_code = SCALE_CODE["batch" if stats_only else scale]
    two_pass = scale_code == 2 or decoupled
    scalars = torch.tensor([eps, 0.0, 0.0], **f64)
    if two_pass:
        group_count = torch.empty(num_groups, **f64)
        group_m2 = torch.empty(num_groups, **f64)
    else:
        group_count = group_m2 = None
    block_g, groups_per_program = _launch_config(layout.max_group_size)
    grid = (triton.cdiv(num_groups, groups_per_program),)
    has_keep = keep_mask is not None
    keep_arg = keep_mask if has_keep else advantages

    def launch(write_advantages: bool):
        _group_advantages_kernel[grid](
            rewards2d, weights, keep_arg, scalars, layout.offsets, advantages, group_mean, group_std,
            group_mean if group_count is None else group_count, group_mean if group_m2 is None else group_m2,
            num_groups, layout.max_group_size, num_rewards, rewards2d.stride(0), rewards2d.stride(1),
            SCALE=scale_code, DECOUPLED=decoupled, WRITE_ADVANTAGES=write_advantages,
            HAS_KEEP_MASK=has_keep, GROUPS_PER_PROGRAM=groups_per_program, BLOCK_G=block_g,
            num_warps=4, num_stages=1,
        )

    if two_pass:
        launch(False)
        if stats_only:
            return None, group_mean, group_std, group_count, group_m2
        scalars[1:].copy_(torch.stack(batch_stats_from_groups(group_count, group_mean, group_m2)))
    launch(True)
    return layout.unpermute(advantages), group_mean, group_std, group_count, group_m2


def batch_stats_from_groups(count, mean, m2) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, Bessel std) of every included value of the batch from per-group (count, mean, M2).

    M2_batch = sum_g M2_g + sum_g n_g (mean_g - mean_batch)^2; the group means are shifted by
    one of them first so that a batch of equal values gets exactly their value as mean and
    exactly zero std. Mean 0 without included values, std 0 with fewer than two. 0-d tensors of
    the dtype and device of the inputs.
    """
    total = count.sum()
    nonempty = count > 0
    reference = torch.where(nonempty, mean, torch.full_like(mean, -float("inf"))).amax()
    reference = torch.where(total > 0, reference, torch.zeros_like(reference))
    shifted = torch.where(nonempty, mean - reference, torch.zeros_like(mean))
    shifted_mean = (count * shifted).sum() / total.clamp(min=1.0)
    spread = torch.where(nonempty, shifted - shifted_mean, torch.zeros_like(mean))
    m2_batch = m2.sum() + (count * spread * spread).sum()
    variance = m2_batch / (total - 1.0).clamp(min=1.0)
    return reference + shifted_mean, torch.where(total > 1, variance.sqrt(), torch.zeros_like(variance))


# ---------------------------------------------------------------------------------------------
# Per-group sums of [B, C] rows
# ---------------------------------------------------------------------------------------------


@triton.jit
def _segment_sum_kernel(
    values_ptr,  # [B, C] fp64, row stride stride_row, unit column stride
    order_ptr,  # [B] int64: rows in group order (read only when HAS_ORDER)
    offsets_ptr,  # [num_groups + 1] int64
    out_ptr,  # [num_groups, C] fp64, contiguous
    num_columns,
    stride_row,
    HAS_ORDER: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    group = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_ok = columns < num_columns
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    total = tl.zeros((BLOCK_C,), tl.float64)
    for position in range(start, end):
        row = position
        if HAS_ORDER:
            row = tl.load(order_ptr + position)
        total += tl.load(values_ptr + row.to(tl.int64) * stride_row + columns, mask=column_ok, other=0.0)
    tl.store(out_ptr + group.to(tl.int64) * num_columns + columns, total, mask=column_ok)


def _block_c(num_columns: int) -> int:
    return next(b for b in BLOCK_C_CHOICES if b >= num_columns or b == BLOCK_C_CHOICES[-1])


def segment_sum_triton(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``values [B, C]`` float64 -> ``[num_groups, C]`` float64, each group's rows summed in row order."""
    if values.stride(1) != 1:
        values = values.contiguous()
    num_columns = values.shape[1]
    out = torch.empty(layout.num_groups, num_columns, dtype=torch.float64, device=values.device)
    if layout.num_groups == 0 or num_columns == 0:
        return out.zero_()
    block_c = _block_c(num_columns)
    has_order = layout.order is not None
    grid = (layout.num_groups, triton.cdiv(num_columns, block_c))
    _segment_sum_kernel[grid](
        values, layout.order if has_order else layout.offsets, layout.offsets, out, num_columns, values.stride(0),
        HAS_ORDER=has_order, BLOCK_C=block_c, num_warps=4, num_stages=1,
    )
    return out


# ---------------------------------------------------------------------------------------------
# sm_90 compile specs
# ---------------------------------------------------------------------------------------------


def sm90_compile_specs() -> list[CompileSpec]:
    """Every configuration the advantages package launches on a GPU: the group kernel for each
    group-size bucket x (scale, aggregation, pass) x keep mask (rewards and weights are cast to
    fp64 before the launch), and the segment sum for each column bucket, with and without a row
    order (verl's ``index`` / contiguous groups)."""
    specs = []
    for block_g in BLOCK_G_CHOICES:
        for scale_code, decoupled, write_advantages in kernel_modes():
            for has_keep in (False, True):
                signature = {
                    "rewards_ptr": "*fp64", "weights_ptr": "*fp64",
                    "keep_ptr": "*i1" if has_keep else "*fp64", "scalars_ptr": "*fp64",
                    "offsets_ptr": "*i64",
                    "advantages_ptr": "*fp64", "group_mean_ptr": "*fp64", "group_std_ptr": "*fp64",
                    "group_count_ptr": "*fp64", "group_m2_ptr": "*fp64",
                    "num_groups": "i32", "max_group_size": "i32", "num_rewards": "i32",
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
    for block_c in BLOCK_C_CHOICES:
        for has_order in (False, True):
            signature = {
                "values_ptr": "*fp64", "order_ptr": "*i64", "offsets_ptr": "*i64", "out_ptr": "*fp64",
                "num_columns": "i32", "stride_row": "i32", "HAS_ORDER": "constexpr", "BLOCK_C": "constexpr",
            }
            name = f"segment_sum[{'index' if has_order else 'contiguous'},C<={block_c}]"
            specs.append(CompileSpec(name, _segment_sum_kernel, signature,
                                     {"HAS_ORDER": has_order, "BLOCK_C": block_c}, 4, 1))
    return specs
