"""verl's advantage estimators on :func:`grpo_kernels.estimate_advantages`.

``VERL_ADV_ESTIMATORS`` maps every name of verl 0.9.1's ``ADV_ESTIMATOR_REGISTRY`` but ``gae``
(``gae`` needs a critic's values and is not a group statistic; verl's trainer calls it directly)
to how it is computed here; :func:`adv_estimator` returns a function with verl's signature for
that name (the same parameters, in the same order, with the same defaults, so that verl's
``compute_advantage`` and a positional caller both work), and :func:`register_adv_estimators`
(called by ``patch_verl()``) puts them in ``verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY``.

What the functions read, as verl's do: ``index`` (verl's ``uid`` array: any labels, strings
included, are mapped to group ids), ``config`` (verl's ``AlgoConfig``, an OmegaConf
``DictConfig`` or a dict: ``gamma`` for ``reinforce_plus_plus``, ``norm_adv_by_std_in_grpo`` for
``grpo_passk``, ``gdpo_reward_keys`` / ``gdpo_reward_weights`` for ``gdpo``), GDPO's
``non_tensor_batch`` and ``batch``. verl's ``alpha`` of ``gpg`` is ignored, as verl overwrites it.

verl itself is not a dependency: this module imports neither verl nor numpy (numpy only when an
``index`` arrives as a numpy array, which only verl passes).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch

from grpo_kernels.ops.advantages.estimate import estimate_advantages
from grpo_kernels.ops.advantages.estimators import ESTIMATORS

__all__ = ["VERL_ADV_ESTIMATORS", "adv_estimator", "register_adv_estimators"]

_REQUIRED = inspect.Parameter.empty


def _config_get(config, name, default=None):
    """``config.<name>`` for verl's AlgoConfig, a DictConfig, a dict or any object; ``default``
    when absent or None."""
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        value = config.get(name, None)
    else:
        value = getattr(config, name, None)
    return default if value is None else value


def group_ids(index, device) -> torch.Tensor:
    """verl's ``index`` (a tensor, a numpy array of ints, or of ``uid`` strings / any labels) ->
    ``[B]`` int64 group ids on ``device``: equal labels, equal ids."""
    if isinstance(index, torch.Tensor):
        if index.is_floating_point() or index.is_complex():
            raise TypeError(f"index must hold integer group ids or labels, got a {index.dtype} tensor")
        return index.reshape(-1).to(device=device, dtype=torch.int64)
    import numpy as np

    labels = np.asarray(index)
    if labels.dtype.kind in "iub":
        return torch.from_numpy(labels.reshape(-1).astype(np.int64)).to(device)
    try:
        _, inverse = np.unique(labels.reshape(-1), return_inverse=True)
    except TypeError:  # labels of mixed types: compare them as text, as verl's as_torch_index does
        _, inverse = np.unique(np.array([str(label) for label in labels.reshape(-1)], dtype=object),
                               return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(device)


def _needs_config(name):
    def read(arguments):
        if arguments.get("config") is None:
            raise ValueError(f"verl's {name} estimator needs the algorithm config (verl asserts config is not None)")
        return arguments["config"]
    return read


def _passk_options(arguments):
    # verl's grpo_passk reads norm_adv_by_std_in_grpo from the config, not from its argument
    config = _needs_config("grpo_passk")(arguments)
    return {"norm_adv_by_std_in_grpo": bool(_config_get(config, "norm_adv_by_std_in_grpo", True))}


def _reinforce_options(arguments):
    return {"gamma": _config_get(_needs_config("reinforce_plus_plus")(arguments), "gamma", 1.0)}


def _gdpo_inputs(arguments):
    """verl's gdpo: the components named by ``config.gdpo_reward_keys`` in ``non_tensor_batch``
    (one score per row, through float32 as verl reads them) when config, non_tensor_batch and
    batch are all given; else the row sums of token_level_rewards."""
    config, non_tensor_batch = arguments.get("config"), arguments.get("non_tensor_batch")
    if config is None or non_tensor_batch is None or arguments.get("batch") is None:
        return {}
    keys = _config_get(config, "gdpo_reward_keys")
    if not keys:
        raise ValueError("GDPO requires 'algorithm.gdpo_reward_keys' listing the reward component keys "
                         "returned by compute_score (verl asserts it)")
    missing = [key for key in keys if key not in non_tensor_batch]
    if missing:
        raise ValueError(f"GDPO reward key(s) {missing} not found in non_tensor_batch "
                         f"(available: {sorted(non_tensor_batch)})")
    import numpy as np

    device = arguments["token_level_rewards"].device
    components = torch.stack([torch.from_numpy(np.asarray(non_tensor_batch[key], dtype=np.float32).reshape(-1))
                              for key in keys], dim=1).to(device)
    inputs = {"reward_components": components}
    weights = _config_get(config, "gdpo_reward_weights")
    if weights is not None:
        inputs["reward_weights"] = [float(w) for w in weights]
    return inputs


@dataclass(frozen=True)
class VerlAdvEstimator:
    """One verl estimator name: ``estimator``, our ``ESTIMATORS`` entry; ``parameters``, verl
    0.9.1's signature (a name: required; a (name, default) pair; ``"**kwargs"``); ``extra(bound
    arguments) -> dict``: what it reads from verl's config and batch."""

    estimator: str
    parameters: tuple
    extra: Callable = field(default=lambda arguments: {})

    def signature(self) -> inspect.Signature:
        params = []
        for item in self.parameters:
            if item == "**kwargs":
                params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
            else:
                name, default = (item, _REQUIRED) if isinstance(item, str) else item
                params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
        return inspect.Signature(params)


