"""GRPO-family policy loss from per-token log-probs: loss, metrics and d loss / d logp in one pass.

For a batch of B completions of T tokens (``logprobs``, ``completion_mask`` ``[B, T]``) and one
advantage per completion, the loss is TRL 1.16's ``GRPOTrainer._compute_loss`` (see
``shared/grpo-semantics.md``)::

    l_t   = logp_t - old_t                                   (old = logp.detach() when not given)
    rho   = exp(l_t)                      token level
          = exp(sum_t m l_t / max(sum_t m, 1))               sequence level (GSPO), one per row
    P_t   = -min(min(rho, delta) A, clip(rho, 1-eps_low, 1+eps_high) A)     grpo/bnpo/dr_grpo/dapo/luspo
          = -stopgrad(min(rho, eps_high)) A logp_t                          cispo
          = -sigmoid(tau (rho-1)) 4/tau A,  tau = tau_pos if A > 0 else tau_neg      sapo
    L_t   = P_t * entropy_mask_t * rollout_is_ratio * off_policy_mask + beta * KL_t (* rho if bias-corrected)
    KL_t  = exp(ref - logp) - (ref - logp) - 1

aggregated per ``loss_type`` (grpo/sapo: mean over rows of the row's token mean; bnpo: token mean of
the micro-batch; dr_grpo: sum / (B * max_completion_length); dapo/cispo: sum / num_items_in_batch
per rank; luspo: mean over rows of the row's token sum), minus ``entropy_coef`` times the mean entropy
over the effective mask.

Kernel layout: one program owns ``BLOCK_B`` rows and walks along T in ``[BLOCK_B, BLOCK_T]`` tiles.
An optional first walk reduces per-row quantities on chip (token count, the GSPO mean log-ratio, the
off-policy KL); the main walk reads every input once and writes d loss / d logp, the weight of
d loss / d entropy and nine per-row partial sums (loss and metrics); sequence-level ratios need one
more walk that adds the row's d loss / d rho back onto its tokens. Everything normalized by a
batch-wide quantity (token count of the micro-batch or of the generation batch, B) is applied to the
``[B, 9]`` partial sums afterwards and folded into the scalar that the backward multiplies by, so the
kernel never needs a second launch and the backward is one multiply.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
import triton
import triton.language as tl

from grpo_kernels.ops.utils import (
    FLOAT_DTYPES,
    CompileSpec,
    check_tensor,
    resolve_backend,
)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = (None, "truncate", "mask")
METRIC_NAMES = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy")

# Policy-term family, a kernel constexpr.
_CLIP, _CISPO, _SAPO = 0, 1, 2
_FAMILY = {"cispo": _CISPO, "sapo": _SAPO, **{name: _CLIP for name in CLIP_LOSS_TYPES}}

# Columns of the per-row partial sums written by the kernel.
(_S_LOSS, _S_KL, _S_LOW, _S_HIGH, _S_REGION, _S_ENTROPY, _S_TOKENS, _S_EFF_ENTROPY, _S_EFF_TOKENS) = range(9)
NUM_STATS = 9

# Mask dtypes the kernel reads directly (anything else is cast to float32 first).
_KERNEL_MASK_DTYPES = {torch.float32: "fp32", torch.bool: "i1", torch.int32: "i32", torch.int64: "i64"}


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grpo_loss_kernel(
    Logp, OldLogp, RefLogp, SamplingLogp, Advantages, Mask, Entropy, RolloutRatio, EntropyThreshold,
    GradLogp, GradEntropy, RowStats,
    B, T,
    stride_logp, stride_old, stride_ref, stride_sampling, stride_mask,
    stride_adv_b, stride_adv_t, stride_ent_b, stride_ent_t, stride_is_b, stride_is_t,
    eps_low, eps_high, delta, beta, bias_kl, tau_pos, tau_neg,
    is_clip_min, is_clip_max, is_mask_mode, off_policy_threshold, write_grad_entropy,
    FAMILY: tl.constexpr, SEQ_LEVEL: tl.constexpr, PER_SEQ_NORM: tl.constexpr,
    OFF_POLICY: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Rows ``[pid * BLOCK_B, pid * BLOCK_B + BLOCK_B)``: per-token loss, its gradient, row sums.

    Absent optional inputs arrive as aliases that make their term vanish: old/ref/sampling point at
    Logp (log-ratio 0, KL 0), entropy at a zero scalar with strides 0, the rollout ratio at a one.
    ``GradLogp``/``GradEntropy`` hold the gradient before the batch-wide normalizer, which the
    caller folds into the backward's scalar.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    ROW_PASS: tl.constexpr = SEQ_LEVEL or PER_SEQ_NORM or OFF_POLICY

    tokens = tl.zeros((BLOCK_B,), dtype=tl.float32)
    log_ratio_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    off_policy_kl_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if ROW_PASS:
        # Per-row reductions needed before any token's loss: sum m, sum m*l (GSPO), sum m*kl (OPSM).
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + offs_t
            ok = row_ok[:, None] & (cols < T)[None, :]
            m = tl.load(Mask + rows64[:, None] * stride_mask + cols[None, :], mask=ok, other=0).to(tl.float32)
            active = m != 0
            tokens += tl.sum(m, axis=1)
            if SEQ_LEVEL or OFF_POLICY:
                x = tl.load(Logp + rows64[:, None] * stride_logp + cols[None, :], mask=ok, other=0.0)
            if SEQ_LEVEL:
                o = tl.load(OldLogp + rows64[:, None] * stride_old + cols[None, :], mask=ok, other=0.0)
                log_ratio_sum += tl.sum(tl.where(active, (x - o) * m, 0.0), axis=1)
            if OFF_POLICY:
                s = tl.load(SamplingLogp + rows64[:, None] * stride_sampling + cols[None, :], mask=ok, other=0.0)
                kl = s - x
                kl = tl.where(kl != kl, 0.0, kl)  # tokens the rollout engine could not score: no evidence
                off_policy_kl_sum += tl.sum(tl.where(active, kl * m, 0.0), axis=1)
    inv_tokens = 1.0 / tl.maximum(tokens, 1.0)
    seq_rho = tl.exp(log_ratio_sum * inv_tokens)
    off_policy_kl = off_policy_kl_sum * inv_tokens
    entropy_threshold = tl.load(EntropyThreshold)
    no_entropy_mask = entropy_threshold == float("-inf")

    acc_loss = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_kl = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_low = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_high = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_region = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_entropy = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_tokens = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_eff_entropy = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_eff_tokens = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_dloss_drho = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + offs_t
        ok = row_ok[:, None] & (cols < T)[None, :]
        m = tl.load(Mask + rows64[:, None] * stride_mask + cols[None, :], mask=ok, other=0).to(tl.float32)
        active = m != 0
        x = tl.load(Logp + rows64[:, None] * stride_logp + cols[None, :], mask=ok, other=0.0)
        o = tl.load(OldLogp + rows64[:, None] * stride_old + cols[None, :], mask=ok, other=0.0)
        r = tl.load(RefLogp + rows64[:, None] * stride_ref + cols[None, :], mask=ok, other=0.0)
        a = tl.load(Advantages + rows64[:, None] * stride_adv_b + cols[None, :] * stride_adv_t, mask=ok, other=0.0)
        ent = tl.load(Entropy + rows64[:, None] * stride_ent_b + cols[None, :] * stride_ent_t, mask=ok, other=0.0)
        is_ratio = tl.load(RolloutRatio + rows64[:, None] * stride_is_b + cols[None, :] * stride_is_t,
                           mask=ok, other=1.0)
        # Rollout IS ratio: "truncate" clamps into [min, max], "mask" zeroes what falls outside
        # (bounds are -inf/inf when unset, so mode "none" is a truncate that changes nothing).
        outside = (is_ratio < is_clip_min) | (is_ratio > is_clip_max)
        is_ratio = tl.where(is_mask_mode != 0, tl.where(outside, 0.0, is_ratio),
                            tl.minimum(tl.maximum(is_ratio, is_clip_min), is_clip_max))

        if SEQ_LEVEL:
            rho = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32) + seq_rho[:, None]
        else:
            rho = tl.exp(x - o)

        if FAMILY == 0:
            upper = 1.0 + eps_high
            lower = 1.0 - eps_low
            coef_clipped = tl.minimum(tl.maximum(rho, lower), upper)
            coef = tl.minimum(rho, delta)  # delta = inf when two-sided clipping is off
            unclipped_term = coef * a
            clipped_term = coef_clipped * a
            policy = -tl.minimum(unclipped_term, clipped_term)
            # torch.min splits the gradient evenly on ties; clamps pass it on their closed range.
            take_unclipped = tl.where(unclipped_term < clipped_term, 1.0,
                                      tl.where(unclipped_term == clipped_term, 0.5, 0.0))
            d_coef = tl.where(rho <= delta, 1.0, 0.0)
            d_clipped = tl.where((rho >= lower) & (rho <= upper), 1.0, 0.0)
            dpolicy_drho = -a * (take_unclipped * d_coef + (1.0 - take_unclipped) * d_clipped)
            dpolicy_dx = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
            is_low = (coef < lower) & (a < 0)
            is_high = (coef > upper) & (a > 0)
        elif FAMILY == 1:
            capped = tl.minimum(rho, eps_high)  # stop-gradient weight on logp
            policy = -capped * a * x
            dpolicy_dx = -capped * a
            dpolicy_drho = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
            is_low = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.int1)
            is_high = (rho > eps_high) & (a > 0)
        else:
            tau = tl.where(a > 0, tau_pos, tau_neg)
            gate = tl.sigmoid(tau * (rho - 1.0))
            policy = -gate * (4.0 / tau) * a
            dpolicy_drho = -4.0 * a * gate * (1.0 - gate)
            dpolicy_dx = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32)
            is_low = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.int1)
            is_high = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.int1)
        is_region = is_low | is_high

        entropy_mask = tl.where(no_entropy_mask, active, active & (ent * m >= entropy_threshold))
        multiplier = tl.where(entropy_mask, is_ratio, 0.0)
        if OFF_POLICY:
            keep = (a >= 0) | (off_policy_kl[:, None] <= off_policy_threshold)
            multiplier = tl.where(keep, multiplier, 0.0)

        diff = r - x
        exp_diff = tl.exp(diff)
        kl = exp_diff - diff - 1.0
        kl_weight = tl.where(bias_kl != 0, rho, 1.0)
        kl_term = tl.where(beta != 0, beta * kl * kl_weight, 0.0)
        loss_t = policy * multiplier + kl_term
        dloss_dx = dpolicy_dx * multiplier + tl.where(beta != 0, beta * (1.0 - exp_diff) * kl_weight, 0.0)
        dloss_drho = dpolicy_drho * multiplier + tl.where((beta != 0) & (bias_kl != 0), beta * kl, 0.0)

        if PER_SEQ_NORM:
            weight = tl.where(active, m * inv_tokens[:, None], 0.0)
        else:
            weight = tl.where(active, m, 0.0)
        acc_loss += tl.sum(tl.where(active, loss_t * weight, 0.0), axis=1)
        grad = tl.where(active, weight * dloss_dx, 0.0)
        if SEQ_LEVEL:
            acc_dloss_drho += tl.sum(tl.where(active, weight * dloss_drho, 0.0), axis=1)
        else:
            grad += tl.where(active, weight * dloss_drho * rho, 0.0)
        tl.store(GradLogp + rows64[:, None] * T + cols[None, :], grad, mask=ok)

        masked = tl.where(active, m, 0.0)
        acc_kl += tl.sum(tl.where(active, kl * kl_weight * m, 0.0), axis=1)
        acc_low += tl.sum(tl.where(is_low, masked, 0.0), axis=1)
        acc_high += tl.sum(tl.where(is_high, masked, 0.0), axis=1)
        acc_region += tl.sum(tl.where(is_region, masked, 0.0), axis=1)
        acc_entropy += tl.sum(tl.where(active, ent * m, 0.0), axis=1)
        acc_tokens += tl.sum(masked, axis=1)
        effective = tl.where(entropy_mask, m, 0.0)
        acc_eff_tokens += tl.sum(effective, axis=1)
        acc_eff_entropy += tl.sum(tl.where(entropy_mask, ent * m, 0.0), axis=1)
        if write_grad_entropy != 0:
            tl.store(GradEntropy + rows64[:, None] * T + cols[None, :], effective, mask=ok)

    if SEQ_LEVEL:
        # d rho_i / d logp_t = rho_i * m_t / max(n_i, 1): add the row's d loss / d rho to its tokens.
        row_coef = acc_dloss_drho * seq_rho * inv_tokens
        tl.debug_barrier()
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + offs_t
            ok = row_ok[:, None] & (cols < T)[None, :]
            m = tl.load(Mask + rows64[:, None] * stride_mask + cols[None, :], mask=ok, other=0).to(tl.float32)
            g_ptrs = GradLogp + rows64[:, None] * T + cols[None, :]
            grad = tl.load(g_ptrs, mask=ok, other=0.0)
            grad += tl.where(m != 0, m * row_coef[:, None], 0.0)
            tl.store(g_ptrs, grad, mask=ok)

    stats = RowStats + rows64 * 9  # NUM_STATS columns, in the order of the _S_* indices
    tl.store(stats + 0, acc_loss, mask=row_ok)
    tl.store(stats + 1, acc_kl, mask=row_ok)
    tl.store(stats + 2, acc_low, mask=row_ok)
    tl.store(stats + 3, acc_high, mask=row_ok)
    tl.store(stats + 4, acc_region, mask=row_ok)
    tl.store(stats + 5, acc_entropy, mask=row_ok)
    tl.store(stats + 6, acc_tokens, mask=row_ok)
    tl.store(stats + 7, acc_eff_entropy, mask=row_ok)
    tl.store(stats + 8, acc_eff_tokens, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# One [BLOCK_B, BLOCK_T] = [4, 256] tile shape for every T: the kernel moves O(B*T) bytes, a few
# microseconds next to the log-prob kernel, so a second tile shape would only double the compiled
# variants. Several rows per program keep short completions from idling most lanes.
_BLOCK_B, _BLOCK_T, _NUM_WARPS, _NUM_STAGES = 4, 256, 8, 1


def _kernel_switches(cfg) -> dict:
    return {
        "FAMILY": _FAMILY[cfg.loss_type],
        "SEQ_LEVEL": cfg.sequence_level,
        "PER_SEQ_NORM": cfg.loss_type in ("grpo", "sapo"),
        "OFF_POLICY": cfg.off_policy_mask_threshold is not None,
    }


# ---------------------------------------------------------------------------------------------
# Row pass: Triton and PyTorch implementations of the same contract
# ---------------------------------------------------------------------------------------------
# Both take the options and the prepared [B, T] inputs and return (row_stats [B, 9] fp32,
# d loss / d logp [B, T] fp32 before the batch-wide normalizer, the effective-mask weights of
# d loss / d entropy [B, T] fp32 or None).


def _rows_triton(cfg, t):
    logp = t["logp"]
    B, T = logp.shape
    device = logp.device
    grad_logp = torch.empty((B, T), device=device, dtype=torch.float32)
    write_grad_entropy = t["entropy_grad"]
    grad_entropy = torch.empty((B, T), device=device, dtype=torch.float32) if write_grad_entropy else grad_logp
    row_stats = torch.empty((B, NUM_STATS), device=device, dtype=torch.float32)

    def alias(name):
        tensor = t[name]
        return (logp, logp.stride(0)) if tensor is None else (tensor, tensor.stride(0))

    old, stride_old = alias("old")
    ref, stride_ref = alias("ref")
    sampling, stride_sampling = (
        (t["sampling"], t["sampling"].stride(0)) if t["sampling"] is not None else (old, stride_old))
    adv = t["advantages"]
    if t["entropy"] is not None:
        entropy, stride_ent = t["entropy"].detach(), t["entropy"].stride()
    else:
        entropy, stride_ent = torch.zeros(1, device=device, dtype=torch.float32), (0, 0)
    if t["is_ratio"] is not None:
        is_ratio, stride_is = t["is_ratio"], t["is_ratio"].stride()
    else:
        is_ratio, stride_is = torch.ones(1, device=device, dtype=torch.float32), (0, 0)
    grid = (triton.cdiv(B, _BLOCK_B),)
    _grpo_loss_kernel[grid](
        logp.detach(), old, ref.detach(), sampling.detach(), adv, t["mask"], entropy, is_ratio,
        t["entropy_threshold"], grad_logp, grad_entropy, row_stats,
        B, T,
        logp.stride(0), stride_old, stride_ref, stride_sampling, t["mask"].stride(0),
        adv.stride(0), adv.stride(1), stride_ent[0], stride_ent[1], stride_is[0], stride_is[1],
        cfg.epsilon_low, cfg.epsilon_high, cfg.delta_or_inf, cfg.beta, int(cfg.use_bias_correction_kl),
        cfg.sapo_temperature_pos, cfg.sapo_temperature_neg,
        cfg.is_clip_min, cfg.is_clip_max, int(cfg.rollout_is_mode == "mask"),
        cfg.off_policy_threshold_or_inf, int(write_grad_entropy),
        BLOCK_B=_BLOCK_B, BLOCK_T=_BLOCK_T, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
        **_kernel_switches(cfg),
    )
    return row_stats, grad_logp, (grad_entropy if write_grad_entropy else None)


def _rows_torch(cfg, t):
    """The kernel's arithmetic, vectorized over [B, T] in float32."""
    x = t["logp"].detach()
    B, T = x.shape
    m = t["mask"].to(torch.float32)
    active = m != 0
    zero = torch.zeros((), device=x.device, dtype=torch.float32)
    o = t["old"] if t["old"] is not None else x
    r = t["ref"] if t["ref"] is not None else x
    a = t["advantages"].expand(B, T)
    ent = t["entropy"].detach() if t["entropy"] is not None else torch.zeros_like(x)
    is_ratio = t["is_ratio"].expand(B, T) if t["is_ratio"] is not None else torch.ones_like(x)
    if cfg.rollout_is_mode == "mask":
        is_ratio = torch.where((is_ratio < cfg.is_clip_min) | (is_ratio > cfg.is_clip_max), zero, is_ratio)
    else:
        is_ratio = is_ratio.clamp(cfg.is_clip_min, cfg.is_clip_max)

    tokens = m.sum(1)
    inv_tokens = 1.0 / tokens.clamp(min=1.0)
    if cfg.sequence_level:
        rho = torch.exp(torch.where(active, (x - o) * m, zero).sum(1) * inv_tokens)[:, None].expand(B, T)
    else:
        rho = torch.exp(x - o)

    lower, upper = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    no_flags = torch.zeros_like(active)
    if _FAMILY[cfg.loss_type] == _CLIP:
        coef_clipped = rho.clamp(lower, upper)
        coef = rho.clamp(max=cfg.delta_or_inf)
        unclipped_term, clipped_term = coef * a, coef_clipped * a
        policy = -torch.minimum(unclipped_term, clipped_term)
        take_unclipped = torch.where(
            unclipped_term < clipped_term, 1.0, torch.where(unclipped_term == clipped_term, 0.5, 0.0))
        d_coef = (rho <= cfg.delta_or_inf).float()
        d_clipped = ((rho >= lower) & (rho <= upper)).float()
        dpolicy_drho = -a * (take_unclipped * d_coef + (1.0 - take_unclipped) * d_clipped)
        dpolicy_dx = torch.zeros_like(x)
        is_low, is_high = (coef < lower) & (a < 0), (coef > upper) & (a > 0)
    elif _FAMILY[cfg.loss_type] == _CISPO:
        capped = rho.clamp(max=cfg.epsilon_high)
        policy, dpolicy_dx, dpolicy_drho = -capped * a * x, -capped * a, torch.zeros_like(x)
        is_low, is_high = no_flags, (rho > cfg.epsilon_high) & (a > 0)
    else:
        tau = torch.where(a > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        gate = torch.sigmoid(tau * (rho - 1.0))
        policy = -gate * (4.0 / tau) * a
        dpolicy_drho, dpolicy_dx = -4.0 * a * gate * (1.0 - gate), torch.zeros_like(x)
        is_low, is_high = no_flags, no_flags
    is_region = is_low | is_high

    threshold = t["entropy_threshold"]
    entropy_mask = active & ((threshold == float("-inf")) | (ent * m >= threshold))
    multiplier = torch.where(entropy_mask, is_ratio, zero)
    if cfg.off_policy_mask_threshold is not None:
        sampling = t["sampling"] if t["sampling"] is not None else o
        kl_off = torch.nan_to_num(sampling - x, nan=0.0)
        off_policy_kl = torch.where(active, kl_off * m, zero).sum(1) * inv_tokens
        keep = (a >= 0) | (off_policy_kl[:, None] <= cfg.off_policy_mask_threshold)
        multiplier = torch.where(keep, multiplier, zero)

    diff = r - x
    exp_diff = torch.exp(diff)
    kl = exp_diff - diff - 1.0
    kl_weight = rho if cfg.use_bias_correction_kl else torch.ones_like(rho)
    use_kl = cfg.beta != 0
    loss_t = policy * multiplier + (cfg.beta * kl * kl_weight if use_kl else 0.0)
    dloss_dx = dpolicy_dx * multiplier + (cfg.beta * (1.0 - exp_diff) * kl_weight if use_kl else 0.0)
    dloss_drho = dpolicy_drho * multiplier + (cfg.beta * kl if use_kl and cfg.use_bias_correction_kl else 0.0)

    weight = torch.where(active, m * (inv_tokens[:, None] if cfg.loss_type in ("grpo", "sapo") else 1.0), zero)
    grad = torch.where(active, weight * dloss_dx, zero)
    if cfg.sequence_level:
        row_dloss_drho = torch.where(active, weight * dloss_drho, zero).sum(1)
        grad = grad + torch.where(active, m * (row_dloss_drho * rho[:, 0] * inv_tokens)[:, None], zero)
    else:
        grad = grad + torch.where(active, weight * dloss_drho * rho, zero)

    masked = torch.where(active, m, zero)
    effective = torch.where(entropy_mask, m, zero)
    row_stats = torch.stack([
        torch.where(active, loss_t * weight, zero).sum(1),
        torch.where(active, kl * kl_weight * m, zero).sum(1),
        torch.where(is_low, masked, zero).sum(1),
        torch.where(is_high, masked, zero).sum(1),
        torch.where(is_region, masked, zero).sum(1),
        torch.where(active, ent * m, zero).sum(1),
        masked.sum(1),
        torch.where(entropy_mask, ent * m, zero).sum(1),
        effective.sum(1),
    ], dim=1)
    return row_stats, grad, (effective if t["entropy_grad"] else None)


_ROW_PASS = {"triton": _rows_triton, "torch": _rows_torch}


# ---------------------------------------------------------------------------------------------
# Batch-wide normalizers and the autograd Function
# ---------------------------------------------------------------------------------------------


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _policy_scale(cfg, stats: torch.Tensor, num_rows: int) -> torch.Tensor:
    """1 / (the loss type's normalizer), a 0-d float32 tensor (no host sync)."""
    tokens = stats[_S_TOKENS]
    if cfg.loss_type in ("grpo", "sapo", "luspo"):
        return torch.full_like(tokens, 1.0 / num_rows)
    if cfg.loss_type == "bnpo":
        return 1.0 / tokens.clamp(min=1.0)
    if cfg.loss_type == "dr_grpo":
        return torch.full_like(tokens, 1.0 / (num_rows * cfg.max_completion_length))
    # dapo / cispo: tokens of the whole generation batch, per rank (TRL: num_items_in_batch /
    # num_processes); without it, the micro-batch's tokens averaged over ranks (Liger).
    world_size = _world_size()
    if cfg.num_items_in_batch is not None:
        items = torch.as_tensor(cfg.num_items_in_batch, dtype=torch.float32).to(tokens.device)
        normalizer = items.clamp(min=1.0) / world_size
    else:
        normalizer = tokens.clone()
        if world_size > 1:
            torch.distributed.all_reduce(normalizer, op=torch.distributed.ReduceOp.SUM)
        normalizer = (normalizer / world_size).clamp(min=1.0)
    return 1.0 / normalizer


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, cfg, tensors, backend):
        row_stats, grad_logp, grad_entropy = _ROW_PASS[backend](cfg, tensors)
        stats = row_stats.sum(0)
        num_rows = logp.shape[0]
        policy_scale = _policy_scale(cfg, stats, num_rows)
        loss = stats[_S_LOSS] * policy_scale
        entropy_scale = -cfg.entropy_coef / stats[_S_EFF_TOKENS].clamp(min=1.0)
        if cfg.entropy_coef != 0:
            loss = loss + stats[_S_EFF_ENTROPY] * entropy_scale
        tokens = stats[_S_TOKENS].clamp(min=1.0)
        nan = torch.full_like(tokens, float("nan"))
        metrics = torch.stack([
            stats[_S_KL] / tokens if tensors["ref"] is not None else nan,
            stats[_S_LOW] / tokens,
            stats[_S_HIGH] / tokens,
            stats[_S_REGION] / tokens,
            stats[_S_ENTROPY] / tokens if entropy is not None else nan,
        ])
        ctx.mark_non_differentiable(metrics)
        ctx.entropy_grad = grad_entropy is not None
        ctx.save_for_backward(grad_logp, policy_scale, grad_entropy, entropy_scale)
        return loss, metrics

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_metrics):
        grad_logp, policy_scale, grad_entropy, entropy_scale = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None
        grad_loss = grad_loss.float()
        d_logp = grad_logp * (policy_scale * grad_loss) if ctx.needs_input_grad[0] else None
        d_entropy = None
        if ctx.entropy_grad and ctx.needs_input_grad[1]:
            d_entropy = grad_entropy * (entropy_scale * grad_loss)
        return d_logp, d_entropy, None, None, None


