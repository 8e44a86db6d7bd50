"""The public entry points: ``grpo_loss``, and ``prepare_loss_inputs`` / ``grpo_loss_prepared`` (the
fused API checks every loss input before its log-prob kernel runs, then hands the log-probs over).
"""

from __future__ import annotations

import math
import numbers

import torch

from grpo_kernels.ops.grpo_loss.kernel import KERNEL_MASK_DTYPES
from grpo_kernels.ops.grpo_loss.op import COUNT_OPTIONS
from grpo_kernels.ops.grpo_loss.options import validate_loss_options
from grpo_kernels.ops.grpo_loss.rows_torch import Rows, on_torch, rollout_correction_rows, rollout_is_batch_scale
from grpo_kernels.ops.grpo_loss.table import METRIC_NAMES, ROW_LOG_RATIO_VESPO, metric_names
from grpo_kernels.ops.grpo_loss.terms import rollout_is_weight
from grpo_kernels.ops.packing import as_tokens, check_cu_seqlens, cu_seqlens_value_checks, packed_shape, raise_failed
from grpo_kernels.ops.utils import FLOAT_DTYPES, check_tensor, resolve_backend


class LossLayout:
    """The layout the loss inputs are checked against and brought into for the op.

    Padded (``cu_seqlens`` None): token tensors ``[B, T]`` (``shape``), per-row inputs ``[B]`` /
    ``[B, 1]`` broadcast to ``[B, T]`` by a zero stride. Packed: token tensors ``[N]`` or ``[1, N]``
    (``shape`` is the log-probs'), brought to ``[N]``; per-sequence inputs ``[S]`` / ``[S, 1]``,
    brought to ``[S, 1]``; ``cu_seqlens`` int64 ``[S + 1]`` (its values are checked in the op).
    """

    def __init__(self, shape, device, cu_seqlens=None):
        shape = tuple(shape)
        self.cu_seqlens = None
        if cu_seqlens is None:
            if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
                raise ValueError(f"log-probs must be a non-empty [B, T] tensor, got shape {shape}")
            self.token_shape, self.num_rows = shape, shape[0]
        else:
            num_tokens = packed_shape("logprobs", shape)
            if not 0 < num_tokens < 2**31:  # (the kernel addresses packed tokens with int32 positions)
                raise ValueError(f"log-probs must hold between 1 and 2**31 - 1 tokens ([N] or [1, N]) with "
                                 f"cu_seqlens, got shape {shape}")
            self.cu_seqlens = check_cu_seqlens(cu_seqlens, device)
            self.token_shape, self.num_rows = (num_tokens,), self.cu_seqlens.shape[0] - 1

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def shape_of(self, name, tensor) -> None:
        """A token tensor's shape: the log-probs' ``[B, T]``, or packed ``[N]`` / ``[1, N]``."""
        if self.packed:
            as_tokens(name, tensor, self.token_shape[0])
        elif tuple(tensor.shape) != self.token_shape:
            raise ValueError(f"{name} must have the shape of the log-probs {self.token_shape}, "
                             f"got {tuple(tensor.shape)}")

    def tokens(self, name, tensor):
        """A float token tensor -> float32 in the op's layout, unit stride along the tokens."""
        if tensor is None:
            return None
        check_tensor(name, tensor, dtypes=FLOAT_DTYPES)
        self.shape_of(name, tensor)
        tensor = tensor.detach().float()
        if self.packed:
            return tensor.reshape(self.token_shape).contiguous()
        return tensor if tensor.stride(1) == 1 or self.token_shape[1] == 1 else tensor.contiguous()

    def per_row_or_token(self, name, tensor, what):
        """Padded ``[B]``, ``[B, 1]`` or ``[B, T]`` -> float32 ``[B, T]`` (per row: a zero stride along
        T). Packed ``[S]`` or ``[S, 1]`` (per sequence; also when S = N) -> ``[S, 1]``, ``[N]`` or
        ``[1, N]`` -> ``[N]``."""
        if tensor is None:
            return None
        check_tensor(name, tensor, dtypes=FLOAT_DTYPES)
        if self.packed:
            S, N = self.num_rows, self.token_shape[0]
            if tuple(tensor.shape) in ((S,), (S, 1)):
                return tensor.detach().float().reshape(S, 1)
            if tuple(tensor.shape) in ((N,), (1, N)):
                return tensor.detach().float().reshape(N).contiguous()
            raise ValueError(f"{name} must be [S] or [S, 1] (S = {S} sequences, {what}) or [N] or [1, N] "
                             f"(N = {N} tokens) with cu_seqlens, got shape {tuple(tensor.shape)}")
        B, T = self.token_shape
        if tensor.dim() == 1 and tensor.shape[0] == B:
            tensor = tensor[:, None]
        if tensor.dim() != 2 or tensor.shape[0] != B or tensor.shape[1] not in (1, T):
            raise ValueError(f"{name} must be [B], [B, 1] or [B, T] = [{B}], [{B}, 1] or [{B}, {T}] ({what}), "
                             f"got shape {tuple(tensor.shape)}")
        tensor = tensor.detach().float()
        if tensor.shape[1] == 1:
            return tensor.expand(B, T)
        return tensor if tensor.stride(1) == 1 else tensor.contiguous()

    def is_per_token(self, tensor) -> bool:
        """Whether a prepared ``per_row_or_token`` input varies along the tokens."""
        if self.packed:
            return tensor.dim() == 1
        return tensor.stride(1) != 0 and self.token_shape[1] > 1


