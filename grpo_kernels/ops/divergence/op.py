"""The divergence op's PyTorch custom ops (``torch.compile`` traces through them; meta tensors
give the output shapes) and their autograd. Three ops:

- ``grpo_kernels::fused_divergence``: the full-vocabulary divergence of one ``beta`` and the
  student's entropy, per row; backward: the student's gradients.
- ``grpo_kernels::divergence_topk_logprobs``: the student's (and, given a teacher head, the
  teacher's) full-vocabulary log-probs at ``k`` ids per row, and the student's entropy, in one
  pass; backward: the student's gradients through its log-probs. The top-k forms put
  ``topk.topk_divergence`` (plain differentiable torch) on top.
- ``grpo_kernels::divergence_student_topk``: the student's top-k ids (no gradient).

Arguments shared by all: 2-D row-contiguous hidden states, ``inv_temperature [N]`` float32 (one
over each row's temperature), ``row_mask [N]`` bool (rows computed; the others give 0 and no
gradient). Teacher inputs never get a gradient. Data-dependent checks (id ranges, temperature
values) run inside the ops, where ``torch.compile`` does not trace.
"""

from __future__ import annotations

from typing import Optional

import torch

from grpo_kernels.ops.divergence.drivers import BACKENDS
from grpo_kernels.ops.divergence.head import Head
from grpo_kernels.ops.divergence.kernels import FORWARD_KL, JSD, REVERSE_KL, TARGETS
from grpo_kernels.ops.divergence.topk import select_student_topk
from grpo_kernels.ops.utils import check_index_range

Tensor = torch.Tensor


def _check_inv_temperature(inv_temperature: Tensor) -> None:
    bad = ~(torch.isfinite(inv_temperature) & (inv_temperature > 0))
    if bool(bad.any()):
        raise ValueError(f"temperature must be finite and > 0 in every row; {int(bad.sum())} row(s) are not")


def _rows(row_mask: Tensor) -> Tensor:
    return row_mask.nonzero().squeeze(1).to(torch.int32)


def _kind(beta: float) -> int:
    return FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD


# ---------------------------------------------------------------------------------------------
# Full vocabulary
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("grpo_kernels::fused_divergence", mutates_args=())
def _divergence_op(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], inv_temperature: Tensor, row_mask: Tensor, beta: float,
    student_logit_scale: float, student_softcap: Optional[float], teacher_logit_scale: float,
    teacher_softcap: Optional[float], workspace_bytes: Optional[int], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """float32 ``[N]`` each: (divergence, student entropy, student lse, teacher lse, aux); aux is
    the KL that the backward's formula needs (the divergence itself for beta 0 or 1, KL(p_s || m)
    for the JSD). Only the divergence is differentiable; 0 on rows outside ``row_mask``."""
    _check_inv_temperature(inv_temperature)
    outputs = [student_hidden.new_zeros(student_hidden.shape[0], dtype=torch.float32) for _ in range(5)]
    rows = _rows(row_mask)
    if rows.numel() > 0:
        forward_fn, _ = BACKENDS[backend]
        student = Head(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap)
        teacher = Head(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap)
        stats = forward_fn(student, teacher, rows, inv_temperature, None, beta)
        divergence, aux = {FORWARD_KL: (stats.forward_kl, stats.forward_kl),
                           REVERSE_KL: (stats.reverse_kl, stats.reverse_kl),
                           JSD: (stats.jsd, stats.kl_student_mixture)}[_kind(beta)]
        index = rows.long()
        for out, value in zip(outputs, (divergence, stats.entropy, stats.student_lse, stats.teacher_lse, aux)):
            out[index] = value
    return tuple(outputs)


@_divergence_op.register_fake
def _divergence_fake(student_hidden, *args):
    return tuple(student_hidden.new_empty(student_hidden.shape[0], dtype=torch.float32) for _ in range(5))