# ---------------------------------------------------------------------------------------------
# Options and validation
# ---------------------------------------------------------------------------------------------


class _Config:
    """The validated scalar options of ``grpo_loss``; their defaults live here, and only here."""

    def __init__(self, *, beta=0.0, loss_type="dapo", epsilon_low=0.2, epsilon_high=None, delta=None,
                 importance_sampling_level="token", max_completion_length=None, num_items_in_batch=None,
                 rollout_is_mode=None, rollout_is_clip_min=None, rollout_is_clip_max=3.0,
                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, use_bias_correction_kl=False,
                 entropy_coef=0.0, top_entropy_quantile=1.0, off_policy_mask_threshold=None):
        if loss_type == "vespo":
            raise ValueError(
                "loss_type='vespo' is not supported by grpo_kernels (its gamma weights are not implemented); "
                f"supported loss types: {', '.join(LOSS_TYPES)}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo"):
            raise ValueError(
                f"importance_sampling_level='sequence' (GSPO) makes no sense with loss_type={loss_type!r}: "
                "its per-token weight is defined on token ratios; use importance_sampling_level='token'")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' normalizes by B * max_completion_length: pass max_completion_length")
        if max_completion_length is not None and (
                isinstance(max_completion_length, bool) or not isinstance(max_completion_length, numbers.Integral)
                or max_completion_length <= 0):
            raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
        self.loss_type = loss_type
        self.sequence_level = importance_sampling_level == "sequence"
        self.max_completion_length = None if max_completion_length is None else int(max_completion_length)
        self.beta = _finite("beta", beta)
        self.epsilon_low = _finite("epsilon_low", epsilon_low)
        self.epsilon_high = self.epsilon_low if epsilon_high is None else _finite("epsilon_high", epsilon_high)
        if delta is not None and _finite("delta", delta) <= 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        self.delta_or_inf = math.inf if delta is None else float(delta)
        self.sapo_temperature_pos = _positive("sapo_temperature_pos", sapo_temperature_pos)
        self.sapo_temperature_neg = _positive("sapo_temperature_neg", sapo_temperature_neg)
        self.use_bias_correction_kl = bool(use_bias_correction_kl)
        self.entropy_coef = _finite("entropy_coef", entropy_coef)
        self.top_entropy_quantile = _finite("top_entropy_quantile", top_entropy_quantile)
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
        if rollout_is_mode not in ROLLOUT_IS_MODES:
            raise ValueError(f"rollout_is_mode must be None, 'truncate' or 'mask', got {rollout_is_mode!r}")
        self.rollout_is_mode = rollout_is_mode
        if rollout_is_mode is None:
            self.is_clip_min, self.is_clip_max = -math.inf, math.inf
        else:
            self.is_clip_min = _finite_or("rollout_is_clip_min", rollout_is_clip_min, -math.inf)
            self.is_clip_max = _finite_or("rollout_is_clip_max", rollout_is_clip_max, math.inf)
            if self.is_clip_min > self.is_clip_max:
                raise ValueError(
                    f"rollout_is_clip_min {rollout_is_clip_min} > rollout_is_clip_max {rollout_is_clip_max}")
        self.off_policy_mask_threshold = off_policy_mask_threshold
        self.off_policy_threshold_or_inf = _finite_or("off_policy_mask_threshold", off_policy_mask_threshold, math.inf)
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
            num_items_in_batch = num_items_in_batch.detach().reshape(())
        elif num_items_in_batch is not None:
            _finite("num_items_in_batch", num_items_in_batch)
        self.num_items_in_batch = num_items_in_batch


