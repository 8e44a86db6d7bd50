"""The default backward of the log-prob op: d logits in a bounded workspace, then plain GEMMs.

No floating-point atomics, so the gradients are bitwise identical run to run (same GPU, shapes
and library versions: cuBLAS documents bitwise reproducibility under those conditions; PyTorch's
note on ``CUBLAS_WORKSPACE_CONFIG`` applies when several streams run GEMMs). For each chunk of
``ids_per_chunk`` vocabulary ids (the outer loop) and ``rows_per_chunk`` compacted rows (inner)::

    G            = d loss / d y   [rows, ids]     the d-logits kernel: recompute, store (input dtype)
    d hidden    += G @ W[ids]     [rows, D]       GEMM into a float32 accumulator
    d weight[ids] = G^T @ h[rows] [ids, D]        GEMM, float32 accumulation inside, written once
    d bias[ids] += sum of the kernel's per-row-block float32 column sums, in row-block order

That is the 4-GEMM floor (forward, the recompute inside the d-logits kernel, d hidden, d weight),
against 4-5 GEMMs plus float32 atomics for ``backward="atomic"``. Choices, and why:

- **Vocabulary outermost, all rows at once when they fit** (:func:`launch.backward_plan`): every
  row of d weight is then one GEMM with K = rows, float32 accumulation inside cuBLAS and a single
  rounding to the weight's dtype; d hidden needs a float32 ``[M, D]`` accumulator across
  vocabulary chunks (rounding each chunk's product to bf16 before summing biases training, as TRL
  found). One of the two gradients has to live in float32 across the other's loop; ``[M, D]`` is
  the smaller one for M < V. Its read-modify-write is ``8 D M V / ids_per_chunk`` bytes. When even
  ``MIN_IDS_PER_CHUNK`` ids of all rows exceed the workspace, rows are chunked too and d weight
  gets a float32 ``[ids, D]`` accumulator (16-bit weights): ``8 D M V (1/rows + 1/ids)`` bytes.
- **cuBLAS through torch** for both GEMMs: they are plain ``[rows, ids] x [ids, D]`` products with
  nothing to fuse in the epilogue except the accumulation, which cuBLAS does itself
  (``torch.addmm(acc, G, W, out_dtype=torch.float32)`` for 16-bit inputs, torch >= 2.8 on CUDA).
  Where that form is missing (older torch, CPU) see :func:`_matmul_into`.
- **d logits in the input dtype**: the GEMMs read 16-bit operands at full tensor-core rate, and
  the buffer holds twice the ids of a float32 one. float32 inputs keep float32 d logits (IEEE
  GEMMs unless the caller enabled TF32 for torch matmuls).
- **Ignored and zero-gradient rows** are compacted away before the kernel, as in the atomic path.
  When the active rows are one contiguous range (the usual case) the d-weight GEMM reads hidden
  in place; otherwise their hidden rows are gathered into a buffer counted in the workspace.
- **d bias**: per-row-block float32 column sums from the kernel (no atomics), summed in order.

Modelled at N = 16384 active contiguous rows, D = 4096, V = 151936, bf16, default 256 MiB
workspace (a model from the plan, not a measurement): one row chunk, 19 vocabulary chunks of
8064 ids; 252 MiB of d logits + a 256 MiB float32 d-hidden accumulator = 508 MiB above inputs and
gradients. HBM traffic beyond the GEMM operands: d logits written once and read by both GEMMs
(3 x 5.0 GB), the accumulator's read-modify-write (~9.7 GB), hidden re-read by each chunk's
d-weight GEMM (19 x 128 MiB); each GEMM stays compute-bound (>= 1200 FLOP per HBM byte).
"""

from __future__ import annotations

import torch
import triton

from grpo_kernels.ops.logprobs import launch
from grpo_kernels.ops.logprobs.kernels import _logprobs_dlogits_kernel

# Whether torch.addmm(float32 acc, 16-bit a, 16-bit b, out_dtype=torch.float32, out=acc) runs on
# CUDA here (torch >= 2.8; some releases require acc in the inputs' dtype): probed once.
_ADDMM_FLOAT32_OUT: dict[str, bool] = {}


