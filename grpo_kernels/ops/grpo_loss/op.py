"""The loss as a PyTorch custom op (``grpo_kernels::grpo_loss``) with its autograd formula.

``loss_forward`` runs eagerly inside the op: the value checks, the entropy quantile, the
covariance selection, the row pass (``kernel.rows_triton`` or ``rows_torch.rows_torch``), then the
batch-wide normalizers applied to the ``[B, NUM_STATS]`` row sums and folded into the gradients,
so that the backward is one multiply. Options travel into the op as a string
(``LossConfig.as_json``); tensor counts and Clip-Cov's draw seed as tensors.
"""

from __future__ import annotations

import ast
import functools
import math

import torch

from grpo_kernels.ops.grpo_loss.covariance import covariance_selection
from grpo_kernels.ops.grpo_loss.kernel import rows_triton
from grpo_kernels.ops.grpo_loss.options import validate_loss_options
from grpo_kernels.ops.grpo_loss.rows_torch import Rows, rollout_is_batch_scale, rows_torch
from grpo_kernels.ops.grpo_loss.table import (
    METRIC_NAMES,
    S_EFF_ENTROPY,
    S_EFF_TOKENS,
    S_ENTROPY,
    S_HIGH,
    S_IS_WEIGHT,
    S_KL,
    S_LOSS,
    S_LOW,
    S_LOWER,
    S_PHI,
    S_REGION,
    S_REJECTED,
    S_TOKENS,
)
from grpo_kernels.ops.packing import cu_seqlens_value_checks, raise_failed

ROW_PASS = {"triton": rows_triton, "torch": rows_torch}


def _metrics_vector(cfg, row_stats, has_ref, has_entropy):
    """[len(METRIC_NAMES)] float32: every metric (those a loss type does not report are dropped later)."""
    stats = row_stats.sum(0)
    tokens = stats[S_TOKENS].clamp(min=1.0)
    nan = torch.full_like(tokens, float("nan"))
    return torch.stack([
        stats[S_KL] / tokens if has_ref else nan,
        stats[S_LOW] / tokens,
        stats[S_HIGH] / tokens,
        stats[S_REGION] / tokens,
        stats[S_ENTROPY] / tokens if has_entropy else nan,
        stats[S_LOWER] / tokens,
        stats[S_PHI] / row_stats.shape[0],
        stats[S_LOWER] / tokens,  # the same column: the cov losses flag their selection there
        stats[S_IS_WEIGHT] / tokens,
        stats[S_REJECTED] / (stats[S_TOKENS] + stats[S_REJECTED]).clamp(min=1.0),
    ])


def _check_values(cfg, tensors) -> None:
    """What only the values can tell, in one host sync (nothing to sync for integer masks, no
    tensor counts and no ``cu_seqlens``): a NaN/inf/negative float mask, a negative or NaN rollout
    IS ratio, a NaN or non-positive tensor count, ``cu_seqlens`` values that do not cut the tokens
    into sequences. Each would give a NaN, a silently wrong loss or a read out of bounds."""
    checks = []
    if tensors["cu_seqlens"] is not None:
        checks += cu_seqlens_value_checks(tensors["cu_seqlens"], tensors["logp"].shape[0])
    mask = tensors["mask"]
    if mask.dtype.is_floating_point:
        checks.append(("completion_mask must be finite and >= 0 (0 marks padding)",
                       ~(torch.isfinite(mask) & (mask >= 0)).all()))
    if tensors["is_ratio"] is not None:
        checks.append(("rollout_is_ratio must be >= 0 and not NaN (an importance-sampling ratio)",
                       ~(tensors["is_ratio"] >= 0).all()))
    for name in ("num_items_in_batch", "batch_num_tokens", "global_batch_size"):
        value = getattr(cfg, name)
        if isinstance(value, torch.Tensor):
            checks.append((f"{name} must be finite and > 0 (a count)",
                           ~(torch.isfinite(value.float()) & (value > 0)).all()))
    raise_failed(checks)


