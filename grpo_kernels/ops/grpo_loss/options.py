"""The options of ``grpo_loss``: one ``Option`` each (default, check, doc, what it needs), which
loss types read it (``option_readers``), and their validation without tensors
(``validate_loss_options``). ``docs.py`` generates their tables in ``docs/semantics.md``.

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
    POLICIES,
    RATIO_LEVELS,
    REJECTION_SAMPLING,
    ROLLOUT_IS_LEVELS,
)
from grpo_kernels.ops.utils import check_bool

IMPORTANCE_SAMPLING_LEVELS = tuple(RATIO_LEVELS)
ROLLOUT_IS_MODES = (None, "truncate", "mask")


# Checks: ``check(name, value) -> normalized value``, raising TypeError (wrong type) or ValueError
# (out of range) naming the option; ``check.accepts`` says what it accepts, in the words of the
# error-policy table of docs/semantics.md. Plain functions, so that dynamo traces the validation.


def _accepting(accepts):
    def attach(check):
        check.accepts = accepts
        return check
    return attach


def _number(name, value) -> float:
    """A real number (int, float, numpy scalar; never a bool, a string or a tensor), finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _real(low=None, high=None, *, open_low=False, open_high=False, why=""):
    """A finite number in a range: ``[low, high]``, either end open or absent."""
    if low is None and high is None:
        words = ""
    elif high is None:
        words = f"{'>' if open_low else '>='} {low:g}"
    elif low is None:
        words = f"{'<' if open_high else '<='} {high:g}"
    else:
        words = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    @_accepting(f"a number {words}".strip() + why)
    def check(name, value):
        value = _number(name, value)
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if below or above:
            raise ValueError(f"{name} must be {words}{why}, got {value}")
        return value
    return check


_finite = _real()
_nonnegative = _real(0)
_positive = _real(0, open_low=True)
_fraction = _real(0, 1, open_low=True)
_unit_interval = _real(0, 1)
_clip_ratio_c = _real(1, open_low=True, why=" (dual-clip PPO's bound on -A * ratio for A < 0)")


@_accepting("an int > 0")
def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@_accepting("a bool (or a numpy bool)")
def _boolean(name, value) -> bool:
    return check_bool(name, value)


def _optional(check):
    @_accepting(f"None or {check.accepts}")
    def optional(name, value):
        return None if value is None else check(name, value)
    return optional


def _choice(choices):
    """One of ``choices`` (strings, and None where listed); anything else, strings included, is refused
    without being converted."""
    @_accepting("one of " + ", ".join(map(repr, choices)))
    def choice(name, value):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))}, got {type(value).__name__}")
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    return choice


