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
from grpo_kernels.ops.grpo_loss.table import (
    REJECTION_SAMPLING,
    ROW_LOG_RATIO_GMPO,
    ROW_LOG_RATIO_MEAN,
    ROW_LOG_RATIO_SUM,
    ROW_LOG_RATIO_VESPO,
    RS_SEQ_MAX,
    RS_SEQ_MEAN,
    RS_TOKEN,
    world_size,
)
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


def _row_sum(values: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: every per-row (per-sequence) sum of the torch side goes through here (and
    ``_row_max``): the one place a packed layout would change."""
    return values.sum(1)


def _row_max(values: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B], the per-row maximum."""
    return values.amax(1)


def rollout_correction_rows(cfg, x, o, s, m):
    """Rollout correction on ``[B, T]`` float32 tensors (``x`` logp, ``o`` old, ``s`` sampling, ``m``
    mask): ``(kept [B, T] bool or None, raw IS ratio [B, T] or None)``. ``kept``: the tokens rejection
    sampling keeps; the raw ratio is exp(clamp(l, +-20)) per token or per row, before
    ``rollout_is_mode``; l = logp - old (bypass) or old - sampling (decoupled)."""
    if not cfg.rollout_correction:
        return None, None
    train, rollout = (x, o) if cfg.bypass_mode else (o, s)
    B, T = m.shape
    active = m != 0
    zero = torch.zeros((), device=m.device, dtype=torch.float32)
    kept = None
    criterion = REJECTION_SAMPLING.get(cfg.rollout_rs)
    if criterion is not None:
        stat = on_torch(criterion.stat)(train, rollout)
        if criterion.level != RS_TOKEN:
            if criterion.level == RS_SEQ_MAX:
                stat = _row_max(torch.where(active, stat, float("-inf")))
                stat = torch.where(stat == float("-inf"), zero, stat)  # a row without tokens: 0
            else:
                stat = _row_sum(torch.where(active, stat * m, zero))
                if criterion.level == RS_SEQ_MEAN:
                    stat = stat / (_row_sum(m) + 1e-8)
            stat = stat[:, None].expand(B, T)
        kept = (stat >= cfg.rs_lower) & (stat <= cfg.rs_upper)
    is_ratio = None
    if cfg.rollout_is == "token":
        is_ratio = torch.exp((train - rollout).clamp(-20.0, 20.0))
    elif cfg.rollout_is == "sequence":
        log_ratio = _row_sum(torch.where(active, (train - rollout) * m, zero))
        is_ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))[:, None].expand(B, T)
    return kept, is_ratio


