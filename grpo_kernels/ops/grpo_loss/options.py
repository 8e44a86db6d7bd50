"""The options of ``grpo_loss``: one ``Option`` each (default, check, doc), their validation
without tensors (``validate_loss_options``), and the generated options tables of
``docs/semantics.md`` (``options_markdown``, ``docs_in_sync``).

Checks are strict: a bool is a bool, a number is a number (a bool is not), a string is a choice
and never parsed. Every error names the option.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from grpo_kernels.ops.grpo_loss.table import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    LOSS_TYPES,
    LOSS_TYPES_TABLE,
    METRIC_DOCS,
    METRIC_NAMES,
    POLICIES,
    REJECTION_SAMPLING,
    ROLLOUT_IS_LEVELS,
    RS_LEVEL_DOCS,
)

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = (None, "truncate", "mask")



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
    "max_completion_length": Option(None, _optional(_positive_int),
                                    "dr_grpo's normalizer is B * max_completion_length (required by dr_grpo)"),
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
    "dro_beta": Option(None, _optional(_positive), "DRO: weight of the quadratic log-ratio penalty (> 0; verl's "
                       "policy_loss.dro_beta, required by dro)"),
    "adv_tau": Option(1.0, _nonnegative, "prime-rl: scale of the advantage in the policy term"),
    "kl_tau": Option(1e-3, _nonnegative, "prime-rl: weight of the squared log-ratio kl_tau (logp - old)^2, on every "
                     "masked token"),
    "ipo_threshold": Option(0.1, _nonnegative, "ipo: tokens with abs(p - p_old) above it leave the policy term"),
    "rollout_is": Option(None, _choice(ROLLOUT_IS_LEVELS),
                         "rollout correction: compute the rollout IS weight in the loss, exp(clamp(l, +-20)) per "
                         "token or exp(clamp(sum_t m l, +-20)) per sequence (l: see bypass_mode), then "
                         "rollout_is_mode and its bounds (verl's TIS: 'truncate'; IcePop: 'mask'); None: off"),
    "rollout_is_batch_normalize": Option(False, _boolean,
                                         "divide the computed IS weights by their mean over the masked tokens "
                                         "(rollout_is='token') or the sequences with a token ('sequence'), over "
                                         "all ranks (verl's rollout_is_batch_normalize)"),
    "rollout_rs": Option(None, _choice((None,) + tuple(REJECTION_SAMPLING)),
                         "rollout correction: rejection sampling, tokens (token_*) or whole sequences (seq_*) "
                         "whose statistic falls outside the thresholds leave the completion mask (table below)"),
    "rollout_rs_threshold": Option(None, _optional(_positive), "upper bound of rollout_rs's statistic (> 0; "
                                   "for *_k1 a probability-ratio bound); required with rollout_rs"),
    "rollout_rs_threshold_lower": Option(None, _optional(_positive),
                                         "*_k1 only: lower probability-ratio bound (default 1 / rollout_rs_threshold)"),
    "bypass_mode": Option(False, _boolean,
                          "the log-ratio l of rollout_is / rollout_rs: False: old_logprobs - sampling_logprobs "
                          "(verl's decoupled mode); True: logprobs - old_logprobs, old_logprobs being the "
                          "rollout's (verl's bypass mode; the weight carries no gradient)"),
}
# Options that only some loss types read: setting one to a non-default value for another loss type
# is an error (it would silently do nothing).
_TYPE_SPECIFIC = frozenset(name for spec in LOSS_TYPES_TABLE.values() for name in spec.options) - {
    "max_completion_length"}
_AGG_OPTIONS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
_ROLLOUT_CORRECTION = ("rollout_is", "rollout_rs")


class LossConfig:
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
        # rollout correction: its log-ratio (0: off, 1: old - sampling, 2: logp - old) and the
        # rejection bounds in the statistic's own space (a ratio's in log space)
        self.rollout_correction = self.rollout_is is not None or self.rollout_rs is not None
        self.rollout_correction_source = 0 if not self.rollout_correction else 2 if self.bypass_mode else 1
        self.rs_lower, self.rs_upper = -math.inf, math.inf
        if self.rollout_rs is not None:
            self.rs_upper = self.rollout_rs_threshold
            if REJECTION_SAMPLING[self.rollout_rs].ratio_bounds:
                lower = self.rollout_rs_threshold_lower
                self.rs_lower = math.log(1.0 / self.rs_upper if lower is None else lower)
                self.rs_upper = math.log(self.rs_upper)

    def policy_params(self) -> tuple:
        return tuple(getattr(self, name) for name in self.policy.params) + (0.0,) * (4 - len(self.policy.params))

    def as_json(self) -> str:
        """The options that travel as a string into the custom op (tensors and objects excluded):
        ``name=repr(value);...``, built from plain string formatting so that torch.compile traces it."""
        return ";".join(f"{name}={getattr(self, name)!r}" for name in OPTIONS
                        if not isinstance(getattr(self, name), (torch.Tensor, torch.Generator)))


def validate_loss_options(**options) -> LossConfig:
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
    for name in spec.required:
        if values[name] is None:
            raise ValueError(f"loss_type={loss_type!r} needs {name} ({OPTIONS[name].doc})")
    if not 0.0 <= values["top_entropy_quantile"] <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {values['top_entropy_quantile']}")
    if values["rollout_is_mode"] is not None:
        low, high = values["rollout_is_clip_min"], values["rollout_is_clip_max"]
        if low is not None and high is not None and low > high:
            raise ValueError(f"rollout_is_clip_min {low} > rollout_is_clip_max {high}")
    _check_rollout_correction(loss_type, spec, options, values)
    mode = values["loss_agg_mode"]
    if mode is None:
        for name in _AGG_OPTIONS:
            if name in options and values[name] != OPTIONS[name].default:
                raise ValueError(f"{name} is one of verl's agg_loss normalizers: it needs loss_agg_mode")
    elif values["dp_size"] > 1:
        needed = "batch_num_tokens" if mode == "token-mean" else "global_batch_size" if mode.startswith("seq") else None
        if needed and values[needed] is None:
            raise ValueError(f"loss_agg_mode={mode!r} with dp_size > 1 needs {needed} (the global count), as in verl")
    return LossConfig(values)


def _check_rollout_correction(loss_type, spec, options, values) -> None:
    for name in _ROLLOUT_CORRECTION:
        if values[name] is not None and name not in spec.rollout_correction:
            raise ValueError(f"{name} is not supported with loss_type={loss_type!r} (see the loss-type table: "
                             "rollout correction)")
    criterion = REJECTION_SAMPLING.get(values["rollout_rs"])
    if criterion is None:
        for name in ("rollout_rs_threshold", "rollout_rs_threshold_lower"):
            if values[name] is not None:
                raise ValueError(f"{name} is a bound of rejection sampling: it needs rollout_rs")
    else:
        upper, lower = values["rollout_rs_threshold"], values["rollout_rs_threshold_lower"]
        if upper is None:
            raise ValueError(f"rollout_rs={values['rollout_rs']!r} needs rollout_rs_threshold (its upper bound)")
        if lower is not None and not criterion.ratio_bounds:
            raise ValueError(f"rollout_rs_threshold_lower is a probability-ratio bound of the *_k1 criteria; "
                             f"rollout_rs={values['rollout_rs']!r} has only an upper bound")
        if lower is not None and lower > upper:
            raise ValueError(f"rollout_rs_threshold_lower {lower} > rollout_rs_threshold {upper}")
    if values["rollout_is_batch_normalize"] and values["rollout_is"] is None:
        raise ValueError("rollout_is_batch_normalize normalizes the weights rollout_is computes: set rollout_is")
    if values["bypass_mode"] and values["rollout_is"] is None and values["rollout_rs"] is None:
        raise ValueError("bypass_mode selects the log-ratio of rollout_is / rollout_rs: set one of them")


def options_markdown() -> str:
    """The options and loss-type tables of ``docs/semantics.md``, generated from the tables here."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for name, option in OPTIONS.items():
        lines.append(f"| `{name}` | `{option.default!r}` | {option.doc} |")
    lines += ["", "| loss_type | policy term | default aggregation | type-specific options | extra metrics | "
              "sequence level | rollout correction | semantics of |", "|---|---|---|---|---|---|---|---|"]
    for name, spec in LOSS_TYPES_TABLE.items():
        opts = ", ".join(f"`{o}`" for o in spec.options) or "-"
        metrics = ", ".join(f"`{m}`" for m in spec.metrics) or "-"
        correction = ", ".join(f"`{c}`" for c in spec.rollout_correction) or "-"
        lines.append(f"| `{name}` | {spec.doc} | `{spec.aggregation}`: {AGGREGATIONS[spec.aggregation].doc} | "
                     f"{opts} | {metrics} | {'yes' if spec.sequence_level else 'no'} | {correction} | {spec.peer} |")
    lines += ["", "| loss_agg_mode | loss |", "|---|---|"]
    lines += [f"| `{name}` | {AGGREGATIONS[name].doc} |" for name in LOSS_AGG_MODES]
    lines += ["", "| kl_estimator | estimator |", "|---|---|"]
    lines += [f"| `{name!r}` | {doc} |" for name, (_, doc) in KL_ESTIMATORS.items()]
    lines += ["", "| rollout_rs | statistic | of | kept when | semantics of |", "|---|---|---|---|---|"]
    for name, criterion in REJECTION_SAMPLING.items():
        bounds = ("log(lower) <= statistic <= log(upper), lower = 1 / upper unless given" if criterion.ratio_bounds
                  else "statistic <= upper")
        lines.append(f"| `{name}` | {criterion.doc} | {RS_LEVEL_DOCS[criterion.level]} | {bounds} | "
                     f"{criterion.peer} |")
    lines += ["", "| metric | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {METRIC_DOCS[name]} |" for name in METRIC_NAMES]
    return "\n".join(lines) + "\n"


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
