"""The Triton kernel of the row pass and its launch.

One program owns ``BLOCK_B`` rows and walks along T in ``[BLOCK_B, BLOCK_T]`` tiles. A row is a
padded row, or, with ``cu_seqlens``, a packed sequence: the same walk over a segment of the token
dimension (``token_tile``), up to the longest sequence of the program, so that a packed batch
costs at most what its padded layout costs and reads no padding. An optional
first walk reduces per-row quantities on chip (token count, the GSPO mean log-ratio, VESPO's
summed log-ratio, GMPO's clipped mean, the off-policy KL); the main walk reads every input once
and writes d loss / d logp (before the batch-wide normalizer), the weights of d loss / d entropy
and the per-row partial sums (``table.STAT_COLUMNS``); sequence-level ratios need one more walk
that adds the row's d loss / d rho back onto its tokens. Which policy term, KL estimator and row
reduction run is decided by constexpr switches (``kernel_switches``) derived from the tables.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.ops.grpo_loss.table import (
    DEFAULT_RS_STAT,
    NUM_STATS,
    REJECTION_SAMPLING,
    ROLLOUT_IS_LEVELS,
    ROW_LOG_RATIO_MEAN,
    RS_NONE,
)
from grpo_kernels.ops.grpo_loss.terms import (
    gmpo_log_ratio,
    importance_ratio,
    rollout_is_weight,
    token_loss,
    vespo_log_is,
    vespo_phi,
)

# Mask dtypes the kernel reads directly (anything else is cast to float32 first).
KERNEL_MASK_DTYPES = {torch.float32: "fp32", torch.bool: "i1", torch.int32: "i32", torch.int64: "i64"}


@triton.jit
def token_tile(t0, offs_t, row_ok, seq_start, seq_len, T, PACKED: tl.constexpr):
    """Positions ``t0 + offs_t`` of each row: ``(tok, ok)``, ``tok`` the offset added to an input's
    row base (``row_base``, or ``row * stride_b`` for inputs that may be per row) and ``ok`` the
    in-bounds mask ``[BLOCK_B, BLOCK_T]``. Padded: the column, ``ok`` below T; packed: the
    sequence's first token + the position (int32, as the columns; a packed input's token stride is
    1, its row stride 0), ``ok`` below the sequence's length."""
    cols = t0 + offs_t
    if PACKED:
        tok = seq_start[:, None] + cols[None, :]
        ok = row_ok[:, None] & (cols[None, :] < seq_len[:, None])
    else:
        tok = cols[None, :]
        ok = row_ok[:, None] & (cols < T)[None, :]
    return tok, ok


@triton.jit
def row_base(rows64, stride, PACKED: tl.constexpr):
    """A token tensor's offset of each row, ``[BLOCK_B, 1]``: row * stride (padded); 0 (packed: its
    rows are addressed by their tokens' positions, ``token_tile``)."""
    if PACKED:
        base = tl.zeros_like(rows64)[:, None]
    else:
        base = rows64[:, None] * stride
    return base


