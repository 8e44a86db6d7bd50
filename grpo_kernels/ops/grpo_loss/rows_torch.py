"""The row pass on PyTorch: the kernel's walk over whole ``[B, T]`` float32 tensors.

It calls *the same* per-token jit functions as the kernel (``terms.py``), run on torch tensors by
``on_torch`` (``tl`` and the jit functions they call rebound to torch counterparts), so that the
formulas and their derivatives exist once; only the data movement is written twice. Used on CPU
without the Triton interpreter (``backend="torch"``). Returns what ``kernel.rows_triton`` returns.
"""

from __future__ import annotations

import sys
import types

import torch
from triton.runtime.jit import JITFunction

from grpo_kernels.ops.grpo_loss.kernel import kernel_switches
from grpo_kernels.ops.grpo_loss.table import ROW_LOG_RATIO_GMPO, ROW_LOG_RATIO_MEAN, ROW_LOG_RATIO_VESPO
from grpo_kernels.ops.grpo_loss.terms import (
    LOG_1E_8,
    gmpo_log_ratio,
    importance_ratio,
    rollout_is_weight,
    token_loss,
    vespo_phi,
)


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


def _is_jit_function(value) -> bool:
    """A ``@triton.jit`` function, compiled or interpreted. The interpreter's class is looked up only
    if Triton's interpreter module is loaded (it needs numpy): importing this package must not
    import it on a machine that runs the compiled kernels or the torch path only."""
    if isinstance(value, JITFunction):
        return True
    interpreter = sys.modules.get("triton.runtime.interpreter")
    return interpreter is not None and isinstance(value, interpreter.InterpretedFunction)


def on_torch(jit_fn):
    """The Python function of a per-token ``@triton.jit`` function, with ``tl`` and the jit
    functions it calls rebound to their torch counterparts: the same formula on [B, T] tensors."""
    if jit_fn in _TORCH_VERSIONS:
        return _TORCH_VERSIONS[jit_fn]
    fn = jit_fn.fn
    namespace = dict(fn.__globals__, tl=_TorchLanguage)
    for name in fn.__code__.co_names:
        value = fn.__globals__.get(name)
        if _is_jit_function(value) and value is not jit_fn:
            namespace[name] = on_torch(value)
    torch_fn = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    _TORCH_VERSIONS[jit_fn] = torch_fn
    return torch_fn


def rows_torch(cfg, t):
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
    switches = kernel_switches(cfg)
    rollout_is_torch, ratio_torch, token_loss_torch = (
        on_torch(rollout_is_weight), on_torch(importance_ratio), on_torch(token_loss))
    is_ratio = t["is_ratio"].expand(B, T) if t["is_ratio"] is not None else torch.ones_like(x)
    is_ratio = rollout_is_torch(is_ratio, cfg.is_clip_min, cfg.is_clip_max, int(cfg.rollout_is_mode == "mask"))

    tokens = m.sum(1)
    inv_tokens = 1.0 / tokens.clamp(min=1.0)
    row_value = torch.zeros_like(tokens)
    seq_norm = inv_tokens
    if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_MEAN:
        seq_rho, seq_drho = ratio_torch(torch.where(active, (x - o) * m, zero).sum(1) * inv_tokens, cfg.log_ratio_bound)
        rho = seq_rho[:, None].expand(B, T)
    elif switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_GMPO:
        g, dg = on_torch(gmpo_log_ratio)(x, o, a, *cfg.policy_params()[:2])
        seq_norm = 1.0 / (tokens + 1e-8)
        seq_rho = torch.exp(torch.where(active, g * m, zero).sum(1) * seq_norm)
        seq_drho = seq_rho
        rho = seq_rho[:, None].expand(B, T)
    else:
        rho, drho_dx = ratio_torch(x - o, cfg.log_ratio_bound)
    if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_VESPO:
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
    loss_t, dloss_dx, dloss_drho, kl, is_low, is_high, is_lower = token_loss_torch(
        x, o, r, a, rho, aux, multiplier, *cfg.policy_params(), cfg.beta,
        int(cfg.use_bias_correction_kl), on_torch(switches["POLICY"]), on_torch(switches["KL"]))

    weight = torch.where(active, m, zero)
    grad = torch.where(active, weight * dloss_dx, zero)
    if switches["ROW_LOG_RATIO"] in (ROW_LOG_RATIO_MEAN, ROW_LOG_RATIO_GMPO):
        row_dloss_drho = torch.where(active, weight * dloss_drho, zero).sum(1)
        per_token = m * dg if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_GMPO else m
        grad = grad + torch.where(active, per_token * (row_dloss_drho * seq_drho * seq_norm)[:, None], zero)
    else:
        grad = grad + torch.where(active, weight * dloss_drho * drho_dx, zero)

    masked = torch.where(active, m, zero)
    effective = torch.where(entropy_mask, m, zero)
    phi = torch.zeros_like(tokens)
    if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_VESPO:
        phi = on_torch(vespo_phi)(row_value, t["advantages"][:, 0], *cfg.policy_params())
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
