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
from grpo_kernels.ops.logprobs.outputs import RowStats
from grpo_kernels.ops.logprobs.temperature import kernel_temperature
from grpo_kernels.ops.logprobs.topk import merge_topk, unpack_keys
from grpo_kernels.ops.logprobs.torch_path import torch_backward, torch_forward
from grpo_kernels.ops.logprobs.workspace import workspace_backward


def _interpreted(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cuda"


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def triton_forward(hidden, weight, bias, targets, rows, temperature, compute_entropy, *, softcap=None,
                   batch_invariant=True, stats=frozenset(), topk=0) -> RowStats:
    """hidden [N, D], weight [V, D], bias [V] or None, targets [N, K] int32 (ids outside [0, V)
    match nothing; K may be 0: statistics only), rows [M] int32, temperature a float or a [N]
    tensor (per row). ``stats``: names among ``outputs.DRIVER_STATS``; ``topk``: k (0: none).
    Returns :class:`RowStats` of the M rows (float32). The kernel switches are
    ``launch.forward_switches``: any statistic computes all three, and any extra output the
    entropy too; what was computed is returned, whether asked for or not."""
    num_rows, (vocab, dim), num_targets = rows.numel(), weight.shape, targets.shape[1]
    device, device_type = hidden.device, hidden.device.type
    switches = launch.forward_switches(compute_entropy, bool(stats), topk)
    on, slots = switches.stats, switches.topk_slots
    kind = launch.forward_kind(switches)
    block_n, block_v, block_d, num_warps, num_stages = launch.launch_config(kind, hidden.dtype, device_type)
    merge_n, _, _, merge_warps, merge_stages = launch.launch_config("merge", hidden.dtype, device_type)
    vocab_per_split, splits = launch.forward_splits(num_rows, vocab, hidden.dtype, device_type, batch_invariant,
                                                    _num_sms(device), kind=kind)

    def row_vector(needed=True):
        return torch.empty(num_rows, device=device, dtype=torch.float32) if needed else None

    inv_temp = kernel_temperature(temperature, hidden.shape[0], device)
    target_logit = torch.zeros((num_rows, num_targets), device=device, dtype=torch.float32)
    lse, entropy = row_vector(), row_vector(switches.entropy)
    log_sum_sq, mean_logits, row_max, max_before = (row_vector(on) for _ in range(4))
    top_keys = torch.empty((num_rows, topk), device=device, dtype=torch.int64) if topk else None
    # Partial states per (row, split): 3 float32 (+ 3 with the statistics) and the top-k keys.
    float_slots = 6 if on else 3
    row_bytes = splits * (4 * float_slots + 8 * slots)
    # Row chunks bound the partial states; a row's result does not depend on its chunk.
    row_chunk = max(block_n, launch.FORWARD_PARTIAL_BYTES // row_bytes // block_n * block_n)
    unused = lse  # stands for pointer arguments that a constexpr switch leaves unread
    kernel_targets = targets if num_targets else rows  # K = 0: never read; any int32 pointer
    for start in range(0, num_rows, row_chunk):
        sl = slice(start, start + row_chunk)
        chunk_rows = rows[sl]
        count = chunk_rows.numel()
        part = torch.empty((float_slots, count, splits), device=device, dtype=torch.float32)
        part_max, part_sum, part_ent, *extra = part.unbind(0)
        part_sq, part_z, part_before = extra if on else (unused, unused, unused)
        part_top = torch.empty((count, splits, slots), device=device, dtype=torch.int64) if topk else unused
        _logprobs_fwd_kernel[(triton.cdiv(count, block_n) * splits,)](
            hidden, weight, bias if bias is not None else hidden, kernel_targets, chunk_rows,
            inv_temp.rows if inv_temp.rows is not None else unused,
            part_max, part_sum, part_ent, part_sq, part_z, part_before, part_top, target_logit[sl],
            count, vocab, dim, num_targets, hidden.stride(0), weight.stride(0), kernel_targets.stride(0),
            inv_temp.scalar, float(softcap or 1.0), vocab_per_split, splits, topk,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=launch.FORWARD_GROUP_ROWS,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, COMPUTE_ENTROPY=switches.entropy,
            LOG_SUM_SQ=on, MEAN_LOGITS=on, TOP1=on, TOPK=slots, ROW_TEMP=inv_temp.rows is not None,
            DOT_PRECISION=launch.dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
            num_warps=num_warps, num_stages=num_stages,
        )

        def out(tensor):
            return tensor[sl] if tensor is not None else lse[sl]

        _logprobs_merge_kernel[(triton.cdiv(count, merge_n),)](
            part_max, part_sum, part_ent, part_sq, part_z, part_before,
            lse[sl], out(entropy), out(log_sum_sq), out(mean_logits), out(row_max), out(max_before),
            count, vocab, splits, BLOCK_N=merge_n, COMPUTE_ENTROPY=switches.entropy,
            LOG_SUM_SQ=on, MEAN_LOGITS=on, TOP1=on, num_warps=merge_warps, num_stages=merge_stages,
        )
        if topk:
            # the splits' top-k lists, merged exactly (distinct keys: the result is unique)
            top_keys[sl] = merge_topk(part_top.view(count, splits * slots), topk)
    topk_logits, topk_ids = unpack_keys(top_keys) if topk else (None, None)
    return RowStats(target_logit, lse, entropy, log_sum_sq, mean_logits, row_max, max_before, topk_logits,
                    topk_ids)


def _backward_args(hidden, weight, bias, targets, rows, inv_temp, lse, mean_logit, grad_logp, grad_logp_sum,
                   grad_ent):
    unused_fp32 = lse  # stands for pointer arguments that a constexpr switch leaves unread
    return (hidden, weight, bias if bias is not None else hidden, targets, rows,
            inv_temp.rows if inv_temp.rows is not None else unused_fp32, lse,
            mean_logit if mean_logit is not None else unused_fp32, grad_logp, grad_logp_sum,
            grad_ent if grad_ent is not None else unused_fp32)


def _launch_atomic(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                   inv_temp, softcap, filter_eps, v_begin, v_end, grad_hidden_acc, grad_weight_acc, grad_bias):
    """One atomic backward launch over the compacted ``rows`` x vocabulary ids ``[v_begin, v_end)``."""
    dim = weight.shape[1]
    block_n, block_v, block_d, num_warps, num_stages = launch.launch_config("bwd_atomic", hidden.dtype,
                                                                            hidden.device.type)
    grid = (triton.cdiv(rows.numel(), block_n) * triton.cdiv(v_end - v_begin, block_v),)
    _logprobs_bwd_atomic_kernel[grid](
        *_backward_args(hidden, weight, bias, targets, rows, inv_temp, lse, mean_logit, grad_logp, grad_logp_sum,
                        grad_ent),
        grad_hidden_acc if grad_hidden_acc is not None else lse,
        grad_weight_acc if grad_weight_acc is not None else weight,
        grad_bias if grad_bias is not None else lse,
        rows.numel(), v_begin, v_end, dim, targets.shape[1], hidden.stride(0), weight.stride(0),
        targets.stride(0),
        grad_hidden_acc.stride(0) if grad_hidden_acc is not None else 0,
        grad_weight_acc.stride(0) if grad_weight_acc is not None else 0,
        inv_temp.scalar, float(softcap or 1.0), float(filter_eps or 0.0),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=launch.BACKWARD_GROUP_ROWS,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, ENTROPY_GRAD=grad_ent is not None,
        HIDDEN_GRAD=grad_hidden_acc is not None, WEIGHT_GRAD=grad_weight_acc is not None,
        ROW_TEMP=inv_temp.rows is not None,
        DOT_PRECISION=launch.dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
        num_warps=num_warps, num_stages=num_stages,
    )


def _atomic_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                     inv_temp, softcap, filter_eps, exact, grad_hidden, grad_weight, grad_bias):
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
        _launch_atomic(*args, *row_args(sl), inv_temp, softcap, filter_eps, 0, vocab,
                       grad_hidden_acc, grad_weight if weight_in_pass_1 else None, grad_bias)
        grad_hidden.index_copy_(0, rows[sl].long(), grad_hidden_acc.to(grad_hidden.dtype))

    if grad_weight is not None and not weight_in_pass_1:
        vocab_chunk = max(block_v, (launch.ATOMIC_GRAD_CHUNK_BYTES // (4 * dim)) // block_v * block_v)
        full_args = (rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent)
        for v_begin in range(0, vocab, vocab_chunk):
            v_end = min(v_begin + vocab_chunk, vocab)
            grad_weight_acc = torch.zeros((v_end - v_begin, dim), device=weight.device, dtype=torch.float32)
            _launch_atomic(*args, *full_args, inv_temp, softcap, filter_eps, v_begin, v_end,
                           None, grad_weight_acc, None)
            grad_weight[v_begin:v_end] = grad_weight_acc


def triton_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_ent,
                    temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias, *, softcap=None,
                    backward="workspace", workspace_bytes=None):
    """Writes the gradients of the compacted rows into grad_hidden / grad_weight / grad_bias.

    targets [N, K] int32; temperature a float or a [N] tensor (per row); lse, mean_logit (= E_p[z],
    or None), grad_ent (or None) [M]; grad_logp [M, K]; grad_hidden [N, D] (its ``rows`` only are
    written), grad_weight [V, D] or None (written), grad_bias [V] float32 or None (added to).

    ``backward="workspace"`` (default): d logits in a bounded buffer, then GEMMs, no atomics (see
    ``workspace``; ``exact`` does not apply: always float32 accumulation). ``"atomic"``: the
    kernel scatters its products with float32 (or, exact=False, 16-bit) atomic adds.
    """
    grad_logp_sum = grad_logp.sum(dim=1)  # the softmax term weighs p by every target's gradient
    inv_temp = kernel_temperature(temperature, hidden.shape[0], hidden.device)
    if backward == "atomic":
        _atomic_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                         inv_temp, softcap, filter_eps, exact, grad_hidden, grad_weight, grad_bias)
    else:
        workspace_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                           inv_temp, softcap, filter_eps, grad_hidden, grad_weight, grad_bias, workspace_bytes)


# backend name -> (forward driver, backward driver)
BACKENDS = {"triton": (triton_forward, triton_backward), "torch": (torch_forward, torch_backward)}