def _finite(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _finite_or(name, value, default) -> float:
    return default if value is None else _finite(name, value)


def _positive(name, value) -> float:
    value = _finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _as_float32_rows(name, tensor, shape):
    """[B, T] float tensor -> float32 with unit stride along T (copies only when needed)."""
    if tensor is None:
        return None
    check_tensor(name, tensor, dtypes=FLOAT_DTYPES, ndim=2)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have the shape of logprobs {shape}, got {tuple(tensor.shape)}")
    tensor = tensor.detach().float()
    return tensor if tensor.stride(1) == 1 or shape[1] == 1 else tensor.contiguous()


def _per_row_or_token(name, tensor, shape, what):
    """[B], [B, 1] or [B, T] -> float32 [B, 1] or [B, T] (broadcast along T by a zero stride)."""
    if tensor is None:
        return None
    check_tensor(name, tensor, dtypes=FLOAT_DTYPES)
    B, T = shape
    if tensor.dim() == 1 and tensor.shape[0] == B:
        tensor = tensor[:, None]
    if tensor.dim() != 2 or tensor.shape[0] != B or tensor.shape[1] not in (1, T):
        raise ValueError(f"{name} must be [B], [B, 1] or [B, T] = [{B}], [{B}, 1] or [{B}, {T}] ({what}), "
                         f"got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().float()
    if tensor.shape[1] == 1:
        return tensor.expand(B, T)
    return tensor if tensor.stride(1) == 1 else tensor.contiguous()


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


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


_OPTION_NAMES = frozenset(inspect.signature(_Config.__init__).parameters) - {"self"}


def prepare_loss_inputs(shape, device, completion_mask, advantages, *, old_logprobs=None, ref_logprobs=None,
                        entropy=None, will_have_entropy=False, rollout_is_ratio=None, sampling_logprobs=None,
                        **options):
    """Validate everything ``grpo_loss`` gets besides the log-probs, before any launch.

    ``shape``/``device``: those of the ``[B, T]`` log-probs. ``will_have_entropy``: the caller
    computes the entropy later (the fused API). Returns ``(cfg, tensors)``: the options object and
    the per-token inputs as float32 with unit stride along T (``[B, 1]`` inputs broadcast).
    """
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown grpo_loss option(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_OPTION_NAMES))}")
    cfg = _Config(**options)
    shape = tuple(shape)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"log-probs must be a non-empty [B, T] tensor, got shape {shape}")
    check_tensor("completion_mask", completion_mask, ndim=2)
    if tuple(completion_mask.shape) != shape:
        raise ValueError(f"completion_mask must have the shape of the log-probs {shape}, "
                         f"got {tuple(completion_mask.shape)}")
    if completion_mask.dtype.is_complex:
        raise TypeError(f"completion_mask must be bool, integer or float, got {completion_mask.dtype}")
    check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES)
    for name, tensor in (("completion_mask", completion_mask), ("advantages", advantages),
                         ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("entropy", entropy),
                         ("rollout_is_ratio", rollout_is_ratio), ("sampling_logprobs", sampling_logprobs)):
        if tensor is not None and isinstance(tensor, torch.Tensor) and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the log-probs are on {device}")
    if cfg.beta != 0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs (the reference model's per-token log-probs)")
    has_entropy = entropy is not None or will_have_entropy
    if not has_entropy and (cfg.entropy_coef != 0 or cfg.top_entropy_quantile < 1.0):
        raise ValueError("entropy_coef != 0 and top_entropy_quantile < 1 need the per-token entropy")
    if sampling_logprobs is not None and cfg.off_policy_mask_threshold is None:
        raise ValueError("sampling_logprobs is only used by the off-policy mask: set off_policy_mask_threshold")
    mask = completion_mask if completion_mask.dtype in _KERNEL_MASK_DTYPES else completion_mask.float()
    tensors = {
        "mask": mask if mask.stride(1) == 1 or shape[1] == 1 else mask.contiguous(),
        "advantages": _per_row_or_token("advantages", advantages, shape, "one per completion"),
        "old": _as_float32_rows("old_logprobs", old_logprobs, shape),
        "ref": _as_float32_rows("ref_logprobs", ref_logprobs, shape),
        "sampling": _as_float32_rows("sampling_logprobs", sampling_logprobs, shape),
        "is_ratio": _per_row_or_token("rollout_is_ratio", rollout_is_ratio, shape, "per token or per sequence"),
    }
    if entropy is not None:
        check_tensor("entropy", entropy, dtypes=FLOAT_DTYPES, ndim=2)
        if tuple(entropy.shape) != shape:
            raise ValueError(f"entropy must have the shape of the log-probs {shape}, got {tuple(entropy.shape)}")
    return cfg, tensors


def grpo_loss(
    logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_is_ratio: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    **options,
):
    """GRPO-family policy loss of TRL 1.16's ``GRPOTrainer`` from per-token log-probs.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (differentiable).
        completion_mask: ``[B, T]`` bool/int/float; 0 marks padding (and, e.g., tool-output tokens).
        advantages: ``[B]`` (or ``[B, 1]``, or ``[B, T]`` per token) advantages, not differentiated.
        old_logprobs: ``[B, T]`` log-probs of the sampling policy; ``None`` means ``logprobs.detach()``
            (ratio 1, gradient kept).
        ref_logprobs: ``[B, T]`` reference-model log-probs; required when ``beta != 0``. When given
            with ``beta == 0`` only the ``kl`` metric uses it.
        entropy: ``[B, T]`` per-token entropies (differentiable); required for ``entropy_coef != 0`` or
            ``top_entropy_quantile < 1``, and for the ``entropy`` metric.
        rollout_is_ratio: importance-sampling ratio between training and rollout engine (TRL's
            ``importance_sampling_ratio``, Liger's ``vllm_is_ratio``): ``[B, T]`` per token, or ``[B]``
            / ``[B, 1]`` per sequence; multiplies the policy term (not the KL). See ``rollout_is_mode``.
        sampling_logprobs: ``[B, T]`` rollout-engine log-probs for the off-policy mask (defaults to
            ``old_logprobs``, as in TRL).
        temperature: accepted for signature parity with the fused API and ignored (the log-probs are
            already temperature-scaled).
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else PyTorch),
            ``"triton"`` or ``"torch"``.

    Options (keyword, defaults in brackets):
        beta [0.0]: weight of the k3 KL to the reference model.
        loss_type ["dapo"]: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo`` or ``luspo``.
        epsilon_low [0.2], epsilon_high [None = epsilon_low]: clip range ``[1 - eps_low, 1 + eps_high]``.
            For ``cispo``, ``epsilon_high`` is the ratio cap itself (TRL recommends 5.0).
        delta [None]: two-sided clipping (INTELLECT-2): the unclipped branch uses ``min(rho, delta)``.
        importance_sampling_level ["token"]: or ``"sequence"`` (GSPO; clip loss types only).
        max_completion_length [None]: required by ``dr_grpo``.
        num_items_in_batch [None]: active tokens of the whole generation batch on all ranks (``dapo``,
            ``cispo``); the loss divides by ``max(num_items_in_batch, 1) / world_size`` (TRL).
            ``None``: the micro-batch's token count, summed over ranks and averaged (Liger's fallback).
        rollout_is_mode [None]: ``None``: ``rollout_is_ratio`` is used as given, i.e. the caller already
            truncated/masked it as TRL does. ``"truncate"``: clamped into
            ``[rollout_is_clip_min, rollout_is_clip_max]``; ``"mask"``: set to 0 outside that range
            (TRL's ``*_truncate`` / ``*_mask`` modes; a ``None`` bound is open).
        rollout_is_clip_min [None], rollout_is_clip_max [3.0]: the bounds of those modes.
        sapo_temperature_pos [1.0], sapo_temperature_neg [1.05]: SAPO gate temperatures (A > 0 / A <= 0).
        use_bias_correction_kl [False]: multiply the KL by the unclipped ratio (DeepSeek-V3.2).
        entropy_coef [0.0]: entropy bonus: ``loss -= entropy_coef * mean entropy`` over the effective
            mask (completion mask x entropy mask), independent of the loss type's normalizer (TRL).
        top_entropy_quantile [1.0]: keep the policy term only on tokens whose entropy is in this top
            quantile of the micro-batch's masked tokens (TRL's ``get_high_entropy_mask``).
        off_policy_mask_threshold [None]: off-policy sequence mask (DeepSeek-V3.2): drop the policy
            term of rows with A < 0 whose mean ``sampling_logprobs - logprobs`` exceeds it.

    Returns:
        ``(loss, metrics)``: a differentiable 0-d float32 loss (w.r.t. ``logprobs`` and ``entropy``),
        and a dict of detached 0-d float32 tensors, all means over the masked tokens of this
        micro-batch: ``kl`` (NaN without ``ref_logprobs``), ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (for ``cispo``: the capped fraction,
        reported as high and region; 0 for ``sapo``) and ``entropy`` (NaN without ``entropy``).
        Token-weighted at sequence level too (TRL logs GSPO clip ratios per sequence). Gradient
        accumulation scaling is left to the caller.

    Raises:
        ValueError / TypeError, before any launch, for bad shapes, dtypes, devices or a combination
        that makes no sense (sequence level with cispo/sapo, dr_grpo without max_completion_length,
        beta != 0 without ref_logprobs, an unknown loss_type or option; ``vespo`` is not supported).
    """
    del temperature  # log-probs are already temperature-scaled
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES, ndim=2)
    cfg, tensors = prepare_loss_inputs(
        logprobs.shape, logprobs.device, completion_mask, advantages, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, entropy=entropy, rollout_is_ratio=rollout_is_ratio,
        sampling_logprobs=sampling_logprobs, **options)
    backend = resolve_backend(logprobs.device, backend)
    return grpo_loss_prepared(logprobs, entropy, cfg, tensors, backend)


