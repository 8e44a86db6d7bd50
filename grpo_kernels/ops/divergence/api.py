"""The public entry point :func:`fused_divergence` and its argument checks: the top layer of the
package (nothing below imports it)."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from grpo_kernels.ops.divergence import op as _op  # noqa: F401  (registers the custom ops)
from grpo_kernels.ops.divergence.topk import TAILS, topk_divergence
from grpo_kernels.ops.logprobs.op import SOFTCAP_RANGE, check_backward_options
from grpo_kernels.ops.utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_positive_finite,
    check_same_device,
    check_tensor,
    resolve_backend,
)

MODES = ("full", "teacher_topk", "student_topk")
# The largest student top-k: that of token_logprobs' own top-k (issue 19, item 3).
MAX_STUDENT_TOPK = 64


class DivergenceOutput(NamedTuple):
    """:func:`fused_divergence`'s result; shapes are hidden's leading shape ``[...]``."""

    divergence: torch.Tensor  # [...] float32, differentiable w.r.t. the student's hidden, weight, bias
    student_entropy: torch.Tensor  # [...] float32, no gradient
    student_topk_mass: Optional[torch.Tensor] = None  # [...] top-k forms: sum of p_s over the support
    teacher_topk_mass: Optional[torch.Tensor] = None  # [...] top-k forms: sum of p_t over the support
    topk_ids: Optional[torch.Tensor] = None  # [..., k] int32, mode="student_topk": the support (-1: masked row)


def _check_head(prefix: str, hidden, weight, bias, lead_shape=None):
    check_tensor(f"{prefix}_hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(f"{prefix}_weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if bias is not None:
        check_tensor(f"{prefix}_bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    for name, tensor in ((f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from {prefix}_hidden dtype {hidden.dtype}: cast "
                            f"one (the student's gradient flows back to the original)")
    vocab, dim = weight.shape
    if vocab == 0 or dim == 0:
        raise ValueError(f"{prefix}_weight must be [V, D] with V, D > 0, got {tuple(weight.shape)}")
    if hidden.shape[-1] != dim:
        raise ValueError(f"{prefix}_hidden last dim {hidden.shape[-1]} != {prefix}_weight dim {dim} (weight is [V, D])")
    if lead_shape is not None and tuple(hidden.shape[:-1]) != lead_shape:
        raise ValueError(f"{prefix}_hidden leading shape {tuple(hidden.shape[:-1])} must equal student_hidden's "
                         f"{lead_shape} (one row per token)")
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"{prefix}_bias has {bias.shape[0]} entries, {prefix}_weight has V={vocab} rows")


def _check_number(name: str, value, low: float, high: float) -> float:
    """``value`` as a float in ``[low, high]``: a real number (as ``check_positive_finite`` takes:
    never a bool, a string or a tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _inv_temperature(temperature, student_hidden) -> torch.Tensor:
    """[N] float32 1 / temperature (values checked inside the op)."""
    lead_shape = tuple(student_hidden.shape[:-1])
    num_rows = math.prod(lead_shape)
    if isinstance(temperature, torch.Tensor):
        check_tensor("temperature", temperature, dtypes=FLOAT_DTYPES)
        if tuple(temperature.shape) != lead_shape:
            raise ValueError(f"temperature tensor shape {tuple(temperature.shape)} must be hidden's leading shape "
                             f"{lead_shape} (one temperature per row)")
        check_same_device(student_hidden=student_hidden, temperature=temperature)
        return 1.0 / temperature.detach().reshape(num_rows).float()
    # 1 / T in double, rounded once to float32: what TRL's kernels multiply by
    return torch.full((num_rows,), 1.0 / check_positive_finite("temperature", temperature),
                      device=student_hidden.device, dtype=torch.float32)


def _row_mask(mask, student_hidden) -> torch.Tensor:
    """[N] bool: the rows computed (``mask != 0``; all without a mask)."""
    lead_shape = tuple(student_hidden.shape[:-1])
    num_rows = math.prod(lead_shape)
    if mask is None:
        return torch.ones(num_rows, device=student_hidden.device, dtype=torch.bool)
    check_tensor("mask", mask)
    if tuple(mask.shape) != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must be hidden's leading shape {lead_shape}")
    check_same_device(student_hidden=student_hidden, mask=mask)
    return (mask.reshape(num_rows) != 0).detach()


def _check_teacher_inputs(mode, topk, lead_shape, vocab, teacher_hidden, teacher_weight, teacher_bias,
                          teacher_topk_ids, teacher_topk_logprobs) -> None:
    """The teacher's inputs and ``topk`` fit ``mode``: a teacher head for ``"full"`` and
    ``"student_topk"`` (with ``topk``), the teacher's top-k for ``"teacher_topk"``."""
    has_teacher_head = any(t is not None for t in (teacher_hidden, teacher_weight, teacher_bias))
    has_teacher_topk = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if mode == "teacher_topk":
        if has_teacher_head:
            raise ValueError("mode='teacher_topk' takes teacher_topk_ids and teacher_topk_logprobs, not a teacher "
                             "head (teacher_hidden/teacher_weight/teacher_bias)")
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("mode='teacher_topk' needs teacher_topk_ids and teacher_topk_logprobs ([..., k] each)")
        check_tensor("teacher_topk_ids", teacher_topk_ids, dtypes=INDEX_DTYPES)
        check_tensor("teacher_topk_logprobs", teacher_topk_logprobs, dtypes=FLOAT_DTYPES)
        for name, tensor in (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs)):
            if tensor.dim() != len(lead_shape) + 1 or tuple(tensor.shape[:-1]) != lead_shape or tensor.shape[-1] == 0:
                raise ValueError(f"{name} shape {tuple(tensor.shape)} must be hidden's leading shape {lead_shape} "
                                 f"+ (k,) with k >= 1")
        if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
            raise ValueError(f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
                             f"{tuple(teacher_topk_logprobs.shape)} must have the same shape")
        if topk is not None and topk != teacher_topk_ids.shape[-1]:
            raise ValueError(f"topk={topk!r} differs from teacher_topk_ids' k={teacher_topk_ids.shape[-1]} (leave "
                             f"topk None with mode='teacher_topk')")
    else:
        if has_teacher_topk:
            raise ValueError(f"teacher_topk_ids/teacher_topk_logprobs are for mode='teacher_topk', not {mode!r}")
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(f"mode={mode!r} needs the teacher head: teacher_hidden and teacher_weight")
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, lead_shape)
        if teacher_weight.shape[0] != vocab:
            raise ValueError(f"teacher_weight has V={teacher_weight.shape[0]} rows, student_weight V={vocab}: the "
                             f"vocabularies must be the same")
    if mode == "student_topk":
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= min(MAX_STUDENT_TOPK, vocab):
            raise ValueError(f"mode='student_topk' needs topk, an int in [1, {min(MAX_STUDENT_TOPK, vocab)}], "
                             f"got {topk!r}")
    elif mode == "full" and topk is not None:
        raise ValueError("topk is for mode='student_topk' (the teacher's k comes from teacher_topk_ids)")


