"""verl integration: grpo-kernels behind verl's fused log-prob/entropy path and its policy losses.

With ``actor_rollout_ref.model.use_fused_kernels=True`` verl's patched model forward hands the
backbone's last hidden states and the LM-head weight to one of two functions and gets per-token
log-probs and entropies back, never the logits:

* ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels,
  temperature, reduction, dist_process_group) -> (log_probs, entropy)`` (``fused_kernel_options.
  impl_backend="triton"``), and
* ``verl.utils.experimental.torch_functional.FusedLinearForPPO(...)(hidden_states, vocab_weights,
  input_ids, temperature) -> (log_probs, entropy)`` (``impl_backend="torch"``).

This module provides both with the same signatures, computed by :func:`grpo_kernels.token_logprobs`;
:func:`policy_loss` returns, for each verl policy loss we support (``actor_rollout_ref.actor.
policy_loss.loss_mode``: ``vanilla``, ``gspo``, ``sapo``, ``cispo``, ``geo_mean``, ``dppo_tv``,
``dppo_kl``, ``kl_cov``, ``clip_cov``, ``gpg``, ``dro``, ``bypass_mode``), a function with verl's ``PolicyLossFn`` signature computed
by :func:`grpo_kernels.grpo_loss`; and :func:`patch_verl` swaps all of them into an installed verl
in one call::

    from grpo_kernels.integrations.verl import patch_verl
    patch_verl()          # before verl builds its actor; then train with use_fused_kernels=True

verl itself is not a dependency: the functions below work on plain tensors and read verl's actor
config through ``.get`` / attributes (an ``ActorConfig``, an OmegaConf ``DictConfig`` or a dict).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from grpo_kernels.integrations.verl_advantages import VERL_ADV_ESTIMATORS, adv_estimator, register_adv_estimators
from grpo_kernels.ops.grpo_loss import REJECTION_SAMPLING, grpo_loss, rollout_correction
from grpo_kernels.ops.logprobs import token_logprobs

__all__ = ["linear_cross_entropy", "FusedLinearForPPO", "policy_loss", "VERL_POLICY_LOSSES", "patch_verl",
           "adv_estimator", "VERL_ADV_ESTIMATORS"]


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor):
    # verl runs the actor forward under torch.autocast: a plain ``hidden @ weight.T`` would then
    # compute in the autocast dtype, so cast both operands the same way (differentiably).
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
):
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``.

    Args:
        hidden: ``[..., D]`` last hidden states (verl passes ``[1, total_nnz, D]`` with remove-padding
            or ``[B, L, D]`` without).
        weight: ``[V, D]`` LM-head weight.
        labels: ``[...]`` next-token ids (verl's rolled ``input_ids``), the leading shape of ``hidden``.
        temperature: logits are divided by it (``None`` means 1.0, as in verl).
        reduction: only ``"none"`` (per-token outputs), the one verl's fused path uses.
        dist_process_group: a tensor-parallel group over which ``weight`` is split by vocabulary
            (this rank's ``[V_r, D]`` shard, rank order; ``labels`` global ids, ``hidden`` the same on
            every rank), as verl's Megatron backend passes it; ``None`` for an unsharded head. As
            verl's own kernel, the backward then gives each rank its shard's partial d hidden
            (verl's sequence-parallel gather reduce-scatters it).

    Returns:
        ``(log_probs, entropy)``, float32, shaped like ``labels``; differentiable w.r.t. ``hidden``
        and ``weight`` through both.
    """
    if reduction is None:
        reduction = "none"
    if reduction != "none":
        raise ValueError(f"grpo_kernels linear_cross_entropy supports reduction='none' only, got {reduction!r}")
    if temperature is None:
        temperature = 1.0
    hidden, weight = _autocast_inputs(hidden, weight)
    if dist_process_group is not None:
        from grpo_kernels.ops.vocab_parallel import vocab_parallel_logprobs

        return vocab_parallel_logprobs(hidden, weight, labels, dist_process_group, temperature=float(temperature),
                                       return_entropy=True, sum_grad_hidden=False)
    return token_logprobs(hidden, weight, labels, temperature=float(temperature), return_entropy=True)


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO``.

    The constructor accepts (and ignores) verl's ``chunk_size`` and ``impl_backend``: the kernel
    streams the vocabulary itself. ``backend`` picks grpo-kernels' implementation
    (``"auto"``, ``"triton"``, ``"torch"``).
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str | None = None, *, backend: str = "auto"):
        super().__init__()
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float | torch.Tensor = 1.0,
    ):
        """hidden_states ``[..., D]``, vocab_weights ``[V, D]``, input_ids ``[...]``.

        ``temperature`` is a number, a one-element tensor, or a tensor of the shape of
        ``input_ids`` (one temperature per token: the hidden states are scaled by ``1 / T`` in
        float32 and the kernel runs at temperature 1, which is the same logits).

        Returns ``(log_probs, entropy)``, float32, shaped like ``input_ids``.
        """
        input_ids = input_ids.to(torch.int64)
        hidden_states, vocab_weights = _autocast_inputs(hidden_states, vocab_weights)
        if isinstance(temperature, torch.Tensor) and temperature.numel() != 1:
            if tuple(temperature.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"per-token temperature must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(temperature.shape)}")
            scale = temperature.to(device=hidden_states.device, dtype=torch.float32).unsqueeze(-1)
            hidden_states = (hidden_states.float() / scale).to(hidden_states.dtype)
            temperature = 1.0
        elif isinstance(temperature, torch.Tensor):
            temperature = float(temperature.item())
        return token_logprobs(
            hidden_states, vocab_weights, input_ids, temperature=float(temperature), return_entropy=True,
            backend=self.backend)