def _row_scale(cfg, row_stats) -> torch.Tensor:
    """[B] float32 per-row weight of the aggregation: 1 (token sums), 1 / max(n_i, 1) (TRL's
    per-sequence mean) or 1 / (n_i + 1e-8) (verl's). Applied to the kernel's row sums and, in the
    backward, to its gradient rows (both are linear in it), so the kernel needs no variant for it."""
    tokens = row_stats[:, S_TOKENS]
    if cfg.aggregation.row_norm == 1:
        return 1.0 / tokens.clamp(min=1.0)
    if cfg.aggregation.row_norm == 2:
        return 1.0 / (tokens + 1e-8)
    return torch.ones_like(tokens)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation), also past its 2**24-element limit."""
    if values.numel() <= 2**24:
        return torch.quantile(values, q)
    sorted_values = values.sort().values
    rank = q * (values.numel() - 1)
    below = int(math.floor(rank))
    above = min(below + 1, values.numel() - 1)
    return torch.lerp(sorted_values[below], sorted_values[above], torch.tensor(rank - below, dtype=values.dtype,
                                                                              device=values.device))


def _entropy_threshold(cfg, entropy, mask) -> torch.Tensor:
    """TRL's get_high_entropy_mask threshold: the (1 - q) quantile of the masked tokens' entropies
    (over this micro-batch), as a device scalar; -inf when the entropy mask is off."""
    device = mask.device
    if cfg.top_entropy_quantile >= 1.0:
        return torch.full((1,), float("-inf"), device=device, dtype=torch.float32)
    local = entropy.detach()[mask != 0].float()
    if local.numel() == 0:  # nothing to rank: TRL masks every token out
        return torch.full((1,), float("inf"), device=device, dtype=torch.float32)
    return _quantile(local, 1 - cfg.top_entropy_quantile).reshape(1).float()


COUNT_OPTIONS = ("num_items_in_batch", "batch_num_tokens", "global_batch_size")


@functools.lru_cache(maxsize=256)
def _options_from_json(options_json: str) -> dict:
    """Inverse of ``LossConfig.as_json``."""
    pairs = (item.split("=", 1) for item in options_json.split(";"))
    return {name: ast.literal_eval(value) for name, value in pairs}


def _loss_forward(logp, entropy, mask, advantages, old, ref, sampling, is_ratio, counts, draw_seed, cu_seqlens,
                  options_json, backend, entropy_grad):
    """The loss, its metrics and its gradients w.r.t. logp and entropy (already scaled), eagerly.

    Everything data-dependent (value checks, the entropy quantile, host syncs) happens here, inside
    the custom op, never in traced code.
    """
    options = dict(_options_from_json(options_json))
    options.update({name: count for name, count in zip(COUNT_OPTIONS, counts) if count is not None})
    cfg = validate_loss_options(**options)
    tensors = dict(mask=mask, advantages=advantages, old=old, ref=ref, sampling=sampling, is_ratio=is_ratio,
                   logp=logp, entropy=entropy, entropy_grad=entropy_grad, cu_seqlens=cu_seqlens)
    _check_values(cfg, tensors)
    if cfg.policy.token_selection is not None:
        tensors["token_value"] = covariance_selection(cfg, logp, tensors, draw_seed)
    tensors["is_scale"] = rollout_is_batch_scale(cfg, tensors)
    if entropy is not None:
        tensors["entropy_threshold"] = _entropy_threshold(cfg, entropy, mask)
    else:
        tensors["entropy_threshold"] = torch.full((1,), float("-inf"), device=logp.device, dtype=torch.float32)
    row_stats, grad_logp, grad_entropy = ROW_PASS[backend](cfg, tensors)
    B = row_stats.shape[0]  # rows, or packed sequences
    T = logp.shape[1] if cu_seqlens is None else None  # (packed: no padded length; see prepare_loss_inputs)
    policy_scale = cfg.aggregation.scale(cfg, row_stats, B, T)
    row_scale = _row_scale(cfg, row_stats)  # [B]: the per-row token mean, if any
    stats = row_stats.sum(0)
    loss = (row_stats[:, S_LOSS] * row_scale).sum() * policy_scale
    if cfg.entropy_coef != 0:
        entropy_scale = -cfg.entropy_coef / stats[S_EFF_TOKENS].clamp(min=1.0)
        loss = loss + stats[S_EFF_ENTROPY] * entropy_scale
    metrics = _metrics_vector(cfg, row_stats, ref is not None, entropy is not None)
    d_logp = grad_logp * (Rows(logp.shape, cu_seqlens).spread(row_scale) * policy_scale)
    d_entropy = grad_entropy * entropy_scale if grad_entropy is not None else logp.new_empty((0,))
    return loss.reshape(()).float(), metrics, d_logp, d_entropy


@torch.library.custom_op("grpo_kernels::grpo_loss", mutates_args=())
def _grpo_loss_op(logp: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor, advantages: torch.Tensor,
                  old: torch.Tensor | None, ref: torch.Tensor | None, sampling: torch.Tensor | None,
                  is_ratio: torch.Tensor | None, num_items_in_batch: torch.Tensor | None,
                  batch_num_tokens: torch.Tensor | None, global_batch_size: torch.Tensor | None,
                  draw_seed: torch.Tensor | None, cu_seqlens: torch.Tensor | None, options_json: str, backend: str,
                  entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss [], metrics [len(METRIC_NAMES)], d loss / d logp, d loss / d entropy or [0])``, the
    gradients in the token layout of ``logp``: ``[B, T]``, or ``[N]`` with ``cu_seqlens`` (int64 ``[S + 1]``)."""
    return _loss_forward(logp, entropy, mask, advantages, old, ref, sampling, is_ratio,
                         (num_items_in_batch, batch_num_tokens, global_batch_size), draw_seed, cu_seqlens,
                         options_json, backend, entropy_grad)


@_grpo_loss_op.register_fake
def _grpo_loss_fake(logp, entropy, mask, advantages, old, ref, sampling, is_ratio, num_items_in_batch,
                    batch_num_tokens, global_batch_size, draw_seed, cu_seqlens, options_json, backend, entropy_grad):
    d_entropy = logp.new_empty(logp.shape, dtype=torch.float32) if entropy_grad else logp.new_empty(
        (0,), dtype=torch.float32)
    return (logp.new_empty((), dtype=torch.float32), logp.new_empty((len(METRIC_NAMES),), dtype=torch.float32),
            logp.new_empty(logp.shape, dtype=torch.float32), d_entropy)


def _grpo_loss_setup_context(ctx, inputs, output):
    ctx.entropy_grad = inputs[-1]
    ctx.save_for_backward(output[2], output[3])
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _grpo_loss_backward(ctx, grad_loss, _grad_metrics, _grad_d_logp, _grad_d_entropy):
    d_logp, d_entropy = ctx.saved_tensors
    grad_loss = grad_loss.float()
    d_logp = d_logp * grad_loss if ctx.needs_input_grad[0] else None
    d_entropy = d_entropy * grad_loss if ctx.entropy_grad and ctx.needs_input_grad[1] else None
    return (d_logp, d_entropy) + (None,) * 14


_grpo_loss_op.register_autograd(_grpo_loss_backward, setup_context=_grpo_loss_setup_context)
