"""The per-token terms of the GRPO loss family: one small ``@triton.jit`` function each.

Policy terms share one signature, ``policy_<name>(x, o, rho, a, row_value, p0, p1, p2, p3) ->
(P, dP/dx, dP/drho, flag_low, flag_high, flag_lower)`` for one tile: ``x`` = logp, ``o`` = old
logp, ``rho`` = the importance ratio (token or sequence), ``a`` = advantage, ``row_value`` = the
per-row quantity the row pass reduced (``table.ROW_LOG_RATIO_*``) or the per-token covariance
selection, ``p0..p3`` = the options ``PolicyTerm.params`` names. KL estimators return ``(value,
d value / d logp)`` from ``x`` = logp and ``r`` = ref logp.

The kernel (``kernel.py``) calls them on tiles; the torch row pass (``rows_torch.py``) runs the same
functions on whole ``[B, T]`` tensors, so each formula and its derivative is written once. They use
only ``tl.where/exp/log/minimum/maximum/sigmoid/abs/zeros_like`` and arithmetic for that reason.
Gradients follow torch's conventions (``torch.min`` splits ties evenly; a clamp passes gradient on
its closed range). ``docs/semantics.md`` states every formula.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

LOG_1E_8 = math.log(1e-8)  # the floor of VESPO's log-weight (TRL's clamp(min=1e-8) in log space)

# ---------------------------------------------------------------------------------------------
# Policy terms
# ---------------------------------------------------------------------------------------------


@triton.jit
def policy_clip(x, o, rho, a, row_value, eps_low, eps_high, delta, clip_c):
    """PPO clip (TRL's grpo/bnpo/dr_grpo/dapo/luspo) with INTELLECT-2's delta and dual clip.

    P = -min(min(rho, delta) A, clip(rho, 1-eps_low, 1+eps_high) A); for A < 0 also bounded by
    -A * clip_c (dual-clip PPO, ``clip_c = inf`` when off). delta = inf when two-sided clipping is off.
    """
    upper = 1.0 + eps_high
    lower = 1.0 - eps_low
    coef_clipped = tl.minimum(tl.maximum(rho, lower), upper)
    coef = tl.minimum(rho, delta)
    unclipped_term = coef * a
    clipped_term = coef_clipped * a
    clip_loss = -tl.minimum(unclipped_term, clipped_term)
    # torch.min splits the gradient evenly on ties; clamps pass it on their closed range.
    take_unclipped = tl.where(unclipped_term < clipped_term, 1.0,
                              tl.where(unclipped_term == clipped_term, 0.5, 0.0))
    d_coef = tl.where(rho <= delta, 1.0, 0.0)
    d_clipped = tl.where((rho >= lower) & (rho <= upper), 1.0, 0.0)
    dclip_drho = -a * (take_unclipped * d_coef + (1.0 - take_unclipped) * d_clipped)
    negative = a < 0
    # (-A is replaced by 1 where A >= 0 so that no lane computes 0 * inf when dual clip is off)
    cap = tl.where(negative, tl.where(negative, -a, 1.0) * clip_c, float("inf"))
    take_clip = tl.where(clip_loss < cap, 1.0, tl.where(clip_loss == cap, 0.5, 0.0))
    policy = tl.where(negative, tl.minimum(clip_loss, cap), clip_loss)
    dpolicy_drho = tl.where(negative, take_clip * dclip_drho, dclip_drho)
    is_low = (coef < lower) & negative
    is_high = (coef > upper) & (a > 0)
    is_lower = (clip_loss > cap) & negative
    return policy, tl.zeros_like(x), dpolicy_drho, is_low, is_high, is_lower


@triton.jit
def policy_cispo(x, o, rho, a, row_value, eps_high, ratio_min, p2, p3):
    """CISPO: P = -stopgrad(clamp(rho, ratio_min, eps_high)) A logp (TRL: ratio_min 0; verl:
    clamp(rho, 1 - clip_ratio_low, 1 + clip_ratio_high))."""
    capped = tl.minimum(tl.maximum(rho, ratio_min), eps_high)
    no_flag = tl.zeros_like(x) != 0
    return -capped * a * x, -capped * a, tl.zeros_like(x), no_flag, (rho > eps_high) & (a > 0), no_flag


@triton.jit
def policy_sapo(x, o, rho, a, row_value, tau_pos, tau_neg, p2, p3):
    """SAPO: P = -sigmoid(tau (rho - 1)) 4/tau A, tau = tau_pos if A > 0 else tau_neg."""
    tau = tl.where(a > 0, tau_pos, tau_neg)
    gate = tl.sigmoid(tau * (rho - 1.0))
    no_flag = tl.zeros_like(x) != 0
    return -gate * (4.0 / tau) * a, tl.zeros_like(x), -4.0 * a * gate * (1.0 - gate), no_flag, no_flag, no_flag


@triton.jit
def vespo_phi(log_w, a, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's gamma weight phi = exp(lambda + k log w - lambda w), (k, lambda) by sign(A); 0 if not finite."""
    nonneg = a >= 0
    k = tl.where(nonneg, k_pos, k_neg)
    lam = tl.maximum(tl.where(nonneg, lambda_pos, lambda_neg), 1e-4)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi == phi) & (phi != float("inf")), phi, 0.0)