def prepare_loss_inputs(shape, device, completion_mask, advantages, *, old_logprobs=None, ref_logprobs=None,
                        entropy=None, will_have_entropy=False, rollout_is_ratio=None, sampling_logprobs=None,
                        cu_seqlens=None, **options):
    """Validate everything ``grpo_loss`` gets besides the log-probs, before any launch.

    ``shape``/``device``: those of the log-probs (``[B, T]``, or ``[N]`` / ``[1, N]`` with
    ``cu_seqlens``). ``will_have_entropy``: the caller computes the entropy later (the fused API).
    Returns ``(cfg, tensors)``: the options object and the inputs in the op's layout
    (``LossLayout``): float32 with unit stride along the tokens, per-row inputs broadcast
    (padded) or ``[S, 1]`` (packed), and ``tensors["cu_seqlens"]`` (int64 ``[S + 1]`` or None).
    """
    cfg = validate_loss_options(**options)
    layout = LossLayout(shape, device, cu_seqlens)
    check_tensor("completion_mask", completion_mask)
    if completion_mask.dtype.is_complex:
        raise TypeError(f"completion_mask must be bool, integer or float, got {completion_mask.dtype}")
    layout.shape_of("completion_mask", completion_mask)
    check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES)
    for name, tensor in (("completion_mask", completion_mask), ("advantages", advantages),
                         ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("entropy", entropy),
                         ("rollout_is_ratio", rollout_is_ratio), ("sampling_logprobs", sampling_logprobs)):
        if tensor is not None and isinstance(tensor, torch.Tensor) and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the log-probs are on {device}")
    if cfg.beta != 0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs (the reference model's per-token log-probs)")
    has_entropy = entropy is not None or will_have_entropy
    if not has_entropy and (cfg.entropy_coef != 0 or cfg.top_entropy_quantile < 1.0):
        raise ValueError("entropy_coef != 0 and top_entropy_quantile < 1 need the per-token entropy")
    _check_rollout_correction_inputs(cfg, old_logprobs, sampling_logprobs, rollout_is_ratio)
    if layout.packed and cfg.loss_agg_mode == "seq-mean-token-sum-norm" and cfg.loss_scale_factor is None:
        raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' with cu_seqlens needs loss_scale_factor: its "
                         "default is T, the padded length, which a packed batch does not have")
    mask = completion_mask if completion_mask.dtype in KERNEL_MASK_DTYPES else completion_mask.float()
    if layout.packed:
        mask = mask.reshape(layout.token_shape).contiguous()
    elif mask.stride(1) != 1 and layout.token_shape[1] != 1:
        mask = mask.contiguous()
    tensors = {
        "mask": mask,
        "advantages": layout.per_row_or_token("advantages", advantages, "one per completion"),
        "old": layout.tokens("old_logprobs", old_logprobs),
        "ref": layout.tokens("ref_logprobs", ref_logprobs),
        "sampling": layout.tokens("sampling_logprobs", sampling_logprobs),
        "is_ratio": layout.per_row_or_token("rollout_is_ratio", rollout_is_ratio, "per token or per sequence"),
        "cu_seqlens": layout.cu_seqlens,
    }
    if cfg.policy.row_log_ratio == ROW_LOG_RATIO_VESPO and layout.is_per_token(tensors["advantages"]):
        raise ValueError("loss_type='vespo' weighs whole sequences: advantages must be one per completion "
                         "([B] or [B, 1]; with cu_seqlens [S] or [S, 1])")
    if entropy is not None:
        check_tensor("entropy", entropy, dtypes=FLOAT_DTYPES)
        layout.shape_of("entropy", entropy)
    return cfg, tensors