_GROUPED = ("token_level_rewards", "response_mask", "index", ("epsilon", 1e-6))
_GRPO = _GROUPED + (("norm_adv_by_std_in_grpo", True), ("config", None))
_OTB = ("token_level_rewards", "response_mask", "index", "old_log_probs", "sum_pi_squared",
        ("rollout_is_weights", None), ("handle_zero_tail", True), ("epsilon", 1e-8), "**kwargs")

VERL_ADV_ESTIMATORS = {
    "grpo": VerlAdvEstimator("grpo", _GRPO),
    "grpo_vectorized": VerlAdvEstimator("grpo_vectorized", _GRPO),
    "gdpo": VerlAdvEstimator("gdpo", _GRPO + (("non_tensor_batch", None), ("batch", None), "**kwargs"),
                             _gdpo_inputs),
    "grpo_passk": VerlAdvEstimator("grpo_passk", _GRPO + ("**kwargs",), _passk_options),
    "reinforce_plus_plus_baseline": VerlAdvEstimator(
        "reinforce_plus_plus_baseline", _GROUPED + (("config", None), "**kwargs")),
    "rloo": VerlAdvEstimator("rloo", _GROUPED + (("config", None), "**kwargs")),
    "rloo_vectorized": VerlAdvEstimator("rloo_vectorized", _GROUPED + (("config", None), "**kwargs")),
    "opo": VerlAdvEstimator("opo", _GROUPED + (("config", None), "**kwargs")),
    "gpg": VerlAdvEstimator("gpg", _GROUPED + (("f_norm", 1.0), ("alpha", 1.0), ("config", None), "**kwargs")),
    "reinforce_plus_plus": VerlAdvEstimator(
        "reinforce_plus_plus", ("token_level_rewards", "response_mask", ("config", None), "**kwargs"),
        _reinforce_options),
    "remax": VerlAdvEstimator(
        "remax", ("token_level_rewards", "reward_baselines", "response_mask", ("config", None), "**kwargs")),
    "optimal_token_baseline": VerlAdvEstimator("optimal_token_baseline", _OTB),
    "tir_optimal_token_baseline": VerlAdvEstimator("tir_optimal_token_baseline", _OTB),
}