@triton.jit
def vespo_log_is(is_ratio, is_clip_min, is_clip_max, is_mask_mode):
    """VESPO's share of a rollout IS ratio in its summed log-ratio: clamp(log w, log 1e-8, 20), w the
    ratio after ``rollout_is_mode`` (``rollout_is_weight``, defined below: jit functions resolve names late)."""
    weight = rollout_is_weight(is_ratio, is_clip_min, is_clip_max, is_mask_mode)
    return tl.minimum(tl.maximum(tl.log(weight), -18.420680743952367), 20.0)


@triton.jit
def policy_vespo(x, o, rho, a, row_value, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO: P = -stopgrad(phi(w)) A logp, log w = the row's clamped summed log-ratio (row_value)."""
    phi = vespo_phi(row_value, a, k_pos, lambda_pos, k_neg, lambda_neg)
    no_flag = tl.zeros_like(x) != 0
    return -phi * a * x, -phi * a, tl.zeros_like(x), no_flag, no_flag, no_flag


@triton.jit
def gmpo_log_ratio(x, o, a, eps_low, eps_high):
    """GMPO's g_t = s min(s l_t, s clamp(l_t, -eps_low, eps_high)), s = sign(A_t), and d g_t / d l_t
    (torch's conventions: 1 unless clipped on the side of s, 0 where A = 0)."""
    log_ratio = x - o
    clamped = tl.minimum(tl.maximum(log_ratio, -eps_low), eps_high)
    s = tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0))
    g = s * tl.minimum(s * log_ratio, s * clamped)
    return g, tl.where((s != 0) & (s * log_ratio <= s * clamped), 1.0, 0.0)


@triton.jit
def policy_geo_mean(x, o, rho, a, row_value, eps_low, eps_high, p2, p3):
    """GMPO (verl geo_mean): P = -A_t rho_i, rho_i = exp(sum_t m g_t / (sum_t m + 1e-8)) the row's
    geometric-mean ratio (the row pass, table.ROW_LOG_RATIO_GMPO); averaged per row by sum_t m + 1e-8 this
    is -A_i rho_i with verl's A_i. Flags: l_t outside [-eps_low, eps_high] with A > 0 (high) / A < 0 (low)."""
    log_ratio = x - o
    clipped = log_ratio != tl.minimum(tl.maximum(log_ratio, -eps_low), eps_high)
    no_flag = tl.zeros_like(x) != 0
    return -a * rho, tl.zeros_like(x), -a + tl.zeros_like(x), clipped & (a < 0), clipped & (a > 0), no_flag


@triton.jit
def dppo_term(x, rho, a, valid, cap):
    """DPPO's P = -A stopgrad(min(rho, cap) valid) logp; flags: invalid with A <= 0 (low) / A > 0 (high),
    truncated and valid (lower: verl's pg_clipfrac_lower)."""
    weight = tl.where(valid, tl.minimum(rho, cap), 0.0)
    invalid = valid == 0
    return -a * weight * x, -a * weight, tl.zeros_like(x), invalid & (a <= 0), invalid & (a > 0), (rho > cap) & valid