def _check_rollout_correction_inputs(cfg, old_logprobs, sampling_logprobs, rollout_is_ratio) -> None:
    """Which log-probs the off-policy mask and rollout correction read, and that they are given."""
    decoupled = cfg.rollout_correction and not cfg.bypass_mode
    if sampling_logprobs is not None and cfg.off_policy_mask_threshold is None and not decoupled:
        raise ValueError("sampling_logprobs is read by the off-policy mask (off_policy_mask_threshold) and by "
                         "rollout correction in decoupled mode (rollout_is / rollout_rs, bypass_mode=False)")
    if cfg.rollout_correction and old_logprobs is None:
        raise ValueError("rollout_is / rollout_rs need old_logprobs (decoupled mode: the training policy's "
                         "log-probs before the update; bypass_mode=True: the rollout's)")
    if decoupled and sampling_logprobs is None:
        raise ValueError("rollout_is / rollout_rs in decoupled mode compare old_logprobs with sampling_logprobs "
                         "(the rollout engine's): pass sampling_logprobs, or bypass_mode=True to compare the "
                         "log-probs with old_logprobs")
    if cfg.rollout_is is not None and rollout_is_ratio is not None:
        raise ValueError("rollout_is computes the rollout IS weight: do not pass rollout_is_ratio as well")


