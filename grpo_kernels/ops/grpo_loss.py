"""GRPO-family policy loss from per-token log-probs: loss, metrics and d loss / d logp in one pass.

For a batch of B completions of T tokens (``logprobs``, ``completion_mask`` ``[B, T]``) and one
advantage per completion (or per token), the loss is the per-token loss ``L_t`` of the chosen loss
type, aggregated by its normalizer (``docs/semantics.md`` states every formula)::

    l_t   = logp_t - old_t                                   (old = logp.detach() when not given)
    rho   = exp(l_t)  token level,  exp(sum_t m l_t / max(sum_t m, 1))  sequence level (GSPO)
    L_t   = P_t(rho, A, logp) * multiplier_t + beta * KL_t (* rho when bias-corrected)
    loss  = aggregation(L) - entropy_coef * (mean entropy over the effective mask)

``P_t`` is the loss type's policy term, ``multiplier_t`` the entropy mask x rollout IS ratio x
off-policy mask, ``KL_t`` the chosen KL estimator.

How the family is organized
---------------------------
* ``LOSS_TYPES``: one ``LossType`` per ``loss_type`` value: its policy term (``POLICIES``), its
  default aggregation (``AGGREGATIONS``), the type-specific options it reads, its metrics, whether
  it allows sequence-level ratios, and which peer's semantics it follows.
* ``OPTIONS``: every scalar option of ``grpo_loss``: default, validation, one line of doc.
  ``validate_loss_options(**options)`` checks a set of options against both tables without any
  tensor (trainers call it at construction); ``docs/semantics.md``'s options table is generated
  from them (``options_markdown()``; a test keeps the file in sync).
* Each policy term is one small ``@triton.jit`` function with the uniform signature of
  ``_policy_clip`` and is handed to the kernel as the constexpr ``POLICY``; the KL estimators
  likewise (``KL``). The CPU path (``backend="torch"``) runs *the same jit functions* on torch
  tensors (``_on_torch``): the per-token formulas and their derivatives exist once. Only the data
  movement (tiles and loops on the kernel side, whole ``[B, T]`` tensors on the torch side) is
  written twice. ``grpo_kernels.reference`` is the independent float64 autograd oracle.

Adding a loss type
------------------
1. Write its policy term as a ``@triton.jit`` function ``_policy_<name>(x, o, rho, a, row_value,
   p0, p1, p2, p3)`` returning ``(P, dP/dx, dP/drho, flag_low, flag_high, flag_lower)`` for one
   tile: ``x`` = logp, ``o`` = old logp, ``rho`` = the importance ratio (token or sequence),
   ``a`` = advantage, ``row_value`` = the per-row quantity of ``row_log_ratio`` (see
   ``_ROW_LOG_RATIO_*``), ``p0..p3`` = the options named in ``PolicyTerm.params`` (in that order).
   Use only ``tl.where/exp/log/minimum/maximum/sigmoid/abs/zeros_like`` and arithmetic, so that
   ``_on_torch`` can run it on tensors. Gradients follow torch's conventions (``torch.min`` splits
   ties evenly; a clamp passes gradient on its closed range).
2. Add a ``PolicyTerm`` to ``POLICIES`` and a ``LossType`` to ``LOSS_TYPES`` (and any new option
   to ``OPTIONS``, with its check; type-specific options go in ``LossType.options``).
3. Add it to ``grpo_kernels.reference.grpo_loss_reference`` from the formula (not from the
   kernel), and to the tests; regenerate ``docs/semantics.md``'s table
   (``python -m grpo_kernels.ops.grpo_loss --write-docs``).
The launcher, the torch path, validation, metrics and the sm_90 compile specs pick it up from the
tables.

Kernel layout: one program owns ``BLOCK_B`` rows and walks along T in ``[BLOCK_B, BLOCK_T]`` tiles.
An optional first walk reduces per-row quantities on chip (token count, the GSPO mean log-ratio,
VESPO's summed log-ratio, the off-policy KL); the main walk reads every input once and writes
d loss / d logp, the weight of d loss / d entropy and the per-row partial sums (loss and
metrics); sequence-level ratios need one more walk that adds the row's d loss / d rho back onto its
tokens. Everything normalized by a batch-wide quantity is applied to the ``[B, NUM_STATS]``
partial sums afterwards and folded into the scalar that the backward multiplies by, so the kernel
never needs a second launch and the backward is one multiply.
"""

from __future__ import annotations

import ast
import functools
import math
import numbers
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from grpo_kernels.ops.utils import (
    FLOAT_DTYPES,
    CompileSpec,
    check_tensor,
    resolve_backend,
)

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = (None, "truncate", "mask")
LOG_1E_8 = math.log(1e-8)

# ---------------------------------------------------------------------------------------------
# Per-token terms: small jit functions, run by the kernel and (through _on_torch) by the torch path
# ---------------------------------------------------------------------------------------------


@triton.jit
def _policy_clip(x, o, rho, a, row_value, eps_low, eps_high, delta, clip_c):
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
def _policy_cispo(x, o, rho, a, row_value, eps_high, ratio_min, p2, p3):
    """CISPO: P = -stopgrad(clamp(rho, ratio_min, eps_high)) A logp (TRL: ratio_min 0; verl:
    clamp(rho, 1 - clip_ratio_low, 1 + clip_ratio_high))."""
    capped = tl.minimum(tl.maximum(rho, ratio_min), eps_high)
    no_flag = tl.zeros_like(x) != 0
    return -capped * a * x, -capped * a, tl.zeros_like(x), no_flag, (rho > eps_high) & (a > 0), no_flag


@triton.jit
def _policy_sapo(x, o, rho, a, row_value, tau_pos, tau_neg, p2, p3):
    """SAPO: P = -sigmoid(tau (rho - 1)) 4/tau A, tau = tau_pos if A > 0 else tau_neg."""
    tau = tl.where(a > 0, tau_pos, tau_neg)
    gate = tl.sigmoid(tau * (rho - 1.0))
    no_flag = tl.zeros_like(x) != 0
    return -gate * (4.0 / tau) * a, tl.zeros_like(x), -4.0 * a * gate * (1.0 - gate), no_flag, no_flag, no_flag


@triton.jit
def _vespo_phi(log_w, a, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's gamma weight phi = exp(lambda + k log w - lambda w), (k, lambda) by sign(A); 0 if not finite."""
    nonneg = a >= 0
    k = tl.where(nonneg, k_pos, k_neg)
    lam = tl.maximum(tl.where(nonneg, lambda_pos, lambda_neg), 1e-4)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi == phi) & (phi != float("inf")), phi, 0.0)


@triton.jit
def _policy_vespo(x, o, rho, a, row_value, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO: P = -stopgrad(phi(w)) A logp, log w = the row's clamped summed log-ratio (row_value)."""
    phi = _vespo_phi(row_value, a, k_pos, lambda_pos, k_neg, lambda_neg)
    no_flag = tl.zeros_like(x) != 0
    return -phi * a * x, -phi * a, tl.zeros_like(x), no_flag, no_flag, no_flag


@triton.jit
def _gmpo_log_ratio(x, o, a, eps_low, eps_high):
    """GMPO's g_t = s min(s l_t, s clamp(l_t, -eps_low, eps_high)), s = sign(A_t), and d g_t / d l_t
    (torch's conventions: 1 unless clipped on the side of s, 0 where A = 0)."""
    log_ratio = x - o
    clamped = tl.minimum(tl.maximum(log_ratio, -eps_low), eps_high)
    s = tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0))
    g = s * tl.minimum(s * log_ratio, s * clamped)
    return g, tl.where((s != 0) & (s * log_ratio <= s * clamped), 1.0, 0.0)


@triton.jit
def _policy_geo_mean(x, o, rho, a, row_value, eps_low, eps_high, p2, p3):
    """GMPO (verl geo_mean): P = -A_t rho_i, rho_i = exp(sum_t m g_t / (sum_t m + 1e-8)) the row's
    geometric-mean ratio (the row pass, _ROW_LOG_RATIO_GMPO); averaged per row by sum_t m + 1e-8 this
    is -A_i rho_i with verl's A_i. Flags: l_t outside [-eps_low, eps_high] with A > 0 (high) / A < 0 (low)."""
    log_ratio = x - o
    clipped = log_ratio != tl.minimum(tl.maximum(log_ratio, -eps_low), eps_high)
    no_flag = tl.zeros_like(x) != 0
    return -a * rho, tl.zeros_like(x), -a + tl.zeros_like(x), clipped & (a < 0), clipped & (a > 0), no_flag


@triton.jit
def _dppo_term(x, rho, a, valid, cap):
    """DPPO's P = -A stopgrad(min(rho, cap) valid) logp; flags: invalid with A <= 0 (low) / A > 0 (high),
    truncated and valid (lower: verl's pg_clipfrac_lower)."""
    weight = tl.where(valid, tl.minimum(rho, cap), 0.0)
    invalid = valid == 0
    return -a * weight * x, -a * weight, tl.zeros_like(x), invalid & (a <= 0), invalid & (a > 0), (rho > cap) & valid


@triton.jit
def _policy_dppo_tv(x, o, rho, a, row_value, eps_low, eps_high, cap, p3):
    """DPPO-Binary-TV: valid = p - q <= eps_high (A > 0) or p - q >= -eps_low (A <= 0), p = exp(logp), q = exp(old)."""
    diff = tl.exp(x) - tl.exp(o)
    return _dppo_term(x, rho, a, tl.where(a > 0, diff <= eps_high, diff >= -eps_low), cap)


@triton.jit
def _policy_dppo_kl(x, o, rho, a, row_value, eps_low, eps_high, cap, p3):
    """DPPO-Binary-KL: b = q (old - logp) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8));
    valid = b <= eps_high or p <= q (A > 0), b <= eps_low or p >= q (A <= 0)."""
    p = tl.exp(x)
    q = tl.exp(o)
    b = q * (o - x) + (1.0 - q) * tl.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
    return _dppo_term(x, rho, a, tl.where(a > 0, (b <= eps_high) | (p <= q), (b <= eps_low) | (p >= q)), cap)