@_accepting("a number > 0, or a one-element real tensor (its value checked in the op: finite and > 0)")
def _count(name, value):
    """A positive count: a number, or a 1-element tensor (its value is checked inside the op)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        return value.detach().reshape(())
    return _positive(name, value)


@_accepting("a torch.Generator")
def _generator(name, value):
    if not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Needs:
    """When an option is read: ``holds(values)`` on the checked options; ``doc``: that condition in
    words. A non-default value where it does not hold is refused (it would be ignored)."""

    holds: Callable
    doc: str


_WITH_AGG_MODE = Needs(lambda v: v["loss_agg_mode"] is not None, "loss_agg_mode (it is one of verl's agg_loss "
                       "normalizers)")
_WITHOUT_AGG_MODE = Needs(lambda v: v["loss_agg_mode"] is None,
                          "loss_agg_mode=None (it is TRL's normalizer of dapo, cispo and vespo; verl's modes "
                          "take batch_num_tokens / global_batch_size)")
_WITH_IS_MODE = Needs(lambda v: v["rollout_is_mode"] is not None, "rollout_is_mode (a bound of it)")
_WITH_ROLLOUT_RS = Needs(lambda v: v["rollout_rs"] is not None, "rollout_rs (a bound of rejection sampling)")
_WITH_SEQUENCE_LEVEL = Needs(lambda v: v["importance_sampling_level"] != "token",
                             "importance_sampling_level 'sequence' or 'sequence_token' (it bounds the "
                             "sequence ratio)")


@dataclass(frozen=True)
class Option:
    default: object
    check: Callable  # (name, value) -> normalized value; raises ValueError/TypeError naming the option
    doc: str
    needs: Needs | None = None  # when it is read (a non-default value is refused otherwise)


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
                                        "'sequence': one GSPO ratio per completion (TRL); 'sequence_token': "
                                        "GSPO-token, the same ratio with a per-token gradient (verl's gspo); "
                                        "the loss types of the table's sequence-level column (table below)"),
    "sequence_log_ratio_max": Option(None, _optional(_finite),
                                     "clamps the sequence log-ratio from above before exp, no gradient above it "
                                     "(verl's gspo: 10); None: off", _WITH_SEQUENCE_LEVEL),
    "max_completion_length": Option(None, _optional(_positive_int),
                                    "dr_grpo's normalizer is B * max_completion_length (required by dr_grpo)"),
    "num_items_in_batch": Option(None, _optional(_count),
                                 "active tokens of the whole generation batch on all ranks (> 0; dapo, cispo, "
                                 "vespo); None: the micro-batch's count, summed over ranks and averaged",
                                 _WITHOUT_AGG_MODE),
    "loss_agg_mode": Option(None, _choice((None,) + LOSS_AGG_MODES),
                            "None: the loss type's own TRL normalizer; else verl's agg_loss mode"),
    "dp_size": Option(1, _positive_int, "verl's data-parallel size (loss_agg_mode only)", _WITH_AGG_MODE),
    "batch_num_tokens": Option(None, _optional(_count),
                               "verl's global token count for token-mean (loss_agg_mode only; needed when dp_size > 1)",
                               _WITH_AGG_MODE),
    "global_batch_size": Option(None, _optional(_count),
                                "verl's global sequence count for the seq-mean modes (loss_agg_mode only; "
                                "needed when dp_size > 1)", _WITH_AGG_MODE),
    "loss_scale_factor": Option(None, _optional(_positive),
                                "seq-mean-token-sum-norm's divisor (loss_agg_mode only); None: T", _WITH_AGG_MODE),
    "rollout_is_mode": Option(None, _choice(ROLLOUT_IS_MODES),
                              "None: the rollout IS ratio (rollout_is_ratio, or rollout_is's) used as given; "
                              "'truncate': clamped into the bounds; 'mask': 0 outside them. Needs a ratio"),
    "rollout_is_clip_min": Option(None, _optional(_nonnegative), "lower bound of rollout_is_mode (None: open)",
                                  _WITH_IS_MODE),
    "rollout_is_clip_max": Option(3.0, _optional(_nonnegative), "upper bound of rollout_is_mode (None: open)",
                                  _WITH_IS_MODE),
    "sapo_temperature_pos": Option(1.0, _positive, "SAPO gate temperature for A > 0"),
    "sapo_temperature_neg": Option(1.05, _positive, "SAPO gate temperature for A <= 0"),
    "vespo_k_pos": Option(2.0, _finite, "VESPO's k for A >= 0"),
    "vespo_lambda_pos": Option(3.0, _finite, "VESPO's lambda for A >= 0 (used as max(lambda, 1e-4))"),
    "vespo_k_neg": Option(3.0, _finite, "VESPO's k for A < 0"),
    "vespo_lambda_neg": Option(2.0, _finite, "VESPO's lambda for A < 0 (used as max(lambda, 1e-4))"),
    "kl_cov_ratio": Option(2e-4, _fraction, "KL-Cov: fraction of the masked tokens, by covariance, that get the "
                           "|log-ratio| penalty"),
    "ppo_kl_coef": Option(1.0, _nonnegative, "KL-Cov: weight of that penalty"),
    "clip_cov_ratio": Option(2e-4, _fraction, "Clip-Cov: fraction of the masked tokens drawn for a zeroed gradient"),
    "clip_cov_lb": Option(1.0, _finite, "Clip-Cov: lower covariance bound of the candidates (<= clip_cov_ub)"),
    "clip_cov_ub": Option(5.0, _finite, "Clip-Cov: upper covariance bound of the candidates"),
    "cispo_ratio_min": Option(0.0, _nonnegative, "CISPO's lower bound of the weight (0: none, TRL; verl: "
                              "1 - clip_ratio_low)"),
    "generator": Option(None, _optional(_generator), "Clip-Cov: the torch.Generator of its random draw "
                        "(reproducible results)"),
    "use_bias_correction_kl": Option(False, _boolean, "multiply the KL by the unclipped ratio (DeepSeek-V3.2)"),
    "entropy_coef": Option(0.0, _finite, "entropy bonus: loss -= entropy_coef * mean entropy over the effective mask"),
    "top_entropy_quantile": Option(1.0, _unit_interval,
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
                                         "all ranks (verl's rollout_is_batch_normalize)",
                                         Needs(lambda v: v["rollout_is"] is not None,
                                               "rollout_is (it normalizes the weights rollout_is computes)")),
    "rollout_rs": Option(None, _choice((None,) + tuple(REJECTION_SAMPLING)),
                         "rollout correction: rejection sampling, tokens (token_*) or whole sequences (seq_*) "
                         "whose statistic falls outside the thresholds leave the completion mask (table below)"),
    "rollout_rs_threshold": Option(None, _optional(_positive), "upper bound of rollout_rs's statistic (> 0; "
                                   "for *_k1 a probability-ratio bound); required with rollout_rs", _WITH_ROLLOUT_RS),
    "rollout_rs_threshold_lower": Option(None, _optional(_positive),
                                         "*_k1 only: lower probability-ratio bound (default 1 / rollout_rs_threshold)",
                                         _WITH_ROLLOUT_RS),
    "bypass_mode": Option(False, _boolean,
                          "the log-ratio l of rollout_is / rollout_rs: False: old_logprobs - sampling_logprobs "
                          "(verl's decoupled mode); True: logprobs - old_logprobs, old_logprobs being the "
                          "rollout's (verl's bypass mode; the weight carries no gradient)",
                          Needs(lambda v: v["rollout_is"] is not None or v["rollout_rs"] is not None,
                                "rollout_is or rollout_rs (it selects their log-ratio)")),
}
# Options that only some loss types read: setting one to a non-default value for another loss type
# is an error (it would silently do nothing).
_TYPE_SPECIFIC = frozenset(name for spec in LOSS_TYPES_TABLE.values() for name in spec.options) - {
    "max_completion_length"}
# Pairs of options whose values must be ordered (low <= high) when both are set.
ORDERED_OPTIONS = (("clip_cov_lb", "clip_cov_ub"), ("rollout_is_clip_min", "rollout_is_clip_max"),
                   ("rollout_rs_threshold_lower", "rollout_rs_threshold"))
_ROLLOUT_CORRECTION = ("rollout_is", "rollout_rs")
# Which loss types read an option that is not type-specific, where not all of them do (the
# validation below refuses the option for the others, each with its own message).
_READ_BY = {
    "importance_sampling_level": lambda spec: spec.sequence_level,
    "sequence_log_ratio_max": lambda spec: spec.sequence_level,
    "off_policy_mask_threshold": lambda spec: spec.off_policy_mask,
    "rollout_is": lambda spec: "rollout_is" in spec.rollout_correction,
    "rollout_is_batch_normalize": lambda spec: "rollout_is" in spec.rollout_correction,
    "rollout_rs": lambda spec: "rollout_rs" in spec.rollout_correction,
    "rollout_rs_threshold": lambda spec: "rollout_rs" in spec.rollout_correction,
    "rollout_rs_threshold_lower": lambda spec: "rollout_rs" in spec.rollout_correction,
    "bypass_mode": lambda spec: bool(spec.rollout_correction),
    # the clip range: accepted by every loss type, read by the policy terms that name it
    "epsilon_low": lambda spec: "epsilon_low" in POLICIES[spec.policy].params,
    "epsilon_high": lambda spec: "epsilon_high" in POLICIES[spec.policy].params,
}
# Options accepted with any loss type though only some read them (the exception to "a non-default
# option the loss type ignores raises"), and why.
ACCEPTED_UNUSED = {
    "epsilon_low": "TRL and verl set the clip range whatever the loss type",
    "epsilon_high": "TRL and verl set the clip range whatever the loss type",
    "max_completion_length": "TRL passes it whatever the loss type",
}


def option_readers(name: str) -> tuple:
    """The loss types that read option ``name`` (``LOSS_TYPES_TABLE`` order)."""
    if name in _READ_BY:
        return tuple(t for t, spec in LOSS_TYPES_TABLE.items() if _READ_BY[name](spec))
    if name in _TYPE_SPECIFIC or name == "max_completion_length":
        return tuple(t for t, spec in LOSS_TYPES_TABLE.items() if name in spec.options)
    return LOSS_TYPES


class LossConfig:
    """The validated scalar options of ``grpo_loss`` (built by ``validate_loss_options``)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)
        self.spec = LOSS_TYPES_TABLE[self.loss_type]
        self.policy = POLICIES[self.spec.policy]
        self.aggregation = AGGREGATIONS[self.loss_agg_mode or self.spec.aggregation]
        self.sequence_level = self.importance_sampling_level != "token"
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon_low
        self.delta_or_inf = math.inf if self.delta is None else self.delta
        self.clip_ratio_c_or_inf = math.inf if self.clip_ratio_c is None else self.clip_ratio_c
        # verl clamps the log-ratio before exp wherever it uses clip_ratio_c
        self.log_ratio_bound = 20.0 if self.clip_ratio_c is not None else math.inf
        self.seq_log_ratio_max = math.inf if self.sequence_log_ratio_max is None else self.sequence_log_ratio_max
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

    def __repr__(self) -> str:
        """The resolved options (defaults filled in, epsilon_high resolved), the loss type first."""
        names = ["loss_type"] + sorted(name for name in OPTIONS if name != "loss_type")
        return f"LossConfig({', '.join(f'{name}={getattr(self, name)!r}' for name in names)})"

    def policy_params(self) -> tuple:
        return tuple(getattr(self, name) for name in self.policy.params) + (0.0,) * (4 - len(self.policy.params))

    def as_json(self) -> str:
        """The options that travel as a string into the custom op (tensors and objects excluded):
        ``name=repr(value);...``, built from plain string formatting so that torch.compile traces it."""
        return ";".join(f"{name}={getattr(self, name)!r}" for name in OPTIONS
                        if not isinstance(getattr(self, name), (torch.Tensor, torch.Generator)))