def grpo_loss_prepared(logprobs, entropy, cfg, tensors, backend):
    """``grpo_loss`` on inputs already checked by ``prepare_loss_inputs``."""
    logp32 = logprobs.float()
    if logp32.stride(1) != 1:
        logp32 = logp32.contiguous()
    entropy32 = None
    if entropy is not None:
        entropy32 = entropy.float()
        if entropy32.stride(1) != 1:
            entropy32 = entropy32.contiguous()
    # d loss / d entropy is needed only for an entropy bonus on an entropy that carries gradient
    entropy_grad = entropy32 is not None and entropy32.requires_grad and cfg.entropy_coef != 0
    tensors = dict(tensors, logp=logp32, entropy=entropy32, entropy_grad=entropy_grad)
    if entropy32 is not None:
        tensors["entropy_threshold"] = _entropy_threshold(cfg, entropy32, tensors["mask"])
    else:
        tensors["entropy_threshold"] = torch.full((1,), float("-inf"), device=logp32.device, dtype=torch.float32)
    loss, metrics = _GRPOLossFunction.apply(logp32, entropy32, cfg, tensors, backend)
    return loss, dict(zip(METRIC_NAMES, metrics.unbind(0)))


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for the sm_90 compile check
# ---------------------------------------------------------------------------------------------