@triton.jit
def _policy_kl_cov(x, o, rho, a, selected, coef, p1, p2, p3):
    """KL-Cov: P = -A rho + selected coef |l| (no clipping); ``selected`` is the per-token covariance
    selection (1 or 0). Flag lower: selected."""
    log_ratio = x - o
    sign = tl.where(log_ratio > 0, 1.0, tl.where(log_ratio < 0, -1.0, 0.0))
    no_flag = tl.zeros_like(x) != 0
    return (-a * rho + selected * coef * tl.abs(log_ratio), selected * coef * sign, -a + tl.zeros_like(x),
            no_flag, no_flag, selected != 0)


@triton.jit
def _policy_clip_cov(x, o, rho, a, selected, eps_low, eps_high, p2, p3):
    """Clip-Cov: the PPO clip term (no delta, no dual clip) with the selected tokens' term zeroed.
    Flags: the clip's low/high; lower: selected."""
    policy, dpolicy_dx, dpolicy_drho, is_low, is_high, is_lower = _policy_clip(
        x, o, rho, a, selected, eps_low, eps_high, float("inf"), float("inf"))
    keep = 1.0 - selected
    return policy * keep, dpolicy_dx, dpolicy_drho * keep, is_low, is_high, selected != 0


# KL estimators of the reference penalty: (value, d value / d logp) from x = logp, r = ref logp.


@triton.jit
def _kl_trl_k3(x, r):
    """TRL's k3, unclamped: exp(r - x) - (r - x) - 1."""
    diff = r - x
    exp_diff = tl.exp(diff)
    return exp_diff - diff - 1.0, 1.0 - exp_diff


@triton.jit
def _kl_k1(x, r):
    return x - r, tl.zeros_like(x) + 1.0


@triton.jit
def _kl_abs(x, r):
    d = x - r
    return tl.abs(d), tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


@triton.jit
def _kl_k2(x, r):
    return 0.5 * (x - r) * (x - r), x - r


@triton.jit
def _kl_verl_k3(x, r):
    """verl's low_var_kl: d = clamp(r - x, -20, 20); clamp(exp(d) - d - 1, -10, 10)."""
    diff = r - x
    d = tl.minimum(tl.maximum(diff, -20.0), 20.0)
    exp_d = tl.exp(d)
    kld = exp_d - d - 1.0
    inside = (diff >= -20.0) & (diff <= 20.0) & (kld >= -10.0) & (kld <= 10.0)
    return tl.minimum(tl.maximum(kld, -10.0), 10.0), tl.where(inside, 1.0 - exp_d, 0.0)


@triton.jit
def _kl_k1_st(x, r):
    """'+' (straight-through) variants: the estimator's value with k2's gradient (x - r)."""
    return x - r, x - r


@triton.jit
def _kl_abs_st(x, r):
    return tl.abs(x - r), x - r


@triton.jit
def _kl_verl_k3_st(x, r):
    value, _ = _kl_verl_k3(x, r)
    return value, x - r


@triton.jit
def _rollout_is(is_ratio, clip_min, clip_max, mask_mode):
    """Rollout IS ratio: "truncate" clamps into [min, max], "mask" zeroes what falls outside
    (bounds are -inf/inf when unset, so mode None is a truncate that changes nothing)."""
    outside = (is_ratio < clip_min) | (is_ratio > clip_max)
    return tl.where(mask_mode != 0, tl.where(outside, 0.0, is_ratio),
                    tl.minimum(tl.maximum(is_ratio, clip_min), clip_max))


@triton.jit
def _ratio(log_ratio, bound):
    """rho = exp(clamp(l, -bound, bound)) and d rho / d l (bound = inf unless a loss type clamps)."""
    rho = tl.exp(tl.minimum(tl.maximum(log_ratio, -bound), bound))
    return rho, tl.where((log_ratio >= -bound) & (log_ratio <= bound), rho, 0.0)