def _is_default(value, default) -> bool:
    """Whether a checked option value is its default (a tensor or a Generator never is)."""
    if value is None or default is None:
        return value is default
    if isinstance(value, (torch.Tensor, torch.Generator)):
        return False
    return value == default


def validate_loss_options(**options) -> LossConfig:
    """Check ``grpo_loss`` options without any tensor; raise ``ValueError``/``TypeError`` naming the option.

    Returns the validated options object (defaults filled in). Trainers call this at construction,
    so that a bad option fails before any model is loaded. Checks each option's type and range
    first (``OPTIONS``: never a conversion, a bool is not a number, a string not a number), then
    the combinations that make no sense (a type-specific option set for another loss type, an
    option set where what it ``Needs`` is off, bounds out of order (``ORDERED_OPTIONS``), sequence
    level with a loss type that does not define it, a loss type without an option it requires).
    """
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown grpo_loss option(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(OPTIONS))}")
    loss_type = OPTIONS["loss_type"].check("loss_type", options.get("loss_type", OPTIONS["loss_type"].default))
    spec = LOSS_TYPES_TABLE[loss_type]
    defaults = {name: spec.defaults.get(name, option.default) for name, option in OPTIONS.items()}
    values = {name: option.check(name, options.get(name, defaults[name])) for name, option in OPTIONS.items()}
    given = [name for name in options if not _is_default(values[name], defaults[name])]
    for name in given:
        if name in _TYPE_SPECIFIC and name not in spec.options:
            readers = sorted(t for t, s in LOSS_TYPES_TABLE.items() if name in s.options)
            raise ValueError(f"{name} is only used by loss_type {', '.join(readers)}; "
                             f"loss_type={loss_type!r} would ignore it")
    for name in given:
        needs = OPTIONS[name].needs
        if needs is not None and not needs.holds(values):
            raise ValueError(f"{name} needs {needs.doc}: without it, {name} would be ignored")
    for low_name, high_name in ORDERED_OPTIONS:
        low, high = values[low_name], values[high_name]
        if low is not None and high is not None and low > high:
            raise ValueError(f"{low_name} {low} > {high_name} {high}: {low_name} must be <= {high_name}")
    if values["off_policy_mask_threshold"] is not None and not spec.off_policy_mask:
        raise ValueError(f"off_policy_mask_threshold is not supported with loss_type={loss_type!r}")
    if values["importance_sampling_level"] != "token" and not spec.sequence_level:
        raise ValueError(
            f"importance_sampling_level={values['importance_sampling_level']!r} (GSPO) makes no sense with "
            f"loss_type={loss_type!r}: "
            "its per-token weight is defined on token ratios; use importance_sampling_level='token'. "
            "(Sequence-level importance sampling is not supported for this loss type.)")
    for name in spec.required:
        if values[name] is None:
            raise ValueError(f"loss_type={loss_type!r} needs {name} ({OPTIONS[name].doc})")
    _check_rollout_correction(loss_type, spec, values)
    mode = values["loss_agg_mode"]
    if mode is not None and values["dp_size"] > 1:
        needed = "batch_num_tokens" if mode == "token-mean" else "global_batch_size" if mode.startswith("seq") else None
        if needed and values[needed] is None:
            raise ValueError(f"loss_agg_mode={mode!r} with dp_size > 1 needs {needed} (the global count), as in verl")
    return LossConfig(values)


def _check_rollout_correction(loss_type, spec, values) -> None:
    for name in _ROLLOUT_CORRECTION:
        if values[name] is not None and name not in spec.rollout_correction:
            raise ValueError(f"{name} is not supported with loss_type={loss_type!r} (see the loss-type table: "
                             "rollout correction)")
    criterion = REJECTION_SAMPLING.get(values["rollout_rs"])
    if criterion is not None:
        if values["rollout_rs_threshold"] is None:
            raise ValueError(f"rollout_rs={values['rollout_rs']!r} needs rollout_rs_threshold (its upper bound)")
        if values["rollout_rs_threshold_lower"] is not None and not criterion.ratio_bounds:
            raise ValueError(f"rollout_rs_threshold_lower is a probability-ratio bound of the *_k1 criteria; "
                             f"rollout_rs={values['rollout_rs']!r} has only an upper bound")