@triton.jit
def policy_dppo_tv(x, o, rho, a, row_value, eps_low, eps_high, cap, p3):
    """DPPO-Binary-TV: valid = p - q <= eps_high (A > 0) or p - q >= -eps_low (A <= 0), p = exp(logp), q = exp(old)."""
    diff = tl.exp(x) - tl.exp(o)
    return dppo_term(x, rho, a, tl.where(a > 0, diff <= eps_high, diff >= -eps_low), cap)


@triton.jit
def policy_dppo_kl(x, o, rho, a, row_value, eps_low, eps_high, cap, p3):
    """DPPO-Binary-KL: b = q (old - logp) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8));
    valid = b <= eps_high or p <= q (A > 0), b <= eps_low or p >= q (A <= 0)."""
    p = tl.exp(x)
    q = tl.exp(o)
    b = q * (o - x) + (1.0 - q) * tl.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
    return dppo_term(x, rho, a, tl.where(a > 0, (b <= eps_high) | (p <= q), (b <= eps_low) | (p >= q)), cap)


@triton.jit
def policy_kl_cov(x, o, rho, a, selected, coef, p1, p2, p3):
    """KL-Cov: P = -A rho + selected coef |l| (no clipping); ``selected`` is the per-token covariance
    selection (1 or 0). Flag lower: selected."""
    log_ratio = x - o
    sign = tl.where(log_ratio > 0, 1.0, tl.where(log_ratio < 0, -1.0, 0.0))
    no_flag = tl.zeros_like(x) != 0
    return (-a * rho + selected * coef * tl.abs(log_ratio), selected * coef * sign, -a + tl.zeros_like(x),
            no_flag, no_flag, selected != 0)


@triton.jit
def policy_clip_cov(x, o, rho, a, selected, eps_low, eps_high, p2, p3):
    """Clip-Cov: the PPO clip term (no delta, no dual clip) with the selected tokens' term zeroed.
    Flags: the clip's low/high; lower: selected."""
    policy, dpolicy_dx, dpolicy_drho, is_low, is_high, is_lower = policy_clip(
        x, o, rho, a, selected, eps_low, eps_high, float("inf"), float("inf"))
    keep = 1.0 - selected
    return policy * keep, dpolicy_dx, dpolicy_drho * keep, is_low, is_high, selected != 0


@triton.jit
def policy_pg(x, o, rho, a, row_value, p0, p1, p2, p3):
    """Policy gradient without a ratio (verl's gpg, REINFORCE): P = -A logp. With a rollout IS weight w
    as the multiplier it is verl's compute_policy_loss_reinforce, -A logp sg(w)."""
    no_flag = tl.zeros_like(x) != 0
    return -a * x, -a + tl.zeros_like(x), tl.zeros_like(x), no_flag, no_flag, no_flag


@triton.jit
def policy_dro(x, o, rho, a, row_value, beta, p1, p2, p3):
    """DRO (verl's dro): P = -(logp A - beta/2 (logp - old)^2), the log-ratio unclamped."""
    log_ratio = x - o
    no_flag = tl.zeros_like(x) != 0
    return (-(x * a - 0.5 * beta * log_ratio * log_ratio), -a + beta * log_ratio, tl.zeros_like(x),
            no_flag, no_flag, no_flag)


@triton.jit
def trust_region_pg(x, o, rho, a, keep, adv_tau, kl_tau):
    """prime-rl's policy term given its trust-region mask ``keep``: P = -keep adv_tau A rho +
    kl_tau (logp - old)^2, the squared log-ratio on every token. Returns (P, dP/dx, dP/drho)."""
    log_ratio = x - o
    # (a dropped token adds nothing even where rho overflows; prime-rl's keep * A * rho is NaN there)
    policy = tl.where(keep, -adv_tau * a * rho, 0.0) + kl_tau * log_ratio * log_ratio
    return policy, 2.0 * kl_tau * log_ratio, tl.where(keep, -adv_tau * a, 0.0)