def grpo_loss(
    logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_is_ratio: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    **options,
):
    """GRPO-family policy loss (TRL 1.16's ``GRPOTrainer``, verl 0.9.1's policy losses) from per-token log-probs.

    Every ``[B, T]`` below may instead be a packed ``[N]`` or ``[1, N]`` with ``cu_seqlens`` (and
    every ``[B]`` per-completion input ``[S]``): see ``cu_seqlens``.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (differentiable).
        completion_mask: ``[B, T]`` bool/int/float; 0 marks padding (and, e.g., tool-output tokens).
        advantages: ``[B]`` (or ``[B, 1]``, or ``[B, T]`` per token) advantages, not differentiated.
        old_logprobs: ``[B, T]`` log-probs of the sampling policy; ``None`` means ``logprobs.detach()``
            (ratio 1, gradient kept).
        ref_logprobs: ``[B, T]`` reference-model log-probs; required when ``beta != 0``. When given
            with ``beta == 0`` only the ``kl`` metric uses it.
        entropy: ``[B, T]`` per-token entropies (differentiable); required for ``entropy_coef != 0`` or
            ``top_entropy_quantile < 1``, and for the ``entropy`` metric.
        rollout_is_ratio: importance-sampling ratio between training and rollout engine (TRL's
            ``importance_sampling_ratio``, Liger's ``vllm_is_ratio``, verl's ``rollout_is_weights``):
            ``[B, T]`` per token, or ``[B]`` / ``[B, 1]`` per sequence; multiplies the policy term (not
            the KL); for ``vespo`` it enters the sequence weight instead (per token only).
        sampling_logprobs: ``[B, T]`` rollout-engine log-probs for the off-policy mask (defaults to
            ``old_logprobs``, as in TRL) and for rollout correction in decoupled mode (``rollout_is`` /
            ``rollout_rs`` with ``bypass_mode=False``: ``l = old_logprobs - sampling_logprobs``).
        cu_seqlens: packed sequences (TRL's ``padding_free``, verl's ``use_remove_padding``):
            int32/int64 ``[S + 1]`` cumulative lengths (flash-attn's / verl's convention: starts at
            0, non-decreasing, ends at N) of S completions stored back to back along N tokens.
            Token tensors are then ``[N]`` or ``[1, N]``; ``advantages`` and ``rollout_is_ratio``
            are per token (``[N]``, ``[1, N]``) or per completion (``[S]``, ``[S, 1]``; a 1-D tensor
            of length S is per completion, also when S = N). The loss, metrics and gradients are
            those of the padded ``[S, T]`` layout of the same data (docs/semantics.md, "Packed
            sequences"); no padding is materialized, and the kernel reads no more than the tokens.
        temperature: accepted for signature parity with the fused API and ignored (the log-probs are
            already temperature-scaled); it must still be a positive number.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else PyTorch),
            ``"triton"`` or ``"torch"``.
        **options: the options of ``OPTIONS`` (``docs/semantics.md`` lists them with defaults and
            ranges): the loss type and its own options, the KL term, the aggregation (TRL's or verl's
            ``loss_agg_mode``), the rollout IS ratio's mode and bounds, rollout correction
            (``rollout_is``, ``rollout_rs``, ``bypass_mode``, ...), the entropy bonus and mask, the
            off-policy mask.

    Returns:
        ``(loss, metrics)``: a differentiable 0-d float32 loss (w.r.t. ``logprobs`` and ``entropy``),
        and a dict of detached 0-d float32 tensors (``metric_names(loss_type)``), token-weighted
        means over the masked tokens (those rollout correction keeps) of this micro-batch: ``kl`` (NaN without ``ref_logprobs``),
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (for ``cispo``:
        the capped fraction, reported as high and region; 0 for ``sapo``/``vespo``), ``entropy``
        (NaN without ``entropy``); ``pg_clipfrac_lower`` for the clip loss types (dual clip) and
        ``vespo/phi_seq_mean`` (a mean over completions) for ``vespo``; ``rollout_is/mean`` and
        ``rollout_rs/masked_fraction`` with rollout correction (``metric_names(loss_type, True)``).
        Gradient accumulation scaling is left to the caller.

    Raises:
        ValueError / TypeError naming the argument, before any launch, for bad shapes, dtypes,
        devices, options or combinations; and, from the values (one host sync), for a completion
        mask that is NaN or outside [0, 1]... see ``docs/semantics.md`` ("Error policy").
    """
    check_temperature(temperature)
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES, ndim=2 if cu_seqlens is None else None)
    cfg, tensors = prepare_loss_inputs(
        logprobs.shape, logprobs.device, completion_mask, advantages, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, entropy=entropy, rollout_is_ratio=rollout_is_ratio,
        sampling_logprobs=sampling_logprobs, cu_seqlens=cu_seqlens, **options)
    backend = resolve_backend(logprobs.device, backend)
    return grpo_loss_prepared(logprobs, entropy, cfg, tensors, backend)


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def grpo_loss_prepared(logprobs, entropy, cfg, tensors, backend):
    """``grpo_loss`` on inputs already checked by ``prepare_loss_inputs``."""
    packed = tensors["cu_seqlens"] is not None

    def token_layout(tensor):  # float32, unit stride along the tokens; packed [1, N] -> [N] (a view)
        tensor = tensor.float()
        if packed:
            return tensor.reshape(-1).contiguous()
        return tensor if tensor.stride(1) == 1 else tensor.contiguous()

    logp32 = token_layout(logprobs)
    entropy32 = None if entropy is None else token_layout(entropy)
    # d loss / d entropy is needed only for an entropy bonus on an entropy that carries gradient
    entropy_grad = entropy32 is not None and entropy32.requires_grad and cfg.entropy_coef != 0
    # tensor counts travel as op inputs (numbers already sit in the options string)
    counts = [getattr(cfg, name) for name in COUNT_OPTIONS]
    counts = [c.to(device=logp32.device, dtype=torch.float32) if isinstance(c, torch.Tensor) else None
              for c in counts]
    # Clip-Cov's draw: a seed from the caller's generator (a Generator cannot enter the op)
    draw_seed = None
    if cfg.generator is not None:
        draw_seed = torch.randint(0, 2**62, (), generator=cfg.generator, device=cfg.generator.device)
    t = tensors
    loss, metrics, _, _ = torch.ops.grpo_kernels.grpo_loss(
        logp32, entropy32, t["mask"], t["advantages"], t["old"], t["ref"], t["sampling"], t["is_ratio"], *counts,
        draw_seed, t["cu_seqlens"], cfg.as_json(), backend, entropy_grad)
    everything = dict(zip(METRIC_NAMES, metrics.unbind(0)))
    return loss, {name: everything[name] for name in metric_names(cfg.loss_type, cfg.rollout_correction)}