# verl's tensor arguments -> estimate_advantages' names
_TENSOR_ARGUMENTS = {"reward_baselines": "reward_baselines", "old_log_probs": "old_logprobs",
                     "sum_pi_squared": "sum_pi_squared", "rollout_is_weights": "rollout_is_ratio"}


def adv_estimator(name: str, *, backend: str = "auto"):
    """A function with verl 0.9.1's signature for its advantage estimator ``name``, computed by
    :func:`grpo_kernels.estimate_advantages` (group reductions on the Triton kernels on a GPU).

    Returns ``(advantages, returns)`` ``[B, T]``, as verl's. Differences from verl's own
    function: rewards must be finite; computed in float64 (verl: in the rewards' dtype); see
    docs/semantics.md, "Advantage estimators".
    """
    if name not in VERL_ADV_ESTIMATORS:
        raise ValueError(f"unknown verl advantage estimator {name!r}; supported: {', '.join(VERL_ADV_ESTIMATORS)}")
    entry = VERL_ADV_ESTIMATORS[name]
    spec = ESTIMATORS[entry.estimator]
    signature = entry.signature()

    def verl_adv_estimator(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        rewards = arguments["token_level_rewards"]
        call = {option: arguments[option] for option in spec.options if option in arguments}
        for verl_name, our_name in _TENSOR_ARGUMENTS.items():
            if arguments.get(verl_name) is not None and our_name in spec.inputs + spec.optional_inputs:
                call[our_name] = arguments[verl_name]
        if spec.grouped:
            if arguments.get("index") is None:
                raise ValueError(f"verl's {name} estimator needs index (verl's uid: the group of each row)")
            call["index"] = group_ids(arguments["index"], rewards.device)
        call.update(entry.extra(arguments))
        out = estimate_advantages(entry.estimator, rewards, arguments["response_mask"], backend=backend, **call)
        return out.advantages, out.returns

    verl_adv_estimator.__signature__ = signature
    verl_adv_estimator.__name__ = f"grpo_kernels_verl_{name}"
    verl_adv_estimator.__qualname__ = verl_adv_estimator.__name__
    verl_adv_estimator.__doc__ = f"verl's {name!r} advantage estimator ({spec.verl_function}) on grpo-kernels."
    return verl_adv_estimator


def register_adv_estimators(adv_estimators=True) -> list[str]:
    """Register :func:`adv_estimator` of each name in verl's ``ADV_ESTIMATOR_REGISTRY``.

    ``adv_estimators``: ``True`` (every name of ``VERL_ADV_ESTIMATORS``), ``False`` (none), or
    the names. verl's trainer calls ``core_algos.compute_grpo_outcome_advantage`` itself for
    ``grpo`` (not through the registry), so registering ``grpo`` replaces that module attribute
    too. Each registered function keeps verl's own in ``._verl_original``. Returns what was
    registered or replaced (empty when already done); raises ``ValueError`` for an unknown name.
    """
    import importlib

    if adv_estimators is False:
        return []
    names = list(VERL_ADV_ESTIMATORS) if adv_estimators is True else list(adv_estimators)
    unknown = [name for name in names if name not in VERL_ADV_ESTIMATORS]
    if unknown:
        raise ValueError(f"patch_verl: unknown advantage estimator(s) {unknown}; "
                         f"supported: {', '.join(VERL_ADV_ESTIMATORS)}")
    try:
        core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError:
        if adv_estimators is True:
            return []  # a verl without the estimator registry: nothing to register
        raise
    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    done = []
    for name in names:
        if getattr(registry.get(name), "_grpo_kernels_adv_estimator", None) == name:
            continue
        function = adv_estimator(name)
        function._grpo_kernels_adv_estimator = name
        function._verl_original = registry.get(name)  # verl's own function, for whoever needs it back
        registry[name] = function
        done.append(f"verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY[{name!r}]")
        if name == "grpo" and hasattr(core_algos, "compute_grpo_outcome_advantage"):
            core_algos.compute_grpo_outcome_advantage = function
            done.append("verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage")
    return done