@triton.jit
def grpo_loss_kernel(
    Logp, OldLogp, RefLogp, SamplingLogp, Advantages, Mask, Entropy, RolloutRatio, EntropyThreshold,
    TokenValue, IsScale, GradLogp, GradEntropy, RowStats, CuSeqlens,
    B, T,
    stride_logp, stride_old, stride_ref, stride_sampling, stride_mask,
    stride_adv_b, stride_adv_t, stride_ent_b, stride_ent_t, stride_is_b, stride_is_t, stride_token_value,
    p0, p1, p2, p3, beta, bias_kl, log_ratio_bound,
    is_clip_min, is_clip_max, is_mask_mode, off_policy_threshold, rs_lower, rs_upper, write_grad_entropy,
    POLICY: tl.constexpr, KL: tl.constexpr, ROW_LOG_RATIO: tl.constexpr, FOLDS_IS_RATIO: tl.constexpr,
    OFF_POLICY: tl.constexpr, TOKEN_VALUE: tl.constexpr, RC_SOURCE: tl.constexpr, RC_IS: tl.constexpr,
    RS_LEVEL: tl.constexpr, RS_STAT: tl.constexpr, PACKED: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Rows ``[pid * BLOCK_B, pid * BLOCK_B + BLOCK_B)``: per-token loss, its gradient, row sums.

    A row is a padded row of ``T`` positions, or (``PACKED``) a sequence of the packed token
    dimension: tokens ``CuSeqlens[row]:CuSeqlens[row + 1]`` of the ``[N]`` token tensors, addressed
    by their positions (``token_tile``, ``row_base``); per-row inputs (strides ``(stride_b, 0)``)
    are read by row in both layouts.

    Absent optional inputs arrive as aliases that make their term vanish: old/ref/sampling point at
    Logp (log-ratio 0, KL 0), entropy at a zero scalar with strides 0, the rollout ratio at a one.
    ``TokenValue`` (read when ``TOKEN_VALUE``): a per-token input handed to the policy term in place
    of the row value (KL-Cov / Clip-Cov's covariance selection).
    Rollout correction (``RC_SOURCE`` != 0): the log-ratio of the training to the rollout policy is
    ``old - sampling`` (1, decoupled) or ``logp - old`` (2, bypass); ``RC_IS`` computes the rollout
    IS weight from it per token (1) or per row (2), scaled by ``IsScale`` (the batch normalizer);
    ``RS_LEVEL`` rejects tokens (1) or rows (2 sum, 3 mean, 4 max of the statistic ``RS_STAT``)
    whose statistic falls outside ``[rs_lower, rs_upper]``: they leave the mask.
    ``GradLogp``/``GradEntropy`` hold the gradient before the batch-wide normalizer, which the
    caller folds into the backward's scalar.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    if PACKED:  # this program's sequences, walked up to the longest of them (int32 positions: N < 2**31)
        seq_start = tl.load(CuSeqlens + rows64, mask=row_ok, other=0).to(tl.int32)
        seq_len = tl.load(CuSeqlens + rows64 + 1, mask=row_ok, other=0).to(tl.int32) - seq_start
        walk = tl.max(seq_len, axis=0)
        grad_stride = 0
    else:
        seq_start = rows64  # (unused)
        seq_len = rows64
        walk = T
        grad_stride = T
    SEQ_LEVEL: tl.constexpr = (ROW_LOG_RATIO == 1) or (ROW_LOG_RATIO == 3) or (ROW_LOG_RATIO == 4)  # a ratio per row
    SEQ_RC: tl.constexpr = (RC_IS == 2) or (RS_LEVEL >= 2)  # rollout correction needs a per-row reduction
    ROW_PASS: tl.constexpr = (ROW_LOG_RATIO != 0) or OFF_POLICY or SEQ_RC

    tokens = tl.zeros((BLOCK_B,), dtype=tl.float32)
    log_ratio_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    log_is_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    off_policy_kl_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    rc_log_ratio_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if RS_LEVEL == 4:
        rs_row = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    else:
        rs_row = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if ROW_PASS:
        # Per-row reductions needed before any token's loss.
        for t0 in range(0, walk, BLOCK_T):
            tok, ok = token_tile(t0, offs_t, row_ok, seq_start, seq_len, T, PACKED)
            m = tl.load(Mask + row_base(rows64, stride_mask, PACKED) + tok, mask=ok, other=0).to(tl.float32)
            x = tl.load(Logp + row_base(rows64, stride_logp, PACKED) + tok, mask=ok, other=0.0)
            if (ROW_LOG_RATIO != 0) or (RC_SOURCE != 0):
                o = tl.load(OldLogp + row_base(rows64, stride_old, PACKED) + tok, mask=ok, other=0.0)
            if RC_SOURCE == 1:
                s = tl.load(SamplingLogp + row_base(rows64, stride_sampling, PACKED) + tok, mask=ok, other=0.0)
                rc_train, rc_rollout = o, s
            if RC_SOURCE == 2:
                rc_train, rc_rollout = x, o
            if RC_IS == 2:  # the row's summed log-ratio over the completion mask
                rc_log_ratio_sum += tl.sum(tl.where(m != 0, (rc_train - rc_rollout) * m, 0.0), axis=1)
            if RS_LEVEL == 1:  # rejected tokens leave the mask of every row sum
                rs_stat = RS_STAT(rc_train, rc_rollout)
                m = tl.where((rs_stat >= rs_lower) & (rs_stat <= rs_upper), m, 0.0)
            if RS_LEVEL == 4:
                rs_row = tl.maximum(rs_row, tl.max(tl.where(m != 0, RS_STAT(rc_train, rc_rollout), float("-inf")),
                                                   axis=1))
            elif RS_LEVEL >= 2:
                rs_row += tl.sum(tl.where(m != 0, RS_STAT(rc_train, rc_rollout) * m, 0.0), axis=1)
            active = m != 0
            tokens += tl.sum(m, axis=1)
            if (ROW_LOG_RATIO == 1) or (ROW_LOG_RATIO == 4):
                log_ratio_sum += tl.sum(tl.where(active, (x - o) * m, 0.0), axis=1)
            if ROW_LOG_RATIO == 3:
                a = tl.load(Advantages + rows64[:, None] * stride_adv_b + tok * stride_adv_t,
                            mask=ok, other=0.0)
                g, _ = gmpo_log_ratio(x, o, a, p0, p1)
                log_ratio_sum += tl.sum(tl.where(active, g * m, 0.0), axis=1)
            if ROW_LOG_RATIO == 2:
                clamped = tl.minimum(tl.maximum(x - o, -20.0), 20.0)
                log_ratio_sum += tl.sum(tl.where(active, clamped * m, 0.0), axis=1)
                # TRL sums a per-token IS log-ratio over every position (padding included); a per-row
                # one (stride_is_t == 0) enters once, below
                is_ratio = tl.load(RolloutRatio + rows64[:, None] * stride_is_b + tok * stride_is_t,
                                   mask=ok, other=1.0)
                log_is = vespo_log_is(is_ratio, is_clip_min, is_clip_max, is_mask_mode)
                log_is_sum += tl.sum(tl.where(ok & (stride_is_t != 0), log_is, 0.0), axis=1)
            if OFF_POLICY:
                s_off = tl.load(SamplingLogp + row_base(rows64, stride_sampling, PACKED) + tok, mask=ok,
                                other=0.0)
                kl = s_off - x
                kl = tl.where(kl != kl, 0.0, kl)  # tokens the rollout engine could not score: no evidence
                off_policy_kl_sum += tl.sum(tl.where(active, kl * m, 0.0), axis=1)
    if ROW_LOG_RATIO == 2:
        row_is_ratio = tl.load(RolloutRatio + rows64 * stride_is_b, mask=row_ok, other=1.0)
        log_is_sum += tl.where(stride_is_t == 0, vespo_log_is(row_is_ratio, is_clip_min, is_clip_max, is_mask_mode),
                               0.0)
    inv_tokens = 1.0 / tl.maximum(tokens, 1.0)
    if ROW_LOG_RATIO == 3:
        seq_norm = 1.0 / (tokens + 1e-8)  # verl's GMPO divides by sum_t m + 1e-8, without a clamp
        seq_rho = tl.exp(log_ratio_sum * seq_norm)
        seq_drho = seq_rho
    elif ROW_LOG_RATIO == 4:
        seq_norm = tl.zeros((BLOCK_B,), dtype=tl.float32) + 1.0  # the summed log-ratio (TRL's RLOO)
        seq_rho, seq_drho = importance_ratio(log_ratio_sum, log_ratio_bound)
    else:
        seq_norm = inv_tokens
        seq_rho, seq_drho = importance_ratio(log_ratio_sum * inv_tokens, log_ratio_bound)
    row_value = tl.minimum(tl.maximum(log_ratio_sum + log_is_sum, -18.420680743952367), 20.0)
    off_policy_kl = off_policy_kl_sum * inv_tokens
    # the row's rollout IS weight (sequence level) and whether the row passes sequence-level rejection
    rc_seq_weight = tl.exp(tl.minimum(tl.maximum(rc_log_ratio_sum, -20.0), 20.0))
    if RS_LEVEL == 3:
        rs_row = rs_row / (tokens + 1e-8)  # the mean (verl's masked_mean)
    if RS_LEVEL == 4:
        rs_row = tl.where(rs_row == float("-inf"), 0.0, rs_row)  # a row without tokens: 0
    row_kept = (rs_row >= rs_lower) & (rs_row <= rs_upper)
    is_scale = tl.load(IsScale)
    entropy_threshold = tl.load(EntropyThreshold)
    no_entropy_mask = entropy_threshold == float("-inf")

    acc_loss = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_kl = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_low = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_high = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_region = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_lower = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_entropy = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_tokens = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_eff_entropy = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_eff_tokens = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_dloss_drho = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_is_weight = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_rejected = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for t0 in range(0, walk, BLOCK_T):
        tok, ok = token_tile(t0, offs_t, row_ok, seq_start, seq_len, T, PACKED)
        m = tl.load(Mask + row_base(rows64, stride_mask, PACKED) + tok, mask=ok, other=0).to(tl.float32)
        x = tl.load(Logp + row_base(rows64, stride_logp, PACKED) + tok, mask=ok, other=0.0)
        o = tl.load(OldLogp + row_base(rows64, stride_old, PACKED) + tok, mask=ok, other=0.0)
        r = tl.load(RefLogp + row_base(rows64, stride_ref, PACKED) + tok, mask=ok, other=0.0)
        a = tl.load(Advantages + rows64[:, None] * stride_adv_b + tok * stride_adv_t, mask=ok, other=0.0)
        ent = tl.load(Entropy + rows64[:, None] * stride_ent_b + tok * stride_ent_t, mask=ok, other=0.0)
        if RC_SOURCE == 1:
            s = tl.load(SamplingLogp + row_base(rows64, stride_sampling, PACKED) + tok, mask=ok, other=0.0)
            rc_train, rc_rollout = o, s
        if RC_SOURCE == 2:
            rc_train, rc_rollout = x, o
        if RS_LEVEL != 0:
            if RS_LEVEL == 1:
                rs_stat = RS_STAT(rc_train, rc_rollout)
                kept = (rs_stat >= rs_lower) & (rs_stat <= rs_upper)
            else:
                kept = (tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.int32) == 0) & row_kept[:, None]
            acc_rejected += tl.sum(tl.where(kept, 0.0, m), axis=1)
            m = tl.where(kept, m, 0.0)
        active = m != 0
        if SEQ_LEVEL:
            rho = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32) + seq_rho[:, None]
        else:
            rho, drho_dx = importance_ratio(x - o, log_ratio_bound)

        entropy_mask = tl.where(no_entropy_mask, active, active & (ent * m >= entropy_threshold))
        if FOLDS_IS_RATIO:
            is_weight = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32) + 1.0
            multiplier = tl.where(entropy_mask, 1.0, 0.0)
        else:
            if RC_IS == 1:
                is_ratio = tl.exp(tl.minimum(tl.maximum(rc_train - rc_rollout, -20.0), 20.0))
            elif RC_IS == 2:
                is_ratio = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32) + rc_seq_weight[:, None]
            else:
                is_ratio = tl.load(RolloutRatio + rows64[:, None] * stride_is_b + tok * stride_is_t,
                                   mask=ok, other=1.0)
            is_weight = rollout_is_weight(is_ratio, is_clip_min, is_clip_max, is_mask_mode) * is_scale
            multiplier = tl.where(entropy_mask, is_weight, 0.0)
        if OFF_POLICY:
            keep = (a >= 0) | (off_policy_kl[:, None] <= off_policy_threshold)
            multiplier = tl.where(keep, multiplier, 0.0)

        if TOKEN_VALUE:
            aux = tl.load(TokenValue + row_base(rows64, stride_token_value, PACKED) + tok, mask=ok, other=0.0)
        else:
            aux = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32) + row_value[:, None]
        loss_t, dloss_dx, dloss_drho, kl, is_low, is_high, is_lower = token_loss(
            x, o, r, a, rho, aux, multiplier, p0, p1, p2, p3, beta, bias_kl, POLICY, KL)

        weight = tl.where(active, m, 0.0)
        acc_loss += tl.sum(tl.where(active, loss_t * weight, 0.0), axis=1)
        grad = tl.where(active, weight * dloss_dx, 0.0)
        if SEQ_LEVEL:
            acc_dloss_drho += tl.sum(tl.where(active, weight * dloss_drho, 0.0), axis=1)
        else:  # (a term that does not depend on rho adds nothing, even where d rho overflows to inf)
            grad += tl.where(active & (dloss_drho != 0), weight * dloss_drho * drho_dx, 0.0)
        tl.store(GradLogp + row_base(rows64, grad_stride, PACKED) + tok, grad, mask=ok)

        masked = tl.where(active, m, 0.0)
        acc_kl += tl.sum(tl.where(active, kl * m, 0.0), axis=1)
        acc_low += tl.sum(tl.where(is_low, masked, 0.0), axis=1)
        acc_high += tl.sum(tl.where(is_high, masked, 0.0), axis=1)
        acc_region += tl.sum(tl.where(is_low | is_high, masked, 0.0), axis=1)
        acc_lower += tl.sum(tl.where(is_lower, masked, 0.0), axis=1)
        acc_entropy += tl.sum(tl.where(active, ent * m, 0.0), axis=1)
        acc_tokens += tl.sum(masked, axis=1)
        if RC_SOURCE != 0:  # (the rollout_is/mean metric, reported with rollout correction only)
            acc_is_weight += tl.sum(tl.where(active, is_weight * m, 0.0), axis=1)
        effective = tl.where(entropy_mask, m, 0.0)
        acc_eff_tokens += tl.sum(effective, axis=1)
        acc_eff_entropy += tl.sum(tl.where(entropy_mask, ent * m, 0.0), axis=1)
        if write_grad_entropy != 0:
            tl.store(GradEntropy + row_base(rows64, grad_stride, PACKED) + tok, effective, mask=ok)

    if SEQ_LEVEL:
        # d rho_i / d logp_t = rho_i' * m_t / max(n_i, 1) (GMPO: rho_i m_t g'_t / (n_i + 1e-8); RLOO's sum:
        # rho_i m_t): add the row's d loss / d rho to its tokens.
        row_coef = tl.where(acc_dloss_drho != 0, acc_dloss_drho * seq_drho * seq_norm, 0.0)
        tl.debug_barrier()
        for t0 in range(0, walk, BLOCK_T):
            tok, ok = token_tile(t0, offs_t, row_ok, seq_start, seq_len, T, PACKED)
            m = tl.load(Mask + row_base(rows64, stride_mask, PACKED) + tok, mask=ok, other=0).to(tl.float32)
            if RS_LEVEL == 1:
                o = tl.load(OldLogp + row_base(rows64, stride_old, PACKED) + tok, mask=ok, other=0.0)
                if RC_SOURCE == 1:
                    s = tl.load(SamplingLogp + row_base(rows64, stride_sampling, PACKED) + tok, mask=ok,
                                other=0.0)
                    rs_stat = RS_STAT(o, s)
                else:
                    x = tl.load(Logp + row_base(rows64, stride_logp, PACKED) + tok, mask=ok, other=0.0)
                    rs_stat = RS_STAT(x, o)
                m = tl.where((rs_stat >= rs_lower) & (rs_stat <= rs_upper), m, 0.0)
            if RS_LEVEL >= 2:  # (a rejected row's d loss / d rho is 0, its d rho may be inf)
                m = tl.where(row_kept[:, None], m, 0.0)
            g_ptrs = GradLogp + row_base(rows64, grad_stride, PACKED) + tok
            grad = tl.load(g_ptrs, mask=ok, other=0.0)
            if ROW_LOG_RATIO == 3:
                x = tl.load(Logp + row_base(rows64, stride_logp, PACKED) + tok, mask=ok, other=0.0)
                o = tl.load(OldLogp + row_base(rows64, stride_old, PACKED) + tok, mask=ok, other=0.0)
                a = tl.load(Advantages + rows64[:, None] * stride_adv_b + tok * stride_adv_t,
                            mask=ok, other=0.0)
                _, dg = gmpo_log_ratio(x, o, a, p0, p1)
                grad += tl.where(m != 0, m * dg * row_coef[:, None], 0.0)
            else:
                grad += tl.where(m != 0, m * row_coef[:, None], 0.0)
            tl.store(g_ptrs, grad, mask=ok)

    phi = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if ROW_LOG_RATIO == 2:
        # VESPO's per-row weight for its metric (advantages are per row for VESPO)
        a_row = tl.load(Advantages + rows64 * stride_adv_b, mask=row_ok, other=0.0)
        phi = vespo_phi(row_value, a_row, p0, p1, p2, p3)

    stats = RowStats + rows64 * 13  # NUM_STATS columns, in the order of STAT_COLUMNS
    tl.store(stats + 0, acc_loss, mask=row_ok)
    tl.store(stats + 1, acc_kl, mask=row_ok)
    tl.store(stats + 2, acc_low, mask=row_ok)
    tl.store(stats + 3, acc_high, mask=row_ok)
    tl.store(stats + 4, acc_region, mask=row_ok)
    tl.store(stats + 5, acc_entropy, mask=row_ok)
    tl.store(stats + 6, acc_tokens, mask=row_ok)
    tl.store(stats + 7, acc_eff_entropy, mask=row_ok)
    tl.store(stats + 8, acc_eff_tokens, mask=row_ok)
    tl.store(stats + 9, acc_lower, mask=row_ok)
    tl.store(stats + 10, phi, mask=row_ok)
    tl.store(stats + 11, acc_is_weight, mask=row_ok)
    tl.store(stats + 12, acc_rejected, mask=row_ok)


