"""The Triton drivers of the divergence op, and ``BACKENDS`` (backend name -> (forward,
backward)); the chunked PyTorch drivers of ``torch_path`` have the same interface.

forward(student, teacher, rows, inv_temp, ids, beta) -> head.ForwardStats
backward(student, teacher, rows, inv_temp, kind, beta, student_lse, teacher_lse, aux, grad_row,
         ids, grad_logp, grad_hidden, grad_weight, grad_bias, workspace_bytes) -> None
"""

from __future__ import annotations

import math

import torch
import triton

from grpo_kernels.ops.divergence import launch
from grpo_kernels.ops.divergence.head import ForwardStats, Head, logits_at_ids
from grpo_kernels.ops.divergence.kernels import (
    JSD,
    NUM_STATES,
    TARGETS,
    _divergence_dlogits_kernel,
    _divergence_fwd_kernel,
    _divergence_jsd_kernel,
    _divergence_merge_kernel,
    _split_sum_kernel,
)
from grpo_kernels.ops.divergence.torch_path import torch_backward, torch_forward
from grpo_kernels.ops.logprobs.launch import BACKWARD_GROUP_ROWS, FORWARD_GROUP_ROWS, FORWARD_PARTIAL_BYTES
from grpo_kernels.ops.logprobs.workspace import dlogits_gemm_backward


def _head_args(head: Head | None, stand_in: Head):
    """(pointer arguments, scalar arguments) of a head for the kernels; a missing head (the
    top-k forms have no teacher tile) passes ``stand_in``'s tensors, which the kernels never read."""
    if head is None:
        return (stand_in.hidden, stand_in.weight, stand_in.hidden), (1.0, 1.0, 0, 0)
    pointers = (head.hidden, head.weight, head.bias if head.bias is not None else head.hidden)
    scalars = (float(head.logit_scale), float(head.softcap or 1.0), int(head.bias is not None),
               int(head.softcap is not None))
    return pointers, scalars


def _mixture_logs(beta: float) -> tuple[float, float, float]:
    """(beta, log beta, log(1 - beta)) for the JSD kernels (0 outside (0, 1), where unused)."""
    if 0.0 < beta < 1.0:
        return float(beta), math.log(beta), math.log1p(-beta)
    return float(beta), 0.0, 0.0