@triton.jit
def _token_loss(x, o, r, a, rho, row_value, multiplier, p0, p1, p2, p3, beta, bias_kl,
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


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------

# What the optional first walk reduces per row into ``row_value`` (the kernel's ROW_LOG_RATIO).
_ROW_LOG_RATIO_NONE = 0  # nothing (token-level ratios)
_ROW_LOG_RATIO_MEAN = 1  # sum_t m l_t / max(sum_t m, 1): the GSPO sequence ratio (rho is per row)
_ROW_LOG_RATIO_VESPO = 2  # clamp(sum_t m clamp(l_t, +-20) + sum_t clamp(log is_t, log 1e-8, 20), log 1e-8, 20)
_ROW_LOG_RATIO_GMPO = 3  # sum_t m g_t / (sum_t m + 1e-8), g_t GMPO's sign-clipped l_t (rho is per row)


@dataclass(frozen=True)
class PolicyTerm:
    """A policy term: its jit function and the ``_Config`` attributes passed as ``p0..p3``."""

    jit: object
    params: tuple
    row_log_ratio: int = _ROW_LOG_RATIO_NONE
    folds_is_ratio: bool = False  # the rollout IS ratio enters row_value instead of the multiplier
    # "kl_cov" / "clip_cov": a per-token covariance selection over the micro-batch, computed before
    # the row pass, is handed to the policy term in place of row_value
    token_selection: str | None = None


POLICIES = {
    "clip": PolicyTerm(_policy_clip, ("epsilon_low", "epsilon_high", "delta_or_inf", "clip_ratio_c_or_inf")),
    "cispo": PolicyTerm(_policy_cispo, ("epsilon_high", "cispo_ratio_min")),
    "sapo": PolicyTerm(_policy_sapo, ("sapo_temperature_pos", "sapo_temperature_neg")),
    "vespo": PolicyTerm(_policy_vespo, ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                        row_log_ratio=_ROW_LOG_RATIO_VESPO, folds_is_ratio=True),
    "geo_mean": PolicyTerm(_policy_geo_mean, ("epsilon_low", "epsilon_high"), row_log_ratio=_ROW_LOG_RATIO_GMPO),
    "dppo_tv": PolicyTerm(_policy_dppo_tv, ("epsilon_low", "epsilon_high", "clip_ratio_c_or_inf")),
    "dppo_kl": PolicyTerm(_policy_dppo_kl, ("epsilon_low", "epsilon_high", "clip_ratio_c_or_inf")),
    "kl_cov": PolicyTerm(_policy_kl_cov, ("ppo_kl_coef",), token_selection="kl_cov"),
    "clip_cov": PolicyTerm(_policy_clip_cov, ("epsilon_low", "epsilon_high"), token_selection="clip_cov"),
}

KL_ESTIMATORS = {
    # name: (jit function, doc); None is TRL's k3, "k3"/"low_var_kl" is verl's clamped one.
    None: (_kl_trl_k3, "TRL's k3, unclamped: exp(ref - logp) - (ref - logp) - 1"),
    "kl": (_kl_k1, "k1: logp - ref"),
    "k1": (_kl_k1, "k1: logp - ref"),
    "abs": (_kl_abs, "|logp - ref|"),
    "mse": (_kl_k2, "k2: 0.5 (logp - ref)^2"),
    "k2": (_kl_k2, "k2: 0.5 (logp - ref)^2"),
    "low_var_kl": (_kl_verl_k3, "verl's k3: clamp(exp(d) - d - 1, -10, 10), d = clamp(ref - logp, -20, 20)"),
    "k3": (_kl_verl_k3, "verl's k3 (low_var_kl)"),
    "kl+": (_kl_k1_st, "k1's value, k2's gradient"),
    "k1+": (_kl_k1_st, "k1's value, k2's gradient"),
    "abs+": (_kl_abs_st, "abs's value, k2's gradient"),
    "mse+": (_kl_k2, "k2"),
    "k2+": (_kl_k2, "k2"),
    "low_var_kl+": (_kl_verl_k3_st, "verl's k3 value, k2's gradient"),
    "k3+": (_kl_verl_k3_st, "verl's k3 value, k2's gradient"),
}


@dataclass(frozen=True)
class Aggregation:
    """How per-token losses become the scalar: the per-row token weight and a batch-wide scale.

    ``row_norm``: 0 sums a row's tokens, 1 divides by ``max(n_i, 1)`` (TRL), 2 by ``n_i + 1e-8``
    (verl). ``scale(cfg, row_stats, B, T)`` returns 1 / the batch-wide normalizer (0-d float32).
    """

    row_norm: int
    scale: Callable
    doc: str


def _per_rank_tokens(cfg, row_stats):
    """TRL's dapo/cispo/vespo normalizer per rank: num_items_in_batch / world_size, or (without
    it) the micro-batch's token count summed over ranks and averaged (Liger's fallback)."""
    world_size = _world_size()
    tokens = row_stats[:, _S_TOKENS].sum()
    if cfg.num_items_in_batch is not None:
        items = torch.as_tensor(cfg.num_items_in_batch, dtype=torch.float32).to(tokens.device)
        return items.clamp(min=1.0) / world_size
    normalizer = tokens.clone()
    if world_size > 1:
        torch.distributed.all_reduce(normalizer, op=torch.distributed.ReduceOp.SUM)
    return (normalizer / world_size).clamp(min=1.0)


def _verl_sequences(cfg, row_stats):
    if cfg.global_batch_size is not None:
        return torch.as_tensor(cfg.global_batch_size, dtype=torch.float32).to(row_stats.device)
    return (row_stats[:, _S_TOKENS] > 0).sum().float().clamp(min=1.0)


def _verl_tokens(cfg, row_stats):
    if cfg.batch_num_tokens is not None:
        return torch.as_tensor(cfg.batch_num_tokens, dtype=torch.float32).to(row_stats.device)
    return row_stats[:, _S_TOKENS].sum().clamp(min=1.0)


def _ones(row_stats, value):
    return torch.full((), float(value), device=row_stats.device, dtype=torch.float32)


AGGREGATIONS = {
    # TRL's normalizers, one per loss_type family (not selectable by name: loss_agg_mode=None)
    "trl:seq-mean-token-mean": Aggregation(
        1, lambda cfg, s, B, T: _ones(s, 1.0 / B), "mean over rows of sum_t m L / max(sum_t m, 1)"),
    "trl:token-mean": Aggregation(
        0, lambda cfg, s, B, T: 1.0 / s[:, _S_TOKENS].sum().clamp(min=1.0), "sum m L / max(sum m, 1)"),
    "trl:dr_grpo": Aggregation(
        0, lambda cfg, s, B, T: _ones(s, 1.0 / (B * cfg.max_completion_length)),
        "sum m L / (B * max_completion_length)"),
    "trl:global-token-mean": Aggregation(
        0, lambda cfg, s, B, T: 1.0 / _per_rank_tokens(cfg, s),
        "sum m L / (num_items_in_batch / world_size); without it, the micro-batch's tokens averaged over ranks"),
    "trl:seq-mean-token-sum": Aggregation(
        0, lambda cfg, s, B, T: _ones(s, 1.0 / B), "mean over rows of sum_t m L"),
    # verl's agg_loss modes (loss_agg_mode=...)
    "token-mean": Aggregation(
        0, lambda cfg, s, B, T: cfg.dp_size / _verl_tokens(cfg, s),
        "sum m L / batch_num_tokens * dp_size (batch_num_tokens: the micro-batch's tokens when not given)"),
    "token-sum": Aggregation(0, lambda cfg, s, B, T: _ones(s, cfg.dp_size), "sum m L * dp_size"),
    "seq-mean-token-sum": Aggregation(
        0, lambda cfg, s, B, T: cfg.dp_size / _verl_sequences(cfg, s),
        "sum over rows of sum_t m L / global_batch_size * dp_size (global_batch_size: rows with a token)"),
    "seq-mean-token-mean": Aggregation(
        2, lambda cfg, s, B, T: cfg.dp_size / _verl_sequences(cfg, s),
        "sum over rows of sum_t m L / (sum_t m + 1e-8) / global_batch_size * dp_size"),
    "seq-mean-token-sum-norm": Aggregation(
        0, lambda cfg, s, B, T: cfg.dp_size / _verl_sequences(cfg, s)
        / (T if cfg.loss_scale_factor is None else cfg.loss_scale_factor),
        "seq-mean-token-sum / loss_scale_factor (default: T, the padded length)"),
    # verl's geo_mean ignores loss_agg_mode: torch.mean over every row of the row's -A_i rho_i
    "verl:geo-mean": Aggregation(
        2, lambda cfg, s, B, T: _ones(s, 1.0 / B), "mean over all B rows of sum_t m L / (sum_t m + 1e-8)"),
}
# the named normalizers of the loss types (prefixed by their peer) are not selectable by name
LOSS_AGG_MODES = tuple(name for name in AGGREGATIONS if ":" not in name)

# Metrics every loss type reports, then the optional ones a loss type lists.
COMMON_METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy")
METRIC_DOCS = {
    "kl": "mean masked KL estimate (times rho when bias-corrected); NaN without ref_logprobs",
    "clip_ratio/low_mean": "fraction of masked tokens with rho < 1 - epsilon_low and A < 0",
    "clip_ratio/high_mean": "fraction with rho > 1 + epsilon_high and A > 0 (cispo: rho > epsilon_high, A > 0)",
    "clip_ratio/region_mean": "low or high",
    "entropy": "mean masked token entropy; NaN without entropy",
    "pg_clipfrac_lower": "dual clip: fraction of masked tokens with A < 0 whose loss hit -A * clip_ratio_c",
    "vespo/phi_seq_mean": "mean over the B completions of VESPO's weight phi",
    "cov/selected_mean": "KL-Cov / Clip-Cov: fraction of masked tokens the covariance selection picked",
}
METRIC_NAMES = COMMON_METRICS + ("pg_clipfrac_lower", "vespo/phi_seq_mean", "cov/selected_mean")


@dataclass(frozen=True)
class LossType:
    """One ``loss_type`` value."""

    policy: str  # key of POLICIES
    aggregation: str  # key of AGGREGATIONS used when loss_agg_mode is None
    options: tuple = ()  # type-specific options it reads (others of that kind must stay at their default)
    metrics: tuple = ()  # beyond COMMON_METRICS
    sequence_level: bool = False  # importance_sampling_level="sequence" allowed
    defaults: dict = field(default_factory=dict)  # type-specific defaults overriding OPTIONS
    off_policy_mask: bool = True  # off_policy_mask_threshold allowed
    peer: str = "TRL 1.16"
    doc: str = ""


_CLIP_OPTIONS = ("delta", "clip_ratio_c")
LOSS_TYPES_TABLE = {
    "grpo": LossType("clip", "trl:seq-mean-token-mean", _CLIP_OPTIONS, ("pg_clipfrac_lower",), True,
                     doc="PPO clip; per-sequence token mean, then the mean over sequences"),
    "bnpo": LossType("clip", "trl:token-mean", _CLIP_OPTIONS, ("pg_clipfrac_lower",), True,
                     doc="PPO clip; token mean over the micro-batch"),
    "dr_grpo": LossType("clip", "trl:dr_grpo", _CLIP_OPTIONS + ("max_completion_length",), ("pg_clipfrac_lower",),
                        True, doc="PPO clip; sum / (B * max_completion_length) (Dr. GRPO)"),
    "dapo": LossType("clip", "trl:global-token-mean", _CLIP_OPTIONS, ("pg_clipfrac_lower",), True,
                     doc="PPO clip; token mean over the whole generation batch (DAPO)"),
    "luspo": LossType("clip", "trl:seq-mean-token-sum", _CLIP_OPTIONS, ("pg_clipfrac_lower",), True,
                      doc="PPO clip; mean over sequences of the token sum (LUSPO)"),
    "cispo": LossType("cispo", "trl:global-token-mean", ("cispo_ratio_min",),
                      doc="-stopgrad(clamp(rho, cispo_ratio_min, epsilon_high)) A logp (CISPO); epsilon_high is the cap"),
    "sapo": LossType("sapo", "trl:seq-mean-token-mean", ("sapo_temperature_pos", "sapo_temperature_neg"),
                     doc="soft gate -sigmoid(tau (rho - 1)) 4/tau A (SAPO)"),
    "vespo": LossType("vespo", "trl:global-token-mean",
                      ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                      ("vespo/phi_seq_mean",),
                      doc="-stopgrad(phi(w)) A logp, phi the gamma weight of the summed sequence log-ratio (VESPO)"),
    # (no off-policy mask: verl has none for GMPO, and that variant trips Triton's sm_90 ThreadLocality pass)
    "geo_mean": LossType("geo_mean", "verl:geo-mean", off_policy_mask=False, peer="verl 0.9.1",
                         doc="-A_i exp(mean_t of l_t clipped to [-epsilon_low, epsilon_high] on the side of sign(A)) "
                             "(GMPO); epsilon_* bound the log-ratio"),
    "dppo_tv": LossType("dppo_tv", "token-mean", ("clip_ratio_c",), ("pg_clipfrac_lower",),
                        defaults={"clip_ratio_c": 20.0}, peer="verl 0.9.1",
                        doc="-A stopgrad(min(rho, clip_ratio_c) valid) logp, valid: p - p_old within "
                            "[-epsilon_low, epsilon_high] on the side of A (DPPO-Binary-TV)"),
    "dppo_kl": LossType("dppo_kl", "token-mean", ("clip_ratio_c",), ("pg_clipfrac_lower",),
                        defaults={"clip_ratio_c": 20.0}, peer="verl 0.9.1",
                        doc="as dppo_tv with the binary KL of p_old to p as the trust region (DPPO-Binary-KL)"),
    "kl_cov": LossType("kl_cov", "token-mean", ("kl_cov_ratio", "ppo_kl_coef"), ("cov/selected_mean",),
                       peer="verl 0.9.1",
                       doc="-A rho, + ppo_kl_coef |l| on the top kl_cov_ratio of masked tokens by "
                           "cov(A, logp) over the micro-batch (KL-Cov)"),
    "clip_cov": LossType("clip_cov", "token-mean", ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "generator"),
                         ("cov/selected_mean",), peer="verl 0.9.1",
                         doc="PPO clip with the term of clip_cov_ratio of the unclipped masked tokens, drawn at "
                             "random among clip_cov_lb < cov(A, logp) < clip_cov_ub, zeroed (Clip-Cov)"),
}
LOSS_TYPES = tuple(LOSS_TYPES_TABLE)
CLIP_LOSS_TYPES = tuple(name for name, spec in LOSS_TYPES_TABLE.items() if spec.policy == "clip")


def metric_names(loss_type: str) -> tuple:
    """The metric names ``grpo_loss`` returns for ``loss_type``."""
    return COMMON_METRICS + LOSS_TYPES_TABLE[loss_type].metrics


# ---------------------------------------------------------------------------------------------
# Options: defaults, validation, docs
# ---------------------------------------------------------------------------------------------


