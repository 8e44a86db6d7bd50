"""The loss family as tables: policy terms, KL estimators, aggregations, loss types, metrics.

* ``POLICIES``: one ``PolicyTerm`` per policy formula: its jit function (``terms.py``), the options
  it reads as ``p0..p3``, what the row pass reduces for it.
* ``LOSS_TYPES_TABLE``: one ``LossType`` per ``loss_type`` value: its policy term, default
  aggregation, type-specific options, extra metrics, whether it allows sequence-level ratios,
  which peer's semantics it follows. Validation (``options.py``), the docs tables, the kernel's
  switches and the sm_90 compile specs are all derived from these tables.
* ``AGGREGATIONS``: how per-token losses become the scalar (TRL's normalizers and verl's
  ``agg_loss`` modes); ``KL_ESTIMATORS``; the metrics and the columns of the per-row statistics the
  row pass writes (``STAT_COLUMNS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from grpo_kernels.ops.grpo_loss import terms

# Columns of the per-row partial sums the row pass writes (the kernel stores them in this order).
# Rows rejected by rollout correction count their tokens in "rejected" only; "is_weight" sums the
# rollout IS weight over the kept tokens.
STAT_COLUMNS = ("loss", "kl", "low", "high", "region", "entropy", "tokens", "eff_entropy", "eff_tokens",
                "lower", "phi", "is_weight", "rejected")
(S_LOSS, S_KL, S_LOW, S_HIGH, S_REGION, S_ENTROPY, S_TOKENS, S_EFF_ENTROPY, S_EFF_TOKENS,
 S_LOWER, S_PHI, S_IS_WEIGHT, S_REJECTED) = range(len(STAT_COLUMNS))
NUM_STATS = len(STAT_COLUMNS)


def world_size() -> int:
    """The number of processes of the default group (1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1



# What the optional first walk reduces per row into ``row_value`` (the kernel's ROW_LOG_RATIO).
ROW_LOG_RATIO_NONE = 0  # nothing (token-level ratios)
ROW_LOG_RATIO_MEAN = 1  # sum_t m l_t / max(sum_t m, 1): the GSPO sequence ratio (rho is per row)
ROW_LOG_RATIO_VESPO = 2  # clamp(sum_t m clamp(l_t, +-20) + sum_t clamp(log is_t, log 1e-8, 20), log 1e-8, 20)
ROW_LOG_RATIO_GMPO = 3  # sum_t m g_t / (sum_t m + 1e-8), g_t GMPO's sign-clipped l_t (rho is per row)
ROW_LOG_RATIO_SUM = 4  # sum_t m l_t: TRL's RLOO sequence ratio, the product of the token ratios (rho is per row)


@dataclass(frozen=True)
class PolicyTerm:
    """A policy term: its jit function and the ``LossConfig`` attributes passed as ``p0..p3``."""

    jit: object
    params: tuple
    row_log_ratio: int = ROW_LOG_RATIO_NONE
    folds_is_ratio: bool = False  # the rollout IS ratio enters row_value instead of the multiplier
    # "kl_cov" / "clip_cov": a per-token covariance selection over the micro-batch, computed before
    # the row pass, is handed to the policy term in place of row_value
    token_selection: str | None = None


POLICIES = {
    "clip": PolicyTerm(terms.policy_clip, ("epsilon_low", "epsilon_high", "delta_or_inf", "clip_ratio_c_or_inf")),
    "cispo": PolicyTerm(terms.policy_cispo, ("epsilon_high", "cispo_ratio_min")),
    "sapo": PolicyTerm(terms.policy_sapo, ("sapo_temperature_pos", "sapo_temperature_neg")),
    "vespo": PolicyTerm(terms.policy_vespo, ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                        row_log_ratio=ROW_LOG_RATIO_VESPO, folds_is_ratio=True),
    "geo_mean": PolicyTerm(terms.policy_geo_mean, ("epsilon_low", "epsilon_high"), row_log_ratio=ROW_LOG_RATIO_GMPO),
    "dppo_tv": PolicyTerm(terms.policy_dppo_tv, ("epsilon_low", "epsilon_high", "clip_ratio_c_or_inf")),
    "dppo_kl": PolicyTerm(terms.policy_dppo_kl, ("epsilon_low", "epsilon_high", "clip_ratio_c_or_inf")),
    "kl_cov": PolicyTerm(terms.policy_kl_cov, ("ppo_kl_coef",), token_selection="kl_cov"),
    "clip_cov": PolicyTerm(terms.policy_clip_cov, ("epsilon_low", "epsilon_high"), token_selection="clip_cov"),
    "pg": PolicyTerm(terms.policy_pg, ()),
    "dro": PolicyTerm(terms.policy_dro, ("dro_beta",)),
    "rloo": PolicyTerm(terms.policy_clip, ("epsilon_low", "epsilon_high", "delta_or_inf", "clip_ratio_c_or_inf"),
                       row_log_ratio=ROW_LOG_RATIO_SUM),
    "prime_dppo": PolicyTerm(terms.policy_prime_dppo, ("epsilon_low", "epsilon_high", "adv_tau", "kl_tau")),
    "ipo": PolicyTerm(terms.policy_ipo, ("ipo_threshold", "adv_tau", "kl_tau")),
}

KL_ESTIMATORS = {
    # name: (jit function, doc); None is TRL's k3, "k3"/"low_var_kl" is verl's clamped one.
    None: (terms.kl_trl_k3, "TRL's k3, unclamped: exp(ref - logp) - (ref - logp) - 1"),
    "kl": (terms.kl_k1, "k1: logp - ref"),
    "k1": (terms.kl_k1, "k1: logp - ref"),
    "abs": (terms.kl_abs, "|logp - ref|"),
    "mse": (terms.kl_k2, "k2: 0.5 (logp - ref)^2"),
    "k2": (terms.kl_k2, "k2: 0.5 (logp - ref)^2"),
    "low_var_kl": (terms.kl_verl_k3, "verl's k3: clamp(exp(d) - d - 1, -10, 10), d = clamp(ref - logp, -20, 20)"),
    "k3": (terms.kl_verl_k3, "verl's k3 (low_var_kl)"),
    "kl+": (terms.kl_k1_st, "k1's value, k2's gradient"),
    "k1+": (terms.kl_k1_st, "k1's value, k2's gradient"),
    "abs+": (terms.kl_abs_st, "abs's value, k2's gradient"),
    "mse+": (terms.kl_k2, "k2"),
    "k2+": (terms.kl_k2, "k2"),
    "low_var_kl+": (terms.kl_verl_k3_st, "verl's k3 value, k2's gradient"),
    "k3+": (terms.kl_verl_k3_st, "verl's k3 value, k2's gradient"),
}


# Rollout correction (verl's rollout_corr_helper, AReaL's rejection sampling): the IS weight's level
# (the kernel's RC_IS is the index) and the rejection-sampling criteria (RS_LEVEL, RS_STAT).
ROLLOUT_IS_LEVELS = (None, "token", "sequence")
RS_NONE, RS_TOKEN, RS_SEQ_SUM, RS_SEQ_MEAN, RS_SEQ_MAX = range(5)
RS_LEVEL_DOCS = {RS_TOKEN: "per token", RS_SEQ_SUM: "the row's masked sum", RS_SEQ_MEAN: "the row's masked mean",
                 RS_SEQ_MAX: "the row's maximum over its tokens"}


@dataclass(frozen=True)
class RejectionCriterion:
    """One ``rollout_rs`` value: a per-token statistic of (train, rollout) log-probs (a jit function of
    ``terms``), reduced per row or not, kept within ``[rollout_rs_threshold_lower, rollout_rs_threshold]``.
    ``ratio_bounds``: the thresholds are probability ratios compared in log space, the lower one
    defaulting to 1 / upper (verl's k1); otherwise only the upper bound applies."""

    level: int
    stat: object
    ratio_bounds: bool
    doc: str
    peer: str


_RS_STATS = {
    "k1": (terms.rs_k1, True, "k1 = -clamp(l, +-20), l = log(train / rollout prob)", "verl 0.9.1"),
    "k2": (terms.rs_k2, False, "k2 = l^2 / 2", "verl 0.9.1"),
    "k3": (terms.rs_k3, False, "k3 = exp(l) - 1 - l", "verl 0.9.1"),
    "kpop": (terms.rs_kpop, False, "max(KL_B(p||q), KL_B(q||p)), the binary KL of the token's train / rollout "
             "probabilities both ways (KPop)", "AReaL"),
}
_RS_LEVELS = {"token": RS_TOKEN, "seq_sum": RS_SEQ_SUM, "seq_mean": RS_SEQ_MEAN, "seq_max": RS_SEQ_MAX}
REJECTION_SAMPLING = {
    # verl's names (rollout_corr_helper.SUPPORTED_ROLLOUT_RS_OPTIONS: no seq_max_k1), and KPop at every level
    f"{level}_{stat}": RejectionCriterion(_RS_LEVELS[level], jit, ratio_bounds, doc, peer)
    for stat, (jit, ratio_bounds, doc, peer) in _RS_STATS.items()
    for level in _RS_LEVELS
    if (level, stat) != ("seq_max", "k1")
}
DEFAULT_RS_STAT = terms.rs_k1  # the kernel's RS_STAT when rejection sampling is off (never called)


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
    ranks = world_size()
    tokens = row_stats[:, S_TOKENS].sum()
    if cfg.num_items_in_batch is not None:
        items = torch.as_tensor(cfg.num_items_in_batch, dtype=torch.float32).to(tokens.device)
        return items.clamp(min=1.0) / ranks
    normalizer = tokens.clone()
    if ranks > 1:
        torch.distributed.all_reduce(normalizer, op=torch.distributed.ReduceOp.SUM)
    return (normalizer / ranks).clamp(min=1.0)


def _verl_sequences(cfg, row_stats):
    if cfg.global_batch_size is not None:
        return torch.as_tensor(cfg.global_batch_size, dtype=torch.float32).to(row_stats.device)
    return (row_stats[:, S_TOKENS] > 0).sum().float().clamp(min=1.0)


def _verl_tokens(cfg, row_stats):
    if cfg.batch_num_tokens is not None:
        return torch.as_tensor(cfg.batch_num_tokens, dtype=torch.float32).to(row_stats.device)
    return row_stats[:, S_TOKENS].sum().clamp(min=1.0)


def _ones(row_stats, value):
    return torch.full((), float(value), device=row_stats.device, dtype=torch.float32)


AGGREGATIONS = {
    # TRL's normalizers, one per loss_type family (not selectable by name: loss_agg_mode=None)
    "trl:seq-mean-token-mean": Aggregation(
        1, lambda cfg, s, B, T: _ones(s, 1.0 / B), "mean over rows of sum_t m L / max(sum_t m, 1)"),
    "trl:token-mean": Aggregation(
        0, lambda cfg, s, B, T: 1.0 / s[:, S_TOKENS].sum().clamp(min=1.0), "sum m L / max(sum m, 1)"),
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
    "rollout_is/mean": "rollout correction: mean rollout IS weight over the kept tokens (1 without one)",
    "rollout_rs/masked_fraction": "rollout correction: fraction of the masked tokens that rejection sampling "
                                  "removed (verl's rollout_rs_masked_fraction)",
}
ROLLOUT_CORRECTION_METRICS = ("rollout_is/mean", "rollout_rs/masked_fraction")
METRIC_NAMES = COMMON_METRICS + ("pg_clipfrac_lower", "vespo/phi_seq_mean", "cov/selected_mean") + \
    ROLLOUT_CORRECTION_METRICS


@dataclass(frozen=True)
class LossType:
    """One ``loss_type`` value."""

    policy: str  # key of POLICIES
    aggregation: str  # key of AGGREGATIONS used when loss_agg_mode is None
    options: tuple = ()  # type-specific options it reads (others of that kind must stay at their default)
    metrics: tuple = ()  # beyond COMMON_METRICS
    sequence_level: bool = False  # importance_sampling_level="sequence" allowed
    defaults: dict = field(default_factory=dict)  # type-specific defaults overriding OPTIONS
    required: tuple = ()  # options that must be set (not None)
    off_policy_mask: bool = True  # off_policy_mask_threshold allowed
    rollout_correction: tuple = ("rollout_is", "rollout_rs")  # the in-loss rollout corrections it allows
    peer: str = "TRL 1.16"
    doc: str = ""


_CLIP_OPTIONS = ("delta", "clip_ratio_c")
LOSS_TYPES_TABLE = {
    "grpo": LossType("clip", "trl:seq-mean-token-mean", _CLIP_OPTIONS, ("pg_clipfrac_lower",), True,
                     doc="PPO clip; per-sequence token mean, then the mean over sequences"),
    "bnpo": LossType("clip", "trl:token-mean", _CLIP_OPTIONS, ("pg_clipfrac_lower",), True,
                     doc="PPO clip; token mean over the micro-batch"),
    "dr_grpo": LossType("clip", "trl:dr_grpo", _CLIP_OPTIONS + ("max_completion_length",), ("pg_clipfrac_lower",),
                        True, required=("max_completion_length",),
                        doc="PPO clip; sum / (B * max_completion_length) (Dr. GRPO)"),
    "dapo": LossType("clip", "trl:global-token-mean", _CLIP_OPTIONS, ("pg_clipfrac_lower",), True,
                     doc="PPO clip; token mean over the whole generation batch (DAPO)"),
    "luspo": LossType("clip", "trl:seq-mean-token-sum", _CLIP_OPTIONS, ("pg_clipfrac_lower",), True,
                      doc="PPO clip; mean over sequences of the token sum (LUSPO)"),
    "cispo": LossType("cispo", "trl:global-token-mean", ("cispo_ratio_min",),
                      doc="-stopgrad(clamp(rho, cispo_ratio_min, epsilon_high)) A logp (CISPO); epsilon_high is the cap"),
    "sapo": LossType("sapo", "trl:seq-mean-token-mean", ("sapo_temperature_pos", "sapo_temperature_neg"),
                     doc="soft gate -sigmoid(tau (rho - 1)) 4/tau A (SAPO)"),
    # (VESPO folds a given rollout IS ratio into its sequence weight: no in-loss rollout correction)
    "vespo": LossType("vespo", "trl:global-token-mean",
                      ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                      ("vespo/phi_seq_mean",), rollout_correction=(),
                      doc="-stopgrad(phi(w)) A logp, phi the gamma weight of the summed sequence log-ratio (VESPO)"),
    # (no off-policy mask: verl has none for GMPO, and that variant trips Triton's sm_90 ThreadLocality pass)
    "geo_mean": LossType("geo_mean", "verl:geo-mean", off_policy_mask=False, rollout_correction=(), peer="verl 0.9.1",
                         doc="-A_i exp(mean_t of l_t clipped to [-epsilon_low, epsilon_high] on the side of sign(A)) "
                             "(GMPO); epsilon_* bound the log-ratio"),
    "dppo_tv": LossType("dppo_tv", "token-mean", ("clip_ratio_c",), ("pg_clipfrac_lower",),
                        defaults={"clip_ratio_c": 20.0}, peer="verl 0.9.1",
                        doc="-A stopgrad(min(rho, clip_ratio_c) valid) logp, valid: p - p_old within "
                            "[-epsilon_low, epsilon_high] on the side of A (DPPO-Binary-TV)"),
    "dppo_kl": LossType("dppo_kl", "token-mean", ("clip_ratio_c",), ("pg_clipfrac_lower",),
                        defaults={"clip_ratio_c": 20.0}, peer="verl 0.9.1",
                        doc="as dppo_tv with the binary KL of p_old to p as the trust region (DPPO-Binary-KL)"),
    # (their covariance selection runs before the row pass: it cannot see rejected tokens)
    "kl_cov": LossType("kl_cov", "token-mean", ("kl_cov_ratio", "ppo_kl_coef"), ("cov/selected_mean",),
                       rollout_correction=("rollout_is",), peer="verl 0.9.1",
                       doc="-A rho, + ppo_kl_coef |l| on the top kl_cov_ratio of masked tokens by "
                           "cov(A, logp) over the micro-batch (KL-Cov)"),
    "clip_cov": LossType("clip_cov", "token-mean", ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "generator"),
                         ("cov/selected_mean",), rollout_correction=("rollout_is",), peer="verl 0.9.1",
                         doc="PPO clip with the term of clip_cov_ratio of the unclipped masked tokens, drawn at "
                             "random among clip_cov_lb < cov(A, logp) < clip_cov_ub, zeroed (Clip-Cov)"),
    "gpg": LossType("pg", "token-mean", peer="verl 0.9.1",
                    doc="-A logp, no ratio (verl's gpg); the rollout IS weight as given or computed (rollout_is) "
                        "multiplies it"),
    "reinforce": LossType("pg", "seq-mean-token-sum", peer="verl 0.9.1",
                          doc="-A logp sg(w), w the rollout IS weight (rollout_is, usually with bypass_mode=True; "
                              "verl's compute_policy_loss_reinforce); the term of gpg, verl's default aggregation "
                              "of REINFORCE"),
    "dro": LossType("dro", "token-mean", ("dro_beta",), required=("dro_beta",), peer="verl 0.9.1",
                    doc="-(logp A - dro_beta/2 (logp - old)^2) (verl's dro, Direct Reward Optimization)"),
    "rloo": LossType("rloo", "trl:seq-mean-token-mean", peer="TRL 1.16 (RLOOTrainer)",
                     doc="PPO clip of the sequence ratio exp(sum_t m l_t), one loss per completion, mean over "
                         "completions (TRL's RLOOTrainer)"),
    "prime_dppo": LossType("prime_dppo", "token-mean", ("adv_tau", "kl_tau"), peer="prime-rl",
                           doc="-keep adv_tau A rho + kl_tau l^2, keep: p - p_old <= epsilon_high (A > 0) or "
                               ">= -epsilon_low (A <= 0) (prime-rl's default loss: DPPO-Binary-TV mask, "
                               "squared log-ratio KL)"),
    "ipo": LossType("ipo", "token-mean", ("ipo_threshold", "adv_tau", "kl_tau"), peer="prime-rl",
                    doc="-keep adv_tau A rho + kl_tau l^2, keep: abs(p - p_old) <= ipo_threshold (prime-rl's ipo)"),
}
LOSS_TYPES = tuple(LOSS_TYPES_TABLE)
CLIP_LOSS_TYPES = tuple(name for name, spec in LOSS_TYPES_TABLE.items() if spec.policy == "clip")


def metric_names(loss_type: str, rollout_correction: bool = False) -> tuple:
    """The metric names ``grpo_loss`` returns for ``loss_type`` (with ``rollout_correction``: when
    ``rollout_is`` or ``rollout_rs`` is set)."""
    return COMMON_METRICS + LOSS_TYPES_TABLE[loss_type].metrics + (ROLLOUT_CORRECTION_METRICS if rollout_correction
                                                                   else ())
