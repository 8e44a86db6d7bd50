"""Per-token log-probs and entropy straight from hidden states and the LM head.

For every row ``n`` with hidden state ``h_n`` and target token ``y_n``::

    z_n      = (h_n @ weight.T + bias) / temperature        # [V] logits, never stored whole
    logp_n   = z_n[y_n] - logsumexp(z_n)
    entropy_n = logsumexp(z_n) - sum_v softmax(z_n)_v * z_n[v]

The forward streams the vocabulary through on-chip tiles (``tl.dot`` of ``[BLOCK_N, BLOCK_D]``
hidden by ``[BLOCK_D, BLOCK_V]`` weight tiles), keeps an online logsumexp and an online
``sum p (z - max)`` for the entropy, gathers the target logit, and stores O(N) state only. The
vocabulary may be split across programs (for parallelism when N is small); the per-split
partial states are merged with a few O(N) torch ops.

The backward recomputes each ``[BLOCK_N, BLOCK_V]`` logit tile, forms ::

    d z = (g_logp * (onehot(y) - p) - g_ent * p * (z - sum_v p_v z_v)) / temperature

on chip, and adds ``d z @ W`` into ``d hidden`` and ``d z^T @ h`` into ``d weight`` with atomic
adds (Cut Cross-Entropy's scheme), so no ``[N, V]`` buffer ever exists. ``d hidden`` is
accumulated in float32 over row chunks of bounded size; ``d weight`` is accumulated in the
weight's dtype (a float32 ``[V, D]`` buffer would cost twice the gradient itself). Rows that are
ignored or whose incoming gradient is zero are compacted away before the launch and cost nothing.

On CPU tensors the same Triton kernels run under ``TRITON_INTERPRET=1``; otherwise a chunked
PyTorch path computes the same thing, never holding more than a row chunk of logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.ops.logprobs_torch import torch_backward, torch_forward
from grpo_kernels.ops.utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    TRITON_DTYPE,
    CompileSpec,
    check_index_range,
    check_positive_finite,
    check_same_device,
    check_tensor,
    resolve_backend,
    triton_interpreter_enabled,
)

# float32 gradient accumulator per backward launch (rows, or vocabulary ids, in chunks that fit).
_GRAD_CHUNK_BYTES = 32 * 2**20


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    if INTERPRETER:
        # Triton's CPU interpreter computes bf16/fp16 dots wrongly; products of 16-bit floats
        # are exact in float32, so upcasting gives what the tensor cores give.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(
    Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """z = (h[rows] @ W[offs_v].T + b[offs_v]) / T as a [BLOCK_N, BLOCK_V] float32 tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_ptrs = Hidden + rows.to(tl.int64)[:, None] * stride_h
    w_ptrs = Weight + offs_v.to(tl.int64)[None, :] * stride_w
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        h = tl.load(h_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_d[:, None], mask=v_ok[None, :] & d_ok[:, None], other=0.0)
        acc = _dot(h, w, acc, DOT_PRECISION, INTERPRETER)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _logprobs_fwd_kernel(
    Hidden, Weight, Bias, Targets, RowIdx,
    PartMax, PartSum, PartEnt, PartTarget,
    M, V, D, stride_h, stride_w, inv_temp, vocab_per_split, num_splits,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """One program: BLOCK_N rows x one vocabulary split. Writes per-split partial states
    (running max, sum of exp(z - max), sum of exp(z - max) * (z - max), target logit)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    targets = tl.load(Targets + rows, mask=row_ok, other=-1)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # sum_v exp(z - run_max) * (z - run_max): shift-invariant form of sum p z, so that the
    # entropy does not cancel catastrophically when |z| ~ 1e4.
    run_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        z = _logit_tile(Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w,
                        inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_PRECISION, INTERPRETER)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        z_shift = tl.where(v_ok[None, :], z - new_max[:, None], 0.0)
        p = tl.where(v_ok[None, :], tl.exp(z_shift), 0.0)
        if COMPUTE_ENTROPY:
            # re-base the old sum to the new max: sum e^{z-m'}(z-m') = r * (sum e^{z-m}(z-m) + s (m-m'))
            shift = tl.where(run_sum > 0, run_max - new_max, 0.0)
            run_ent = rescale * (run_ent + run_sum * shift) + tl.sum(p * z_shift, axis=1)
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        run_max = new_max
        is_target = offs_v[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)

    out = offs_m * num_splits + pid_s
    tl.store(PartMax + out, run_max, mask=row_ok)
    tl.store(PartSum + out, run_sum, mask=row_ok)
    tl.store(PartTarget + out, target_logit, mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(PartEnt + out, run_ent, mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(
    Hidden, Weight, Bias, Targets, RowIdx, Lse, MeanLogit, GradLogp, GradEnt,
    GradHidden, GradWeight, GradBias,
    M, v_begin, v_end, D, stride_h, stride_w, stride_gh, stride_gw, inv_temp, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, ENTROPY_GRAD: tl.constexpr, HIDDEN_GRAD: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One program: a [BLOCK_N, BLOCK_V] tile of d logits, scattered into d hidden and/or d weight.

    Covers the M compacted rows x vocabulary ids [v_begin, v_end). GradHidden is indexed by the
    compacted row position ``offs_m``; GradWeight by ``offs_v - v_begin`` (so that it can be a
    chunk buffer); hidden/targets by the original row ``rows``. With HIDDEN_GRAD the bias
    gradient is added too. The row-block index varies fastest inside groups of GROUP_N row
    blocks, so that programs running together share weight tiles in L2.
    """
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(M, BLOCK_N)
    num_v_blocks = tl.cdiv(v_end - v_begin, BLOCK_V)
    per_group = GROUP_N * num_v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(num_n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    offs_v = v_begin + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < v_end

    z = _logit_tile(Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w,
                    inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_PRECISION, INTERPRETER)
    lse = tl.load(Lse + offs_m, mask=row_ok, other=0.0)
    grad_logp = tl.load(GradLogp + offs_m, mask=row_ok, other=0.0)
    targets = tl.load(Targets + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    # d logp / d z = onehot - p ; d entropy / d z = -p (z - E_p[z])
    coeff = grad_logp[:, None]
    if ENTROPY_GRAD:
        grad_ent = tl.load(GradEnt + offs_m, mask=row_ok, other=0.0)
        mean_logit = tl.load(MeanLogit + offs_m, mask=row_ok, other=0.0)
        coeff += grad_ent[:, None] * (z - mean_logit[:, None])
    grad_z = tl.where(offs_v[None, :] == targets[:, None], grad_logp[:, None], 0.0) - p * coeff
    grad_z = tl.where(row_ok[:, None] & v_ok[None, :], grad_z * inv_temp, 0.0)

    # Optional Cut-Cross-Entropy-style filtering: a tile whose every |d z| is below filter_eps
    # contributes less than rounding to both products; skip its matmuls.
    if tl.max(tl.max(tl.abs(grad_z), axis=1), axis=0) < filter_eps:
        return

    # Relaxed atomics throughout: the adds commute and nothing in this launch reads them back.
    if HAS_BIAS and HIDDEN_GRAD:
        tl.atomic_add(GradBias + offs_v, tl.sum(grad_z, axis=0), mask=v_ok, sem="relaxed")

    grad_z_op = grad_z.to(Hidden.dtype.element_ty)
    gh_ptrs = GradHidden + offs_m.to(tl.int64)[:, None] * stride_gh
    w_ptrs = Weight + offs_v.to(tl.int64)[:, None] * stride_w
    h_ptrs = Hidden + rows.to(tl.int64)[:, None] * stride_h
    gw_ptrs = GradWeight + (offs_v - v_begin).to(tl.int64)[:, None] * stride_gw
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if HIDDEN_GRAD:
            w = tl.load(w_ptrs + offs_d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            grad_h = _dot(grad_z_op, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_PRECISION,
                          INTERPRETER)
            tl.atomic_add(gh_ptrs + offs_d[None, :], grad_h, mask=row_ok[:, None] & d_ok[None, :],
                          sem="relaxed")
        if WEIGHT_GRAD:
            h = tl.load(h_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            grad_w = _dot(tl.trans(grad_z_op), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32),
                          DOT_PRECISION, INTERPRETER)
            gw_mask = v_ok[:, None] & d_ok[None, :]
            if INTERPRETER:
                # Triton's CPU interpreter runs programs one after another and has no bf16/fp16
                # atomics: a plain read-add-write is then exact and race-free.
                acc_w = tl.load(gw_ptrs + offs_d[None, :], mask=gw_mask, other=0.0).to(tl.float32)
                tl.store(gw_ptrs + offs_d[None, :], (acc_w + grad_w).to(GradWeight.dtype.element_ty),
                         mask=gw_mask)
            else:
                tl.atomic_add(gw_ptrs + offs_d[None, :], grad_w.to(GradWeight.dtype.element_ty),
                              mask=gw_mask, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Launch configuration: one table, shared by the launcher and the sm_90 compile check
# ---------------------------------------------------------------------------------------------

_GPU_CONFIG = {
    # dtype: (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) for forward and backward
    "fwd": {
        torch.bfloat16: (128, 128, 64, 8, 3),
        torch.float16: (128, 128, 64, 8, 3),
        torch.float32: (64, 64, 32, 4, 3),
    },
    "bwd": {
        torch.bfloat16: (128, 128, 64, 8, 2),
        torch.float16: (128, 128, 64, 8, 2),
        torch.float32: (64, 64, 32, 4, 2),
    },
}
# Interpreter: small tiles so that tests at small shapes still cross tile boundaries.
_INTERPRETER_CONFIG = (16, 16, 16, 1, 1)
_GROUP_N = 8


def _config(kind: str, dtype: torch.dtype, device: torch.device):
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    return _GPU_CONFIG[kind][dtype]


def _interpreted(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cuda"


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not silently go through tf32 (3e-4 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_vocab_splits(num_rows: int, vocab: int, block_n: int, block_v: int, device) -> int:
    """Split the vocabulary across programs when there are too few row blocks to fill the GPU."""
    row_blocks = triton.cdiv(num_rows, block_n)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 3  # the interpreter: exercise the split-merge path at test sizes
    return max(1, min(triton.cdiv(target, row_blocks), triton.cdiv(vocab, block_v)))


# ---------------------------------------------------------------------------------------------
# Forward / backward drivers
# ---------------------------------------------------------------------------------------------


def _triton_forward(hidden, weight, bias, targets, rows, temperature, compute_entropy):
    """Returns (logp, lse, entropy or None), each float32 [M] over the compacted rows."""
    num_rows, (vocab, dim) = rows.numel(), weight.shape
    block_n, block_v, block_d, num_warps, num_stages = _config("fwd", hidden.dtype, hidden.device)
    splits = _num_vocab_splits(num_rows, vocab, block_n, block_v, hidden.device)
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, vocab_per_split)  # every split holds at least one token

    part = torch.empty((4, num_rows, splits), device=hidden.device, dtype=torch.float32)
    part_max, part_sum, part_ent, part_target = part.unbind(0)
    grid = (triton.cdiv(num_rows, block_n), splits)
    _logprobs_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, rows,
        part_max, part_sum, part_ent, part_target,
        num_rows, vocab, dim, hidden.stride(0), weight.stride(0), 1.0 / temperature,
        vocab_per_split, splits,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        HAS_BIAS=bias is not None, COMPUTE_ENTROPY=compute_entropy,
        DOT_PRECISION=_dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
        num_warps=num_warps, num_stages=num_stages,
    )
    row_max = part_max.amax(dim=1, keepdim=True)
    weights = torch.exp(part_max - row_max)
    total = (part_sum * weights).sum(dim=1)
    lse = row_max.squeeze(1) + torch.log(total)
    logp = part_target.sum(dim=1) - lse
    entropy = None
    if compute_entropy:
        ent_sum = (weights * (part_ent + part_sum * (part_max - row_max))).sum(dim=1)
        entropy = torch.log(total) - ent_sum / total
    return logp, lse, entropy


def _launch_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_ent,
                     temperature, filter_eps, v_begin, v_end, grad_hidden_acc, grad_weight_acc, grad_bias):
    """One backward launch over the compacted ``rows`` x vocabulary ids ``[v_begin, v_end)``."""
    dim = weight.shape[1]
    block_n, block_v, block_d, num_warps, num_stages = _config("bwd", hidden.dtype, hidden.device)
    grid = (triton.cdiv(rows.numel(), block_n) * triton.cdiv(v_end - v_begin, block_v),)
    unused_fp32 = lse  # stands for pointer arguments that a constexpr switch leaves unread
    _logprobs_bwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, rows,
        lse, mean_logit if mean_logit is not None else unused_fp32, grad_logp,
        grad_ent if grad_ent is not None else unused_fp32,
        grad_hidden_acc if grad_hidden_acc is not None else unused_fp32,
        grad_weight_acc if grad_weight_acc is not None else weight,
        grad_bias if grad_bias is not None else unused_fp32,
        rows.numel(), v_begin, v_end, dim, hidden.stride(0), weight.stride(0),
        grad_hidden_acc.stride(0) if grad_hidden_acc is not None else 0,
        grad_weight_acc.stride(0) if grad_weight_acc is not None else 0,
        1.0 / temperature, float(filter_eps or 0.0),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=_GROUP_N,
        HAS_BIAS=bias is not None, ENTROPY_GRAD=grad_ent is not None,
        HIDDEN_GRAD=grad_hidden_acc is not None, WEIGHT_GRAD=grad_weight_acc is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
        num_warps=num_warps, num_stages=num_stages,
    )


def _triton_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_ent,
                     temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias):
    """Writes the gradients of the compacted rows into grad_hidden / grad_weight / grad_bias.

    Pass 1, over row chunks: d hidden into a float32 chunk buffer (and d bias). When the weight
    is float32, or ``exact`` is off, d weight is scattered in the same pass, straight into the
    weight-dtype gradient: 4 matmuls in all, but 16-bit d weight then sums N / BLOCK_N partial
    products in 16-bit arithmetic. Exact mode instead runs pass 2, over vocabulary chunks, which
    recomputes the logits (a 5th matmul) and accumulates d weight in a float32 chunk buffer.
    Extra memory either way: the chunk buffers (_GRAD_CHUNK_BYTES each).
    """
    vocab, dim = weight.shape
    block_n, block_v = _config("bwd", hidden.dtype, hidden.device)[:2]
    args = (hidden, weight, bias, targets)
    weight_in_pass_1 = grad_weight is not None and (grad_weight.dtype == torch.float32 or not exact)

    row_chunk = max(block_n, (_GRAD_CHUNK_BYTES // (4 * dim)) // block_n * block_n)
    for start in range(0, rows.numel(), row_chunk):
        sl = slice(start, start + row_chunk)
        grad_hidden_acc = torch.zeros((rows[sl].numel(), dim), device=hidden.device, dtype=torch.float32)
        _launch_backward(
            *args, rows[sl], lse[sl], mean_logit[sl] if mean_logit is not None else None, grad_logp[sl],
            grad_ent[sl] if grad_ent is not None else None, temperature, filter_eps, 0, vocab,
            grad_hidden_acc, grad_weight if weight_in_pass_1 else None, grad_bias)
        grad_hidden.index_copy_(0, rows[sl].long(), grad_hidden_acc.to(grad_hidden.dtype))

    if grad_weight is not None and not weight_in_pass_1:
        vocab_chunk = max(block_v, (_GRAD_CHUNK_BYTES // (4 * dim)) // block_v * block_v)
        for v_begin in range(0, vocab, vocab_chunk):
            v_end = min(v_begin + vocab_chunk, vocab)
            grad_weight_acc = torch.zeros((v_end - v_begin, dim), device=weight.device, dtype=torch.float32)
            _launch_backward(*args, rows, lse, mean_logit, grad_logp, grad_ent, temperature, filter_eps,
                             v_begin, v_end, None, grad_weight_acc, None)
            grad_weight[v_begin:v_end] = grad_weight_acc


_BACKENDS = {"triton": (_triton_forward, _triton_backward), "torch": (torch_forward, torch_backward)}


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy,
                filter_eps, exact, backend):
        forward_fn, _ = _BACKENDS[backend]
        num_rows = hidden.shape[0]
        valid = targets != ignore_index
        rows = valid.nonzero().squeeze(1).to(torch.int32)
        logp = hidden.new_zeros(num_rows, dtype=torch.float32)
        entropy = hidden.new_zeros(num_rows, dtype=torch.float32) if return_entropy else None
        lse = hidden.new_zeros(num_rows, dtype=torch.float32)
        if rows.numel() > 0:
            logp_rows, lse_rows, entropy_rows = forward_fn(
                hidden, weight, bias, targets, rows, temperature, return_entropy)
            logp[rows.long()] = logp_rows
            lse[rows.long()] = lse_rows
            if return_entropy:
                entropy[rows.long()] = entropy_rows

        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.config = (temperature, ignore_index, filter_eps, exact, backend)
        ctx.set_materialize_grads(False)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, filter_eps, exact, backend = ctx.config
        _, backward_fn = _BACKENDS[backend]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 10

        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = grad_logp.float()
        # Only rows with a target and a non-zero incoming gradient take part in the backward.
        active = (targets != ignore_index) & (grad_logp != 0)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float()
            active |= (targets != ignore_index) & (grad_entropy != 0)
        rows = active.nonzero().squeeze(1).to(torch.int32)

        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if need_weight else None
        # Whenever there is a bias the kernel adds into d bias ([V] float32, small), needed or not.
        has_bias = bias is not None
        grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if has_bias else None
        if rows.numel() > 0:
            idx = rows.long()
            mean_logit = None
            if grad_entropy is not None:
                # E_p[z] = lse - entropy
                mean_logit = (lse - entropy)[idx].contiguous()
            backward_fn(
                hidden, weight, bias, targets, rows, lse[idx].contiguous(), mean_logit,
                grad_logp[idx].contiguous(),
                grad_entropy[idx].contiguous() if grad_entropy is not None else None,
                temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias,
            )
        return (
            grad_hidden if need_hidden else None,
            grad_weight,
            grad_bias.to(bias.dtype) if need_bias else None,
            None, None, None, None, None, None, None,
        )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _validate(hidden, weight, targets, bias, temperature, ignore_index, filter_eps):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("targets", targets, dtypes=INDEX_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}: cast one "
                        f"(e.g. weight.to(hidden.dtype); the gradient flows back to the original)")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    vocab, dim = weight.shape
    if vocab == 0 or dim == 0:
        raise ValueError(f"weight must be [V, D] with V, D > 0, got {tuple(weight.shape)}")
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden last dim {hidden.shape[-1]} != weight dim {dim} (weight is [V, D])")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}")
    if targets.numel() == 0:
        raise ValueError("empty batch: hidden has no rows")
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias has {bias.shape[0]} entries, weight has V={vocab} rows")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    temperature = check_positive_finite("temperature", temperature)
    if filter_eps is not None:
        filter_eps = check_positive_finite("filter_eps", filter_eps)
    check_index_range("targets", targets, vocab, ignore_index)
    return temperature, filter_eps


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    filter_eps: float | None = None,
    exact: bool = True,
    backend: str = "auto",
):
    """Log-prob of each target token (and the entropy of its distribution), logits never stored.

    Args:
        hidden: ``[..., D]`` last hidden states (bf16, fp16 or fp32).
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[...]`` int32/int64 token ids, the leading shape of ``hidden``; entries equal
            to ``ignore_index`` give log-prob 0, entropy 0 and no gradient.
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it before the softmax (finite, > 0).
        return_entropy: also return the entropy of ``softmax(z)`` per row.
        filter_eps: backward only: skip ``[BLOCK_N, BLOCK_V]`` tiles whose every ``|d logit|`` is
            below this (Cut Cross-Entropy's gradient filtering, e.g. ``2**-12`` for bf16). ``None``
            (default) is exact.
        exact: backward only, 16-bit weights only. ``True`` (default): every gradient is
            accumulated in float32; d weight takes a second pass that recomputes the logits
            (5 matmuls in all instead of 4). ``False``: d weight is accumulated in the weight's
            dtype within the single pass (Cut Cross-Entropy's scheme): faster, but its 16-bit
            rounding error grows with the number of rows.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else chunked torch),
            ``"triton"`` or ``"torch"``.

    Returns:
        float32 log-probs of the shape of ``targets``; with ``return_entropy=True`` a pair
        ``(logprobs, entropy)``. Differentiable w.r.t. hidden, weight and bias through both;
        gradients come back in the inputs' dtype. Under ``torch.no_grad()`` only the forward runs.
    """
    temperature, filter_eps = _validate(hidden, weight, targets, bias, temperature, ignore_index, filter_eps)
    backend = resolve_backend(hidden.device, backend)
    lead_shape = targets.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    weight_c = weight if weight.stride(-1) == 1 else weight.contiguous()
    targets_1d = targets.reshape(-1).to(torch.int32)
    bias_c = bias.contiguous() if bias is not None else None
    out = _TokenLogprobsFunction.apply(
        hidden_2d, weight_c, bias_c, targets_1d, temperature, ignore_index, bool(return_entropy),
        filter_eps, bool(exact), backend)
    if return_entropy:
        logp, entropy = out
        return logp.view(lead_shape), entropy.view(lead_shape)
    return out.view(lead_shape)


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for the sm_90 compile check
# ---------------------------------------------------------------------------------------------


def sm90_compile_specs() -> list[CompileSpec]:
    specs = []
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        precision = _dot_precision(dtype)
        block_n, block_v, block_d, num_warps, num_stages = _GPU_CONFIG["fwd"][dtype]
        for has_bias in (False, True):
            for entropy in (False, True):
                specs.append(CompileSpec(
                    name=f"logprobs_fwd[{ty},bias={has_bias},entropy={entropy}]",
                    kernel=_logprobs_fwd_kernel,
                    signature={
                        "Hidden": f"*{ty}", "Weight": f"*{ty}", "Bias": f"*{ty}", "Targets": "*i32",
                        "RowIdx": "*i32", "PartMax": "*fp32", "PartSum": "*fp32", "PartEnt": "*fp32",
                        "PartTarget": "*fp32", "M": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
                        "stride_w": "i32", "inv_temp": "fp32", "vocab_per_split": "i32",
                        "num_splits": "i32", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
                        "BLOCK_D": "constexpr", "HAS_BIAS": "constexpr", "COMPUTE_ENTROPY": "constexpr",
                        "DOT_PRECISION": "constexpr", "INTERPRETER": "constexpr",
                    },
                    constexprs={"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d,
                                "HAS_BIAS": has_bias, "COMPUTE_ENTROPY": entropy,
                                "DOT_PRECISION": precision, "INTERPRETER": False},
                    num_warps=num_warps, num_stages=num_stages,
                ))
        block_n, block_v, block_d, num_warps, num_stages = _GPU_CONFIG["bwd"][dtype]
        # (d hidden, d weight, d weight accumulator dtype): pass 1 without / with d weight, and
        # the exact d-weight pass into a float32 chunk buffer (16-bit weights only).
        passes = [(True, False, ty), (True, True, ty)] + ([(False, True, "fp32")] if ty != "fp32" else [])
        for has_bias in (False, True):
            for entropy_grad in (False, True):
                for hidden_grad, weight_grad, grad_weight_ty in passes:
                    specs.append(CompileSpec(
                        name=(f"logprobs_bwd[{ty},bias={has_bias},entropy={entropy_grad},dH={hidden_grad},"
                              f"dW={weight_grad and grad_weight_ty}]"),
                        kernel=_logprobs_bwd_kernel,
                        signature={
                            "Hidden": f"*{ty}", "Weight": f"*{ty}", "Bias": f"*{ty}", "Targets": "*i32",
                            "RowIdx": "*i32", "Lse": "*fp32", "MeanLogit": "*fp32", "GradLogp": "*fp32",
                            "GradEnt": "*fp32", "GradHidden": "*fp32", "GradWeight": f"*{grad_weight_ty}",
                            "GradBias": "*fp32", "M": "i32", "v_begin": "i32", "v_end": "i32", "D": "i32",
                            "stride_h": "i32", "stride_w": "i32", "stride_gh": "i32", "stride_gw": "i32",
                            "inv_temp": "fp32", "filter_eps": "fp32", "BLOCK_N": "constexpr",
                            "BLOCK_V": "constexpr", "BLOCK_D": "constexpr", "GROUP_N": "constexpr",
                            "HAS_BIAS": "constexpr", "ENTROPY_GRAD": "constexpr", "HIDDEN_GRAD": "constexpr",
                            "WEIGHT_GRAD": "constexpr", "DOT_PRECISION": "constexpr", "INTERPRETER": "constexpr",
                        },
                        constexprs={"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d,
                                    "GROUP_N": _GROUP_N, "HAS_BIAS": has_bias, "ENTROPY_GRAD": entropy_grad,
                                    "HIDDEN_GRAD": hidden_grad, "WEIGHT_GRAD": weight_grad,
                                    "DOT_PRECISION": precision, "INTERPRETER": False},
                        num_warps=num_warps, num_stages=num_stages,
                    ))
    return specs