def _rows_2d(hidden: torch.Tensor) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _contiguous(tensor):
    if tensor is None:
        return None
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()



def _check_softcap(name, softcap):
    """None, or a normal float32 (the logits are float32: 1e300 would become inf, a NaN divergence)."""
    if softcap is None:
        return None
    softcap = check_positive_finite(name, softcap)
    if not SOFTCAP_RANGE[0] <= softcap <= SOFTCAP_RANGE[1]:
        raise ValueError(f"{name} must be a normal float32, in [2**-126, {SOFTCAP_RANGE[1]:.7g}] (the logits are "
                         f"float32), got {softcap:.7g}; a cap beyond the logits' size (e.g. 1e30) is no cap")
    return softcap


def fused_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    mode: str = "full",
    topk: int | None = None,
    beta: float = 0.0,
    temperature: float | torch.Tensor = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    mask: torch.Tensor | None = None,
    topk_tail: str = "bucket",
    workspace_bytes: int | None = None,
    backend: str = "auto",
) -> DivergenceOutput:
    """Per-token distillation divergence between a student's and a teacher's next-token
    distributions, and the student's entropy, from hidden states: neither model's ``[N, V]``
    logits are stored. Gradients go to the student only (hidden, weight, bias).

    Each head's logits are ``z = softcap * tanh(scale * (hidden @ weight.T + bias) / softcap) / T``
    (``scale * (...) / T`` without a soft-cap; TRL's ``ChunkedDivergenceFunction`` order), with
    the same temperature ``T`` (per row, if a tensor) for both; ``p_s = softmax(z_s)``,
    ``p_t = softmax(z_t)``.

    ``beta`` picks the divergence, on the categories of the mode: 0 forward KL(p_t || p_s),
    1 reverse KL(p_s || p_t), in between the generalized JSD
    ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = (1 - beta) p_s + beta p_t``.

    Modes (definitions and where TRL and verl differ: docs/semantics.md, "Distillation divergences"):

    - ``"full"``: over the whole vocabulary (TRL's ``ChunkedDivergenceFunction``); needs the teacher
      head (``teacher_hidden``, ``teacher_weight``, optional ``teacher_bias``).
    - ``"teacher_topk"``: over the teacher's top-k ids ``teacher_topk_ids [..., k]`` with the
      teacher's log-probs there, ``teacher_topk_logprobs [..., k]`` (full-vocabulary log-probs, as
      a vLLM server returns them, used as given: the temperature applies to the student only;
      entries of ``-inf`` are absent), plus a tail bucket (``topk_tail="bucket"``) or renormalized
      over the ids (``"renormalize"``). With ``beta=0``: TRL's server-distillation forward KL (verl's
      truncated top-k sum plus the tail's term).
    - ``"student_topk"``: over the student's own top-``topk`` ids (ties: the lower id), with the
      teacher head's log-probs at them; tail as above. With ``beta=1``: the reverse KL on the
      student's top-k (verl #7590). No gradient flows through the choice of ids.

    Args:
        student_hidden: ``[..., D_s]`` bf16/fp16/fp32. student_weight ``[V, D_s]``, student_bias
            ``[V]``: same dtype.
        teacher_hidden, teacher_weight, teacher_bias: ``[..., D_t]``, ``[V, D_t]``, ``[V]``, any one
            float dtype (may differ from the student's, as may ``D_t``); constants (no gradient).
        teacher_topk_ids, teacher_topk_logprobs: ``[..., k]`` int32/int64 and float, for
            ``mode="teacher_topk"``.
        mode: ``"full"``, ``"teacher_topk"`` or ``"student_topk"``.
        topk: ``mode="student_topk"``: k in ``[1, min(64, V)]``.
        beta: in ``[0, 1]``.
        temperature: a float > 0, or a tensor of hidden's leading shape (per-token temperature).
        student_softcap, teacher_softcap: Gemma's ``final_logit_softcapping`` (a normal float32 > 0:
            2**-126 to 3.4e38) or None.
        student_logit_scale, teacher_logit_scale: finite > 0 multipliers before the soft-cap
            (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``).
        mask: optional ``[...]`` (bool or numbers): rows where it is 0 give divergence 0, entropy 0
            and no gradient (and cost nothing).
        topk_tail: ``"bucket"`` (default) or ``"renormalize"``, for the top-k modes.
        workspace_bytes: the backward's scratch budget (as in :func:`token_logprobs`; default 256 MiB).
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else chunked torch),
            ``"triton"`` or ``"torch"``.

    Returns:
        :class:`DivergenceOutput`: ``divergence`` and ``student_entropy`` (float32, hidden's
        leading shape); for the top-k modes also ``student_topk_mass`` and ``teacher_topk_mass``
        (the probability on the support before the tail bucket, verl's metrics), and for
        ``"student_topk"`` the ids (``topk_ids``). ``torch.compile(fullgraph=True)`` traces
        through it (custom ops ``torch.ops.grpo_kernels.fused_divergence``,
        ``divergence_topk_logprobs``, ``divergence_student_topk``); meta tensors give the shapes.
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_head("student", student_hidden, student_weight, student_bias)
    lead_shape = tuple(student_hidden.shape[:-1])
    num_rows = math.prod(lead_shape)
    if num_rows == 0:
        raise ValueError("empty batch: student_hidden has no rows")
    _check_teacher_inputs(mode, topk, lead_shape, student_weight.shape[0], teacher_hidden, teacher_weight,
                          teacher_bias, teacher_topk_ids, teacher_topk_logprobs)
    if not isinstance(topk_tail, str) or topk_tail not in TAILS:
        raise ValueError(f"topk_tail must be one of {TAILS}, got {topk_tail!r}")
    beta = _check_number("beta", beta, 0.0, 1.0)
    student_logit_scale = check_positive_finite("student_logit_scale", student_logit_scale)
    teacher_logit_scale = check_positive_finite("teacher_logit_scale", teacher_logit_scale)
    student_softcap = _check_softcap("student_softcap", student_softcap)
    teacher_softcap = _check_softcap("teacher_softcap", teacher_softcap)
    check_backward_options("workspace", workspace_bytes, False)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                      teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs)
    device = student_hidden.device
    backend = resolve_backend(device, backend)
    inv_temperature = _inv_temperature(temperature, student_hidden)
    row_mask = _row_mask(mask, student_hidden)
    student = (_rows_2d(student_hidden), _contiguous(student_weight), _contiguous(student_bias))
    teacher = (None, None, None) if mode == "teacher_topk" else \
        (_rows_2d(teacher_hidden), _contiguous(teacher_weight), _contiguous(teacher_bias))
    caps = (student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap)

    if mode == "full":
        divergence, entropy, *_ = torch.ops.grpo_kernels.fused_divergence(
            *student, *teacher, inv_temperature, row_mask, beta, *caps, workspace_bytes, backend)
        return DivergenceOutput(divergence.view(lead_shape), entropy.view(lead_shape))

    if mode == "teacher_topk":
        k = teacher_topk_ids.shape[-1]
        ids = teacher_topk_ids.reshape(num_rows, k)
        teacher_logp = teacher_topk_logprobs.detach().reshape(num_rows, k)
        live = (teacher_logp > -math.inf) & row_mask[:, None]
        topk_ids = None
    else:
        k = topk
        ids = torch.ops.grpo_kernels.divergence_student_topk(*student, inv_temperature, row_mask, k,
                                                             student_logit_scale, student_softcap)
        live = ids >= 0
        topk_ids = ids.view(*lead_shape, k)
    student_logp, entropy, _, head_teacher_logp = torch.ops.grpo_kernels.divergence_topk_logprobs(
        *student, *teacher, ids, live, inv_temperature, row_mask, *caps, workspace_bytes, backend)
    if mode == "student_topk":
        teacher_logp = head_teacher_logp
    divergence, student_mass, teacher_mass = topk_divergence(student_logp, teacher_logp, live, beta, topk_tail)
    divergence = torch.where(row_mask, divergence, 0.0)
    return DivergenceOutput(divergence.view(lead_shape), entropy.view(lead_shape), student_mass.view(lead_shape),
                            teacher_mass.view(lead_shape), topk_ids)
