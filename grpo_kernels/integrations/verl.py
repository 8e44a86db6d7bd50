"""verl integration: grpo-kernels behind verl's ``use_fused_kernels`` log-prob/entropy path.

With ``actor_rollout_ref.model.use_fused_kernels=True`` verl's patched model forward hands the
backbone's last hidden states and the LM-head weight to one of two functions and gets per-token
log-probs and entropies back, never the logits:

* ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels,
  temperature, reduction, dist_process_group) -> (log_probs, entropy)`` (``fused_kernel_options.
  impl_backend="triton"``), and
* ``verl.utils.experimental.torch_functional.FusedLinearForPPO(...)(hidden_states, vocab_weights,
  input_ids, temperature) -> (log_probs, entropy)`` (``impl_backend="torch"``).

This module provides both with the same signatures, computed by :func:`grpo_kernels.token_logprobs`,
and :func:`patch_verl`, which swaps them into an installed verl in one call::

    from grpo_kernels.integrations.verl import patch_verl
    patch_verl()          # before verl builds its actor; then train with use_fused_kernels=True

verl itself is not a dependency: the functions below work on plain tensors.
"""

from __future__ import annotations

import sys

import torch

from grpo_kernels.ops.logprobs import token_logprobs

__all__ = ["linear_cross_entropy", "FusedLinearForPPO", "patch_verl"]


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


_VERL_MODULES = (
    "verl.utils.kernel.linear_cross_entropy",
    "verl.utils.experimental.torch_functional",
)


def patch_verl() -> list[str]:
    """Route an installed verl's fused log-prob/entropy path through grpo-kernels.

    Imports verl's two fused-kernel modules and replaces ``linear_cross_entropy`` and
    ``FusedLinearForPPO`` there and in every already-imported ``verl.*`` module that holds a
    reference to the originals (older verl releases import them at module level). verl's callers
    that import them lazily, inside the forward, pick up the replacements too. Call it once, in
    every process, before verl builds its actor model (in a Ray worker: at the top of the worker
    module, or via verl's ``external_lib`` hook).

    Returns the qualified names that were replaced (empty when already patched). Raises
    ``ImportError`` when verl is not installed or has neither module.
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
    return sorted(replaced)