@triton.jit
def policy_prime_dppo(x, o, rho, a, row_value, mask_low, mask_high, adv_tau, kl_tau):
    """prime-rl's default loss (DPPO-Binary-TV mask + Kimi-K2.5's squared log-ratio): tokens with
    p - p_old > mask_high (A > 0) or p - p_old < -mask_low (A <= 0) leave the policy term
    (``trust_region_pg``). Flags: masked with A < 0 (low) / A > 0 (high), prime-rl's is_masked_low/high."""
    diff = tl.exp(x) - tl.exp(o)
    too_high = diff > mask_high
    too_low = diff < -mask_low
    keep = tl.where(a > 0, too_high, too_low) == 0
    policy, dpolicy_dx, dpolicy_drho = trust_region_pg(x, o, rho, a, keep, adv_tau, kl_tau)
    no_flag = tl.zeros_like(x) != 0
    return policy, dpolicy_dx, dpolicy_drho, too_low & (a < 0), too_high & (a > 0), no_flag


@triton.jit
def policy_ipo(x, o, rho, a, row_value, threshold, adv_tau, kl_tau, p3):
    """prime-rl's IPO: tokens with |p - p_old| > threshold leave the policy term (``trust_region_pg``).
    Flags: masked with p < p_old (low) / p > p_old (high)."""
    diff = tl.exp(x) - tl.exp(o)
    outside = tl.abs(diff) > threshold
    policy, dpolicy_dx, dpolicy_drho = trust_region_pg(x, o, rho, a, outside == 0, adv_tau, kl_tau)
    no_flag = tl.zeros_like(x) != 0
    return policy, dpolicy_dx, dpolicy_drho, outside & (diff < 0), outside & (diff > 0), no_flag


# ---------------------------------------------------------------------------------------------
# KL estimators of the reference penalty: (value, d value / d logp) from x = logp, r = ref logp
# ---------------------------------------------------------------------------------------------


@triton.jit
def kl_trl_k3(x, r):
    """TRL's k3, unclamped: exp(r - x) - (r - x) - 1."""
    diff = r - x
    exp_diff = tl.exp(diff)
    return exp_diff - diff - 1.0, 1.0 - exp_diff


@triton.jit
def kl_k1(x, r):
    return x - r, tl.zeros_like(x) + 1.0


@triton.jit
def kl_abs(x, r):
    d = x - r
    return tl.abs(d), tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


@triton.jit
def kl_k2(x, r):
    return 0.5 * (x - r) * (x - r), x - r


@triton.jit
def kl_verl_k3(x, r):
    """verl's low_var_kl: d = clamp(r - x, -20, 20); clamp(exp(d) - d - 1, -10, 10)."""
    diff = r - x
    d = tl.minimum(tl.maximum(diff, -20.0), 20.0)
    exp_d = tl.exp(d)
    kld = exp_d - d - 1.0
    inside = (diff >= -20.0) & (diff <= 20.0) & (kld >= -10.0) & (kld <= 10.0)
    return tl.minimum(tl.maximum(kld, -10.0), 10.0), tl.where(inside, 1.0 - exp_d, 0.0)


@triton.jit
def kl_k1_st(x, r):
    """'+' (straight-through) variants: the estimator's value with k2's gradient (x - r)."""
    return x - r, x - r


@triton.jit
def kl_abs_st(x, r):
    return tl.abs(x - r), x - r


@triton.jit
def kl_verl_k3_st(x, r):
    value, _ = kl_verl_k3(x, r)
    return value, x - r


# ---------------------------------------------------------------------------------------------
# Rejection-sampling statistics of rollout correction: (train logp, rollout logp) -> statistic
# ---------------------------------------------------------------------------------------------


@triton.jit
def rs_k1(train, rollout):
    """verl's token_k1: -clamp(train - rollout, -20, 20), the log of rollout / train probability."""
    return -tl.minimum(tl.maximum(train - rollout, -20.0), 20.0)


@triton.jit
def rs_k2(train, rollout):
    """verl's token_k2: 0.5 l^2, l = clamp(train - rollout, -20, 20)."""
    log_ratio = tl.minimum(tl.maximum(train - rollout, -20.0), 20.0)
    return 0.5 * log_ratio * log_ratio