# One [BLOCK_B, BLOCK_T] = [4, 256] tile shape for every T: the kernel moves O(B*T) bytes, a few
# microseconds next to the log-prob kernel, so a second tile shape would only double the compiled
# variants. Several rows per program keep short completions from idling most lanes.
BLOCK_B, BLOCK_T, NUM_WARPS, NUM_STAGES = 4, 256, 8, 1


def kernel_switches(cfg) -> dict:
    """The kernel's constexpr switches for the options ``cfg`` (the torch row pass follows them too)."""
    policy = cfg.policy
    criterion = REJECTION_SAMPLING.get(cfg.rollout_rs)
    return {
        "POLICY": policy.jit,
        "KL": cfg.kl_jit,
        "ROW_LOG_RATIO": ROW_LOG_RATIO_MEAN if cfg.sequence_level else policy.row_log_ratio,
        "FOLDS_IS_RATIO": policy.folds_is_ratio,
        "OFF_POLICY": cfg.off_policy_mask_threshold is not None,
        "TOKEN_VALUE": policy.token_selection is not None,
        "RC_SOURCE": cfg.rollout_correction_source,
        "RC_IS": ROLLOUT_IS_LEVELS.index(cfg.rollout_is),
        "RS_LEVEL": RS_NONE if criterion is None else criterion.level,
        "RS_STAT": DEFAULT_RS_STAT if criterion is None else criterion.stat,
    }


