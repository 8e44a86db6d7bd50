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
from grpo_kernels.ops.advantages.tokens import PackedTokens, PaddedTokens
from grpo_kernels.ops.packing import as_tokens, check_cu_seqlens, cu_seqlens_value_checks, packed_shape, raise_failed
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


def _float_input(name, tensor, shape, device, packed=False):
    """A float input of ``shape`` as float64; ``packed``: a token tensor ``[N]`` or ``[1, N]`` (``shape`` ``(N,)``)."""
    check_tensor(name, tensor, dtypes=REWARD_DTYPES)
    if packed:
        tensor = as_tokens(name, tensor, shape[0])
    elif tuple(tensor.shape) != tuple(shape):
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
    cu_seqlens: torch.Tensor | None = None,
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
        cu_seqlens: packed sequences, int32/int64 ``[S + 1]`` (flash-attn's / verl's cumulative
            lengths, ``ops/packing.py``): the token tensors (``token_level_rewards``,
            ``response_mask``, ``old_logprobs``, ``sum_pi_squared``, ``rollout_is_ratio``) are
            ``[N]`` or ``[1, N]``, the per-row ones (``index``, ``reward_baselines``,
            ``reward_components``) ``[S]`` / ``[S, K]``, ``group_size`` counts sequences. The
            results are those of the padded ``[S, T]`` layout with zeros where there is no token,
            computed without it; its values are checked in the one host sync of the value checks.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``: where the group reductions run.
        **options: ``epsilon``, ``norm_adv_by_std_in_grpo``, ``gamma``, ``f_norm``,
            ``handle_zero_tail`` (``OPTIONS``), those the estimator reads.

    Returns:
        :class:`TokenAdvantages` ``(advantages, returns)``, each of the shape of
        ``token_level_rewards`` (``[B, T]``; packed ``[N]`` or ``[1, N]``), float32 (float64 for
        float64 rewards), not differentiable. Meta tensors give the shapes.
    """
    values = validate_estimator_options(estimator, **options)
    spec = ESTIMATORS[estimator]
    packed = cu_seqlens is not None
    check_tensor("token_level_rewards", token_level_rewards, dtypes=REWARD_DTYPES, ndim=None if packed else 2)
    check_tensor("response_mask", response_mask, dtypes=MASK_DTYPES, ndim=None if packed else 2)
    if packed:
        num_tokens = packed_shape("token_level_rewards", token_level_rewards.shape)
        as_tokens("response_mask", response_mask, num_tokens)
    elif response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask must have the shape of token_level_rewards {list(token_level_rewards.shape)}, "
                         f"got {list(response_mask.shape)}")
    check_same_device(token_level_rewards=token_level_rewards, response_mask=response_mask)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    device = token_level_rewards.device
    out_shape = tuple(token_level_rewards.shape)
    if packed:
        cu_seqlens = check_cu_seqlens(cu_seqlens, device)
        batch_size, horizon = cu_seqlens.shape[0] - 1, num_tokens  # rows: sequences; token shape: (N,)
    else:
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
    token_shape = (horizon,) if packed else (batch_size, horizon)
    for name in ("reward_baselines", "old_logprobs", "sum_pi_squared", "rollout_is_ratio"):
        if name in given:
            per_token = name != "reward_baselines"
            inputs[name] = _float_input(name, given[name], token_shape if per_token else (batch_size,), device,
                                        packed=packed and per_token)
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
    if device.type == "meta" or batch_size == 0 or (packed and horizon == 0):  # (no token: nothing to estimate)
        if packed and device.type != "meta":
            raise_failed(cu_seqlens_value_checks(cu_seqlens, horizon))
        empty = torch.zeros(out_shape, dtype=out_dtype, device=device)
        return TokenAdvantages(empty, empty.clone())
    resolve_backend(device, backend)

    rewards = token_level_rewards.detach().double().reshape(token_shape)
    mask = response_mask.detach().double().reshape(token_shape)
    _check_values(rewards, mask, inputs, cu_seqlens)
    tokens = PackedTokens(cu_seqlens, horizon) if packed else PaddedTokens(token_shape, device)
    batch = EstimatorBatch(rewards, mask, tokens, layout, backend, inputs)
    advantages, returns = spec.compute(batch, **values)
    return TokenAdvantages(advantages.to(out_dtype).reshape(out_shape), returns.to(out_dtype).reshape(out_shape))


def _check_values(rewards, mask, inputs, cu_seqlens=None) -> None:
    """One host sync: rewards and inputs finite (old_logprobs may be -inf: probability 0), the
    mask finite and >= 0, ``cu_seqlens`` (when given) cutting the tokens into sequences."""
    what = {"response_mask": "finite and >= 0", "old_logprobs": "not NaN or +inf"}
    failed = {"token_level_rewards": ~torch.isfinite(rewards).all(),
              "response_mask": ~(torch.isfinite(mask) & (mask >= 0)).all()}
    for name, tensor in inputs.items():
        if name == "old_logprobs":
            failed[name] = ~(~torch.isnan(tensor) & (tensor != math.inf)).all()
        elif name != "reward_weights":
            failed[name] = ~torch.isfinite(tensor).all()
    checks = [(f"{name} must be {what.get(name, 'finite')}", flag) for name, flag in failed.items()]
    if cu_seqlens is not None:
        checks += cu_seqlens_value_checks(cu_seqlens, rewards.shape[0])
    raise_failed(checks)


# ---------------------------------------------------------------------------------------------
