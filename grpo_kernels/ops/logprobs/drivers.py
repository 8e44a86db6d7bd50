"""The forward / backward drivers of the log-prob op (the interface of docs in logprob-drivers:
shared with the torch backend and the vocab-parallel op)."""

import torch
import triton

from grpo_kernels.ops.logprobs import launch
from grpo_kernels.ops.logprobs.kernels import (
    _logprobs_bwd_atomic_kernel,
    _logprobs_fwd_kernel,
    _logprobs_merge_kernel,
)
from grpo_kernels.ops.logprobs.torch_path import torch_backward, torch_forward
from grpo_kernels.ops.logprobs.workspace import workspace_backward


def _interpreted(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cuda"


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def triton_forward(hidden, weight, bias, targets, rows, temperature, compute_entropy, *, softcap=None,
                   batch_invariant=True):
    """hidden [N, D], weight [V, D], bias [V] or None, targets [N, K] int32 (ids outside [0, V)
    match nothing), rows [M] int32. Returns (logp [M, K], lse [M], entropy [M] or None), float32."""
    num_rows, (vocab, dim), num_targets = rows.numel(), weight.shape, targets.shape[1]
    device_type = hidden.device.type
    block_n, block_v, block_d, num_warps, num_stages = launch.launch_config("fwd", hidden.dtype, device_type)
    merge_n, _, _, merge_warps, merge_stages = launch.launch_config("merge", hidden.dtype, device_type)
    vocab_per_split, splits = launch.forward_splits(num_rows, vocab, hidden.dtype, device_type, batch_invariant,
                                                    _num_sms(hidden.device))

    target_logit = torch.zeros((num_rows, num_targets), device=hidden.device, dtype=torch.float32)
    lse = torch.empty(num_rows, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(num_rows, device=hidden.device, dtype=torch.float32) if compute_entropy else None
    # Row chunks bound the partial states; a row's result does not depend on its chunk.
    row_chunk = max(block_n, launch.FORWARD_PARTIAL_BYTES // (12 * splits) // block_n * block_n)
    for start in range(0, num_rows, row_chunk):
        sl = slice(start, start + row_chunk)
        chunk_rows = rows[sl]
        part = torch.empty((3, chunk_rows.numel(), splits), device=hidden.device, dtype=torch.float32)
        part_max, part_sum, part_ent = part.unbind(0)
        _logprobs_fwd_kernel[(triton.cdiv(chunk_rows.numel(), block_n) * splits,)](
            hidden, weight, bias if bias is not None else hidden, targets, chunk_rows,
            part_max, part_sum, part_ent, target_logit[sl],
            chunk_rows.numel(), vocab, dim, num_targets, hidden.stride(0), weight.stride(0), targets.stride(0),
            1.0 / temperature, float(softcap or 1.0), vocab_per_split, splits,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=launch.FORWARD_GROUP_ROWS,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, COMPUTE_ENTROPY=compute_entropy,
            DOT_PRECISION=launch.dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
            num_warps=num_warps, num_stages=num_stages,
        )
        _logprobs_merge_kernel[(triton.cdiv(chunk_rows.numel(), merge_n),)](
            part_max, part_sum, part_ent, lse[sl], entropy[sl] if compute_entropy else lse[sl],
            chunk_rows.numel(), splits, BLOCK_N=merge_n, COMPUTE_ENTROPY=compute_entropy,
            num_warps=merge_warps, num_stages=merge_stages,
        )
    return target_logit - lse[:, None], lse, entropy


def _backward_args(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent):
    unused_fp32 = lse  # stands for pointer arguments that a constexpr switch leaves unread
    return (hidden, weight, bias if bias is not None else hidden, targets, rows, lse,
            mean_logit if mean_logit is not None else unused_fp32, grad_logp, grad_logp_sum,
            grad_ent if grad_ent is not None else unused_fp32)


def _launch_atomic(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                     temperature, softcap, filter_eps, v_begin, v_end, grad_hidden_acc, grad_weight_acc,
                     grad_bias):
    """One atomic backward launch over the compacted ``rows`` x vocabulary ids ``[v_begin, v_end)``."""
    dim = weight.shape[1]
    block_n, block_v, block_d, num_warps, num_stages = launch.launch_config("bwd_atomic", hidden.dtype,
                                                                            hidden.device.type)
    grid = (triton.cdiv(rows.numel(), block_n) * triton.cdiv(v_end - v_begin, block_v),)
    _logprobs_bwd_atomic_kernel[grid](
        *_backward_args(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent),
        grad_hidden_acc if grad_hidden_acc is not None else lse,
        grad_weight_acc if grad_weight_acc is not None else weight,
        grad_bias if grad_bias is not None else lse,
        rows.numel(), v_begin, v_end, dim, targets.shape[1], hidden.stride(0), weight.stride(0),
        targets.stride(0),
        grad_hidden_acc.stride(0) if grad_hidden_acc is not None else 0,
        grad_weight_acc.stride(0) if grad_weight_acc is not None else 0,
        1.0 / temperature, float(softcap or 1.0), float(filter_eps or 0.0),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=launch.BACKWARD_GROUP_ROWS,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, ENTROPY_GRAD=grad_ent is not None,
        HIDDEN_GRAD=grad_hidden_acc is not None, WEIGHT_GRAD=grad_weight_acc is not None,
        DOT_PRECISION=launch.dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
        num_warps=num_warps, num_stages=num_stages,
    )


def _atomic_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                     temperature, softcap, filter_eps, exact, grad_hidden, grad_weight, grad_bias):
    """``backward="atomic"``. Pass 1 over row chunks: d hidden into a float32 chunk buffer (and d
    bias). When the weight is float32, or ``exact`` is off, d weight is scattered in the same pass,
    straight into the weight-dtype gradient: 4 matmuls in all, but 16-bit d weight then sums
    N / BLOCK_N partial products in 16-bit arithmetic. Exact mode instead runs pass 2, over
    vocabulary chunks, which recomputes the logits (a 5th matmul) and accumulates d weight in a
    float32 chunk buffer. Extra memory: the chunk buffers (``launch.ATOMIC_GRAD_CHUNK_BYTES`` each).
    """
    vocab, dim = weight.shape
    args = (hidden, weight, bias, targets)

    def row_args(sl):
        return (rows[sl], lse[sl], mean_logit[sl] if mean_logit is not None else None, grad_logp[sl],
                grad_logp_sum[sl], grad_ent[sl] if grad_ent is not None else None)

    block_n, block_v = launch.launch_config("bwd_atomic", hidden.dtype, hidden.device.type)[:2]
    weight_in_pass_1 = grad_weight is not None and (grad_weight.dtype == torch.float32 or not exact)
    row_chunk = max(block_n, (launch.ATOMIC_GRAD_CHUNK_BYTES // (4 * dim)) // block_n * block_n)
    for start in range(0, rows.numel(), row_chunk):
        sl = slice(start, start + row_chunk)
        grad_hidden_acc = torch.zeros((rows[sl].numel(), dim), device=hidden.device, dtype=torch.float32)
        _launch_atomic(*args, *row_args(sl), temperature, softcap, filter_eps, 0, vocab,
                       grad_hidden_acc, grad_weight if weight_in_pass_1 else None, grad_bias)
        grad_hidden.index_copy_(0, rows[sl].long(), grad_hidden_acc.to(grad_hidden.dtype))

    if grad_weight is not None and not weight_in_pass_1:
        vocab_chunk = max(block_v, (launch.ATOMIC_GRAD_CHUNK_BYTES // (4 * dim)) // block_v * block_v)
        full_args = (rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent)
        for v_begin in range(0, vocab, vocab_chunk):
            v_end = min(v_begin + vocab_chunk, vocab)
            grad_weight_acc = torch.zeros((v_end - v_begin, dim), device=weight.device, dtype=torch.float32)
            _launch_atomic(*args, *full_args, temperature, softcap, filter_eps, v_begin, v_end,
                           None, grad_weight_acc, None)
            grad_weight[v_begin:v_end] = grad_weight_acc


def triton_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_ent,
                    temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias, *, softcap=None,
                    backward="workspace", workspace_bytes=None):
    """Writes the gradients of the compacted rows into grad_hidden / grad_weight / grad_bias.

    targets [N, K] int32; lse, mean_logit (= E_p[z], or None), grad_ent (or None) [M]; grad_logp
    [M, K]; grad_hidden [N, D] (its ``rows`` only are written), grad_weight [V, D] or None (written),
    grad_bias [V] float32 or None (added to).

    ``backward="workspace"`` (default): d logits in a bounded buffer, then GEMMs, no atomics (see
    ``workspace``; ``exact`` does not apply: always float32 accumulation). ``"atomic"``: the
    kernel scatters its products with float32 (or, exact=False, 16-bit) atomic adds.
    """
    grad_logp_sum = grad_logp.sum(dim=1)  # the softmax term weighs p by every target's gradient
    if backward == "atomic":
        _atomic_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                         temperature, softcap, filter_eps, exact, grad_hidden, grad_weight, grad_bias)
    else:
        workspace_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                           temperature, softcap, filter_eps, grad_hidden, grad_weight, grad_bias, workspace_bytes)


# backend name -> (forward driver, backward driver)
BACKENDS = {"triton": (triton_forward, triton_backward), "torch": (torch_forward, torch_backward)}