@torch.library.custom_op("grpo_kernels::fused_divergence_backward", mutates_args=())
def _divergence_backward_op(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], inv_temperature: Tensor, row_mask: Tensor,
    student_lse: Tensor, teacher_lse: Tensor, aux: Tensor, grad_divergence: Tensor, beta: float,
    student_logit_scale: float, student_softcap: Optional[float], teacher_logit_scale: float,
    teacher_softcap: Optional[float], workspace_bytes: Optional[int], backend: str, need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d student hidden [N, D_s], d student weight [V, D_s] (or [0]), d student bias [V] (or [0]))."""
    grad = grad_divergence.float()
    rows = _rows(row_mask & (grad != 0))
    grad_hidden = torch.zeros_like(student_hidden)
    grad_weight = torch.zeros_like(student_weight) if need_weight else None
    grad_bias = torch.zeros(student_weight.shape[0], device=student_weight.device) if student_bias is not None \
        else None
    if rows.numel() > 0:
        _, backward_fn = BACKENDS[backend]
        index = rows.long()
        student = Head(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap)
        teacher = Head(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap)
        backward_fn(student, teacher, rows, inv_temperature, _kind(beta), beta, student_lse[index].contiguous(),
                    teacher_lse[index].contiguous(), aux[index].contiguous(), grad[index].contiguous(), None, None,
                    grad_hidden, grad_weight, grad_bias, workspace_bytes=workspace_bytes)
    return (grad_hidden, grad_weight if need_weight else student_hidden.new_empty(0),
            grad_bias.to(student_bias.dtype) if need_bias else student_hidden.new_empty(0))


@_divergence_backward_op.register_fake
def _divergence_backward_fake(student_hidden, student_weight, student_bias, *args):
    need_weight, need_bias = args[-2:]
    return (torch.empty_like(student_hidden),
            torch.empty_like(student_weight) if need_weight else student_hidden.new_empty(0),
            torch.empty_like(student_bias) if need_bias else student_hidden.new_empty(0))


def _divergence_setup(ctx, inputs, output):
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, inv_temperature,
     row_mask, *options) = inputs
    _, entropy, student_lse, teacher_lse, aux = output
    ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          inv_temperature, row_mask, student_lse, teacher_lse, aux)
    ctx.options = options  # beta, scales and soft-caps, workspace_bytes, backend
    ctx.mark_non_differentiable(entropy, student_lse, teacher_lse, aux)
    ctx.set_materialize_grads(False)


def _divergence_backward(ctx, grad_divergence, *unused):
    no_grads = (None,) * 15
    if grad_divergence is None:
        return no_grads
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = torch.ops.grpo_kernels.fused_divergence_backward(*ctx.saved_tensors, grad_divergence, *ctx.options,
                                                             need_weight, need_bias)
    return (grads[0] if need_hidden else None, grads[1] if need_weight else None,
            grads[2] if need_bias else None) + no_grads[3:]


_divergence_op.register_autograd(_divergence_backward, setup_context=_divergence_setup)


# ---------------------------------------------------------------------------------------------
# Log-probs at k ids (the top-k forms)
# ---------------------------------------------------------------------------------------------


def _kernel_ids(ids: Tensor, live: Tensor) -> Tensor:
    """[N, K] int32 ids for the drivers: entries not live become -1 (matches no logit)."""
    return torch.where(live, ids, -1).to(torch.int32).contiguous()


@torch.library.custom_op("grpo_kernels::divergence_topk_logprobs", mutates_args=())
def _topk_logprobs_op(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    ids: Tensor, live: Tensor, inv_temperature: Tensor, row_mask: Tensor, student_logit_scale: float,
    student_softcap: Optional[float], teacher_logit_scale: float, teacher_softcap: Optional[float],
    workspace_bytes: Optional[int], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ids ``[N, K]`` int32/int64 (entries where ``live [N, K]`` is False are not read). Returns
    float32 (student log-probs ``[N, K]``, student entropy ``[N]``, student lse ``[N]``, teacher
    log-probs ``[N, K]`` (``[N, 0]`` without a teacher head)); 0 for entries not live and rows
    outside ``row_mask``. Only the student's log-probs are differentiable."""
    _check_inv_temperature(inv_temperature)
    live = live & row_mask[:, None]
    check_index_range("teacher_topk_ids", torch.where(live, ids, 0), student_weight.shape[0])
    num_rows, num_ids = ids.shape
    has_teacher = teacher_hidden is not None
    student_logp = student_hidden.new_zeros((num_rows, num_ids), dtype=torch.float32)
    entropy = student_hidden.new_zeros(num_rows, dtype=torch.float32)
    student_lse = student_hidden.new_zeros(num_rows, dtype=torch.float32)
    teacher_logp = student_hidden.new_zeros((num_rows, num_ids if has_teacher else 0), dtype=torch.float32)
    rows = _rows(row_mask)
    if rows.numel() > 0:
        forward_fn, _ = BACKENDS[backend]
        student = Head(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap)
        teacher = Head(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap) \
            if has_teacher else None
        stats = forward_fn(student, teacher, rows, inv_temperature, _kernel_ids(ids, live), 0.0)
        index = rows.long()
        student_logp[index] = stats.student_id_logits - stats.student_lse[:, None]
        entropy[index] = stats.entropy
        student_lse[index] = stats.student_lse
        if has_teacher:
            teacher_logp[index] = stats.teacher_id_logits - stats.teacher_lse[:, None]
            teacher_logp.masked_fill_(~live, 0.0)
        student_logp.masked_fill_(~live, 0.0)
    return student_logp, entropy, student_lse, teacher_logp


