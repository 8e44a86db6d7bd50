"""``estimate_advantages``: the checked entry point of verl's advantage estimators (``estimators.py``).

Arguments are checked from the table before anything runs (a ``ValueError``/``TypeError``
naming the argument): the estimator name, each option's type and range, an option or input the
estimator does not read, the required inputs, shapes, dtypes, devices, and, with one host sync,
the values (finite rewards and inputs, a finite non-negative mask).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from grpo_kernels.ops.advantages.estimators import ESTIMATORS, INPUTS, OPTIONS, EstimatorBatch
from grpo_kernels.ops.advantages.group import REWARD_DTYPES, group_layout, reward_weights_tensor
from grpo_kernels.ops.utils import check_same_device, check_tensor, resolve_backend

MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64) + REWARD_DTYPES


class TokenAdvantages(NamedTuple):
    """advantages, returns: ``[B, T]``, float32 (float64 for float64 rewards), verl's pair."""

    advantages: torch.Tensor
    returns: torch.Tensor


def validate_estimator_options(estimator: str, **options) -> dict:
    """Check ``estimate_advantages``' scalar options for ``estimator`` without any tensor; returns
    every option it reads, defaults filled in. Raises ``ValueError``/``TypeError`` naming the
    argument: an unknown estimator or option, an option this estimator does not read, a value of
    the wrong type (a string or bool where a number belongs) or out of range."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    spec = ESTIMATORS[estimator]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown estimate_advantages option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    ignored = sorted(set(options) - set(spec.options))
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: not read by estimator {estimator!r} "
                         f"(it reads: {', '.join(spec.options) or 'no option'})")
    return {name: OPTIONS[name].check(name, options.get(name, spec.defaults.get(name, OPTIONS[name].default)))
            for name in spec.options}


def _float_input(name, tensor, shape, device):
    check_tensor(name, tensor, dtypes=REWARD_DTYPES)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but token_level_rewards is on {device}")
    return tensor.detach().double()


def estimate_advantages(
    estimator: str,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
    group_size: int | None = None,
    reward_baselines: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    sum_pi_squared: torch.Tensor | None = None,
    rollout_is_ratio: torch.Tensor | None = None,
    reward_components: torch.Tensor | None = None,
    reward_weights=None,
    backend: str = "auto",
    **options,
) -> TokenAdvantages:
    """verl 0.9.1's advantage estimator ``estimator`` (``ESTIMATORS``; docs/semantics.md).

    Args:
        estimator: ``"grpo"``, ``"grpo_vectorized"``, ``"gdpo"``, ``"grpo_passk"``, ``"rloo"``,
            ``"rloo_vectorized"``, ``"reinforce_plus_plus_baseline"``, ``"opo"``, ``"gpg"``,
            ``"reinforce_plus_plus"``, ``"remax"``, ``"optimal_token_baseline"``,
            ``"tir_optimal_token_baseline"``.
        token_level_rewards: ``[B, T]`` float (finite); outcome estimators read the row sums.
        response_mask: ``[B, T]`` bool/int/float, 0 on padding (and tool output); finite, >= 0.
        index: ``[B]`` int32/int64 group ids (verl's ``index``; any ids and order), or
        group_size: contiguous groups of that many rows. Exactly one for estimators with groups,
            neither for ``reinforce_plus_plus`` and ``remax``.
        reward_baselines, old_logprobs, sum_pi_squared, rollout_is_ratio, reward_components,
        reward_weights: the estimator's inputs (``INPUTS``); one it does not read raises.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``: where the group reductions run.
        **options: ``epsilon``, ``norm_adv_by_std_in_grpo``, ``gamma``, ``f_norm``,
            ``handle_zero_tail`` (``OPTIONS``), those the estimator reads.

    Returns:
        :class:`TokenAdvantages` ``(advantages, returns)``, ``[B, T]`` each, float32 (float64 for
        float64 rewards), not differentiable. Meta tensors give the shapes.
    """
    values = validate_estimator_options(estimator, **options)
    spec = ESTIMATORS[estimator]
    check_tensor("token_level_rewards", token_level_rewards, dtypes=REWARD_DTYPES, ndim=2)
    check_tensor("response_mask", response_mask, dtypes=MASK_DTYPES, ndim=2)
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask must have the shape of token_level_rewards {list(token_level_rewards.shape)}, "
                         f"got {list(response_mask.shape)}")
    check_same_device(token_level_rewards=token_level_rewards, response_mask=response_mask)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    device = token_level_rewards.device
    batch_size, horizon = token_level_rewards.shape
    given = {"reward_baselines": reward_baselines, "old_logprobs": old_logprobs, "sum_pi_squared": sum_pi_squared,
             "rollout_is_ratio": rollout_is_ratio, "reward_components": reward_components,
             "reward_weights": reward_weights}
    given = {name: value for name, value in given.items() if value is not None}
    for name in given:
        if name not in spec.inputs + spec.optional_inputs:
            raise ValueError(f"{name}: not read by estimator {estimator!r}")
    for name in spec.inputs:
        if name not in given:
            raise ValueError(f"estimator {estimator!r} needs {name} ({INPUTS[name][1]})")
    inputs = {}
    for name in ("reward_baselines", "old_logprobs", "sum_pi_squared", "rollout_is_ratio"):
        if name in given:
            shape = (batch_size,) if name == "reward_baselines" else (batch_size, horizon)
            inputs[name] = _float_input(name, given[name], shape, device)
    if "reward_components" in given:
        components = given["reward_components"]
        check_tensor("reward_components", components, dtypes=REWARD_DTYPES, ndim=2)
        if components.shape[1] == 0:
            raise ValueError("reward_components [B, K] needs at least one reward function (K >= 1), got K=0")
        inputs["reward_components"] = _float_input("reward_components", components,
                                                   (batch_size, components.shape[1]), device)
    if "reward_weights" in given:
        num_components = inputs["reward_components"].shape[1] if "reward_components" in inputs else 1
        inputs["reward_weights"] = reward_weights_tensor(given["reward_weights"], num_components, device)

    if spec.grouped:
        if device.type == "meta":
            if index is not None:
                check_tensor("index", index, ndim=1)
            layout = None
        else:
            layout = group_layout(batch_size, device, group_size, index, what="rows",
                                  reference_name="token_level_rewards", reference=token_level_rewards)
    else:
        if index is not None or group_size is not None:
            raise ValueError(f"estimator {estimator!r} has no groups: pass neither index nor group_size")
        layout = None
    out_dtype = torch.float64 if token_level_rewards.dtype == torch.float64 else torch.float32
    if device.type == "meta" or batch_size == 0:
        empty = torch.zeros(batch_size, horizon, dtype=out_dtype, device=device)
        return TokenAdvantages(empty, empty.clone())
    resolve_backend(device, backend)

    rewards = token_level_rewards.detach().double()
    mask = response_mask.detach().double()
    _check_values(rewards, mask, inputs)
    batch = EstimatorBatch(rewards, mask, layout, backend, inputs)
    advantages, returns = spec.compute(batch, **values)
    return TokenAdvantages(advantages.to(out_dtype), returns.to(out_dtype))


def _check_values(rewards, mask, inputs) -> None:
    """One host sync: rewards and inputs finite (old_logprobs may be -inf: probability 0), the
    mask finite and >= 0."""
    checks = {"token_level_rewards": torch.isfinite(rewards).all(),
              "response_mask": (torch.isfinite(mask) & (mask >= 0)).all()}
    for name, tensor in inputs.items():
        if name == "old_logprobs":
            checks[name] = (~torch.isnan(tensor) & (tensor != math.inf)).all()
        elif name != "reward_weights":
            checks[name] = torch.isfinite(tensor).all()
    ok = torch.stack(list(checks.values())).tolist()
    bad = [name for name, fine in zip(checks, ok) if not fine]
    if bad:
        what = {"response_mask": "finite and >= 0", "old_logprobs": "not NaN or +inf"}
        raise ValueError("; ".join(f"{name} must be {what.get(name, 'finite')}" for name in bad))


# ---------------------------------------------------------------------------------------------