def triton_forward(student: Head, teacher: Head | None, rows: torch.Tensor, inv_temp: torch.Tensor,
                   ids: torch.Tensor | None, beta: float) -> ForwardStats:
    """Triton forward over the compacted ``rows [M]`` int32; see ``torch_path.torch_forward``."""
    num_rows, vocab = rows.numel(), student.weight.shape[0]
    device, dtype = student.hidden.device, student.hidden.dtype
    device_type = device.type
    teacher_dtype = teacher.hidden.dtype if teacher is not None else None
    block_n, block_v, block_d, num_warps, num_stages = launch.launch_config("fwd", dtype, teacher_dtype, device_type)
    merge_n, _, _, merge_warps, merge_stages = launch.launch_config("merge", dtype, teacher_dtype, device_type)
    vocab_per_split, splits = launch.forward_splits(num_rows, vocab, dtype, device_type, batch_invariant=True)
    has_teacher = teacher is not None
    (sh, sw, sb), s_scalars = _head_args(student, student)
    (th, tw, tb), t_scalars = _head_args(teacher, student)
    scalars = (*s_scalars[:2], *t_scalars[:2], s_scalars[2], s_scalars[3], t_scalars[2], t_scalars[3])
    tiles = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_DS": block_d, "BLOCK_DT": block_d,
             "GROUP_N": FORWARD_GROUP_ROWS, "S_DOT_PRECISION": launch.dot_precision(dtype),
             "T_DOT_PRECISION": launch.dot_precision(th.dtype), "INTERPRETER": device_type != "cuda",
             "num_warps": num_warps, "num_stages": num_stages}

    def vector():
        return torch.empty(num_rows, device=device, dtype=torch.float32)

    student_lse, entropy = vector(), vector()
    teacher_lse, forward_kl, reverse_kl = (vector(), vector(), vector()) if has_teacher else (None, None, None)
    # Row chunks bound the partial states; a row's result does not depend on its chunk.
    row_chunk = max(block_n, FORWARD_PARTIAL_BYTES // (4 * NUM_STATES * splits) // block_n * block_n)
    for start in range(0, num_rows, row_chunk):
        sl = slice(start, start + row_chunk)
        chunk_rows = rows[sl]
        count = chunk_rows.numel()
        part = torch.empty((NUM_STATES if has_teacher else 3, count, splits), device=device, dtype=torch.float32)
        _divergence_fwd_kernel[(triton.cdiv(count, block_n) * splits,)](
            sh, sw, sb, th, tw, tb, inv_temp, chunk_rows, part, count, vocab, sh.shape[1], th.shape[1],
            sh.stride(0), sw.stride(0), th.stride(0), tw.stride(0), *scalars, vocab_per_split, splits,
            HAS_TEACHER=has_teacher, **tiles)
        unused = student_lse[sl]
        _divergence_merge_kernel[(triton.cdiv(count, merge_n),)](
            part, student_lse[sl], entropy[sl], teacher_lse[sl] if has_teacher else unused,
            forward_kl[sl] if has_teacher else unused, reverse_kl[sl] if has_teacher else unused, count, splits,
            BLOCK_N=merge_n, HAS_TEACHER=has_teacher, num_warps=merge_warps, num_stages=merge_stages)

    stats = {"student_lse": student_lse, "entropy": entropy}
    if ids is not None:
        stats["student_id_logits"] = logits_at_ids(student, rows, ids, inv_temp)
        if has_teacher:
            stats["teacher_id_logits"] = logits_at_ids(teacher, rows, ids, inv_temp)
    if has_teacher:
        stats.update(teacher_lse=teacher_lse, forward_kl=forward_kl, reverse_kl=reverse_kl)
        if 0.0 < beta < 1.0:
            stats["jsd"], stats["kl_student_mixture"] = _jsd_pass(
                (sh, sw, sb, th, tw, tb), scalars, rows, inv_temp, student_lse, teacher_lse, beta, vocab_per_split,
                splits, dtype, teacher_dtype)
    return ForwardStats(**stats)


def _jsd_pass(pointers, scalars, rows, inv_temp, student_lse, teacher_lse, beta, vocab_per_split, splits, dtype,
              teacher_dtype):
    """(JSD, KL(p_s || m)) per compacted row: the second pass, then the ordered sum of its splits."""
    num_rows, device = rows.numel(), rows.device
    vocab, (sh, _, _, th, _, _) = pointers[1].shape[0], pointers
    block_n, block_v, block_d, num_warps, num_stages = launch.launch_config("jsd", dtype, teacher_dtype, device.type)
    merge_n, _, _, merge_warps, merge_stages = launch.launch_config("merge", dtype, teacher_dtype, device.type)
    sums = torch.empty((2, num_rows), device=device, dtype=torch.float32)
    row_chunk = max(block_n, FORWARD_PARTIAL_BYTES // (8 * splits) // block_n * block_n)
    for start in range(0, num_rows, row_chunk):
        sl = slice(start, start + row_chunk)
        chunk_rows = rows[sl]
        count = chunk_rows.numel()
        part = torch.empty((2, count, splits), device=device, dtype=torch.float32)
        _divergence_jsd_kernel[(triton.cdiv(count, block_n) * splits,)](
            *pointers, inv_temp, chunk_rows, student_lse[sl], teacher_lse[sl], part, count, vocab, sh.shape[1],
            th.shape[1], sh.stride(0), pointers[1].stride(0), th.stride(0), pointers[4].stride(0), *scalars,
            *_mixture_logs(beta), vocab_per_split, splits,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_DS=block_d, BLOCK_DT=block_d, GROUP_N=FORWARD_GROUP_ROWS,
            S_DOT_PRECISION=launch.dot_precision(dtype), T_DOT_PRECISION=launch.dot_precision(th.dtype),
            INTERPRETER=device.type != "cuda", num_warps=num_warps, num_stages=num_stages)
        chunk_sums = torch.empty((2, count), device=device, dtype=torch.float32)
        _split_sum_kernel[(triton.cdiv(count, merge_n),)](
            part, chunk_sums, count, splits, NUM_SUMS=2, BLOCK_N=merge_n, num_warps=merge_warps,
            num_stages=merge_stages)
        sums[:, sl] = chunk_sums
    return sums.unbind(0)


def triton_backward(student: Head, teacher: Head | None, rows, inv_temp, kind: int, beta: float, student_lse,
                    teacher_lse, aux, grad_row, ids, grad_logp, grad_hidden, grad_weight, grad_bias,
                    workspace_bytes=None) -> None:
    """Writes the student's gradients of the compacted ``rows [M]`` (int32).

    ``kind``: a ``kernels`` KIND. student_lse, teacher_lse, aux (the KL that the kind's formula
    subtracts), grad_row: ``[M]`` float32 (teacher_lse/aux None where the kind needs none; for
    TARGETS grad_row is ``sum_k grad_logp``); ids ``[N, K]`` int32 and grad_logp ``[M, K]`` for
    TARGETS. grad_hidden ``[N, D]`` (its rows written), grad_weight ``[V, D]`` or None (written),
    grad_bias ``[V]`` float32 or None (added to). The workspace backward of the log-prob package
    (``logprobs.workspace.dlogits_gemm_backward``) with this package's d-logits kernel: d logits
    into a bounded buffer, then cuBLAS GEMMs, no floating-point atomics.
    """
    dtype, device_type = student.hidden.dtype, student.hidden.device.type
    teacher = teacher if kind != TARGETS else None
    teacher_dtype = teacher.hidden.dtype if teacher is not None else None
    block_n, block_v, block_d, num_warps, num_stages = launch.launch_config("dlogits", dtype, teacher_dtype,
                                                                            device_type)
    (sh, sw, sb), s_scalars = _head_args(student, student)
    (th, tw, tb), t_scalars = _head_args(teacher, student)
    num_ids = ids.shape[1] if kind == TARGETS else 0
    ids_arg = ids if kind == TARGETS else rows
    unused = student_lse
    mixture = _mixture_logs(beta) if kind == JSD else (float(beta), 0.0, 0.0)
    constexprs = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_DS": block_d, "BLOCK_DT": block_d,
                  "GROUP_N": BACKWARD_GROUP_ROWS, "KIND": kind,
                  "S_DOT_PRECISION": launch.dot_precision(dtype), "T_DOT_PRECISION": launch.dot_precision(th.dtype),
                  "INTERPRETER": device_type != "cuda", "num_warps": num_warps, "num_stages": num_stages}

    def write_dlogits(dlogits, bias_partial, r0, r1, v0, v1):
        count = r1 - r0
        grid = (triton.cdiv(count, block_n) * triton.cdiv(v1 - v0, block_v),)
        _divergence_dlogits_kernel[grid](
            sh, sw, sb, th, tw, tb, inv_temp, rows[r0:r1], ids_arg, student_lse[r0:r1],
            teacher_lse[r0:r1] if teacher_lse is not None else unused,
            aux[r0:r1] if aux is not None else unused, grad_row[r0:r1],
            grad_logp[r0:r1] if grad_logp is not None else unused,
            dlogits, bias_partial if bias_partial is not None else unused,
            count, v0, v1, sh.shape[1], th.shape[1], num_ids, sh.stride(0), sw.stride(0), th.stride(0),
            tw.stride(0), ids_arg.stride(0), dlogits.stride(0), *s_scalars[:2], *t_scalars[:2], s_scalars[2],
            s_scalars[3], t_scalars[2], t_scalars[3], *mixture, **constexprs)

    dlogits_gemm_backward(sh, sw, rows, grad_hidden, grad_weight, grad_bias, write_dlogits,
                          has_bias=student.bias is not None, workspace_bytes=workspace_bytes, tiles=(block_n, block_v))


# backend name -> (forward driver, backward driver)
BACKENDS = {"triton": (triton_forward, triton_backward), "torch": (torch_forward, torch_backward)}
