"""Drop-ins for TRL 1.16's two chunked LM-head functions, on grpo-kernels' kernels.

* :class:`ChunkedLogProbFunction` for ``trl.kernels.ChunkedLogProbFunction``: per-token
  log-probs and, on request, entropy, ``log sum p^2``, mean logit and TRL's ``is_top1``, from
  :func:`grpo_kernels.token_logprobs` (one pass over the vocabulary, logits never stored).
* :class:`ChunkedDivergenceFunction` for ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``:
  the per-token forward KL / reverse KL / generalized JSD between a student's and a teacher's
  next-token distributions, and the student's entropy, from
  :func:`grpo_kernels.fused_divergence` (``mode="full"``).

Same ``apply`` signature, outputs, dtypes and gradients as TRL's (``chunk_size`` is accepted and
ignored: our kernels pick their own tiles). TRL's numerics are followed where they define the
result: the operands are cast to the compute dtype (the autocast dtype under autocast, else the
hidden states' dtype) before the projection, differentiably, so gradients reach each parameter in
its own dtype; the logit scale multiplies before the soft-cap, and the temperature divides last.

What our kernels do not implement runs TRL's own function for that call, with a
:class:`~grpo_kernels.integrations.trl.TRLFallbackWarning` (once per reason): a logit scale,
soft-cap or temperature that is not a positive finite number (TRL keeps a 0 scale as it is),
``beta`` outside ``[0, 1]``, an empty batch of rows, and DeepSpeed ZeRO-3 (our backward reads the
LM-head weight after ZeRO-3 has partitioned it again).
"""

from __future__ import annotations

import math
import numbers

import torch
from trl.kernels import chunked_divergence as _trl_divergence
from trl.kernels import chunked_logprob as _trl_logprob

from grpo_kernels.integrations.trl._compat import folded_scale, warn_fallback, zero3_enabled

__all__ = ["ChunkedLogProbFunction", "ChunkedDivergenceFunction", "OPTIONAL_OUTPUTS", "token_outputs"]

# TRL's own classes, captured before any patch replaces the names they are published under.
TRL_CHUNKED_LOGPROB = _trl_logprob.ChunkedLogProbFunction
TRL_CHUNKED_DIVERGENCE = _trl_divergence.ChunkedDivergenceFunction
# Per-token outputs besides the log-probs, in the order TRL returns them.
OPTIONAL_OUTPUTS = _trl_logprob.OPTIONAL_OUTPUTS


def _positive_finite(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """TRL's compute dtype: the autocast dtype under autocast, else the hidden states' own."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def logprob_fallback_reason(hidden, temperature, final_logit_softcapping, logit_scale) -> str | None:
    """Why a ChunkedLogProbFunction call must run TRL's code (None: ours runs it)."""
    if zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions the LM head between the forward and the backward"
    if hidden.numel() == 0:
        return "no rows (an all-masked micro-batch, or sequences of one token)"
    if not _positive_finite(logit_scale):
        return f"a logit scale of {logit_scale!r} (grpo-kernels folds the scale into a positive temperature)"
    if final_logit_softcapping is not None and not _positive_finite(final_logit_softcapping):
        return f"final_logit_softcapping={final_logit_softcapping!r} (grpo-kernels takes a positive soft-cap)"
    if not _positive_finite(temperature):
        return f"temperature={temperature!r} (grpo-kernels takes a positive temperature)"
    return None


def token_outputs(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs, *,
                  backend="auto"):
    """TRL's per-token outputs ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` on
    grpo-kernels (None for those not in ``outputs``); the caller has checked
    :func:`logprob_fallback_reason`.

    ``hidden`` ``[..., H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``targets`` ``[...]``
    ids (``-100``: ignored, every output 0 / False there, no gradient). float32 outputs
    (``is_top1`` bool); ``log_probs`` and ``entropy`` are differentiable.
    """
    dtype = compute_dtype(hidden)
    temperature, softcap = folded_scale(float(temperature), float(logit_scale), final_logit_softcapping)
    names = tuple(name for name in OPTIONAL_OUTPUTS if name in outputs)
    from grpo_kernels.ops.logprobs import token_logprobs

    with torch.autocast(hidden.device.type, enabled=False):
        stats = token_logprobs(hidden.to(dtype), weight.to(dtype), targets, outputs=names,
                               bias=None if bias is None else bias.to(dtype), temperature=temperature,
                               softcap=softcap, backend=backend)
    return stats.logprobs, stats.entropy, stats.log_sum_sq_probs, stats.mean_logits, stats.is_top1


class ChunkedLogProbFunction:
    """``trl.kernels.ChunkedLogProbFunction`` on grpo-kernels: ``apply`` takes TRL's arguments and
    returns TRL's 5-tuple ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (None
    where not in ``outputs``).

    Shapes: ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None, ``targets``
    ``[N]`` ids in ``[0, V)``; every output ``[N]``. ``backend`` (class attribute) is what
    :func:`grpo_kernels.token_logprobs` gets (``patch_trl(backend=...)`` sets it).
    """

    backend = "auto"

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        reason = logprob_fallback_reason(hidden, temperature, final_logit_softcapping, logit_scale)
        if reason is not None:
            warn_fallback(f"ChunkedLogProbFunction with {reason}")
            return TRL_CHUNKED_LOGPROB.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                             final_logit_softcapping, logit_scale, outputs)
        # TRL never passes an ignored label here (its head compacts or clamps them), so no id is
        # special: -100 cannot be a vocabulary id.
        return token_outputs(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                             outputs, backend=cls.backend)