def _finite(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _nonnegative(name, value) -> float:
    value = _finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _positive(name, value) -> float:
    value = _finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _boolean(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _optional(check):
    def optional(name, value):
        return None if value is None else check(name, value)
    optional.__doc__ = check.__doc__
    return optional


def _choice(choices):
    def choice(name, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    return choice


def _count(name, value):
    """A positive count: a number, or a 1-element tensor (its value is checked inside the op)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        return value.detach().reshape(())
    return _positive(name, value)


def _clip_ratio_c(name, value):
    value = _finite(name, value)
    if value <= 1.0:
        raise ValueError(f"{name} (dual-clip PPO's bound on -A * ratio for A < 0) must be > 1, got {value}")
    return value


def _generator(name, value):
    if not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Option:
    default: object
    check: Callable  # (name, value) -> normalized value; raises ValueError/TypeError naming the option
    doc: str


OPTIONS = {
    "loss_type": Option("dapo", _choice(LOSS_TYPES), "the loss type (table below)"),
    "beta": Option(0.0, _nonnegative, "weight of the KL penalty to the reference model (needs ref_logprobs)"),
    "kl_estimator": Option(None, _choice(tuple(KL_ESTIMATORS)),
                           "None: TRL's unclamped k3; verl's kl_penalty values: 'kl'/'k1', 'abs', 'mse'/'k2', "
                           "'low_var_kl'/'k3' (clamped), and '+' variants (the value with k2's gradient)"),
    "epsilon_low": Option(0.2, _nonnegative, "clip range [1 - epsilon_low, 1 + epsilon_high]"),
    "epsilon_high": Option(None, _optional(_nonnegative),
                           "None: epsilon_low; for cispo the ratio cap itself (TRL recommends 5.0)"),
    "delta": Option(None, _optional(_positive), "two-sided clip (INTELLECT-2): the unclipped branch uses min(rho, delta)"),
    "clip_ratio_c": Option(None, _optional(_clip_ratio_c),
                           "dual-clip PPO: for A < 0 the loss is at most -A * clip_ratio_c (> 1; verl's default 3); "
                           "None: off. When set, log-ratios are clamped to [-20, 20] before exp, as verl does"),
    "importance_sampling_level": Option("token", _choice(IMPORTANCE_SAMPLING_LEVELS),
                                        "'sequence': one GSPO ratio per completion (clip loss types)"),
    "max_completion_length": Option(None, _optional(_positive_int), "required by dr_grpo"),
    "num_items_in_batch": Option(None, _optional(_count),
                                 "active tokens of the whole generation batch on all ranks (> 0; dapo, cispo, "
                                 "vespo); None: the micro-batch's count, summed over ranks and averaged"),
    "loss_agg_mode": Option(None, _choice((None,) + LOSS_AGG_MODES),
                            "None: the loss type's own TRL normalizer; else verl's agg_loss mode"),
    "dp_size": Option(1, _positive_int, "verl's data-parallel size (loss_agg_mode only)"),
    "batch_num_tokens": Option(None, _optional(_count),
                               "verl's global token count for token-mean (loss_agg_mode only; needed when dp_size > 1)"),
    "global_batch_size": Option(None, _optional(_count),
                                "verl's global sequence count for the seq-mean modes (loss_agg_mode only; "
                                "needed when dp_size > 1)"),
    "loss_scale_factor": Option(None, _optional(_positive),
                                "seq-mean-token-sum-norm's divisor (loss_agg_mode only); None: T"),
    "rollout_is_mode": Option(None, _choice(ROLLOUT_IS_MODES),
                              "None: rollout_is_ratio used as given; 'truncate': clamped into the bounds; "
                              "'mask': 0 outside them"),
    "rollout_is_clip_min": Option(None, _optional(_nonnegative), "lower bound of rollout_is_mode (None: open)"),
    "rollout_is_clip_max": Option(3.0, _optional(_nonnegative), "upper bound of rollout_is_mode (None: open)"),
    "sapo_temperature_pos": Option(1.0, _positive, "SAPO gate temperature for A > 0"),
    "sapo_temperature_neg": Option(1.05, _positive, "SAPO gate temperature for A <= 0"),
    "vespo_k_pos": Option(2.0, _finite, "VESPO's k for A >= 0"),
    "vespo_lambda_pos": Option(3.0, _finite, "VESPO's lambda for A >= 0 (used as max(lambda, 1e-4))"),
    "vespo_k_neg": Option(3.0, _finite, "VESPO's k for A < 0"),
    "vespo_lambda_neg": Option(2.0, _finite, "VESPO's lambda for A < 0 (used as max(lambda, 1e-4))"),
    "kl_cov_ratio": Option(2e-4, _positive, "KL-Cov: fraction of the masked tokens, by covariance, that get the "
                           "|log-ratio| penalty"),
    "ppo_kl_coef": Option(1.0, _nonnegative, "KL-Cov: weight of that penalty"),
    "clip_cov_ratio": Option(2e-4, _positive, "Clip-Cov: fraction of the masked tokens drawn for a zeroed gradient"),
    "clip_cov_lb": Option(1.0, _finite, "Clip-Cov: lower covariance bound of the candidates"),
    "clip_cov_ub": Option(5.0, _finite, "Clip-Cov: upper covariance bound of the candidates"),
    "cispo_ratio_min": Option(0.0, _nonnegative, "CISPO's lower bound of the weight (0: none, TRL; verl: "
                              "1 - clip_ratio_low)"),
    "generator": Option(None, _optional(_generator), "Clip-Cov: the torch.Generator of its random draw "
                        "(reproducible results)"),
    "use_bias_correction_kl": Option(False, _boolean, "multiply the KL by the unclipped ratio (DeepSeek-V3.2)"),
    "entropy_coef": Option(0.0, _finite, "entropy bonus: loss -= entropy_coef * mean entropy over the effective mask"),
    "top_entropy_quantile": Option(1.0, _finite,
                                   "keep the policy term on tokens whose entropy is in this top quantile, in [0, 1]"),
    "off_policy_mask_threshold": Option(None, _optional(_finite),
                                        "drop the policy term of rows with A < 0 whose mean sampling_logprobs - logp "
                                        "exceeds it (DeepSeek-V3.2)"),
}
# Options that only some loss types read: setting one to a non-default value for another loss type
# is an error (it would silently do nothing).
_TYPE_SPECIFIC = frozenset(name for spec in LOSS_TYPES_TABLE.values() for name in spec.options) - {
    "max_completion_length"}
_AGG_OPTIONS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


class _Config:
    """The validated scalar options of ``grpo_loss`` (built by ``validate_loss_options``)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)
        self.spec = LOSS_TYPES_TABLE[self.loss_type]
        self.policy = POLICIES[self.spec.policy]
        self.aggregation = AGGREGATIONS[self.loss_agg_mode or self.spec.aggregation]
        self.sequence_level = self.importance_sampling_level == "sequence"
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon_low
        self.delta_or_inf = math.inf if self.delta is None else self.delta
        self.clip_ratio_c_or_inf = math.inf if self.clip_ratio_c is None else self.clip_ratio_c
        # verl clamps the log-ratio before exp wherever it uses clip_ratio_c
        self.log_ratio_bound = 20.0 if self.clip_ratio_c is not None else math.inf
        if self.rollout_is_mode is None:
            self.is_clip_min, self.is_clip_max = -math.inf, math.inf
        else:
            self.is_clip_min = -math.inf if self.rollout_is_clip_min is None else self.rollout_is_clip_min
            self.is_clip_max = math.inf if self.rollout_is_clip_max is None else self.rollout_is_clip_max
        self.off_policy_threshold_or_inf = (
            math.inf if self.off_policy_mask_threshold is None else self.off_policy_mask_threshold)
        self.kl_jit = KL_ESTIMATORS[self.kl_estimator][0]

    def policy_params(self) -> tuple:
        return tuple(getattr(self, name) for name in self.policy.params) + (0.0,) * (4 - len(self.policy.params))

    def as_json(self) -> str:
        """The options that travel as a string into the custom op (tensors and objects excluded):
        ``name=repr(value);...``, built from plain string formatting so that torch.compile traces it."""
        return ";".join(f"{name}={getattr(self, name)!r}" for name in OPTIONS
                        if not isinstance(getattr(self, name), (torch.Tensor, torch.Generator)))


def validate_loss_options(**options) -> _Config:
    """Check ``grpo_loss`` options without any tensor; raise ``ValueError``/``TypeError`` naming the option.

    Returns the validated options object (defaults filled in). Trainers call this at construction,
    so that a bad option fails before any model is loaded. Checks each option's type and range,
    and the combinations that make no sense (sequence level with a loss type that does not define
    it, dr_grpo without max_completion_length, a type-specific option set for another loss type,
    verl's global normalizers without loss_agg_mode).
    """
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown grpo_loss option(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(OPTIONS))}")
    loss_type = options.get("loss_type", OPTIONS["loss_type"].default)
    if loss_type not in LOSS_TYPES_TABLE:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    spec = LOSS_TYPES_TABLE[loss_type]
    values = {}
    for name, option in OPTIONS.items():
        default = spec.defaults.get(name, option.default)
        value = options.get(name, default)
        if name in _TYPE_SPECIFIC and name not in spec.options and name in options and value != default:
            readers = sorted(t for t, s in LOSS_TYPES_TABLE.items() if name in s.options)
            raise ValueError(f"{name} is only used by loss_type {', '.join(readers)}; "
                             f"loss_type={loss_type!r} would ignore it")
        values[name] = option.check(name, value)
    if values["off_policy_mask_threshold"] is not None and not spec.off_policy_mask:
        raise ValueError(f"off_policy_mask_threshold is not supported with loss_type={loss_type!r}")
    if values["importance_sampling_level"] == "sequence" and not spec.sequence_level:
        raise ValueError(
            f"importance_sampling_level='sequence' (GSPO) makes no sense with loss_type={loss_type!r}: "
            "its per-token weight is defined on token ratios; use importance_sampling_level='token'. "
            "(Sequence-level importance sampling is not supported for this loss type.)")
    if loss_type == "dr_grpo" and values["max_completion_length"] is None:
        raise ValueError("loss_type='dr_grpo' normalizes by B * max_completion_length: pass max_completion_length")
    if not 0.0 <= values["top_entropy_quantile"] <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {values['top_entropy_quantile']}")
    if values["rollout_is_mode"] is not None:
        low, high = values["rollout_is_clip_min"], values["rollout_is_clip_max"]
        if low is not None and high is not None and low > high:
            raise ValueError(f"rollout_is_clip_min {low} > rollout_is_clip_max {high}")
    mode = values["loss_agg_mode"]
    if mode is None:
        for name in _AGG_OPTIONS:
            if name in options and values[name] != OPTIONS[name].default:
                raise ValueError(f"{name} is one of verl's agg_loss normalizers: it needs loss_agg_mode")
    elif values["dp_size"] > 1:
        needed = "batch_num_tokens" if mode == "token-mean" else "global_batch_size" if mode.startswith("seq") else None
        if needed and values[needed] is None:
            raise ValueError(f"loss_agg_mode={mode!r} with dp_size > 1 needs {needed} (the global count), as in verl")
    return _Config(values)


def options_markdown() -> str:
    """The options and loss-type tables of ``docs/semantics.md``, generated from the tables here."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for name, option in OPTIONS.items():
        lines.append(f"| `{name}` | `{option.default!r}` | {option.doc} |")
    lines += ["", "| loss_type | policy term | default aggregation | type-specific options | extra metrics | "
              "sequence level | semantics of |", "|---|---|---|---|---|---|---|"]
    for name, spec in LOSS_TYPES_TABLE.items():
        opts = ", ".join(f"`{o}`" for o in spec.options) or "-"
        metrics = ", ".join(f"`{m}`" for m in spec.metrics) or "-"
        lines.append(f"| `{name}` | {spec.doc} | `{spec.aggregation}`: {AGGREGATIONS[spec.aggregation].doc} | "
                     f"{opts} | {metrics} | {'yes' if spec.sequence_level else 'no'} | {spec.peer} |")
    lines += ["", "| loss_agg_mode | loss |", "|---|---|"]
    lines += [f"| `{name}` | {AGGREGATIONS[name].doc} |" for name in LOSS_AGG_MODES]
    lines += ["", "| kl_estimator | estimator |", "|---|---|"]
    lines += [f"| `{name!r}` | {doc} |" for name, (_, doc) in KL_ESTIMATORS.items()]
    lines += ["", "| metric | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {METRIC_DOCS[name]} |" for name in METRIC_NAMES]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

# Columns of the per-row partial sums written by the kernel (the kernel stores them in this order).
STAT_COLUMNS = ("loss", "kl", "low", "high", "region", "entropy", "tokens", "eff_entropy", "eff_tokens",
                "lower", "phi")
(_S_LOSS, _S_KL, _S_LOW, _S_HIGH, _S_REGION, _S_ENTROPY, _S_TOKENS, _S_EFF_ENTROPY, _S_EFF_TOKENS,
 _S_LOWER, _S_PHI) = range(len(STAT_COLUMNS))
NUM_STATS = len(STAT_COLUMNS)

# Mask dtypes the kernel reads directly (anything else is cast to float32 first).
_KERNEL_MASK_DTYPES = {torch.float32: "fp32", torch.bool: "i1", torch.int32: "i32", torch.int64: "i64"}


@triton.jit
def _grpo_loss_kernel(
    Logp, OldLogp, RefLogp, SamplingLogp, Advantages, Mask, Entropy, RolloutRatio, EntropyThreshold,
    TokenValue, GradLogp, GradEntropy, RowStats,
    B, T,
    stride_logp, stride_old, stride_ref, stride_sampling, stride_mask,
    stride_adv_b, stride_adv_t, stride_ent_b, stride_ent_t, stride_is_b, stride_is_t, stride_token_value,
    p0, p1, p2, p3, beta, bias_kl, log_ratio_bound,
    is_clip_min, is_clip_max, is_mask_mode, off_policy_threshold, write_grad_entropy,
    POLICY: tl.constexpr, KL: tl.constexpr, ROW_LOG_RATIO: tl.constexpr, FOLDS_IS_RATIO: tl.constexpr,
    OFF_POLICY: tl.constexpr, TOKEN_VALUE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Rows ``[pid * BLOCK_B, pid * BLOCK_B + BLOCK_B)``: per-token loss, its gradient, row sums.

    Absent optional inputs arrive as aliases that make their term vanish: old/ref/sampling point at
    Logp (log-ratio 0, KL 0), entropy at a zero scalar with strides 0, the rollout ratio at a one.
    ``TokenValue`` (read when ``TOKEN_VALUE``): a per-token input handed to the policy term in place
    of the row value (KL-Cov / Clip-Cov's covariance selection).
    ``GradLogp``/``GradEntropy`` hold the gradient before the batch-wide normalizer, which the
    caller folds into the backward's scalar.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    SEQ_LEVEL: tl.constexpr = (ROW_LOG_RATIO == 1) or (ROW_LOG_RATIO == 3)  # one ratio per row
    ROW_PASS: tl.constexpr = (ROW_LOG_RATIO != 0) or OFF_POLICY

    tokens = tl.zeros((BLOCK_B,), dtype=tl.float32)
    log_ratio_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    log_is_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    off_policy_kl_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if ROW_PASS:
        # Per-row reductions needed before any token's loss.
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + offs_t
            ok = row_ok[:, None] & (cols < T)[None, :]
            m = tl.load(Mask + rows64[:, None] * stride_mask + cols[None, :], mask=ok, other=0).to(tl.float32)
            active = m != 0
            tokens += tl.sum(m, axis=1)
            if (ROW_LOG_RATIO != 0) or OFF_POLICY:
                x = tl.load(Logp + rows64[:, None] * stride_logp + cols[None, :], mask=ok, other=0.0)
            if ROW_LOG_RATIO == 1:
                o = tl.load(OldLogp + rows64[:, None] * stride_old + cols[None, :], mask=ok, other=0.0)
                log_ratio_sum += tl.sum(tl.where(active, (x - o) * m, 0.0), axis=1)
            if ROW_LOG_RATIO == 3:
                o = tl.load(OldLogp + rows64[:, None] * stride_old + cols[None, :], mask=ok, other=0.0)
                a = tl.load(Advantages + rows64[:, None] * stride_adv_b + cols[None, :] * stride_adv_t,
                            mask=ok, other=0.0)
                g, _ = _gmpo_log_ratio(x, o, a, p0, p1)
                log_ratio_sum += tl.sum(tl.where(active, g * m, 0.0), axis=1)
            if ROW_LOG_RATIO == 2:
                o = tl.load(OldLogp + rows64[:, None] * stride_old + cols[None, :], mask=ok, other=0.0)
                clamped = tl.minimum(tl.maximum(x - o, -20.0), 20.0)
                log_ratio_sum += tl.sum(tl.where(active, clamped * m, 0.0), axis=1)
                # TRL sums the IS log-ratio over every position (padding included)
                is_ratio = tl.load(RolloutRatio + rows64[:, None] * stride_is_b + cols[None, :] * stride_is_t,
                                   mask=ok, other=1.0)
                is_ratio = _rollout_is(is_ratio, is_clip_min, is_clip_max, is_mask_mode)
                log_is = tl.minimum(tl.maximum(tl.log(is_ratio), -18.420680743952367), 20.0)
                log_is_sum += tl.sum(tl.where(ok, log_is, 0.0), axis=1)
            if OFF_POLICY:
                s = tl.load(SamplingLogp + rows64[:, None] * stride_sampling + cols[None, :], mask=ok, other=0.0)
                kl = s - x
                kl = tl.where(kl != kl, 0.0, kl)  # tokens the rollout engine could not score: no evidence
                off_policy_kl_sum += tl.sum(tl.where(active, kl * m, 0.0), axis=1)
    inv_tokens = 1.0 / tl.maximum(tokens, 1.0)
    if ROW_LOG_RATIO == 3:
        seq_norm = 1.0 / (tokens + 1e-8)  # verl's GMPO divides by sum_t m + 1e-8, without a clamp
        seq_rho = tl.exp(log_ratio_sum * seq_norm)
        seq_drho = seq_rho
    else:
        seq_norm = inv_tokens
        seq_rho, seq_drho = _ratio(log_ratio_sum * inv_tokens, log_ratio_bound)
    row_value = tl.minimum(tl.maximum(log_ratio_sum + log_is_sum, -18.420680743952367), 20.0)
    off_policy_kl = off_policy_kl_sum * inv_tokens
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
        if SEQ_LEVEL:
            rho = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32) + seq_rho[:, None]
        else:
            rho, drho_dx = _ratio(x - o, log_ratio_bound)

        entropy_mask = tl.where(no_entropy_mask, active, active & (ent * m >= entropy_threshold))
        if FOLDS_IS_RATIO:
            multiplier = tl.where(entropy_mask, 1.0, 0.0)
        else:
            is_ratio = tl.load(RolloutRatio + rows64[:, None] * stride_is_b + cols[None, :] * stride_is_t,
                               mask=ok, other=1.0)
            multiplier = tl.where(entropy_mask, _rollout_is(is_ratio, is_clip_min, is_clip_max, is_mask_mode), 0.0)
        if OFF_POLICY:
            keep = (a >= 0) | (off_policy_kl[:, None] <= off_policy_threshold)
            multiplier = tl.where(keep, multiplier, 0.0)

        if TOKEN_VALUE:
            aux = tl.load(TokenValue + rows64[:, None] * stride_token_value + cols[None, :], mask=ok, other=0.0)
        else:
            aux = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float32) + row_value[:, None]
        loss_t, dloss_dx, dloss_drho, kl, is_low, is_high, is_lower = _token_loss(
            x, o, r, a, rho, aux, multiplier, p0, p1, p2, p3, beta, bias_kl, POLICY, KL)

        weight = tl.where(active, m, 0.0)
        acc_loss += tl.sum(tl.where(active, loss_t * weight, 0.0), axis=1)
        grad = tl.where(active, weight * dloss_dx, 0.0)
        if SEQ_LEVEL:
            acc_dloss_drho += tl.sum(tl.where(active, weight * dloss_drho, 0.0), axis=1)
        else:
            grad += tl.where(active, weight * dloss_drho * drho_dx, 0.0)
        tl.store(GradLogp + rows64[:, None] * T + cols[None, :], grad, mask=ok)

        masked = tl.where(active, m, 0.0)
        acc_kl += tl.sum(tl.where(active, kl * m, 0.0), axis=1)
        acc_low += tl.sum(tl.where(is_low, masked, 0.0), axis=1)
        acc_high += tl.sum(tl.where(is_high, masked, 0.0), axis=1)
        acc_region += tl.sum(tl.where(is_low | is_high, masked, 0.0), axis=1)
        acc_lower += tl.sum(tl.where(is_lower, masked, 0.0), axis=1)
        acc_entropy += tl.sum(tl.where(active, ent * m, 0.0), axis=1)
        acc_tokens += tl.sum(masked, axis=1)
        effective = tl.where(entropy_mask, m, 0.0)
        acc_eff_tokens += tl.sum(effective, axis=1)
        acc_eff_entropy += tl.sum(tl.where(entropy_mask, ent * m, 0.0), axis=1)
        if write_grad_entropy != 0:
            tl.store(GradEntropy + rows64[:, None] * T + cols[None, :], effective, mask=ok)

    if SEQ_LEVEL:
        # d rho_i / d logp_t = rho_i' * m_t / max(n_i, 1) (GMPO: rho_i m_t g'_t / (n_i + 1e-8)): add
        # the row's d loss / d rho to its tokens.
        row_coef = acc_dloss_drho * seq_drho * seq_norm
        tl.debug_barrier()
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + offs_t
            ok = row_ok[:, None] & (cols < T)[None, :]
            m = tl.load(Mask + rows64[:, None] * stride_mask + cols[None, :], mask=ok, other=0).to(tl.float32)
            g_ptrs = GradLogp + rows64[:, None] * T + cols[None, :]
            grad = tl.load(g_ptrs, mask=ok, other=0.0)
            if ROW_LOG_RATIO == 3:
                x = tl.load(Logp + rows64[:, None] * stride_logp + cols[None, :], mask=ok, other=0.0)
                o = tl.load(OldLogp + rows64[:, None] * stride_old + cols[None, :], mask=ok, other=0.0)
                a = tl.load(Advantages + rows64[:, None] * stride_adv_b + cols[None, :] * stride_adv_t,
                            mask=ok, other=0.0)
                _, dg = _gmpo_log_ratio(x, o, a, p0, p1)
                grad += tl.where(m != 0, m * dg * row_coef[:, None], 0.0)
            else:
                grad += tl.where(m != 0, m * row_coef[:, None], 0.0)
            tl.store(g_ptrs, grad, mask=ok)

    phi = tl.zeros((BLOCK_B,), dtype=tl.float32)
    if ROW_LOG_RATIO == 2:
        # VESPO's per-row weight for its metric (advantages are per row for VESPO)
        a_row = tl.load(Advantages + rows64 * stride_adv_b, mask=row_ok, other=0.0)
        phi = _vespo_phi(row_value, a_row, p0, p1, p2, p3)

    stats = RowStats + rows64 * 11  # NUM_STATS columns, in the order of STAT_COLUMNS
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


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# One [BLOCK_B, BLOCK_T] = [4, 256] tile shape for every T: the kernel moves O(B*T) bytes, a few
# microseconds next to the log-prob kernel, so a second tile shape would only double the compiled
# variants. Several rows per program keep short completions from idling most lanes.
_BLOCK_B, _BLOCK_T, _NUM_WARPS, _NUM_STAGES = 4, 256, 8, 1


def _kernel_switches(cfg) -> dict:
    policy = cfg.policy
    return {
        "POLICY": policy.jit,
        "KL": cfg.kl_jit,
        "ROW_LOG_RATIO": _ROW_LOG_RATIO_MEAN if cfg.sequence_level else policy.row_log_ratio,
        "FOLDS_IS_RATIO": policy.folds_is_ratio,
        "OFF_POLICY": cfg.off_policy_mask_threshold is not None,
        "TOKEN_VALUE": policy.token_selection is not None,
    }


# ---------------------------------------------------------------------------------------------
# Row pass: the kernel, and the same jit functions on whole [B, T] torch tensors
# ---------------------------------------------------------------------------------------------
# Both take the options and the prepared [B, T] inputs and return (row_stats [B, NUM_STATS] fp32,
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
    token_value = t.get("token_value")
    token_value, stride_token_value = (token_value, token_value.stride(0)) if token_value is not None else (logp, 0)
    p0, p1, p2, p3 = cfg.policy_params()
    grid = (triton.cdiv(B, _BLOCK_B),)
    _grpo_loss_kernel[grid](
        logp.detach(), old, ref.detach(), sampling.detach(), adv, t["mask"], entropy, is_ratio,
        t["entropy_threshold"], token_value, grad_logp, grad_entropy, row_stats,
        B, T,
        logp.stride(0), stride_old, stride_ref, stride_sampling, t["mask"].stride(0),
        adv.stride(0), adv.stride(1), stride_ent[0], stride_ent[1], stride_is[0], stride_is[1], stride_token_value,
        p0, p1, p2, p3, cfg.beta, int(cfg.use_bias_correction_kl), cfg.log_ratio_bound,
        cfg.is_clip_min, cfg.is_clip_max, int(cfg.rollout_is_mode == "mask"),
        cfg.off_policy_threshold_or_inf, int(write_grad_entropy),
        BLOCK_B=_BLOCK_B, BLOCK_T=_BLOCK_T, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
        **_kernel_switches(cfg),
    )
    return row_stats, grad_logp, (grad_entropy if write_grad_entropy else None)


def _as_tensor(value):
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)


class _TorchLanguage:
    """The part of ``triton.language`` the per-token jit functions use, on torch tensors."""

    float32 = torch.float32
    constexpr = object

    @staticmethod
    def where(condition, a, b):
        return torch.where(torch.as_tensor(condition), a, b)

    @staticmethod
    def minimum(a, b):
        return torch.minimum(_as_tensor(a), _as_tensor(b))

    @staticmethod
    def maximum(a, b):
        return torch.maximum(_as_tensor(a), _as_tensor(b))

    exp = staticmethod(lambda x: torch.exp(_as_tensor(x)))
    log = staticmethod(lambda x: torch.log(_as_tensor(x)))
    sigmoid = staticmethod(torch.sigmoid)
    abs = staticmethod(torch.abs)
    zeros_like = staticmethod(torch.zeros_like)


_TORCH_VERSIONS: dict = {}
_JIT_TYPES = (JITFunction, InterpretedFunction)


def _on_torch(jit_fn):
    """The Python function of a per-token ``@triton.jit`` function, with ``tl`` and the jit
    functions it calls rebound to their torch counterparts: the same formula on [B, T] tensors."""
    if jit_fn in _TORCH_VERSIONS:
        return _TORCH_VERSIONS[jit_fn]
    fn = jit_fn.fn
    namespace = dict(fn.__globals__, tl=_TorchLanguage)
    for name in fn.__code__.co_names:
        value = fn.__globals__.get(name)
        if isinstance(value, _JIT_TYPES) and value is not jit_fn:
            namespace[name] = _on_torch(value)
    torch_fn = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    _TORCH_VERSIONS[jit_fn] = torch_fn
    return torch_fn


def _rows_torch(cfg, t):
    """The kernel's walk over whole [B, T] float32 tensors, calling the same per-token functions."""
    x = t["logp"].detach()
    B, T = x.shape
    m = t["mask"].to(torch.float32)
    active = m != 0
    zero = torch.zeros((), device=x.device, dtype=torch.float32)
    # padding reads as 0, as the kernel's masked loads do, so nothing there can turn into NaN
    x = torch.where(active, x, zero)
    o = torch.where(active, t["old"], zero) if t["old"] is not None else x
    r = torch.where(active, t["ref"], zero) if t["ref"] is not None else x
    a = t["advantages"].expand(B, T)
    ent = t["entropy"].detach() if t["entropy"] is not None else torch.zeros_like(x)
    switches = _kernel_switches(cfg)
    rollout_is, ratio, token_loss = _on_torch(_rollout_is), _on_torch(_ratio), _on_torch(_token_loss)
    is_ratio = t["is_ratio"].expand(B, T) if t["is_ratio"] is not None else torch.ones_like(x)
    is_ratio = rollout_is(is_ratio, cfg.is_clip_min, cfg.is_clip_max, int(cfg.rollout_is_mode == "mask"))

    tokens = m.sum(1)
    inv_tokens = 1.0 / tokens.clamp(min=1.0)
    row_value = torch.zeros_like(tokens)
    seq_norm = inv_tokens
    if switches["ROW_LOG_RATIO"] == _ROW_LOG_RATIO_MEAN:
        seq_rho, seq_drho = ratio(torch.where(active, (x - o) * m, zero).sum(1) * inv_tokens, cfg.log_ratio_bound)
        rho = seq_rho[:, None].expand(B, T)
    elif switches["ROW_LOG_RATIO"] == _ROW_LOG_RATIO_GMPO:
        g, dg = _on_torch(_gmpo_log_ratio)(x, o, a, *cfg.policy_params()[:2])
        seq_norm = 1.0 / (tokens + 1e-8)
        seq_rho = torch.exp(torch.where(active, g * m, zero).sum(1) * seq_norm)
        seq_drho = seq_rho
        rho = seq_rho[:, None].expand(B, T)
    else:
        rho, drho_dx = ratio(x - o, cfg.log_ratio_bound)
    if switches["ROW_LOG_RATIO"] == _ROW_LOG_RATIO_VESPO:
        log_ratio_sum = torch.where(active, (x - o).clamp(-20.0, 20.0) * m, zero).sum(1)
        log_is_sum = torch.log(is_ratio).clamp(LOG_1E_8, 20.0).sum(1)  # every position, as TRL
        row_value = (log_ratio_sum + log_is_sum).clamp(LOG_1E_8, 20.0)

    threshold = t["entropy_threshold"]
    entropy_mask = active & ((threshold == float("-inf")) | (ent * m >= threshold))
    multiplier = torch.where(entropy_mask, 1.0 if cfg.policy.folds_is_ratio else is_ratio, zero)
    if cfg.off_policy_mask_threshold is not None:
        sampling = torch.where(active, t["sampling"], zero) if t["sampling"] is not None else o
        kl_off = torch.nan_to_num(sampling - x, nan=0.0)
        off_policy_kl = torch.where(active, kl_off * m, zero).sum(1) * inv_tokens
        keep = (a >= 0) | (off_policy_kl[:, None] <= cfg.off_policy_mask_threshold)
        multiplier = torch.where(keep, multiplier, zero)

    aux = t["token_value"] if switches["TOKEN_VALUE"] else row_value[:, None].expand(B, T)
    loss_t, dloss_dx, dloss_drho, kl, is_low, is_high, is_lower = token_loss(
        x, o, r, a, rho, aux, multiplier, *cfg.policy_params(), cfg.beta,
        int(cfg.use_bias_correction_kl), _on_torch(switches["POLICY"]), _on_torch(switches["KL"]))

    weight = torch.where(active, m, zero)
    grad = torch.where(active, weight * dloss_dx, zero)
    if switches["ROW_LOG_RATIO"] in (_ROW_LOG_RATIO_MEAN, _ROW_LOG_RATIO_GMPO):
        row_dloss_drho = torch.where(active, weight * dloss_drho, zero).sum(1)
        per_token = m * dg if switches["ROW_LOG_RATIO"] == _ROW_LOG_RATIO_GMPO else m
        grad = grad + torch.where(active, per_token * (row_dloss_drho * seq_drho * seq_norm)[:, None], zero)
    else:
        grad = grad + torch.where(active, weight * dloss_drho * drho_dx, zero)

    masked = torch.where(active, m, zero)
    effective = torch.where(entropy_mask, m, zero)
    phi = torch.zeros_like(tokens)
    if switches["ROW_LOG_RATIO"] == _ROW_LOG_RATIO_VESPO:
        phi = _on_torch(_vespo_phi)(row_value, t["advantages"][:, 0], *cfg.policy_params())
    row_stats = torch.stack([
        torch.where(active, loss_t * weight, zero).sum(1),
        torch.where(active, kl * m, zero).sum(1),
        torch.where(is_low, masked, zero).sum(1),
        torch.where(is_high, masked, zero).sum(1),
        torch.where(is_low | is_high, masked, zero).sum(1),
        torch.where(active, ent * m, zero).sum(1),
        masked.sum(1),
        torch.where(entropy_mask, ent * m, zero).sum(1),
        effective.sum(1),
        torch.where(is_lower, masked, zero).sum(1),
        phi,
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


def _metrics_vector(cfg, row_stats, has_ref, has_entropy):
    """[len(METRIC_NAMES)] float32: every metric (those a loss type does not report are dropped later)."""
    stats = row_stats.sum(0)
    tokens = stats[_S_TOKENS].clamp(min=1.0)
    nan = torch.full_like(tokens, float("nan"))
    return torch.stack([
        stats[_S_KL] / tokens if has_ref else nan,
        stats[_S_LOW] / tokens,
        stats[_S_HIGH] / tokens,
        stats[_S_REGION] / tokens,
        stats[_S_ENTROPY] / tokens if has_entropy else nan,
        stats[_S_LOWER] / tokens,
        stats[_S_PHI] / row_stats.shape[0],
        stats[_S_LOWER] / tokens,  # the same column: the cov losses flag their selection there
    ])


def covariance_selection(cfg, logp, t, draw_seed=None) -> torch.Tensor:
    """KL-Cov / Clip-Cov's tokens ``[B, T]`` float32 (1 = selected), over the micro-batch's masked tokens.

    cov_t = (A_t - mean A) (logp_t - mean logp) over the masked tokens (Clip-Cov: verl's masked_mean,
    sum / (n + 1e-8)). KL-Cov: the top max(1, floor(kl_cov_ratio * n)) by cov. Clip-Cov: of the masked
    tokens the clip does not already clip, with clip_cov_lb < cov < clip_cov_ub, max(1, floor(clip_cov_ratio
    * sum m)) drawn by ``torch.randperm`` over the candidates in row-major order, on torch's global CPU
    generator (verl), or, with a ``generator``, on a CPU generator seeded by ``draw_seed`` (a 63-bit
    seed grpo_loss draws from it: a Generator cannot enter the custom op). Host syncs (the counts), as
    in verl.
    """
    x = logp.detach()
    B, T = x.shape
    m = t["mask"].to(torch.float32)
    valid = m != 0
    a = t["advantages"].expand(B, T)
    selected = torch.zeros(B * T, device=x.device, dtype=torch.float32)
    n = int(valid.sum())
    if n == 0:
        return selected.view(B, T)
    if cfg.policy.token_selection == "kl_cov":
        a_valid, x_valid = a[valid], x[valid]
        cov = (a_valid - a_valid.mean()) * (x_valid - x_valid.mean())
        top = torch.topk(cov, max(1, int(n * cfg.kl_cov_ratio)), largest=True).indices
        selected[torch.nonzero(valid.reshape(-1)).squeeze(1)[top]] = 1.0
        return selected.view(B, T)
    count = m.sum()
    cov = (a - (a * m).sum() / (count + 1e-8)) * (x - (x * m).sum() / (count + 1e-8))
    ratio = torch.exp(x - (t["old"] if t["old"] is not None else x))
    clipped = -a * ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high) > -a * ratio
    candidates = torch.nonzero(((cov < cfg.clip_cov_ub) & (cov > cfg.clip_cov_lb) & valid & ~clipped).reshape(-1))
    if len(candidates) > 0:
        generator = None if draw_seed is None else torch.Generator().manual_seed(int(draw_seed))
        order = torch.randperm(len(candidates), generator=generator).to(x.device)
        selected[candidates[order[: min(max(int(cfg.clip_cov_ratio * float(count)), 1), len(candidates))], 0]] = 1.0
    return selected.view(B, T)


def _check_values(cfg, tensors) -> None:
    """What only the values can tell, in one host sync (nothing to sync for integer masks and no
    tensor counts): a NaN/inf/negative float mask, a negative or NaN rollout IS ratio, a NaN or
    non-positive tensor count. Each would give a NaN or silently wrong loss."""
    checks = []
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
    if not checks:
        return
    failed = torch.stack([flag for _, flag in checks]).tolist()
    for (message, _), bad in zip(checks, failed):
        if bad:
            raise ValueError(message)


def _row_scale(cfg, row_stats) -> torch.Tensor:
    """[B, 1] float32 per-row weight of the aggregation: 1 (token sums), 1 / max(n_i, 1) (TRL's
    per-sequence mean) or 1 / (n_i + 1e-8) (verl's). Applied to the kernel's row sums and, in the
    backward, to its gradient rows (both are linear in it), so the kernel needs no variant for it."""
    tokens = row_stats[:, _S_TOKENS:_S_TOKENS + 1]
    if cfg.aggregation.row_norm == 1:
        return 1.0 / tokens.clamp(min=1.0)
    if cfg.aggregation.row_norm == 2:
        return 1.0 / (tokens + 1e-8)
    return torch.ones_like(tokens)


_COUNT_OPTIONS = ("num_items_in_batch", "batch_num_tokens", "global_batch_size")


@functools.lru_cache(maxsize=256)
def _options_from_json(options_json: str) -> dict:
    """Inverse of ``_Config.as_json``."""
    pairs = (item.split("=", 1) for item in options_json.split(";"))
    return {name: ast.literal_eval(value) for name, value in pairs}


def _loss_forward(logp, entropy, mask, advantages, old, ref, sampling, is_ratio, counts, draw_seed, options_json,
                  backend, entropy_grad):
    """The loss, its metrics and its gradients w.r.t. logp and entropy (already scaled), eagerly.

    Everything data-dependent (value checks, the entropy quantile, host syncs) happens here, inside
    the custom op, never in traced code.
    """
    options = dict(_options_from_json(options_json))
    options.update({name: count for name, count in zip(_COUNT_OPTIONS, counts) if count is not None})
    cfg = validate_loss_options(**options)
    tensors = dict(mask=mask, advantages=advantages, old=old, ref=ref, sampling=sampling, is_ratio=is_ratio,
                   logp=logp, entropy=entropy, entropy_grad=entropy_grad)
    _check_values(cfg, tensors)
    if cfg.policy.token_selection is not None:
        tensors["token_value"] = covariance_selection(cfg, logp, tensors, draw_seed)
    if entropy is not None:
        tensors["entropy_threshold"] = _entropy_threshold(cfg, entropy, mask)
    else:
        tensors["entropy_threshold"] = torch.full((1,), float("-inf"), device=logp.device, dtype=torch.float32)
    row_stats, grad_logp, grad_entropy = _ROW_PASS[backend](cfg, tensors)
    B, T = logp.shape
    policy_scale = cfg.aggregation.scale(cfg, row_stats, B, T)
    row_scale = _row_scale(cfg, row_stats)  # [B, 1]: the per-row token mean, if any
    stats = row_stats.sum(0)
    loss = (row_stats[:, _S_LOSS] * row_scale[:, 0]).sum() * policy_scale
    if cfg.entropy_coef != 0:
        entropy_scale = -cfg.entropy_coef / stats[_S_EFF_TOKENS].clamp(min=1.0)
        loss = loss + stats[_S_EFF_ENTROPY] * entropy_scale
    metrics = _metrics_vector(cfg, row_stats, ref is not None, entropy is not None)
    d_logp = grad_logp * (row_scale * policy_scale)
    d_entropy = grad_entropy * entropy_scale if grad_entropy is not None else logp.new_empty((0,))
    return loss.reshape(()).float(), metrics, d_logp, d_entropy


@torch.library.custom_op("grpo_kernels::grpo_loss", mutates_args=())
def _grpo_loss_op(logp: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor, advantages: torch.Tensor,
                  old: torch.Tensor | None, ref: torch.Tensor | None, sampling: torch.Tensor | None,
                  is_ratio: torch.Tensor | None, num_items_in_batch: torch.Tensor | None,
                  batch_num_tokens: torch.Tensor | None, global_batch_size: torch.Tensor | None,
                  draw_seed: torch.Tensor | None, options_json: str, backend: str, entropy_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss [], metrics [len(METRIC_NAMES)], d loss / d logp [B, T], d loss / d entropy [B, T] or [0])``."""
    return _loss_forward(logp, entropy, mask, advantages, old, ref, sampling, is_ratio,
                         (num_items_in_batch, batch_num_tokens, global_batch_size), draw_seed, options_json, backend,
                         entropy_grad)


@_grpo_loss_op.register_fake
def _grpo_loss_fake(logp, entropy, mask, advantages, old, ref, sampling, is_ratio, num_items_in_batch,
                    batch_num_tokens, global_batch_size, draw_seed, options_json, backend, entropy_grad):
    B, T = logp.shape
    d_entropy = logp.new_empty((B, T), dtype=torch.float32) if entropy_grad else logp.new_empty((0,),
                                                                                                  dtype=torch.float32)
    return (logp.new_empty((), dtype=torch.float32), logp.new_empty((len(METRIC_NAMES),), dtype=torch.float32),
            logp.new_empty((B, T), dtype=torch.float32), d_entropy)


def _grpo_loss_setup_context(ctx, inputs, output):
    ctx.entropy_grad = inputs[-1]
    ctx.save_for_backward(output[2], output[3])
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _grpo_loss_backward(ctx, grad_loss, _grad_metrics, _grad_d_logp, _grad_d_entropy):
    d_logp, d_entropy = ctx.saved_tensors
    grad_loss = grad_loss.float()
    d_logp = d_logp * grad_loss if ctx.needs_input_grad[0] else None
    d_entropy = d_entropy * grad_loss if ctx.entropy_grad and ctx.needs_input_grad[1] else None
    return (d_logp, d_entropy) + (None,) * 13


_grpo_loss_op.register_autograd(_grpo_loss_backward, setup_context=_grpo_loss_setup_context)


# ---------------------------------------------------------------------------------------------
# Tensor inputs
# ---------------------------------------------------------------------------------------------


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


def prepare_loss_inputs(shape, device, completion_mask, advantages, *, old_logprobs=None, ref_logprobs=None,
                        entropy=None, will_have_entropy=False, rollout_is_ratio=None, sampling_logprobs=None,
                        **options):
    """Validate everything ``grpo_loss`` gets besides the log-probs, before any launch.

    ``shape``/``device``: those of the ``[B, T]`` log-probs. ``will_have_entropy``: the caller
    computes the entropy later (the fused API). Returns ``(cfg, tensors)``: the options object and
    the per-token inputs as float32 with unit stride along T (``[B, 1]`` inputs broadcast).
    """
    cfg = validate_loss_options(**options)
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
    if cfg.policy.row_log_ratio == _ROW_LOG_RATIO_VESPO:
        if tensors["advantages"].stride(1) != 0 and shape[1] > 1:
            raise ValueError("loss_type='vespo' weighs whole sequences: advantages must be [B] or [B, 1]")
        if tensors["is_ratio"] is not None and tensors["is_ratio"].stride(1) == 0 and shape[1] > 1:
            # VESPO sums log(ratio) over the row: a per-sequence ratio enters once (as in Liger)
            per_token = torch.ones(shape, device=device, dtype=torch.float32)
            per_token[:, 0] = tensors["is_ratio"][:, 0]
            tensors["is_ratio"] = per_token
    if entropy is not None:
        check_tensor("entropy", entropy, dtypes=FLOAT_DTYPES, ndim=2)
        if tuple(entropy.shape) != shape:
            raise ValueError(f"entropy must have the shape of the log-probs {shape}, got {tuple(entropy.shape)}")
    return cfg, tensors


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


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
    """GRPO-family policy loss (TRL 1.16's ``GRPOTrainer``, verl 0.9.1's policy losses) from per-token log-probs.

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
            ``importance_sampling_ratio``, Liger's ``vllm_is_ratio``, verl's ``rollout_is_weights``):
            ``[B, T]`` per token, or ``[B]`` / ``[B, 1]`` per sequence; multiplies the policy term (not
            the KL); for ``vespo`` it enters the sequence weight instead (per token only).
        sampling_logprobs: ``[B, T]`` rollout-engine log-probs for the off-policy mask (defaults to
            ``old_logprobs``, as in TRL).
        temperature: accepted for signature parity with the fused API and ignored (the log-probs are
            already temperature-scaled); it must still be a positive number.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else PyTorch),
            ``"triton"`` or ``"torch"``.
        **options: the options of ``OPTIONS`` (``docs/semantics.md`` lists them with defaults):
            ``loss_type``, ``beta``, ``kl_estimator``, ``epsilon_low``, ``epsilon_high``, ``delta``,
            ``clip_ratio_c``, ``importance_sampling_level``, ``max_completion_length``,
            ``num_items_in_batch``, ``loss_agg_mode`` (+ ``dp_size``, ``batch_num_tokens``,
            ``global_batch_size``, ``loss_scale_factor``), ``rollout_is_mode``,
            ``rollout_is_clip_min/max``, ``sapo_temperature_pos/neg``, ``vespo_k_pos``,
            ``vespo_lambda_pos``, ``vespo_k_neg``, ``vespo_lambda_neg``, ``use_bias_correction_kl``,
            ``entropy_coef``, ``top_entropy_quantile``, ``off_policy_mask_threshold``.

    Returns:
        ``(loss, metrics)``: a differentiable 0-d float32 loss (w.r.t. ``logprobs`` and ``entropy``),
        and a dict of detached 0-d float32 tensors (``metric_names(loss_type)``), token-weighted
        means over the masked tokens of this micro-batch: ``kl`` (NaN without ``ref_logprobs``),
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (for ``cispo``:
        the capped fraction, reported as high and region; 0 for ``sapo``/``vespo``), ``entropy``
        (NaN without ``entropy``); ``pg_clipfrac_lower`` for the clip loss types (dual clip) and
        ``vespo/phi_seq_mean`` (a mean over completions) for ``vespo``. Gradient accumulation
        scaling is left to the caller.

    Raises:
        ValueError / TypeError naming the argument, before any launch, for bad shapes, dtypes,
        devices, options or combinations; and, from the values (one host sync), for a completion
        mask that is NaN or outside [0, 1]... see ``docs/semantics.md`` ("Error policy").
    """
    _check_temperature(temperature)
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES, ndim=2)
    cfg, tensors = prepare_loss_inputs(
        logprobs.shape, logprobs.device, completion_mask, advantages, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, entropy=entropy, rollout_is_ratio=rollout_is_ratio,
        sampling_logprobs=sampling_logprobs, **options)
    backend = resolve_backend(logprobs.device, backend)
    return grpo_loss_prepared(logprobs, entropy, cfg, tensors, backend)


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


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
    # tensor counts travel as op inputs (numbers already sit in the options string)
    counts = [getattr(cfg, name) for name in _COUNT_OPTIONS]
    counts = [c.to(device=logp32.device, dtype=torch.float32) if isinstance(c, torch.Tensor) else None
              for c in counts]
    # Clip-Cov's draw: a seed from the caller's generator (a Generator cannot enter the op)
    draw_seed = None
    if cfg.generator is not None:
        draw_seed = torch.randint(0, 2**62, (), generator=cfg.generator, device=cfg.generator.device)
    t = tensors
    loss, metrics, _, _ = torch.ops.grpo_kernels.grpo_loss(
        logp32, entropy32, t["mask"], t["advantages"], t["old"], t["ref"], t["sampling"], t["is_ratio"], *counts,
        draw_seed, cfg.as_json(), backend, entropy_grad)
    everything = dict(zip(METRIC_NAMES, metrics.unbind(0)))
    return loss, {name: everything[name] for name in metric_names(cfg.loss_type)}


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for the sm_90 compile check
# ---------------------------------------------------------------------------------------------


def _switch_combinations():
    """A covering set of ``_kernel_switches`` results: every policy x ratio level x row norm x
    off-policy mask on the default KL estimator, then every KL estimator once (the estimator is a
    leaf of ``_token_loss`` and shares no code with the switches it is not combined with)."""
    combos = {}

    def add(switches):
        combos[tuple((k, id(v) if callable(v) else v) for k, v in switches.items())] = switches

    for spec in LOSS_TYPES_TABLE.values():
        policy = POLICIES[spec.policy]
        for level in IMPORTANCE_SAMPLING_LEVELS:
            if level == "sequence" and not spec.sequence_level:
                continue
            for off_policy in (False, True) if spec.off_policy_mask else (False,):
                add({"POLICY": policy.jit, "KL": _kl_trl_k3,
                     "ROW_LOG_RATIO": _ROW_LOG_RATIO_MEAN if level == "sequence" else policy.row_log_ratio,
                     "FOLDS_IS_RATIO": policy.folds_is_ratio, "OFF_POLICY": off_policy,
                     "TOKEN_VALUE": policy.token_selection is not None})
    for jit, _ in KL_ESTIMATORS.values():
        add({"POLICY": _policy_clip, "KL": jit, "ROW_LOG_RATIO": _ROW_LOG_RATIO_NONE, "FOLDS_IS_RATIO": False,
             "OFF_POLICY": False, "TOKEN_VALUE": False})
    return list(combos.values())


def sm90_compile_specs() -> list[CompileSpec]:
    """Every switch combination x every mask dtype the launcher passes, at the one tile shape."""
    signature = {name: "*fp32" for name in ("Logp", "OldLogp", "RefLogp", "SamplingLogp", "Advantages")}
    signature["Mask"] = None  # per spec
    signature.update({name: "*fp32" for name in ("Entropy", "RolloutRatio", "EntropyThreshold", "TokenValue",
                                                 "GradLogp", "GradEntropy", "RowStats")})
    signature.update({name: "i32" for name in (
        "B", "T", "stride_logp", "stride_old", "stride_ref", "stride_sampling", "stride_mask",
        "stride_adv_b", "stride_adv_t", "stride_ent_b", "stride_ent_t", "stride_is_b", "stride_is_t",
        "stride_token_value")})
    signature.update({name: "fp32" for name in ("p0", "p1", "p2", "p3", "beta")})
    signature["bias_kl"] = "i32"
    signature.update({name: "fp32" for name in ("log_ratio_bound", "is_clip_min", "is_clip_max")})
    signature["is_mask_mode"] = "i32"
    signature["off_policy_threshold"] = "fp32"
    signature["write_grad_entropy"] = "i32"
    specs = []
    for switches in _switch_combinations():
        constexprs = dict(switches, BLOCK_B=_BLOCK_B, BLOCK_T=_BLOCK_T)
        label = ",".join(f"{k.lower()}={v.fn.__name__ if callable(v) else v}" for k, v in switches.items())
        # the mask dtype does not interact with the loss type: every dtype once, on the default switches
        first_of_policy = not switches["OFF_POLICY"] and switches["KL"] is _kl_trl_k3
        mask_types = _KERNEL_MASK_DTYPES.values() if first_of_policy else ("fp32",)
        for mask_ty in mask_types:
            specs.append(CompileSpec(
                name=f"grpo_loss[{label},mask={mask_ty}]",
                kernel=_grpo_loss_kernel,
                signature={**signature, "Mask": f"*{mask_ty}", **{name: "constexpr" for name in constexprs}},
                constexprs=constexprs,
                num_warps=_NUM_WARPS,
                num_stages=_NUM_STAGES,
            ))
    return specs


DOCS_BEGIN = "<!-- options table: generated by `python -m grpo_kernels.ops.grpo_loss --write-docs` -->"
DOCS_END = "<!-- end of generated options table -->"


def docs_in_sync(path, *, write=False) -> bool:
    """Whether ``path`` (docs/semantics.md) holds ``options_markdown()`` between the markers;
    with ``write``, make it so."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin, end = text.index(DOCS_BEGIN) + len(DOCS_BEGIN), text.index(DOCS_END)
    wanted = text[:begin] + "\n\n" + options_markdown() + "\n" + text[end:]
    if write and wanted != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(wanted)
    return wanted == text


if __name__ == "__main__":  # python -m grpo_kernels.ops.grpo_loss --write-docs
    import os
    import sys

    docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "semantics.md")
    sys.exit(0 if docs_in_sync(docs, write="--write-docs" in sys.argv) else 1)