# ---------------------------------------------------------------------------------------------
# verl's policy losses (verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY) on grpo_loss
# ---------------------------------------------------------------------------------------------


def _field(config, name, default=None):
    """``config.<name>`` for verl's ActorConfig (a Mapping), an OmegaConf DictConfig, a dict or any
    object; ``default`` when it is absent or None (verl's ``x if x is not None else default``)."""
    if config is None:
        return default
    value = config.get(name, None) if isinstance(config, Mapping) or hasattr(config, "get") else getattr(
        config, name, None)
    return default if value is None else value


def _clip_range(config) -> dict:
    """verl's clip_ratio_low / clip_ratio_high, each falling back on clip_ratio."""
    clip_ratio = _field(config, "clip_ratio", 0.2)
    return {"epsilon_low": float(_field(config, "clip_ratio_low", clip_ratio)),
            "epsilon_high": float(_field(config, "clip_ratio_high", clip_ratio))}


def _policy_loss_field(config, name, default):
    return _field(_field(config, "policy_loss"), name, default)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """verl_F.masked_mean: sum(values * mask) / (sum(mask) + 1e-8), as a Python float."""
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / (mask.sum() + 1e-8))


@dataclass(frozen=True)
class VerlPolicyLoss:
    """How one verl ``loss_mode`` maps onto ``grpo_loss``.

    ``options(config)``: the grpo_loss options read from verl's actor config. ``aggregation``:
    ``"given"`` (verl's ``loss_agg_mode`` argument, with ``config.global_batch_info``'s
    normalizers), a fixed mode verl uses whatever the argument (sapo), or ``None`` (the loss type
    aggregates itself: geo_mean's mean over sequences). ``metrics(out, l, mask, config)``: verl's
    ``actor/*`` metrics from grpo_loss's metrics ``out`` and the detached log-ratio ``l``.
    ``sequence_is_weights``: verl folds token IS weights into one geometric mean per sequence.
    """

    loss_type: str  # (``options`` may name another one: bypass_mode's depends on the config)
    options: Callable
    metrics: Callable
    aggregation: str | None = "given"
    sequence_is_weights: bool = False
    sequence_ratio: bool = False  # importance_sampling_level="sequence" (GSPO)
    ignores_is_weights: bool = False  # the rollout_is_weights argument is not used


def _ppo_kl(l, mask, bound=None):
    """verl's actor/ppo_kl: masked mean of -(logp - old), clamped to [-20, 20] where verl clamps."""
    return _masked_mean(-(l.clamp(-bound, bound) if bound is not None else l), mask)