@triton.jit
def rs_k3(train, rollout):
    """verl's token_k3: exp(l) - 1 - l, l = clamp(train - rollout, -20, 20)."""
    log_ratio = tl.minimum(tl.maximum(train - rollout, -20.0), 20.0)
    return tl.exp(log_ratio) - 1.0 - log_ratio


@triton.jit
def expm1(y):
    """exp(y) - 1 without cancellation near 0 (a degree-5 Taylor polynomial for |y| < 0.05)."""
    series = y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0)))))
    return tl.where(tl.abs(y) < 0.05, series, tl.exp(y) - 1.0)


@triton.jit
def binary_kl(log_p, log_q):
    """KL(Bernoulli(p) || Bernoulli(q)) = p log(p/q) + (1-p) log((1-p)/(1-q)) from log p, log q < 0,
    the complements as -expm1 (exact in float32 for p close to 1)."""
    complement_p = -expm1(log_p)
    complement_q = -expm1(log_q)
    return tl.exp(log_p) * (log_p - log_q) + complement_p * (tl.log(complement_p) - tl.log(complement_q))


@triton.jit
def rs_kpop(train, rollout):
    """AReaL's KPop: max(KL_B(p || q), KL_B(q || p)), p = exp(train), q = exp(rollout), both clamped
    into [1e-8, 1 - 1e-8] (AReaL's compute_binary_kl_divergence)."""
    log_p = tl.minimum(tl.maximum(train, -18.420680743952367), -1.000000005e-08)
    log_q = tl.minimum(tl.maximum(rollout, -18.420680743952367), -1.000000005e-08)
    return tl.maximum(binary_kl(log_p, log_q), binary_kl(log_q, log_p))


# ---------------------------------------------------------------------------------------------
# Shared pieces: the rollout IS weight, the importance ratio, the per-token loss
# ---------------------------------------------------------------------------------------------


@triton.jit
def rollout_is_weight(is_ratio, clip_min, clip_max, mask_mode):
    """Rollout IS ratio: "truncate" clamps into [min, max], "mask" zeroes what falls outside
    (bounds are -inf/inf when unset, so mode None is a truncate that changes nothing)."""
    outside = (is_ratio < clip_min) | (is_ratio > clip_max)
    return tl.where(mask_mode != 0, tl.where(outside, 0.0, is_ratio),
                    tl.minimum(tl.maximum(is_ratio, clip_min), clip_max))


@triton.jit
def importance_ratio(log_ratio, bound):
    """rho = exp(clamp(l, -bound, bound)) and d rho / d l (bound = inf unless a loss type clamps)."""
    rho = tl.exp(tl.minimum(tl.maximum(log_ratio, -bound), bound))
    return rho, tl.where((log_ratio >= -bound) & (log_ratio <= bound), rho, 0.0)


@triton.jit
def token_loss(x, o, r, a, rho, row_value, multiplier, p0, p1, p2, p3, beta, bias_kl,
               POLICY: tl.constexpr, KL: tl.constexpr):
    """L_t = P_t * multiplier + beta * KL_t (* rho when bias-corrected), with its partials.

    Returns ``(L, dL/dx, dL/drho, kl metric value, flag_low, flag_high, flag_lower)``.
    """
    policy, dpolicy_dx, dpolicy_drho, is_low, is_high, is_lower = POLICY(x, o, rho, a, row_value, p0, p1, p2, p3)
    kl, dkl_dx = KL(x, r)
    kl_weight = tl.where(bias_kl != 0, rho, 1.0)
    use_kl = beta != 0
    loss = policy * multiplier + tl.where(use_kl, beta * kl * kl_weight, 0.0)
    dloss_dx = dpolicy_dx * multiplier + tl.where(use_kl, beta * dkl_dx * kl_weight, 0.0)
    dloss_drho = dpolicy_drho * multiplier + tl.where(use_kl & (bias_kl != 0), beta * kl, 0.0)
    return loss, dloss_dx, dloss_drho, kl * kl_weight, is_low, is_high, is_lower