def rows_triton(cfg, t):
    """The row pass on the kernel: options ``cfg`` and the prepared inputs ``t`` -> ``(row_stats
    [R, NUM_STATS] fp32, d loss / d logp fp32 before the batch-wide normalizer, the effective-mask
    weights of d loss / d entropy fp32 or None)``, the per-token outputs in the token layout.

    Padded: token tensors ``[B, T]``, R = B rows. Packed (``t["cu_seqlens"]``, int64 ``[S + 1]``):
    token tensors ``[N]``, R = S sequences, per-sequence inputs ``[S, 1]``; no host sync (each
    program finds the length of its longest sequence on chip).
    """
    logp = t["logp"]
    cu_seqlens = t.get("cu_seqlens")
    packed = cu_seqlens is not None
    num_rows = cu_seqlens.shape[0] - 1 if packed else logp.shape[0]
    T = 0 if packed else logp.shape[1]
    device = logp.device
    grad_logp = torch.empty(logp.shape, device=device, dtype=torch.float32)
    write_grad_entropy = t["entropy_grad"]
    grad_entropy = torch.empty(logp.shape, device=device, dtype=torch.float32) if write_grad_entropy else grad_logp
    row_stats = torch.empty((num_rows, NUM_STATS), device=device, dtype=torch.float32)

    def row_stride(tensor):  # a token tensor's row stride (packed: 0, its rows are segments)
        return 0 if packed else tensor.stride(0)

    def strides(tensor):  # (row, token) strides of a per-row ([R, 1] packed, zero-strided padded) or token input
        if not packed:
            return tensor.stride(0), tensor.stride(1)
        return (tensor.stride(0), 0) if tensor.dim() == 2 else (0, tensor.stride(0))

    def alias(name):
        tensor = t[name]
        return (logp, row_stride(logp)) if tensor is None else (tensor, row_stride(tensor))

    old, stride_old = alias("old")
    ref, stride_ref = alias("ref")
    sampling, stride_sampling = (
        (t["sampling"], row_stride(t["sampling"])) if t["sampling"] is not None else (old, stride_old))
    adv = t["advantages"]
    if t["entropy"] is not None:
        entropy, stride_ent = t["entropy"].detach(), strides(t["entropy"])
    else:
        entropy, stride_ent = torch.zeros(1, device=device, dtype=torch.float32), (0, 0)
    if t["is_ratio"] is not None:
        is_ratio, stride_is = t["is_ratio"], strides(t["is_ratio"])
    else:
        is_ratio, stride_is = torch.ones(1, device=device, dtype=torch.float32), (0, 0)
    token_value = t.get("token_value")
    token_value, stride_token_value = (
        (token_value, row_stride(token_value)) if token_value is not None else (logp, 0))
    p0, p1, p2, p3 = cfg.policy_params()
    grid = (triton.cdiv(num_rows, BLOCK_B),)
    grpo_loss_kernel[grid](
        logp.detach(), old, ref.detach(), sampling.detach(), adv, t["mask"], entropy, is_ratio,
        t["entropy_threshold"], token_value, t["is_scale"], grad_logp, grad_entropy, row_stats,
        cu_seqlens if packed else row_stats,  # (padded: never read)
        num_rows, T,
        row_stride(logp), stride_old, stride_ref, stride_sampling, row_stride(t["mask"]),
        *strides(adv), *stride_ent, *stride_is, stride_token_value,
        p0, p1, p2, p3, cfg.beta, int(cfg.use_bias_correction_kl), cfg.log_ratio_bound,
        cfg.is_clip_min, cfg.is_clip_max, int(cfg.rollout_is_mode == "mask"),
        cfg.off_policy_threshold_or_inf, cfg.rs_lower, cfg.rs_upper, int(write_grad_entropy),
        PACKED=packed, BLOCK_B=BLOCK_B, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        **kernel_switches(cfg),
    )
    return row_stats, grad_logp, (grad_entropy if write_grad_entropy else None)