def _clip_metrics(clipfrac_key, lower_key, bound=None):
    def metrics(out, l, mask, config):
        return {"actor/pg_clipfrac": float(out[clipfrac_key]) if clipfrac_key else 0.0,
                "actor/ppo_kl": _ppo_kl(l, mask, bound),
                "actor/pg_clipfrac_lower": float(out[lower_key]) if lower_key else 0.0}
    return metrics


def _cispo_options(config):
    clip = _clip_range(config)
    return {"epsilon_high": 1.0 + clip["epsilon_high"], "cispo_ratio_min": 1.0 - clip["epsilon_low"]}


def _cispo_metrics(out, l, mask, config):
    clip = _clip_range(config)
    ratio = l.clamp(-20.0, 20.0).exp()
    clipped = (ratio < 1.0 - clip["epsilon_low"]) | (ratio > 1.0 + clip["epsilon_high"])
    return {"actor/pg_clipfrac": _masked_mean(clipped.float(), mask), "actor/ppo_kl": _ppo_kl(l, mask, 20.0),
            "actor/pg_clipfrac_lower": 0.0}


def _kl_cov_metrics(out, l, mask, config):
    return {"actor/ppo_kl": _masked_mean(l.abs(), mask)}


def _clip_cov_metrics(out, l, mask, config):
    return {"actor/pg_clipfrac": float(out["cov/selected_mean"]), "actor/ppo_kl": _ppo_kl(l, mask)}


def _dppo_options(config):
    return {**_clip_range(config), "clip_ratio_c": float(_field(config, "clip_ratio_c", 20.0))}


def _dro_options(config):
    beta = _policy_loss_field(config, "dro_beta", None)
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO (as verl requires)")
    return {"dro_beta": float(beta)}


def _ppo_kl_metrics(out, l, mask, config):
    """verl's dro / REINFORCE metrics: actor/ppo_kl, the masked mean of old - logp (unclamped)."""
    return {"actor/ppo_kl": _masked_mean(-l, mask)}