def _switch_combinations():
    """Every (FAMILY, SEQ_LEVEL, PER_SEQ_NORM, OFF_POLICY) that ``_kernel_switches`` can return."""
    combos = set()
    for loss_type in LOSS_TYPES:
        for level in IMPORTANCE_SAMPLING_LEVELS:
            if level == "sequence" and loss_type in ("cispo", "sapo"):
                continue
            for off_policy in (False, True):
                family = _FAMILY[loss_type]
                combos.add((family, level == "sequence", loss_type in ("grpo", "sapo"), off_policy))
    return sorted(combos)


def sm90_compile_specs() -> list[CompileSpec]:
    """Every switch combination x every mask dtype the launcher passes, at the one tile shape."""
    signature = {name: "*fp32" for name in ("Logp", "OldLogp", "RefLogp", "SamplingLogp", "Advantages")}
    signature["Mask"] = None  # per spec
    signature.update({name: "*fp32" for name in ("Entropy", "RolloutRatio", "EntropyThreshold", "GradLogp",
                                                 "GradEntropy", "RowStats")})
    signature.update({name: "i32" for name in (
        "B", "T", "stride_logp", "stride_old", "stride_ref", "stride_sampling", "stride_mask",
        "stride_adv_b", "stride_adv_t", "stride_ent_b", "stride_ent_t", "stride_is_b", "stride_is_t")})
    signature.update({name: "fp32" for name in ("eps_low", "eps_high", "delta", "beta")})
    signature["bias_kl"] = "i32"
    signature.update({name: "fp32" for name in ("tau_pos", "tau_neg", "is_clip_min", "is_clip_max")})
    signature["is_mask_mode"] = "i32"
    signature["off_policy_threshold"] = "fp32"
    signature["write_grad_entropy"] = "i32"
    specs = []
    for family, seq_level, per_seq_norm, off_policy in _switch_combinations():
        constexprs = {"FAMILY": family, "SEQ_LEVEL": seq_level, "PER_SEQ_NORM": per_seq_norm,
                      "OFF_POLICY": off_policy, "BLOCK_B": _BLOCK_B, "BLOCK_T": _BLOCK_T}
        for mask_ty in _KERNEL_MASK_DTYPES.values():
            specs.append(CompileSpec(
                name=(f"grpo_loss[family={family},seq={seq_level},seqnorm={per_seq_norm},"
                      f"offpolicy={off_policy},mask={mask_ty}]"),
                kernel=_grpo_loss_kernel,
                signature={**signature, "Mask": f"*{mask_ty}", **{name: "constexpr" for name in constexprs}},
                constexprs=constexprs,
                num_warps=_NUM_WARPS,
                num_stages=_NUM_STAGES,
            ))
    return specs