def _addmm_float32_out_supported() -> bool:
    if "cuda" not in _ADDMM_FLOAT32_OUT:
        try:
            acc = torch.zeros(16, 16, device="cuda")
            a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _ADDMM_FLOAT32_OUT["cuda"] = bool(acc[0, 0] == 16)
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_FLOAT32_OUT["cuda"] = False
    return _ADDMM_FLOAT32_OUT["cuda"]


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` (``accumulate=False``) or ``out += a @ b``, float32 accumulation throughout.

    ``out`` is float32, or the inputs' 16-bit dtype when not accumulating (one rounding at the
    end). On CUDA, 16-bit inputs go to cuBLAS as they are. Where ``addmm(..., out_dtype=float32)``
    is not available, ``mm(..., out_dtype=float32)`` plus an add (a temporary of ``out``'s size,
    torch >= 2.8), else the product is rounded to the inputs' dtype before the float32 add
    (torch < 2.8). Off CUDA (the interpreter's tests) the operands are upcast: exact float32.
    """
    if a.dtype == torch.float32 or not a.is_cuda:
        a, b = a.float(), b.float()
        if out.dtype != torch.float32:  # a 16-bit result, rounded once
            out.copy_(torch.mm(a, b))
        elif accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.dtype != torch.float32:
        torch.mm(a, b, out=out)  # cuBLAS accumulates 16-bit GEMMs in float32
    elif _addmm_float32_out_supported():
        torch.addmm(out, a, b, out_dtype=torch.float32, beta=1 if accumulate else 0, out=out)
    else:
        try:
            product = torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # torch < 2.8
            product = torch.mm(a, b)
        if accumulate:
            out.add_(product)
        else:
            out.copy_(product)


def _spans(total: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _contiguous_offset(rows: torch.Tensor) -> int | None:
    """The first row when ``rows`` is one increasing contiguous range, else None (one host sync)."""
    if rows.numel() == 1 or bool((rows.diff() == 1).all()):
        return int(rows[0])
    return None


def workspace_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                       inv_temp, softcap, filter_eps, grad_hidden, grad_weight, grad_bias, workspace_bytes=None):
    """Writes the gradients of the compacted ``rows`` (see ``drivers.triton_backward`` for the
    arguments; ``inv_temp`` is ``temperature.kernel_temperature``'s 1 / temperature); ``workspace_bytes`` as
    in :func:`launch.backward_plan`."""
    dtype, device_type = hidden.dtype, hidden.device.type
    block_n, block_v, block_d, num_warps, num_stages = launch.launch_config("dlogits", dtype, device_type)
    unused = lse  # stands for pointer arguments that a constexpr switch leaves unread

    def write_dlogits(dlogits, bias_partial, r0, r1, v0, v1):
        chunk_rows, num_ids = r1 - r0, v1 - v0
        grid = (triton.cdiv(chunk_rows, block_n) * triton.cdiv(num_ids, block_v),)
        _logprobs_dlogits_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets, rows[r0:r1],
            inv_temp.rows if inv_temp.rows is not None else unused, lse[r0:r1],
            mean_logit[r0:r1] if mean_logit is not None else unused, grad_logp[r0:r1], grad_logp_sum[r0:r1],
            grad_ent[r0:r1] if grad_ent is not None else unused,
            dlogits, bias_partial if bias_partial is not None else unused,
            chunk_rows, v0, v1, weight.shape[1], targets.shape[1], hidden.stride(0), weight.stride(0),
            targets.stride(0), dlogits.stride(0), inv_temp.scalar, float(softcap or 1.0), float(filter_eps or 0.0),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=launch.BACKWARD_GROUP_ROWS,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, ENTROPY_GRAD=grad_ent is not None,
            ROW_TEMP=inv_temp.rows is not None, DOT_PRECISION=launch.dot_precision(dtype),
            INTERPRETER=device_type != "cuda", num_warps=num_warps, num_stages=num_stages,
        )

    dlogits_gemm_backward(hidden, weight, rows, grad_hidden, grad_weight, grad_bias, write_dlogits,
                          has_bias=bias is not None, workspace_bytes=workspace_bytes, tiles=(block_n, block_v))


def dlogits_gemm_backward(hidden, weight, rows, grad_hidden, grad_weight, grad_bias, write_dlogits, *, has_bias,
                          workspace_bytes=None, tiles=None):
    """The chunk loop of the workspace backward, for any kernel that writes d logits.

    hidden ``[N, D]``, weight ``[V, D]`` (the head whose gradients are wanted), rows ``[M]`` int32
    (the compacted active rows); grad_hidden ``[N, D]`` (its ``rows`` are written), grad_weight
    ``[V, D]`` or None (written), grad_bias ``[V]`` float32 or None (added to).
    ``write_dlogits(dlogits, bias_partial, r0, r1, v0, v1)`` fills ``dlogits`` (``[r1 - r0, v1 -
    v0]``, row stride ``dlogits.stride(0)``, hidden's dtype) with d loss / d y of the compacted rows
    ``[r0, r1)`` and vocabulary ids ``[v0, v1)``, and, when ``has_bias``, ``bias_partial`` (float32,
    ``[ceil((r1 - r0) / BLOCK_N), v1 - v0]`` flattened) with each row block's column sums.
    ``tiles``: the kernel's ``(BLOCK_N, BLOCK_V)`` (see :func:`launch.backward_plan`).
    """
    num_rows, (vocab, dim) = rows.numel(), weight.shape
    device, dtype = hidden.device, hidden.dtype
    offset = _contiguous_offset(rows)
    plan = launch.backward_plan(num_rows, vocab, dim, dtype, workspace_bytes, contiguous_rows=offset is not None,
                                has_bias=has_bias, weight_grad=grad_weight is not None,
                                grad_hidden_dtype=grad_hidden.dtype, device_type=device.type, tiles=tiles)
    block_n = (tiles or launch.launch_config("dlogits", dtype, device.type)[:2])[0]
    row_spans, vocab_spans = _spans(num_rows, plan.rows_per_chunk), _spans(vocab, plan.ids_per_chunk)
    rows_chunked = len(row_spans) > 1
    ids_alloc = launch.padded_ids(min(plan.ids_per_chunk, vocab))
    rows_alloc = plan.rows_per_chunk

    # The allocations of the plan, exactly.
    dlogits_flat = torch.empty(rows_alloc * ids_alloc, device=device, dtype=dtype)
    gathered = torch.empty((rows_alloc, dim), device=device, dtype=dtype) if plan.gathered_hidden_bytes else None
    hidden_in_place = grad_hidden.dtype == torch.float32 and offset is not None
    if hidden_in_place:
        hidden_acc = grad_hidden[offset:offset + num_rows]
    else:
        hidden_acc = torch.empty((num_rows, dim), device=device, dtype=torch.float32)
    weight_acc = None
    if grad_weight is not None and rows_chunked and grad_weight.dtype != torch.float32:
        weight_acc = torch.empty((ids_alloc, dim), device=device, dtype=torch.float32)
    bias_partial = None
    if has_bias:
        bias_partial = torch.empty(triton.cdiv(rows_alloc, block_n) * ids_alloc, device=device, dtype=torch.float32)

    def hidden_rows(r0, r1):
        """hidden's rows at compacted positions [r0, r1), for the d-weight GEMM: a view when the rows
        are contiguous; else gathered, once in all when there is one row chunk, else per chunk."""
        if offset is not None:
            return hidden[offset + r0:offset + r1]
        if rows_chunked:
            torch.index_select(hidden, 0, rows[r0:r1], out=gathered[:r1 - r0])
        return gathered[:r1 - r0]

    if gathered is not None and not rows_chunked:
        torch.index_select(hidden, 0, rows, out=gathered)
    for v0, v1 in vocab_spans:
        for r0, r1 in row_spans:
            num_ids, chunk_rows = v1 - v0, r1 - r0
            # rows padded to a multiple of 16 ids: aligned kernel stores and cuBLAS leading dimensions
            row_stride = launch.padded_ids(num_ids)
            dlogits = dlogits_flat[:chunk_rows * row_stride].view(chunk_rows, row_stride)[:, :num_ids]
            write_dlogits(dlogits, bias_partial, r0, r1, v0, v1)
            if bias_partial is not None:
                parts = bias_partial[:triton.cdiv(chunk_rows, block_n) * num_ids].view(-1, num_ids)
                grad_bias[v0:v1] += parts.sum(dim=0)
            _matmul_into(hidden_acc[r0:r1], dlogits, weight[v0:v1], accumulate=v0 > 0)
            if grad_weight is not None:
                h = hidden_rows(r0, r1)
                if weight_acc is None:  # one row chunk, or a float32 weight: straight into the gradient
                    _matmul_into(grad_weight[v0:v1], dlogits.t(), h, accumulate=r0 > 0)
                else:
                    _matmul_into(weight_acc[:num_ids], dlogits.t(), h, accumulate=r0 > 0)
                    if r1 == num_rows:
                        grad_weight[v0:v1].copy_(weight_acc[:num_ids])
    del dlogits_flat, gathered, weight_acc, bias_partial  # freed before the copies below

    if not hidden_in_place:
        # the float32 accumulator into the gradient's rows and dtype, a row chunk at a time (the
        # 16-bit copy of a chunk is the only temporary)
        for r0, r1 in _spans(num_rows, rows_alloc):
            if offset is not None:
                grad_hidden[offset + r0:offset + r1].copy_(hidden_acc[r0:r1])
            else:
                grad_hidden.index_copy_(0, rows[r0:r1].long(), hidden_acc[r0:r1].to(grad_hidden.dtype))