def _verl_threshold(name, value) -> tuple:
    """verl's threshold specification (a number, or a string "upper" / "lower_upper") as
    ``(lower or None, upper)``: verl's config format is parsed here, never by grpo_loss's options."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be a number or verl's 'lower_upper' string, got {value!r}")
    if isinstance(value, str):
        lower, _, upper = value.strip().rpartition("_")
        try:
            return (float(lower) if lower else None), float(upper)
        except ValueError:
            raise ValueError(f"{name}: invalid threshold specification {value!r}") from None
    return None, float(value)


def _bypass_options(config):
    """verl's bypass_mode (``policy_loss.rollout_correction``): REINFORCE with the rollout IS weight
    and rejection sampling computed from logp vs the rollout log-probs (old_log_prob), or PPO clip
    (``vanilla``) with rejection sampling only."""
    correction = _policy_loss_field(config, "rollout_correction", None)
    if correction is None:
        raise ValueError("verl's bypass_mode needs policy_loss.rollout_correction (verl raises the same)")
    kind = _field(correction, "loss_type", "ppo_clip")
    if kind == "reinforce":
        options = {"loss_type": "reinforce"}
        level = _field(correction, "rollout_is", None)
        upper = _field(correction, "rollout_is_threshold", 2.0)
        if level is not None and upper is not None:  # (for ppo_clip verl computes the weights for metrics only)
            lower, upper = _verl_threshold("rollout_is_threshold", upper)
            options.update(rollout_is=level, rollout_is_mode="truncate" if lower is None else "mask",
                           rollout_is_clip_min=lower, rollout_is_clip_max=upper,
                           rollout_is_batch_normalize=bool(_field(correction, "rollout_is_batch_normalize", False)))
    elif kind == "ppo_clip":
        options = {"loss_type": "dapo", **_clip_range(config), "clip_ratio_c": float(_field(config, "clip_ratio_c", 3.0))}
    else:
        raise ValueError(f"rollout_correction.loss_type must be 'reinforce' or 'ppo_clip', got {kind!r}")
    criteria = _field(correction, "rollout_rs", None)
    if criteria is not None:
        names = list(dict.fromkeys(c.strip() for c in str(criteria).split(",") if c.strip()))
        specs = [t.strip() for t in str(_field(correction, "rollout_rs_threshold", "")).split(",") if t.strip()]
        if len(names) != 1 or len(set(specs)) > 1:
            raise ValueError(f"grpo_kernels' bypass_mode takes one rejection criterion and one threshold, got "
                             f"rollout_rs={criteria!r}, rollout_rs_threshold={_field(correction, 'rollout_rs_threshold')!r}")
        if not specs:
            raise ValueError("rollout_rs_threshold must be provided for rejection sampling (as verl requires)")
        if names[0] not in REJECTION_SAMPLING:
            raise ValueError(f"unknown rollout_rs {names[0]!r}; supported: {', '.join(REJECTION_SAMPLING)}")
        lower, upper = _verl_threshold("rollout_rs_threshold", specs[0])
        options.update(rollout_rs=names[0], rollout_rs_threshold=upper, rollout_rs_threshold_lower=lower)
    if "rollout_is" in options or "rollout_rs" in options:
        options["bypass_mode"] = True
    return options


def _bypass_metrics(out, l, mask, config):
    correction = _policy_loss_field(config, "rollout_correction", None)
    if _field(correction, "loss_type", "ppo_clip") == "reinforce":
        metrics = _ppo_kl_metrics(out, l, mask, config)
    else:
        metrics = _clip_metrics("clip_ratio/region_mean", "pg_clipfrac_lower", 20.0)(out, l, mask, config)
    if "rollout_rs/masked_fraction" in out and _field(correction, "rollout_rs", None) is not None:
        metrics["rollout_corr/rollout_rs_masked_fraction"] = float(out["rollout_rs/masked_fraction"])
    return metrics


VERL_POLICY_LOSSES = {
    # verl's default: PPO clip with dual clip (clip_ratio_c, default 3) on ratios of log-ratios clamped to +-20
    "vanilla": VerlPolicyLoss(
        "dapo", lambda c: {**_clip_range(c), "clip_ratio_c": float(_field(c, "clip_ratio_c", 3.0))},
        _clip_metrics("clip_ratio/region_mean", "pg_clipfrac_lower", 20.0)),
    "gspo": VerlPolicyLoss("dapo", _clip_range, _clip_metrics("clip_ratio/region_mean", None), sequence_ratio=True),
    "sapo": VerlPolicyLoss(
        "sapo", lambda c: {"sapo_temperature_pos": float(_field(c, "tau_pos", 1.0)),
                           "sapo_temperature_neg": float(_field(c, "tau_neg", 1.05))},
        _clip_metrics(None, None, 20.0), aggregation="seq-mean-token-mean"),
    "cispo": VerlPolicyLoss("cispo", _cispo_options, _cispo_metrics),
    "geo_mean": VerlPolicyLoss(
        "geo_mean", _clip_range, _clip_metrics("clip_ratio/high_mean", "clip_ratio/low_mean"),
        aggregation=None, sequence_is_weights=True),
    "dppo_tv": VerlPolicyLoss("dppo_tv", _dppo_options, _clip_metrics("clip_ratio/region_mean", "pg_clipfrac_lower", 20.0)),
    "dppo_kl": VerlPolicyLoss("dppo_kl", _dppo_options, _clip_metrics("clip_ratio/region_mean", "pg_clipfrac_lower", 20.0)),
    "kl_cov": VerlPolicyLoss(
        "kl_cov", lambda c: {"kl_cov_ratio": float(_policy_loss_field(c, "kl_cov_ratio", 2e-4)),
                             "ppo_kl_coef": float(_policy_loss_field(c, "ppo_kl_coef", 1.0))}, _kl_cov_metrics),
    "clip_cov": VerlPolicyLoss(
        "clip_cov", lambda c: {**_clip_range(c), "clip_cov_ratio": float(_policy_loss_field(c, "clip_cov_ratio", 2e-4)),
                               "clip_cov_lb": float(_policy_loss_field(c, "clip_cov_lb", 1.0)),
                               "clip_cov_ub": float(_policy_loss_field(c, "clip_cov_ub", 5.0))}, _clip_cov_metrics),
    "gpg": VerlPolicyLoss("gpg", lambda c: {}, lambda out, l, mask, config: {}),
    "dro": VerlPolicyLoss("dro", _dro_options, _ppo_kl_metrics),
    # REINFORCE (or PPO clip) with rollout correction computed in the loss against old_log_prob, which
    # is the rollout's in bypass mode; verl's rollout_is_weights argument is ignored, as verl does
    "bypass_mode": VerlPolicyLoss("reinforce", _bypass_options, _bypass_metrics, ignores_is_weights=True),
}


def policy_loss(name: str, *, backend: str = "auto", generator: torch.Generator | None = None):
    """A verl ``PolicyLossFn`` for verl's policy loss ``name``, computed by :func:`grpo_kernels.grpo_loss`.

    The returned function has verl 0.9.1's signature ``(old_log_prob, log_prob, advantages,
    response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None) -> (loss,
    metrics)``: ``[B, T]`` tensors (advantages per token, as verl passes them), the loss a
    differentiable 0-d tensor, the metrics verl's ``actor/*`` floats. It reads the fields verl's
    own function reads (``clip_ratio``, ``clip_ratio_low``/``_high``, ``clip_ratio_c``,
    ``tau_pos``/``tau_neg``, ``policy_loss.kl_cov_ratio``/``ppo_kl_coef``/``clip_cov_*``/``dro_beta``,
    ``policy_loss.rollout_correction`` for ``bypass_mode``, ``global_batch_info``) and, like verl's,
    adds no KL or entropy term (verl's actor adds those). ``bypass_mode`` returns the metrics of the
    loss it runs and ``rollout_corr/rollout_rs_masked_fraction``, not verl's other ``rollout_corr/*``
    diagnostics (ESS, chi-square, perplexities); it takes one rejection criterion (verl chains several).

    ``generator``: the random draw of ``clip_cov`` (None: torch's global generator, as verl).
    Differences from verl that remain are documented in ``VERL_POLICY_LOSSES`` and the README.
    """
    if name not in VERL_POLICY_LOSSES:
        raise ValueError(f"unknown verl policy loss {name!r}; supported: {', '.join(VERL_POLICY_LOSSES)}")
    spec = VERL_POLICY_LOSSES[name]

    def verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                         config=None, rollout_is_weights=None):
        if config is None:
            raise ValueError(f"verl policy loss {name!r} needs the actor config (verl asserts config is not None)")
        mask = response_mask
        options = {"loss_type": spec.loss_type, **spec.options(config)}
        if spec.sequence_ratio:
            options["importance_sampling_level"] = "sequence"
        if spec.loss_type == "clip_cov":
            options["generator"] = generator
        if spec.aggregation is not None:
            options["loss_agg_mode"] = loss_agg_mode if spec.aggregation == "given" else spec.aggregation
            info = _field(config, "global_batch_info", {}) or {}
            for key in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"):
                value = info.get(key) if isinstance(info, Mapping) else getattr(info, key, None)
                if value is not None:
                    options[key] = value
        is_ratio = None if spec.ignores_is_weights else rollout_is_weights
        if is_ratio is not None:
            is_ratio = is_ratio.detach()
            if spec.sequence_is_weights:
                # verl: exp(sum_t m log(w_t + 1e-10) / (sum_t m + 1e-8)), one weight per sequence
                m = mask.to(torch.float32)
                is_ratio = torch.exp((torch.log(is_ratio.float() + 1e-10) * m).sum(-1) / (m.sum(-1) + 1e-8))
            elif spec.sequence_ratio and is_ratio.dim() == 2 and bool(
                    ((is_ratio != is_ratio[:, :1]) & mask.bool()).any()):
                raise ValueError(
                    "verl's gspo multiplies the sequence ratio's per-token copies by token-level rollout IS "
                    "weights (GSPO-token); grpo_kernels' sequence-level ratio takes one weight per sequence: "
                    "pass sequence-level rollout_is_weights")
        loss, out = grpo_loss(log_prob, mask, advantages, old_logprobs=old_log_prob, rollout_is_ratio=is_ratio,
                              backend=backend, **options)
        with torch.no_grad():
            if options.get("rollout_rs") is not None:  # verl's metrics see the mask rejection sampling left
                mask, _ = rollout_correction(log_prob, mask, old_logprobs=old_log_prob, **options)
            metrics = spec.metrics(out, (log_prob.detach() - old_log_prob.detach()).float(), mask, config)
        return loss, metrics

    verl_policy_loss.__name__ = f"grpo_kernels_verl_{name}"
    verl_policy_loss.__qualname__ = verl_policy_loss.__name__
    return verl_policy_loss


_VERL_MODULES = (
    "verl.utils.kernel.linear_cross_entropy",
    "verl.utils.experimental.torch_functional",
)


def patch_verl(policy_losses=True, adv_estimators=True) -> list[str]:
    """Route an installed verl's fused log-prob/entropy path, and its policy losses, through grpo-kernels.

    Imports verl's two fused-kernel modules and replaces ``linear_cross_entropy`` and
    ``FusedLinearForPPO`` there and in every already-imported ``verl.*`` module that holds a
    reference to the originals (older verl releases import them at module level). verl's callers
    that import them lazily, inside the forward, pick up the replacements too. Then registers
    :func:`policy_loss` of each verl loss mode in ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``
    (verl's actor looks the loss up there at every step), when that module exists.
    ``policy_losses``: ``True`` (every mode of ``VERL_POLICY_LOSSES``), ``False`` (none), or the
    names to register. Call it once, in every process, before verl builds its actor model (in a
    Ray worker: at the top of the worker module, or via verl's ``external_lib`` hook).
    ``adv_estimators`` (same values): verl's advantage estimators of ``VERL_ADV_ESTIMATORS`` in
    ``ADV_ESTIMATOR_REGISTRY`` (``grpo_kernels.integrations.verl_advantages``); call it in the
    driver process too, where verl computes the advantages.

    Returns the qualified names that were replaced (empty when already patched). Raises
    ``ImportError`` when verl is not installed or has neither module, ``ValueError`` for an
    unknown policy-loss name.
    """
    import importlib

    originals = {}
    found = False
    for module_name in _VERL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found = True
        for attr in ("linear_cross_entropy", "FusedLinearForPPO"):
            value = getattr(module, attr, None)
            if value is not None and value not in (linear_cross_entropy, FusedLinearForPPO):
                originals[id(value)] = attr
    if not found:
        raise ImportError(
            "patch_verl: neither verl.utils.kernel.linear_cross_entropy nor "
            "verl.utils.experimental.torch_functional could be imported; is verl installed?")
    replacements = {"linear_cross_entropy": linear_cross_entropy, "FusedLinearForPPO": FusedLinearForPPO}
    replaced = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "verl" or module_name.startswith("verl.")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in originals and originals[id(value)] == attr:
                setattr(module, attr, replacements[attr])
                replaced.append(f"{module_name}.{attr}")
    return sorted(replaced) + _register_policy_losses(policy_losses) + register_adv_estimators(adv_estimators)


def _register_policy_losses(policy_losses) -> list[str]:
    import importlib

    if policy_losses is False:
        return []
    names = list(VERL_POLICY_LOSSES) if policy_losses is True else list(policy_losses)
    unknown = [name for name in names if name not in VERL_POLICY_LOSSES]
    if unknown:
        raise ValueError(f"patch_verl: unknown policy loss(es) {unknown}; supported: {', '.join(VERL_POLICY_LOSSES)}")
    try:
        core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError:
        if policy_losses is True:
            return []  # a verl without the policy-loss registry: only the log-prob path is patched
        raise
    registry = core_algos.POLICY_LOSS_REGISTRY
    registered = []
    for name in names:
        if getattr(registry.get(name), "_grpo_kernels_loss", None) == name:
            continue
        function = policy_loss(name)
        function._grpo_kernels_loss = name
        registry[name] = function
        registered.append(f"verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY[{name!r}]")
    return registered