@_topk_logprobs_op.register_fake
def _topk_logprobs_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        ids, *args):
    num_rows, num_ids = ids.shape
    return (student_hidden.new_empty((num_rows, num_ids), dtype=torch.float32),
            student_hidden.new_empty(num_rows, dtype=torch.float32),
            student_hidden.new_empty(num_rows, dtype=torch.float32),
            student_hidden.new_empty((num_rows, num_ids if teacher_hidden is not None else 0), dtype=torch.float32))


@torch.library.custom_op("grpo_kernels::divergence_topk_logprobs_backward", mutates_args=())
def _topk_logprobs_backward_op(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], ids: Tensor, live: Tensor,
    inv_temperature: Tensor, row_mask: Tensor, student_lse: Tensor, grad_student_logp: Tensor,
    student_logit_scale: float, student_softcap: Optional[float], workspace_bytes: Optional[int], backend: str,
    need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's gradients of <grad_student_logp, student log-probs at ids>."""
    live = live & row_mask[:, None]
    grad = torch.where(live, grad_student_logp.float(), 0.0)
    rows = _rows((grad != 0).any(dim=1))
    grad_hidden = torch.zeros_like(student_hidden)
    grad_weight = torch.zeros_like(student_weight) if need_weight else None
    grad_bias = torch.zeros(student_weight.shape[0], device=student_weight.device) if student_bias is not None \
        else None
    if rows.numel() > 0:
        _, backward_fn = BACKENDS[backend]
        index = rows.long()
        student = Head(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap)
        backward_fn(student, None, rows, inv_temperature, TARGETS, 0.0, student_lse[index].contiguous(), None, None,
                    grad[index].sum(dim=1), _kernel_ids(ids, live), grad[index].contiguous(), grad_hidden,
                    grad_weight, grad_bias, workspace_bytes=workspace_bytes)
    return (grad_hidden, grad_weight if need_weight else student_hidden.new_empty(0),
            grad_bias.to(student_bias.dtype) if need_bias else student_hidden.new_empty(0))


@_topk_logprobs_backward_op.register_fake
def _topk_logprobs_backward_fake(student_hidden, student_weight, student_bias, *args):
    need_weight, need_bias = args[-2:]
    return (torch.empty_like(student_hidden),
            torch.empty_like(student_weight) if need_weight else student_hidden.new_empty(0),
            torch.empty_like(student_bias) if need_bias else student_hidden.new_empty(0))


def _topk_setup(ctx, inputs, output):
    (student_hidden, student_weight, student_bias, _, _, _, ids, live, inv_temperature, row_mask,
     student_logit_scale, student_softcap, _, _, workspace_bytes, backend) = inputs
    _, entropy, student_lse, teacher_logp = output
    ctx.save_for_backward(student_hidden, student_weight, student_bias, ids, live, inv_temperature, row_mask,
                          student_lse)
    ctx.options = (student_logit_scale, student_softcap, workspace_bytes, backend)
    ctx.mark_non_differentiable(entropy, student_lse, teacher_logp)
    ctx.set_materialize_grads(False)


def _topk_backward(ctx, grad_student_logp, *unused):
    no_grads = (None,) * 16
    if grad_student_logp is None:
        return no_grads
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = torch.ops.grpo_kernels.divergence_topk_logprobs_backward(*ctx.saved_tensors, grad_student_logp,
                                                                     *ctx.options, need_weight, need_bias)
    return (grads[0] if need_hidden else None, grads[1] if need_weight else None,
            grads[2] if need_bias else None) + no_grads[3:]


_topk_logprobs_op.register_autograd(_topk_backward, setup_context=_topk_setup)


# ---------------------------------------------------------------------------------------------
# The student's top-k ids
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("grpo_kernels::divergence_student_topk", mutates_args=())
def _student_topk_op(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                     inv_temperature: Tensor, row_mask: Tensor, k: int, student_logit_scale: float,
                     student_softcap: Optional[float]) -> Tensor:
    """``[N, k]`` int32: each row's k most likely ids under the student (ties: lower id first),
    -1 on rows outside ``row_mask``."""
    _check_inv_temperature(inv_temperature)
    student = Head(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap)
    return student_topk_ids(student, _rows(row_mask), inv_temperature, k)


@_student_topk_op.register_fake
def _student_topk_fake(student_hidden, student_weight, student_bias, inv_temperature, row_mask, k, *args):
    return student_hidden.new_empty((student_hidden.shape[0], k), dtype=torch.int32)


def student_topk_ids(student: Head, rows: Tensor, inv_temperature: Tensor, k: int) -> Tensor:
    """Where the student's top-k ids come from: the chunked PyTorch selection of ``topk`` until
    ``token_logprobs`` computes a top-k in its own pass (issue 19, item 3)."""
    return select_student_topk(student, rows, inv_temperature, k)