def divergence_fallback_reason(student_hidden, beta, temperature, scales_and_caps) -> str | None:
    """Why a ChunkedDivergenceFunction call must run TRL's code (None: ours runs it)."""
    if zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions the LM heads between the forward and the backward"
    if student_hidden.shape[0] == 0:
        return "no rows (an all-masked micro-batch)"
    if not (isinstance(beta, numbers.Real) and not isinstance(beta, bool) and 0.0 <= beta <= 1.0):
        return f"beta={beta!r} (grpo-kernels takes beta in [0, 1])"
    if not _positive_finite(temperature):
        return f"temperature={temperature!r} (grpo-kernels takes a positive temperature)"
    for name, value, optional in scales_and_caps:
        if not (optional and value is None) and not _positive_finite(value):
            return f"{name}={value!r} (grpo-kernels takes a positive finite value)"
    return None


class ChunkedDivergenceFunction:
    """``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` on grpo-kernels: ``apply``
    takes TRL's arguments and returns ``(divergence, student_entropy)``, both ``[N]`` float32;
    the gradient reaches the student's hidden states, weight and bias only.

    ``beta``: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), in between the
    generalized JSD with mixture ``(1 - beta) p_student + beta p_teacher``; ``temperature``
    divides both models' logits after their scale and soft-cap.
    """

    backend = "auto"

    @classmethod
    def apply(cls, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
              temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None, teacher_logit_scale=1.0,
              teacher_final_logit_softcapping=None):
        args = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
                temperature, student_logit_scale, student_final_logit_softcapping, teacher_logit_scale,
                teacher_final_logit_softcapping)
        reason = divergence_fallback_reason(student_hidden, beta, temperature, (
            ("student_logit_scale", student_logit_scale, False), ("teacher_logit_scale", teacher_logit_scale, False),
            ("student_final_logit_softcapping", student_final_logit_softcapping, True),
            ("teacher_final_logit_softcapping", teacher_final_logit_softcapping, True)))
        if reason is not None:
            warn_fallback(f"ChunkedDivergenceFunction with {reason}")
            return TRL_CHUNKED_DIVERGENCE.apply(*args)
        from grpo_kernels.ops.divergence import fused_divergence

        # Each model projects in its own compute dtype (TRL's `_compute_dtype` per hidden state);
        # the casts are differentiable, so the student's gradient reaches its parameters.
        s_dtype, t_dtype = compute_dtype(student_hidden), compute_dtype(teacher_hidden)
        with torch.autocast(student_hidden.device.type, enabled=False):
            out = fused_divergence(
                student_hidden.to(s_dtype), student_weight.to(s_dtype),
                student_bias=None if student_bias is None else student_bias.to(s_dtype),
                teacher_hidden=teacher_hidden.detach().to(t_dtype), teacher_weight=teacher_weight.detach().to(t_dtype),
                teacher_bias=None if teacher_bias is None else teacher_bias.detach().to(t_dtype),
                mode="full", beta=float(beta), temperature=float(temperature),
                student_logit_scale=float(student_logit_scale), teacher_logit_scale=float(teacher_logit_scale),
                student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping,
                backend=cls.backend)
        return out.divergence, out.student_entropy