def rollout_is_batch_scale(cfg, t) -> torch.Tensor:
    """[1] float32: 1 / the batch mean of the computed rollout IS weights (``rollout_is_batch_normalize``;
    1 otherwise): over the masked tokens (token level) or the rows with a token (sequence level), over
    all ranks when torch.distributed is initialized, as verl; no scaling when the mean is <= 1e-8."""
    device = t["logp"].device
    if not cfg.rollout_is_batch_normalize:
        return torch.ones(1, device=device, dtype=torch.float32)
    x = t["logp"].detach().float()
    m = t["mask"].to(torch.float32)
    active = m != 0
    zero = torch.zeros((), device=device, dtype=torch.float32)
    o = t["old"]
    s = t["sampling"] if t["sampling"] is not None else o
    _, is_ratio = rollout_correction_rows(cfg, torch.where(active, x, zero), torch.where(active, o, zero),
                                     torch.where(active, s, zero), m)
    weight = on_torch(rollout_is_weight)(is_ratio, cfg.is_clip_min, cfg.is_clip_max,
                                         int(cfg.rollout_is_mode == "mask"))
    if cfg.rollout_is == "token":
        total = torch.stack([torch.where(active, weight * m, zero).sum(), m.sum()])
    else:
        has_tokens = _row_sum(m) > 0
        total = torch.stack([torch.where(has_tokens, weight[:, 0], zero).sum(), has_tokens.float().sum()])
    if world_size() > 1:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    mean = total[0] / total[1].clamp(min=1e-30)
    return torch.where(mean > 1e-8, 1.0 / mean, torch.ones_like(mean)).reshape(1)


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
    s = torch.where(active, t["sampling"], zero) if t["sampling"] is not None else o
    a = t["advantages"].expand(B, T)
    ent = t["entropy"].detach() if t["entropy"] is not None else torch.zeros_like(x)
    switches = kernel_switches(cfg)
    rollout_is_torch, ratio_torch, token_loss_torch = (
        on_torch(rollout_is_weight), on_torch(importance_ratio), on_torch(token_loss))

    # rollout correction: rejected tokens leave the mask, the computed IS weight replaces the given one
    kept, computed_is_ratio = rollout_correction_rows(cfg, x, o, s, m)
    rejected = torch.zeros_like(m)
    if kept is not None:
        rejected = torch.where(kept, zero, m)
        m = torch.where(kept, m, zero)
        active = m != 0
    if computed_is_ratio is not None:
        is_ratio = computed_is_ratio
    else:
        is_ratio = t["is_ratio"].expand(B, T) if t["is_ratio"] is not None else torch.ones_like(x)
    is_ratio = rollout_is_torch(is_ratio, cfg.is_clip_min, cfg.is_clip_max, int(cfg.rollout_is_mode == "mask"))
    # the weight that multiplies the policy term (VESPO folds the ratio into its own weight instead)
    is_weight = torch.ones_like(x) if cfg.policy.folds_is_ratio else is_ratio * t["is_scale"]

    tokens = _row_sum(m)
    inv_tokens = 1.0 / tokens.clamp(min=1.0)
    row_value = torch.zeros_like(tokens)
    seq_norm = inv_tokens
    if switches["ROW_LOG_RATIO"] in (ROW_LOG_RATIO_MEAN, ROW_LOG_RATIO_SUM):
        if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_SUM:
            seq_norm = torch.ones_like(tokens)  # the summed log-ratio (TRL's RLOO)
        seq_rho, seq_drho = ratio_torch(_row_sum(torch.where(active, (x - o) * m, zero)) * seq_norm,
                                        cfg.log_ratio_bound)
        rho = seq_rho[:, None].expand(B, T)
    elif switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_GMPO:
        g, dg = on_torch(gmpo_log_ratio)(x, o, a, *cfg.policy_params()[:2])
        seq_norm = 1.0 / (tokens + 1e-8)
        seq_rho = torch.exp(_row_sum(torch.where(active, g * m, zero)) * seq_norm)
        seq_drho = seq_rho
        rho = seq_rho[:, None].expand(B, T)
    else:
        rho, drho_dx = ratio_torch(x - o, cfg.log_ratio_bound)
    if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_VESPO:
        log_ratio_sum = _row_sum(torch.where(active, (x - o).clamp(-20.0, 20.0) * m, zero))
        log_is_sum = _row_sum(torch.log(is_ratio).clamp(LOG_1E_8, 20.0))  # every position, as TRL
        row_value = (log_ratio_sum + log_is_sum).clamp(LOG_1E_8, 20.0)

    threshold = t["entropy_threshold"]
    entropy_mask = active & ((threshold == float("-inf")) | (ent * m >= threshold))
    multiplier = torch.where(entropy_mask, is_weight, zero)
    if cfg.off_policy_mask_threshold is not None:
        kl_off = torch.nan_to_num(s - x, nan=0.0)
        off_policy_kl = _row_sum(torch.where(active, kl_off * m, zero)) * inv_tokens
        keep = (a >= 0) | (off_policy_kl[:, None] <= cfg.off_policy_mask_threshold)
        multiplier = torch.where(keep, multiplier, zero)

    aux = t["token_value"] if switches["TOKEN_VALUE"] else row_value[:, None].expand(B, T)
    loss_t, dloss_dx, dloss_drho, kl, is_low, is_high, is_lower = token_loss_torch(
        x, o, r, a, rho, aux, multiplier, *cfg.policy_params(), cfg.beta,
        int(cfg.use_bias_correction_kl), on_torch(switches["POLICY"]), on_torch(switches["KL"]))

    weight = torch.where(active, m, zero)
    grad = torch.where(active, weight * dloss_dx, zero)
    if switches["ROW_LOG_RATIO"] in (ROW_LOG_RATIO_MEAN, ROW_LOG_RATIO_GMPO, ROW_LOG_RATIO_SUM):
        row_dloss_drho = _row_sum(torch.where(active, weight * dloss_drho, zero))
        per_token = m * dg if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_GMPO else m
        row_coef = torch.where(row_dloss_drho != 0, row_dloss_drho * seq_drho * seq_norm, zero)
        grad = grad + torch.where(active, per_token * row_coef[:, None], zero)
    else:  # (a term that does not depend on rho adds nothing, even where d rho overflows to inf)
        grad = grad + torch.where(active & (dloss_drho != 0), weight * dloss_drho * drho_dx, zero)

    masked = torch.where(active, m, zero)
    effective = torch.where(entropy_mask, m, zero)
    phi = torch.zeros_like(tokens)
    if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_VESPO:
        phi = on_torch(vespo_phi)(row_value, t["advantages"][:, 0], *cfg.policy_params())
    row_stats = torch.stack([
        _row_sum(torch.where(active, loss_t * weight, zero)),
        _row_sum(torch.where(active, kl * m, zero)),
        _row_sum(torch.where(is_low, masked, zero)),
        _row_sum(torch.where(is_high, masked, zero)),
        _row_sum(torch.where(is_low | is_high, masked, zero)),
        _row_sum(torch.where(active, ent * m, zero)),
        _row_sum(masked),
        _row_sum(torch.where(entropy_mask, ent * m, zero)),
        _row_sum(effective),
        _row_sum(torch.where(is_lower, masked, zero)),
        phi,
        _row_sum(torch.where(active, is_weight * m, zero)),
        _row_sum(rejected),
    ], dim=1)
    return row_stats, grad, (effective if t["entropy_grad"] else None)
