"""The row pass on PyTorch: the kernel's walk over whole ``[B, T]`` (or packed ``[N]``) float32 tensors.

It calls *the same* per-token jit functions as the kernel (``terms.py``), run on torch tensors by
``on_torch`` (``tl`` and the jit functions they call rebound to torch counterparts), so that the
formulas and their derivatives exist once; only the data movement is written twice. Every per-row
(per-sequence) reduction and broadcast of the torch side goes through :class:`Rows`, the one place
that knows the layout: padded rows, or the sequences ``cu_seqlens`` cuts the packed token
dimension into (segment reductions, no padding). Used on CPU without the Triton interpreter
(``backend="torch"``). Returns what ``kernel.rows_triton`` returns.
"""

from __future__ import annotations

import functools
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
    vespo_log_is,
    vespo_phi,
)
from grpo_kernels.ops.packing import sequence_of_token


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


class Rows:
    """The rows of the torch row pass: padded ``[B, T]`` token tensors (``cu_seqlens`` None), or
    packed ``[N]`` token tensors cut into S sequences by ``cu_seqlens`` (int64 ``[S + 1]``, checked).

    ``sum``/``max`` reduce a token tensor per row (``[R]``), ``spread`` puts a per-row value on
    each of the row's tokens, ``tokens`` reads an input that is per row (``[R, 1]`` packed, or
    ``[B, T]``/``[B, 1]`` padded) or per token as a token tensor.
    """

    def __init__(self, token_shape, cu_seqlens=None):
        self.cu_seqlens = cu_seqlens
        self.token_shape = tuple(token_shape)
        if cu_seqlens is None:
            self.num_rows = self.token_shape[0]
        else:
            self.num_rows = cu_seqlens.shape[0] - 1
            self.row_of_token = sequence_of_token(cu_seqlens, self.token_shape[0])

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return values.sum(1)
        return torch.segment_reduce(values, "sum", offsets=self.cu_seqlens)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """The per-row maximum; -inf for a row without tokens."""
        if not self.packed:
            return values.amax(1)
        return torch.segment_reduce(values, "max", offsets=self.cu_seqlens, initial=float("-inf"))

    def spread(self, per_row: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return per_row[:, None].expand(self.token_shape)
        return per_row[self.row_of_token]

    def tokens(self, values: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return values.expand(self.token_shape)
        return self.spread(values[:, 0]) if values.dim() == 2 else values


def rollout_correction_rows(cfg, rows, x, o, s, m):
    """Rollout correction on float32 token tensors (``x`` logp, ``o`` old, ``s`` sampling, ``m``
    mask) of the layout ``rows``: ``(kept bool token tensor or None, raw IS ratio token tensor or
    None, per-row raw IS ratio [R] or None)``. ``kept``: the tokens rejection sampling keeps; the
    raw ratio is exp(clamp(l, +-20)) per token or per row, before ``rollout_is_mode``; l = logp -
    old (bypass) or old - sampling (decoupled)."""
    if not cfg.rollout_correction:
        return None, None, None
    train, rollout = (x, o) if cfg.bypass_mode else (o, s)
    active = m != 0
    zero = torch.zeros((), device=m.device, dtype=torch.float32)
    kept = None
    criterion = REJECTION_SAMPLING.get(cfg.rollout_rs)
    if criterion is not None:
        stat = on_torch(criterion.stat)(train, rollout)
        if criterion.level != RS_TOKEN:
            if criterion.level == RS_SEQ_MAX:
                stat = rows.max(torch.where(active, stat, float("-inf")))
                stat = torch.where(stat == float("-inf"), zero, stat)  # a row without tokens: 0
            else:
                stat = rows.sum(torch.where(active, stat * m, zero))
                if criterion.level == RS_SEQ_MEAN:
                    stat = stat / (rows.sum(m) + 1e-8)
            stat = rows.spread(stat)
        kept = (stat >= cfg.rs_lower) & (stat <= cfg.rs_upper)
    is_ratio = row_is_ratio = None
    if cfg.rollout_is == "token":
        is_ratio = torch.exp((train - rollout).clamp(-20.0, 20.0))
    elif cfg.rollout_is == "sequence":
        log_ratio = rows.sum(torch.where(active, (train - rollout) * m, zero))
        row_is_ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
        is_ratio = rows.spread(row_is_ratio)
    return kept, is_ratio, row_is_ratio


def rollout_is_batch_scale(cfg, t) -> torch.Tensor:
    """[1] float32: 1 / the batch mean of the computed rollout IS weights (``rollout_is_batch_normalize``;
    1 otherwise): over the masked tokens (token level) or the rows with a token (sequence level), over
    all ranks when torch.distributed is initialized, as verl; no scaling when the mean is <= 1e-8."""
    device = t["logp"].device
    if not cfg.rollout_is_batch_normalize:
        return torch.ones(1, device=device, dtype=torch.float32)
    rows = Rows(t["logp"].shape, t.get("cu_seqlens"))
    x = t["logp"].detach().float()
    m = t["mask"].to(torch.float32)
    active = m != 0
    zero = torch.zeros((), device=device, dtype=torch.float32)
    o = t["old"]
    s = t["sampling"] if t["sampling"] is not None else o
    _, is_ratio, row_is_ratio = rollout_correction_rows(
        cfg, rows, torch.where(active, x, zero), torch.where(active, o, zero), torch.where(active, s, zero), m)
    weight_of = functools.partial(on_torch(rollout_is_weight), clip_min=cfg.is_clip_min, clip_max=cfg.is_clip_max,
                                  mask_mode=int(cfg.rollout_is_mode == "mask"))
    if cfg.rollout_is == "token":
        total = torch.stack([torch.where(active, weight_of(is_ratio) * m, zero).sum(), m.sum()])
    else:
        has_tokens = rows.sum(m) > 0
        total = torch.stack([torch.where(has_tokens, weight_of(row_is_ratio), zero).sum(), has_tokens.float().sum()])
    if world_size() > 1:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    mean = total[0] / total[1].clamp(min=1e-30)
    return torch.where(mean > 1e-8, 1.0 / mean, torch.ones_like(mean)).reshape(1)


def rows_torch(cfg, t):
    """The kernel's walk over whole float32 token tensors (``[B, T]``, or packed ``[N]`` with
    ``t["cu_seqlens"]``), calling the same per-token functions."""
    x = t["logp"].detach()
    rows = Rows(x.shape, t.get("cu_seqlens"))
    m = t["mask"].to(torch.float32)
    active = m != 0
    zero = torch.zeros((), device=x.device, dtype=torch.float32)
    # padding reads as 0, as the kernel's masked loads do, so nothing there can turn into NaN
    x = torch.where(active, x, zero)
    o = torch.where(active, t["old"], zero) if t["old"] is not None else x
    r = torch.where(active, t["ref"], zero) if t["ref"] is not None else x
    s = torch.where(active, t["sampling"], zero) if t["sampling"] is not None else o
    a = rows.tokens(t["advantages"])
    ent = t["entropy"].detach() if t["entropy"] is not None else torch.zeros_like(x)
    switches = kernel_switches(cfg)
    rollout_is_torch, ratio_torch, token_loss_torch = (
        on_torch(rollout_is_weight), on_torch(importance_ratio), on_torch(token_loss))
    mask_mode = int(cfg.rollout_is_mode == "mask")

    # rollout correction: rejected tokens leave the mask, the computed IS weight replaces the given one
    kept, computed_is_ratio, _ = rollout_correction_rows(cfg, rows, x, o, s, m)
    rejected = torch.zeros_like(m)
    if kept is not None:
        rejected = torch.where(kept, zero, m)
        m = torch.where(kept, m, zero)
        active = m != 0
    if computed_is_ratio is not None:
        is_ratio = computed_is_ratio
    else:
        is_ratio = rows.tokens(t["is_ratio"]) if t["is_ratio"] is not None else torch.ones_like(x)
    is_ratio = rollout_is_torch(is_ratio, cfg.is_clip_min, cfg.is_clip_max, mask_mode)
    # the weight that multiplies the policy term (VESPO folds the ratio into its own weight instead)
    is_weight = torch.ones_like(x) if cfg.policy.folds_is_ratio else is_ratio * t["is_scale"]

    tokens = rows.sum(m)
    inv_tokens = 1.0 / tokens.clamp(min=1.0)
    row_value = torch.zeros_like(tokens)
    seq_norm = inv_tokens
    if switches["ROW_LOG_RATIO"] in (ROW_LOG_RATIO_MEAN, ROW_LOG_RATIO_SUM):
        if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_SUM:
            seq_norm = torch.ones_like(tokens)  # the summed log-ratio (TRL's RLOO)
        seq_rho, seq_drho = ratio_torch(rows.sum(torch.where(active, (x - o) * m, zero)) * seq_norm,
                                        cfg.log_ratio_bound)
        rho = rows.spread(seq_rho)
    elif switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_GMPO:
        g, dg = on_torch(gmpo_log_ratio)(x, o, a, *cfg.policy_params()[:2])
        seq_norm = 1.0 / (tokens + 1e-8)
        seq_rho = torch.exp(rows.sum(torch.where(active, g * m, zero)) * seq_norm)
        seq_drho = seq_rho
        rho = rows.spread(seq_rho)
    else:
        rho, drho_dx = ratio_torch(x - o, cfg.log_ratio_bound)
    if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_VESPO:
        log_ratio_sum = rows.sum(torch.where(active, (x - o).clamp(-20.0, 20.0) * m, zero))
        given = t["is_ratio"]
        if given is None:
            log_is_sum = torch.zeros_like(tokens)
        elif rows.packed and given.dim() == 2 or not rows.packed and given.stride(1) == 0:  # per row: once
            log_is_sum = on_torch(vespo_log_is)(given[:, 0], cfg.is_clip_min, cfg.is_clip_max, mask_mode)
        else:  # per token: every position of the row, as TRL
            log_is_sum = rows.sum(on_torch(vespo_log_is)(given, cfg.is_clip_min, cfg.is_clip_max, mask_mode))
        row_value = (log_ratio_sum + log_is_sum).clamp(LOG_1E_8, 20.0)

    threshold = t["entropy_threshold"]
    entropy_mask = active & ((threshold == float("-inf")) | (ent * m >= threshold))
    multiplier = torch.where(entropy_mask, is_weight, zero)
    if cfg.off_policy_mask_threshold is not None:
        kl_off = torch.nan_to_num(s - x, nan=0.0)
        off_policy_kl = rows.sum(torch.where(active, kl_off * m, zero)) * inv_tokens
        keep = (a >= 0) | (rows.spread(off_policy_kl) <= cfg.off_policy_mask_threshold)
        multiplier = torch.where(keep, multiplier, zero)

    aux = t["token_value"] if switches["TOKEN_VALUE"] else rows.spread(row_value)
    loss_t, dloss_dx, dloss_drho, kl, is_low, is_high, is_lower = token_loss_torch(
        x, o, r, a, rho, aux, multiplier, *cfg.policy_params(), cfg.beta,
        int(cfg.use_bias_correction_kl), on_torch(switches["POLICY"]), on_torch(switches["KL"]))

    weight = torch.where(active, m, zero)
    grad = torch.where(active, weight * dloss_dx, zero)
    if switches["ROW_LOG_RATIO"] in (ROW_LOG_RATIO_MEAN, ROW_LOG_RATIO_GMPO, ROW_LOG_RATIO_SUM):
        row_dloss_drho = rows.sum(torch.where(active, weight * dloss_drho, zero))
        per_token = m * dg if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_GMPO else m
        row_coef = torch.where(row_dloss_drho != 0, row_dloss_drho * seq_drho * seq_norm, zero)
        grad = grad + torch.where(active, per_token * rows.spread(row_coef), zero)
    else:  # (a term that does not depend on rho adds nothing, even where d rho overflows to inf)
        grad = grad + torch.where(active & (dloss_drho != 0), weight * dloss_drho * drho_dx, zero)

    masked = torch.where(active, m, zero)
    effective = torch.where(entropy_mask, m, zero)
    phi = torch.zeros_like(tokens)
    if switches["ROW_LOG_RATIO"] == ROW_LOG_RATIO_VESPO:
        phi = on_torch(vespo_phi)(row_value, t["advantages"][:, 0], *cfg.policy_params())
    row_stats = torch.stack([
        rows.sum(torch.where(active, loss_t * weight, zero)),
        rows.sum(torch.where(active, kl * m, zero)),
        rows.sum(torch.where(is_low, masked, zero)),
        rows.sum(torch.where(is_high, masked, zero)),
        rows.sum(torch.where(is_low | is_high, masked, zero)),
        rows.sum(torch.where(active, ent * m, zero)),
        rows.sum(masked),
        rows.sum(torch.where(entropy_mask, ent * m, zero)),
        rows.sum(effective),
        rows.sum(torch.where(is_lower, masked, zero)),
        phi,
        rows.sum(torch.where(active, is_weight * m, zero)),
        rows.sum(rejected),
    ], dim=1)
    return row_stats, grad, (effective if t["entropy_grad"] else None)