@torch.no_grad()
def rollout_correction(logprobs, completion_mask, *, old_logprobs=None, sampling_logprobs=None, cu_seqlens=None,
                       **options):
    """What rollout correction (``rollout_is``, ``rollout_rs``) makes of a batch, as tensors, without a loss.

    Same inputs and options as :func:`grpo_loss` (the loss type's own options are checked but unused),
    packed sequences (``cu_seqlens``) included. Returns ``(kept, is_weight)`` in the shape of
    ``logprobs``: ``kept`` bool, the masked tokens rejection sampling keeps (every masked token
    without ``rollout_rs``); ``is_weight`` float32, the rollout IS weight that multiplies the policy
    term, after ``rollout_is_mode`` and batch normalization (``None`` without ``rollout_is``). For
    logging, or to apply decoupled-mode correction once per batch as verl's trainer does. Runs in
    PyTorch on the inputs' device; no gradient. With ``cu_seqlens``, one host sync checks its values.
    """
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES, ndim=2 if cu_seqlens is None else None)
    layout = LossLayout(logprobs.shape, logprobs.device, cu_seqlens)
    cfg, t = prepare_loss_inputs(logprobs.shape, logprobs.device, completion_mask,
                                 torch.zeros(layout.num_rows, device=logprobs.device), old_logprobs=old_logprobs,
                                 sampling_logprobs=sampling_logprobs, cu_seqlens=cu_seqlens, **options)
    if layout.packed:
        raise_failed(cu_seqlens_value_checks(t["cu_seqlens"], layout.token_shape[0]))
    t["logp"] = logprobs.detach().float().reshape(layout.token_shape)
    rows = Rows(layout.token_shape, t["cu_seqlens"])
    m = t["mask"].to(torch.float32)
    active = m != 0
    zero = torch.zeros((), device=m.device, dtype=torch.float32)

    def masked(tensor):
        return None if tensor is None else torch.where(active, tensor, zero)

    x = masked(t["logp"])
    o = masked(t["old"]) if t["old"] is not None else x
    kept, is_ratio, _ = rollout_correction_rows(cfg, rows, x, o, masked(t["sampling"]) if t["sampling"] is not None
                                                else o, m)
    kept = active if kept is None else kept & active
    if is_ratio is not None:
        is_ratio = on_torch(rollout_is_weight)(is_ratio, cfg.is_clip_min, cfg.is_clip_max,
                                               int(cfg.rollout_is_mode == "mask")) * rollout_is_batch_scale(cfg, t)
        is_ratio = is_ratio.reshape(logprobs.shape)
    return kept.reshape(logprobs.shape), is_ratio
