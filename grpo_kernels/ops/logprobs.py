"""Per-token log-probs and entropy straight from hidden states and the LM head.

For every row ``n`` with hidden state ``h_n`` and target tokens ``t_{n,1..K}`` (K = 1 usually)::

    y_n       = h_n @ weight.T + bias                       # [V], never stored whole
    z_n       = y_n / temperature                           # or, with a soft-cap c:
    z_n       = c * tanh(y_n / c) / temperature             #   (Gemma's final_logit_softcapping)
    lse_n     = logsumexp(z_n)
    logp_nk   = z_n[t_nk] - lse_n
    entropy_n = lse_n - sum_v softmax(z_n)_v * z_n[v]

The forward streams the vocabulary through on-chip tiles (``tl.dot`` of ``[BLOCK_N, BLOCK_D]``
hidden by ``[BLOCK_D, BLOCK_V]`` weight tiles), keeps an online logsumexp and an online
``sum p (z - max)`` for the entropy, copies each target's logit out of the tile that holds it,
and stores O(N) state only. The vocabulary is split across programs; a small merge kernel
combines the per-split partial states in a fixed order (split 0, 1, 2, ...).

Batch invariance (``batch_invariant=True``, the default): the split size is a constant of the
launch configuration (``_INVARIANT_SPLIT_VOCAB`` ids), never a function of the number of rows,
and every tile configuration depends on the dtype only. A row's reduction order is then fixed by
V and the dtype alone, so its log-prob, entropy and lse are bitwise identical whatever else is in
the batch (its size, the other rows, ignored rows, the row's position). With
``batch_invariant=False`` the split count grows when there are few row blocks, to fill the GPU
(faster for a few hundred rows, but a row's bits then depend on N).

The backward recomputes each ``[BLOCK_N, BLOCK_V]`` logit tile and forms, on chip, ::

    d z_v = sum_k g_k [v == t_k] - p_v * sum_k g_k - g_ent * p_v * (z_v - E_p[z])
    d y_v = d z_v / temperature * (1 - tanh^2(y_v / c))       # the last factor under a soft-cap

Default scheme (Cut Cross-Entropy's): ``d y @ W`` goes into ``d hidden`` and ``d y^T @ h`` into
``d weight`` with atomic adds, so no ``[N, V]`` buffer ever exists. ``d hidden`` is accumulated
in float32 over row chunks of bounded size; ``d weight`` in a float32 vocabulary-chunk buffer
(``exact=True``) or in the weight's dtype. Rows that are ignored or whose incoming gradient is
zero are compacted away before the launch and cost nothing.

Deterministic scheme (``deterministic=True``): floating-point atomics add in whatever order the
programs happen to run, so the last bits of the gradients change from run to run. Instead, one
kernel owns each (row block, vocabulary split) and loops over the split's vocabulary tiles in
order, read-add-writing its own float32 ``d hidden`` partial (no other program touches it); the
few split partials are summed in a fixed order. A second kernel owns each vocabulary block and
loops over all row blocks in order, read-add-writing its ``d weight`` rows and keeping ``d bias``
in registers. No atomics at all (the sm_90 check verifies the PTX has no ``atom.``/``red.``), so
the gradients are bitwise identical run to run; the logits are recomputed in both kernels (6
matmuls in all instead of 4-5).

On CPU tensors the same Triton kernels run under ``TRITON_INTERPRET=1``; otherwise the chunked
PyTorch path of ``grpo_kernels.ops.logprobs_torch`` computes the same thing.
"""

from typing import Optional

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
)

# float32 gradient accumulator per backward launch (rows, or vocabulary ids, in chunks that fit).
_GRAD_CHUNK_BYTES = 32 * 2**20
# per-split partial states held at once by the forward (3 float32 per row and split).
_FWD_PART_BYTES = 32 * 2**20
# ignore_index is compared with int32 ids on the device: it must be an int32 itself.
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    if INTERPRETER:
        # Triton's CPU interpreter computes tl.dot with numpy's matmul, whose BLAS kernel rounds a
        # row differently depending on its position in the tile (the tensor cores' MMA does not),
        # and bf16/fp16 dots wrongly. An explicit float32 product-sum is position-invariant like
        # the MMA, and products of 16-bit floats are exact in float32.
        products = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
        return acc + tl.sum(products, axis=1)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _tanh(x):
    # TRL's form; exact at |x| -> inf (sigmoid saturates to 0 or 1), absolute error ~1e-7 near 0.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logit_tile(
    Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """y = h[rows] @ W[offs_v].T + b[offs_v] as a [BLOCK_N, BLOCK_V] float32 tile (before the
    soft-cap and the temperature)."""
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
    return acc


@triton.jit
def _logprobs_fwd_kernel(
    Hidden, Weight, Bias, Targets, RowIdx,
    PartMax, PartSum, PartEnt, TargetLogit,
    M, V, D, K, stride_h, stride_w, stride_t, inv_temp, softcap, vocab_per_split, num_splits,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One program: BLOCK_N rows x one vocabulary split. Writes per-split partial states
    (running max, sum of exp(z - max), sum of exp(z - max) * (z - max)) into Part* [M, splits],
    and the logit of every target id in the split into TargetLogit [M, K] (each (row, k) lies in
    at most one tile of one split, so the stores never collide)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    t_ptrs = Targets + rows.to(tl.int64) * stride_t

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # sum_v exp(z - run_max) * (z - run_max): shift-invariant form of sum p z, so that the
    # entropy does not cancel catastrophically when |z| ~ 1e4.
    run_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        y = _logit_tile(Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_PRECISION, INTERPRETER)
        if HAS_SOFTCAP:
            z = softcap * _tanh(y / softcap) * inv_temp
        else:
            z = y * inv_temp
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
        tile_end = tl.minimum(v0 + BLOCK_V, v_end)
        for k in range(K):
            target = tl.load(t_ptrs + k, mask=row_ok, other=-1)
            hit = row_ok & (target >= v0) & (target < tile_end)
            # Most tiles hold no row's k-th target: skip the [BLOCK_N, BLOCK_V] compare.
            if tl.sum(hit.to(tl.int32), axis=0) > 0:
                gathered = tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
                tl.store(TargetLogit + offs_m.to(tl.int64) * K + k, gathered, mask=hit)

    out = offs_m * num_splits + pid_s
    tl.store(PartMax + out, run_max, mask=row_ok)
    tl.store(PartSum + out, run_sum, mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(PartEnt + out, run_ent, mask=row_ok)


@triton.jit
def _logprobs_merge_kernel(
    PartMax, PartSum, PartEnt, Lse, Entropy, M, num_splits,
    BLOCK_N: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
):
    """lse [M] (and entropy [M]) from the per-split partial states [M, splits], merged split by
    split in index order: the same operations for a row whatever M is (batch-invariant)."""
    offs_m = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(num_splits):
        part_max = tl.load(PartMax + offs_m * num_splits + s, mask=row_ok, other=0.0)
        part_sum = tl.load(PartSum + offs_m * num_splits + s, mask=row_ok, other=0.0)
        new_max = tl.maximum(run_max, part_max)
        old_scale = tl.exp(run_max - new_max)
        part_scale = tl.exp(part_max - new_max)
        if COMPUTE_ENTROPY:
            part_ent = tl.load(PartEnt + offs_m * num_splits + s, mask=row_ok, other=0.0)
            old_shift = tl.where(run_sum > 0, run_max - new_max, 0.0)
            run_ent = (old_scale * (run_ent + run_sum * old_shift)
                       + part_scale * (part_ent + part_sum * (part_max - new_max)))
        run_sum = run_sum * old_scale + part_sum * part_scale
        run_max = new_max
    log_sum = tl.log(tl.where(row_ok, run_sum, 1.0))
    run_sum = tl.where(row_ok, run_sum, 1.0)
    tl.store(Lse + offs_m, run_max + log_sum, mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(Entropy + offs_m, log_sum - run_ent / run_sum, mask=row_ok)


@triton.jit
def _grad_logit_tile(
    Hidden, Weight, Bias, Targets, rows, offs_m, offs_v, row_ok, v_ok, tile_begin, tile_end,
    Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
    D, K, stride_h, stride_w, stride_t, inv_temp, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ENTROPY_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """d loss / d y for one [BLOCK_N, BLOCK_V] tile (y = h W^T + b), float32, 0 outside the valid
    rows x ids. Rows are indexed by the compacted position ``offs_m`` (Lse, GradLogp, ...) and by
    the original row ``rows`` (Hidden, Targets)."""
    y = _logit_tile(Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_PRECISION, INTERPRETER)
    if HAS_SOFTCAP:
        z = softcap * _tanh(y / softcap) * inv_temp
        # 1 - tanh^2(x) = 4 sigmoid(2x) sigmoid(-2x): accurate where tanh saturates (1 - t^2
        # would cancel to a few ulps of 1 once |x| > 4)
        dcap = 4.0 * tl.sigmoid(2.0 * y / softcap) * tl.sigmoid(-2.0 * y / softcap)
    else:
        z = y * inv_temp
    lse = tl.load(Lse + offs_m, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    # d logp_k / d z = onehot(t_k) - p ; d entropy / d z = -p (z - E_p[z])
    coeff = tl.load(GradLogpSum + offs_m, mask=row_ok, other=0.0)[:, None]
    if ENTROPY_GRAD:
        grad_ent = tl.load(GradEnt + offs_m, mask=row_ok, other=0.0)
        mean_logit = tl.load(MeanLogit + offs_m, mask=row_ok, other=0.0)
        coeff += grad_ent[:, None] * (z - mean_logit[:, None])
    grad = -p * coeff
    t_ptrs = Targets + rows.to(tl.int64) * stride_t
    for k in range(K):
        target = tl.load(t_ptrs + k, mask=row_ok, other=-1)
        hit = row_ok & (target >= tile_begin) & (target < tile_end)
        if tl.sum(hit.to(tl.int32), axis=0) > 0:
            grad_logp = tl.load(GradLogp + offs_m.to(tl.int64) * K + k, mask=hit, other=0.0)
            grad += tl.where(offs_v[None, :] == target[:, None], grad_logp[:, None], 0.0)
    if HAS_SOFTCAP:
        grad = grad * (dcap * inv_temp)
    else:
        grad = grad * inv_temp
    return tl.where(row_ok[:, None] & v_ok[None, :], grad, 0.0)


@triton.jit
def _logprobs_bwd_kernel(
    Hidden, Weight, Bias, Targets, RowIdx, Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
    GradHidden, GradWeight, GradBias,
    M, v_begin, v_end, D, K, stride_h, stride_w, stride_t, stride_gh, stride_gw, inv_temp, softcap,
    filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    HIDDEN_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """One program: a [BLOCK_N, BLOCK_V] tile of d logits, scattered into d hidden and/or d weight
    with atomic adds.

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
    tile_begin = v_begin + pid_v * BLOCK_V
    offs_v = tile_begin + tl.arange(0, BLOCK_V)
    v_ok = offs_v < v_end
    grad_y = _grad_logit_tile(
        Hidden, Weight, Bias, Targets, rows, offs_m, offs_v, row_ok, v_ok, tile_begin,
        tl.minimum(tile_begin + BLOCK_V, v_end), Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
        D, K, stride_h, stride_w, stride_t, inv_temp, softcap, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS,
        HAS_SOFTCAP, ENTROPY_GRAD, DOT_PRECISION, INTERPRETER)

    # Optional Cut-Cross-Entropy-style filtering: a tile whose every |d y| is below filter_eps
    # contributes less than rounding to both products; skip its matmuls.
    if tl.max(tl.max(tl.abs(grad_y), axis=1), axis=0) < filter_eps:
        return

    # Relaxed atomics throughout: the adds commute and nothing in this launch reads them back.
    if HAS_BIAS and HIDDEN_GRAD:
        tl.atomic_add(GradBias + offs_v, tl.sum(grad_y, axis=0), mask=v_ok, sem="relaxed")

    grad_y_op = grad_y.to(Hidden.dtype.element_ty)
    gh_ptrs = GradHidden + offs_m.to(tl.int64)[:, None] * stride_gh
    w_ptrs = Weight + offs_v.to(tl.int64)[:, None] * stride_w
    h_ptrs = Hidden + rows.to(tl.int64)[:, None] * stride_h
    gw_ptrs = GradWeight + (offs_v - v_begin).to(tl.int64)[:, None] * stride_gw
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if HIDDEN_GRAD:
            w = tl.load(w_ptrs + offs_d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            grad_h = _dot(grad_y_op, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_PRECISION,
                          INTERPRETER)
            tl.atomic_add(gh_ptrs + offs_d[None, :], grad_h, mask=row_ok[:, None] & d_ok[None, :],
                          sem="relaxed")
        if WEIGHT_GRAD:
            h = tl.load(h_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            grad_w = _dot(tl.trans(grad_y_op), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32),
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


@triton.jit
def _logprobs_bwd_det_kernel(
    Hidden, Weight, Bias, Targets, RowIdx, Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
    GradHidden, GradWeight, GradBias,
    M, v_begin, v_end, D, K, stride_h, stride_w, stride_t, stride_gh, stride_gh_split, stride_gw,
    inv_temp, softcap, filter_eps, vocab_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    HIDDEN_PASS: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """The deterministic backward: every output element has exactly one owning program, which
    accumulates into it with plain loads and stores, in a fixed loop order. No atomics.

    HIDDEN_PASS: program (row block, split) loops over the split's vocabulary tiles in order and
    read-add-writes d hidden of its rows into its own split partial ``GradHidden[split]``
    ([splits, M, D] float32, summed in split order by the caller).
    Otherwise: program (vocabulary block) of [v_begin, v_end) loops over all row blocks in order,
    read-add-writing d weight of its ids (``GradWeight`` indexed by ``offs_v - v_begin``) and
    summing d bias in registers (``GradBias`` indexed by ``offs_v``).
    """
    if HIDDEN_PASS:
        offs_m = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_m < M
        rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
        split_begin = v_begin + tl.program_id(1) * vocab_per_split
        split_end = tl.minimum(split_begin + vocab_per_split, v_end)
        gh_ptrs = GradHidden + tl.program_id(1).to(tl.int64) * stride_gh_split + offs_m.to(tl.int64)[:, None] * stride_gh
        for tile_begin in range(split_begin, split_end, BLOCK_V):
            offs_v = tile_begin + tl.arange(0, BLOCK_V)
            v_ok = offs_v < split_end
            grad_y = _grad_logit_tile(
                Hidden, Weight, Bias, Targets, rows, offs_m, offs_v, row_ok, v_ok, tile_begin,
                tl.minimum(tile_begin + BLOCK_V, split_end), Lse, MeanLogit, GradLogp, GradLogpSum,
                GradEnt, D, K, stride_h, stride_w, stride_t, inv_temp, softcap, BLOCK_N, BLOCK_V,
                BLOCK_D, HAS_BIAS, HAS_SOFTCAP, ENTROPY_GRAD, DOT_PRECISION, INTERPRETER)
            if tl.max(tl.max(tl.abs(grad_y), axis=1), axis=0) >= filter_eps:
                grad_y_op = grad_y.to(Hidden.dtype.element_ty)
                w_ptrs = Weight + offs_v.to(tl.int64)[:, None] * stride_w
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    d_ok = offs_d < D
                    w = tl.load(w_ptrs + offs_d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
                    gh_mask = row_ok[:, None] & d_ok[None, :]
                    acc = tl.load(gh_ptrs + offs_d[None, :], mask=gh_mask, other=0.0)
                    acc = _dot(grad_y_op, w, acc, DOT_PRECISION, INTERPRETER)
                    tl.store(gh_ptrs + offs_d[None, :], acc, mask=gh_mask)
    else:
        tile_begin = v_begin + tl.program_id(0) * BLOCK_V
        offs_v = tile_begin + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        tile_end = tl.minimum(tile_begin + BLOCK_V, v_end)
        gw_ptrs = GradWeight + (offs_v - v_begin).to(tl.int64)[:, None] * stride_gw
        grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_N):
            offs_m = m0 + tl.arange(0, BLOCK_N)
            row_ok = offs_m < M
            rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
            grad_y = _grad_logit_tile(
                Hidden, Weight, Bias, Targets, rows, offs_m, offs_v, row_ok, v_ok, tile_begin, tile_end,
                Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt, D, K, stride_h, stride_w, stride_t,
                inv_temp, softcap, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, ENTROPY_GRAD,
                DOT_PRECISION, INTERPRETER)
            if BIAS_GRAD:
                grad_bias += tl.sum(grad_y, axis=0)
            if WEIGHT_GRAD:
                if tl.max(tl.max(tl.abs(grad_y), axis=1), axis=0) >= filter_eps:
                    grad_y_op = tl.trans(grad_y.to(Hidden.dtype.element_ty))
                    h_ptrs = Hidden + rows.to(tl.int64)[:, None] * stride_h
                    for d0 in range(0, D, BLOCK_D):
                        offs_d = d0 + tl.arange(0, BLOCK_D)
                        d_ok = offs_d < D
                        h = tl.load(h_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                        gw_mask = v_ok[:, None] & d_ok[None, :]
                        acc = tl.load(gw_ptrs + offs_d[None, :], mask=gw_mask, other=0.0)
                        acc = _dot(grad_y_op, h, acc, DOT_PRECISION, INTERPRETER)
                        tl.store(gw_ptrs + offs_d[None, :], acc, mask=gw_mask)
        if BIAS_GRAD:
            tl.store(GradBias + offs_v, grad_bias, mask=v_ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration: one table, shared by the launcher and the sm_90 compile check
# ---------------------------------------------------------------------------------------------

_GPU_CONFIG = {
    # kind -> dtype -> (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)
    "fwd": {
        torch.bfloat16: (128, 128, 64, 8, 3),
        torch.float16: (128, 128, 64, 8, 3),
        torch.float32: (64, 64, 32, 4, 3),
    },
    # the merge of the forward's split partials: BLOCK_N rows per program (BLOCK_V, BLOCK_D unused)
    "merge": {
        torch.bfloat16: (128, 1, 1, 4, 1),
        torch.float16: (128, 1, 1, 4, 1),
        torch.float32: (128, 1, 1, 4, 1),
    },
    "bwd": {
        torch.bfloat16: (128, 128, 64, 8, 2),
        torch.float16: (128, 128, 64, 8, 2),
        torch.float32: (64, 64, 32, 4, 2),
    },
    # deterministic backward (both passes)
    "bwd_det": {
        torch.bfloat16: (128, 128, 64, 8, 2),
        torch.float16: (128, 128, 64, 8, 2),
        torch.float32: (64, 64, 32, 4, 2),
    },
}
# Interpreter: small tiles so that tests at small shapes still cross tile boundaries.
_INTERPRETER_CONFIG = (16, 16, 16, 1, 1)
_GROUP_N = 8
# Batch-invariant forward: vocabulary ids per split, a multiple of every BLOCK_V above. On the
# GPU, 2048 ids (16 tiles of 128) give V=152k 75 splits: at N >= 4096 (>= 32 row blocks) that is
# >= 2400 programs, so the split count never starves the GPU (see token_logprobs' docstring).
# Interpreter: 2 tiles, so that test vocabularies have several splits.
_INVARIANT_SPLIT_VOCAB = {"gpu": 2048, "interpreter": 32}


def _config(kind: str, dtype: torch.dtype, device: torch.device):
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    return _GPU_CONFIG[kind][dtype]


def _interpreted(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cuda"


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not silently go through tf32 (3e-4 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _programs_to_fill(device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # the interpreter: exercise the split paths at test sizes


def _forward_vocab_per_split(num_rows, vocab, block_n, block_v, device, batch_invariant) -> int:
    """Vocabulary ids per forward program, a multiple of block_v.

    Batch-invariant: a constant. Otherwise the vocabulary is split further when there are too few
    row blocks to fill the GPU (the split count, and so a row's reduction order, then depends on N).
    """
    if batch_invariant:
        return _INVARIANT_SPLIT_VOCAB["gpu" if device.type == "cuda" else "interpreter"]
    row_blocks = triton.cdiv(num_rows, block_n)
    splits = max(1, min(triton.cdiv(_programs_to_fill(device), row_blocks), triton.cdiv(vocab, block_v)))
    return triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v


# ---------------------------------------------------------------------------------------------
# Forward / backward drivers (the interface of docs in logprob-drivers: shared with the torch
# backend and the vocab-parallel op)
# ---------------------------------------------------------------------------------------------


def _triton_forward(hidden, weight, bias, targets, rows, temperature, compute_entropy, *, softcap=None,
                    batch_invariant=True):
    """hidden [N, D], weight [V, D], bias [V] or None, targets [N, K] int32 (ids outside [0, V)
    match nothing), rows [M] int32. Returns (logp [M, K], lse [M], entropy [M] or None), float32."""
    num_rows, (vocab, dim), num_targets = rows.numel(), weight.shape, targets.shape[1]
    block_n, block_v, block_d, num_warps, num_stages = _config("fwd", hidden.dtype, hidden.device)
    merge_n, _, _, merge_warps, merge_stages = _config("merge", hidden.dtype, hidden.device)
    vocab_per_split = _forward_vocab_per_split(num_rows, vocab, block_n, block_v, hidden.device, batch_invariant)
    splits = triton.cdiv(vocab, vocab_per_split)  # every split holds at least one token

    target_logit = torch.zeros((num_rows, num_targets), device=hidden.device, dtype=torch.float32)
    lse = torch.empty(num_rows, device=hidden.device, dtype=torch.float32)
    entropy = torch.empty(num_rows, device=hidden.device, dtype=torch.float32) if compute_entropy else None
    # Row chunks bound the partial states; a row's result does not depend on its chunk.
    row_chunk = max(block_n, _FWD_PART_BYTES // (12 * splits) // block_n * block_n)
    for start in range(0, num_rows, row_chunk):
        sl = slice(start, start + row_chunk)
        chunk_rows = rows[sl]
        part = torch.empty((3, chunk_rows.numel(), splits), device=hidden.device, dtype=torch.float32)
        part_max, part_sum, part_ent = part.unbind(0)
        _logprobs_fwd_kernel[(triton.cdiv(chunk_rows.numel(), block_n), splits)](
            hidden, weight, bias if bias is not None else hidden, targets, chunk_rows,
            part_max, part_sum, part_ent, target_logit[sl],
            chunk_rows.numel(), vocab, dim, num_targets, hidden.stride(0), weight.stride(0), targets.stride(0),
            1.0 / temperature, float(softcap or 1.0), vocab_per_split, splits,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, COMPUTE_ENTROPY=compute_entropy,
            DOT_PRECISION=_dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
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


def _launch_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                     temperature, softcap, filter_eps, v_begin, v_end, grad_hidden_acc, grad_weight_acc,
                     grad_bias):
    """One atomic backward launch over the compacted ``rows`` x vocabulary ids ``[v_begin, v_end)``."""
    dim = weight.shape[1]
    block_n, block_v, block_d, num_warps, num_stages = _config("bwd", hidden.dtype, hidden.device)
    grid = (triton.cdiv(rows.numel(), block_n) * triton.cdiv(v_end - v_begin, block_v),)
    _logprobs_bwd_kernel[grid](
        *_backward_args(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent),
        grad_hidden_acc if grad_hidden_acc is not None else lse,
        grad_weight_acc if grad_weight_acc is not None else weight,
        grad_bias if grad_bias is not None else lse,
        rows.numel(), v_begin, v_end, dim, targets.shape[1], hidden.stride(0), weight.stride(0),
        targets.stride(0),
        grad_hidden_acc.stride(0) if grad_hidden_acc is not None else 0,
        grad_weight_acc.stride(0) if grad_weight_acc is not None else 0,
        1.0 / temperature, float(softcap or 1.0), float(filter_eps or 0.0),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=_GROUP_N,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, ENTROPY_GRAD=grad_ent is not None,
        HIDDEN_GRAD=grad_hidden_acc is not None, WEIGHT_GRAD=grad_weight_acc is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
        num_warps=num_warps, num_stages=num_stages,
    )


def _launch_backward_det(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent,
                         temperature, softcap, filter_eps, v_begin, v_end, *, grad_hidden_parts=None,
                         vocab_per_split=0, grad_weight_acc=None, grad_bias=None):
    """One deterministic backward launch: the d-hidden pass (``grad_hidden_parts`` [splits, M, D]
    float32) or the d-weight/d-bias pass (``grad_weight_acc`` [v_end - v_begin, D] float32 and/or
    ``grad_bias`` [V] float32)."""
    dim = weight.shape[1]
    block_n, block_v, block_d, num_warps, num_stages = _config("bwd_det", hidden.dtype, hidden.device)
    hidden_pass = grad_hidden_parts is not None
    if hidden_pass:
        grid = (triton.cdiv(rows.numel(), block_n), grad_hidden_parts.shape[0])
    else:
        grid = (triton.cdiv(v_end - v_begin, block_v),)
    _logprobs_bwd_det_kernel[grid](
        *_backward_args(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent),
        grad_hidden_parts if hidden_pass else lse,
        grad_weight_acc if grad_weight_acc is not None else lse,
        grad_bias if grad_bias is not None else lse,
        rows.numel(), v_begin, v_end, dim, targets.shape[1], hidden.stride(0), weight.stride(0),
        targets.stride(0),
        grad_hidden_parts.stride(1) if hidden_pass else 0, grad_hidden_parts.stride(0) if hidden_pass else 0,
        grad_weight_acc.stride(0) if grad_weight_acc is not None else 0,
        1.0 / temperature, float(softcap or 1.0), float(filter_eps or 0.0), vocab_per_split,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, ENTROPY_GRAD=grad_ent is not None,
        HIDDEN_PASS=hidden_pass, WEIGHT_GRAD=grad_weight_acc is not None, BIAS_GRAD=grad_bias is not None,
        DOT_PRECISION=_dot_precision(hidden.dtype), INTERPRETER=_interpreted(hidden),
        num_warps=num_warps, num_stages=num_stages,
    )


def _triton_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_ent,
                     temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias, *, softcap=None,
                     deterministic=False):
    """Writes the gradients of the compacted rows into grad_hidden / grad_weight / grad_bias.

    targets [N, K] int32; lse, mean_logit (or None), grad_ent (or None) [M]; grad_logp [M, K];
    grad_hidden [N, D] (rows only are written), grad_weight [V, D] or None, grad_bias [V] float32
    or None.

    Atomic scheme, pass 1 over row chunks: d hidden into a float32 chunk buffer (and d bias). When
    the weight is float32, or ``exact`` is off, d weight is scattered in the same pass, straight
    into the weight-dtype gradient: 4 matmuls in all, but 16-bit d weight then sums N / BLOCK_N
    partial products in 16-bit arithmetic. Exact mode instead runs pass 2, over vocabulary chunks,
    which recomputes the logits (a 5th matmul) and accumulates d weight in a float32 chunk buffer.
    Deterministic scheme: see the module docstring (always float32 accumulation, 6 matmuls).
    Extra memory either way: the chunk buffers (_GRAD_CHUNK_BYTES each).
    """
    vocab, dim = weight.shape
    grad_logp_sum = grad_logp.sum(dim=1)  # the softmax term weighs p by every target's gradient
    args = (hidden, weight, bias, targets)

    def row_args(sl):
        return (rows[sl], lse[sl], mean_logit[sl] if mean_logit is not None else None, grad_logp[sl],
                grad_logp_sum[sl], grad_ent[sl] if grad_ent is not None else None)

    full_args = (rows, lse, mean_logit, grad_logp, grad_logp_sum, grad_ent)
    if deterministic:
        block_n, block_v = _config("bwd_det", hidden.dtype, hidden.device)[:2]
        # Vocabulary splits of the d-hidden pass: enough programs to fill the GPU at small N (the
        # split count may depend on N: run-to-run determinism only needs the same shapes).
        row_blocks = triton.cdiv(rows.numel(), block_n)
        splits = max(1, min(triton.cdiv(_programs_to_fill(hidden.device), row_blocks), 8,
                            triton.cdiv(vocab, block_v)))
        vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
        splits = triton.cdiv(vocab, vocab_per_split)
        row_chunk = max(block_n, (_GRAD_CHUNK_BYTES // (4 * dim * splits)) // block_n * block_n)
        for start in range(0, rows.numel(), row_chunk):
            sl = slice(start, start + row_chunk)
            parts = torch.zeros((splits, rows[sl].numel(), dim), device=hidden.device, dtype=torch.float32)
            _launch_backward_det(*args, *row_args(sl), temperature, softcap, filter_eps, 0, vocab,
                                 grad_hidden_parts=parts, vocab_per_split=vocab_per_split)
            total = parts[0]
            for split in range(1, splits):  # fixed order
                total += parts[split]
            grad_hidden.index_copy_(0, rows[sl].long(), total.to(grad_hidden.dtype))
        if grad_weight is None and grad_bias is None:
            return
        vocab_chunk = max(block_v, (_GRAD_CHUNK_BYTES // (4 * dim)) // block_v * block_v)
        for v_begin in range(0, vocab, vocab_chunk):
            v_end = min(v_begin + vocab_chunk, vocab)
            grad_weight_acc = None
            if grad_weight is not None:
                grad_weight_acc = grad_weight[v_begin:v_end] if grad_weight.dtype == torch.float32 else \
                    torch.zeros((v_end - v_begin, dim), device=weight.device, dtype=torch.float32)
            _launch_backward_det(*args, *full_args, temperature, softcap, filter_eps, v_begin, v_end,
                                 grad_weight_acc=grad_weight_acc, grad_bias=grad_bias)
            if grad_weight is not None and grad_weight_acc.data_ptr() != grad_weight[v_begin:v_end].data_ptr():
                grad_weight[v_begin:v_end] = grad_weight_acc
        return

    block_n, block_v = _config("bwd", hidden.dtype, hidden.device)[:2]
    weight_in_pass_1 = grad_weight is not None and (grad_weight.dtype == torch.float32 or not exact)
    row_chunk = max(block_n, (_GRAD_CHUNK_BYTES // (4 * dim)) // block_n * block_n)
    for start in range(0, rows.numel(), row_chunk):
        sl = slice(start, start + row_chunk)
        grad_hidden_acc = torch.zeros((rows[sl].numel(), dim), device=hidden.device, dtype=torch.float32)
        _launch_backward(*args, *row_args(sl), temperature, softcap, filter_eps, 0, vocab,
                         grad_hidden_acc, grad_weight if weight_in_pass_1 else None, grad_bias)
        grad_hidden.index_copy_(0, rows[sl].long(), grad_hidden_acc.to(grad_hidden.dtype))

    if grad_weight is not None and not weight_in_pass_1:
        vocab_chunk = max(block_v, (_GRAD_CHUNK_BYTES // (4 * dim)) // block_v * block_v)
        for v_begin in range(0, vocab, vocab_chunk):
            v_end = min(v_begin + vocab_chunk, vocab)
            grad_weight_acc = torch.zeros((v_end - v_begin, dim), device=weight.device, dtype=torch.float32)
            _launch_backward(*args, *full_args, temperature, softcap, filter_eps, v_begin, v_end,
                             None, grad_weight_acc, None)
            grad_weight[v_begin:v_end] = grad_weight_acc


_BACKENDS = {"triton": (_triton_forward, _triton_backward), "torch": (torch_forward, torch_backward)}


# ---------------------------------------------------------------------------------------------
# The PyTorch custom ops (torch.compile traces through them; meta tensors infer shapes)
# ---------------------------------------------------------------------------------------------


def _kernel_targets(targets: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """[N, K] int32 ids for the drivers: ignored entries become -1 (an id that matches no logit),
    so that no value of ignore_index can collide with a token once narrowed to int32."""
    return torch.where(live, targets, -1).to(torch.int32).contiguous()


@torch.library.custom_op("grpo_kernels::token_logprobs", mutates_args=())
def _token_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    temperature: float, softcap: Optional[float], ignore_index: int, compute_entropy: bool,
    batch_invariant: bool, filter_eps: Optional[float], exact: bool, deterministic: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D] (row-contiguous), weight [V, D], bias [V] or None, targets [N, K] int32/int64.

    Returns float32 (logp [N, K], entropy [N] (or [0] without compute_entropy), lse [N]); 0 for
    ignored entries, and entropy/lse 0 for rows with no live target. filter_eps, exact and
    deterministic are backward options (the autograd context reads them from here).
    """
    num_rows, num_targets = targets.shape
    # The data-dependent checks live inside the op, where torch.compile does not trace.
    check_index_range("targets", targets, weight.shape[0], ignore_index)
    live = targets != ignore_index
    rows = live.any(dim=1).nonzero().squeeze(1).to(torch.int32)
    logp = hidden.new_zeros((num_rows, num_targets), dtype=torch.float32)
    entropy = hidden.new_zeros(num_rows if compute_entropy else 0, dtype=torch.float32)
    lse = hidden.new_zeros(num_rows, dtype=torch.float32)
    if rows.numel() > 0:
        forward_fn, _ = _BACKENDS[backend]
        options = {"softcap": softcap}
        if backend == "triton":
            options["batch_invariant"] = batch_invariant
        logp_rows, lse_rows, entropy_rows = forward_fn(
            hidden, weight, bias, _kernel_targets(targets, live), rows, temperature, compute_entropy, **options)
        idx = rows.long()
        logp[idx] = logp_rows
        lse[idx] = lse_rows
        if compute_entropy:
            entropy[idx] = entropy_rows
        logp.masked_fill_(~live, 0.0)
    return logp, entropy, lse


@_token_logprobs_op.register_fake
def _token_logprobs_fake(hidden, weight, bias, targets, temperature, softcap, ignore_index, compute_entropy, batch_invariant,
      filter_eps, exact, deterministic, backend):
    num_rows, num_targets = targets.shape
    return (hidden.new_empty((num_rows, num_targets), dtype=torch.float32),
            hidden.new_empty(num_rows if compute_entropy else 0, dtype=torch.float32),
            hidden.new_empty(num_rows, dtype=torch.float32))


@torch.library.custom_op("grpo_kernels::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor], temperature: float,
    softcap: Optional[float], ignore_index: int, filter_eps: Optional[float], exact: bool,
    deterministic: bool, backend: str, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d hidden [N, D], d weight [V, D] (or [0]), d bias [V] (or [0])) of
    <grad_logp, logp> + <grad_entropy, entropy> + <grad_lse, lse> (None = no gradient)."""
    num_rows, num_targets = targets.shape
    live = targets != ignore_index
    kernel_targets = _kernel_targets(targets, live)
    if grad_logp is None:
        grad_logp = hidden.new_zeros((num_rows, num_targets), dtype=torch.float32)
    grad_logp = torch.where(live, grad_logp.float(), 0.0)
    # Only rows with a live target and a non-zero incoming gradient take part in the backward.
    active = (grad_logp != 0).any(dim=1)
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float()
        active |= grad_entropy != 0
    if grad_lse is not None:
        grad_lse = grad_lse.float()
        active |= grad_lse != 0
        # d lse / d z = p. An extra target column whose id matches no logit, with gradient
        # -grad_lse, adds exactly +grad_lse * p through the softmax term -p * sum_k g_k.
        kernel_targets = torch.cat([kernel_targets, kernel_targets.new_full((num_rows, 1), -1)], dim=1)
        grad_logp = torch.cat([grad_logp, -grad_lse[:, None]], dim=1)
    rows = (active & live.any(dim=1)).nonzero().squeeze(1).to(torch.int32)

    grad_hidden = torch.zeros_like(hidden)
    grad_weight = torch.zeros_like(weight) if need_weight else None
    # Whenever there is a bias the kernels produce d bias ([V] float32, small), needed or not.
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if bias is not None else None
    if rows.numel() > 0:
        _, backward_fn = _BACKENDS[backend]
        idx = rows.long()
        # E_p[z] = lse - entropy
        mean_logit = (lse - entropy)[idx].contiguous() if grad_entropy is not None else None
        backward_fn(
            hidden, weight, bias, kernel_targets, rows, lse[idx].contiguous(), mean_logit,
            grad_logp[idx].contiguous(), grad_entropy[idx].contiguous() if grad_entropy is not None else None,
            temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias,
            softcap=softcap, deterministic=deterministic,
        )
    return (grad_hidden,
            grad_weight if need_weight else hidden.new_empty(0),
            grad_bias.to(bias.dtype) if need_bias else hidden.new_empty(0))


@_token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, grad_lse, temperature, softcap,
      ignore_index, filter_eps, exact, deterministic, backend, need_weight, need_bias):
    return (torch.empty_like(hidden),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, softcap, ignore_index, _, _, filter_eps, exact, deterministic, \
        backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.options = (temperature, softcap, ignore_index, filter_eps, exact, deterministic, backend)
    # An output nobody used gets None, not a zero tensor that would switch on its backward terms.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    no_grads = (None,) * 13
    if grad_logp is None and grad_entropy is None and grad_lse is None:
        return no_grads
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = torch.ops.grpo_kernels.token_logprobs_backward(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, grad_lse, *ctx.options,
        need_weight, need_bias)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None) + no_grads[3:]


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _validate(hidden, weight, targets, bias, temperature, ignore_index, filter_eps, softcap):
    """Shape, dtype and scalar checks (no data-dependent ones: those run inside the op)."""
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
    lead_shape = tuple(hidden.shape[:-1])
    if targets.dim() == hidden.dim():  # K targets per row
        if tuple(targets.shape[:-1]) != lead_shape or targets.shape[-1] == 0:
            raise ValueError(f"targets shape {tuple(targets.shape)} must be hidden's leading shape {lead_shape} "
                             f"(one target per row) or {lead_shape} + (K,) with K >= 1 (K targets per row)")
    elif tuple(targets.shape) != lead_shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {lead_shape} "
                         f"(or {lead_shape} + (K,) for K targets per row)")
    if targets.numel() == 0:
        raise ValueError("empty batch: hidden has no rows")
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias has {bias.shape[0]} entries, weight has V={vocab} rows")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT32_MIN <= ignore_index <= _INT32_MAX:
        raise ValueError(f"ignore_index must be an int32 (in [{_INT32_MIN}, {_INT32_MAX}]), got {ignore_index}")
    temperature = check_positive_finite("temperature", temperature)
    if filter_eps is not None:
        filter_eps = check_positive_finite("filter_eps", filter_eps)
    if softcap is not None:
        softcap = check_positive_finite("softcap", softcap)
    return temperature, filter_eps, softcap


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    softcap: float | None = None,
    filter_eps: float | None = None,
    exact: bool = True,
    batch_invariant: bool = True,
    deterministic: bool = False,
    backend: str = "auto",
    process_group=None,
):
    """Log-prob of each target token (and the entropy and logsumexp of its row), logits never stored.

    The logits are ``z = (hidden @ weight.T + bias) / temperature``, or with ``softcap``
    ``z = softcap * tanh((hidden @ weight.T + bias) / softcap) / temperature``.

    Args:
        hidden: ``[..., D]`` last hidden states (bf16, fp16 or fp32).
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        targets: int32/int64 token ids, either ``[...]`` (the leading shape of ``hidden``: one
            target per row) or ``[..., K]`` (``targets.dim() == hidden.dim()``: K targets per
            row, e.g. a teacher's top-K, all scored in the same pass over the vocabulary; ids may
            repeat). Entries equal to ``ignore_index`` give log-prob 0 and no gradient; a row
            whose every entry is ignored also gets entropy 0 and lse 0.
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it before the softmax (finite, > 0).
        ignore_index: an int32.
        return_entropy: also return the entropy of ``softmax(z)`` per row.
        return_lse: also return ``logsumexp(z)`` per row (differentiable: a z-loss, or a caller's
            own normalization).
        softcap: logit soft-capping (Gemma 2/3's ``final_logit_softcapping``), finite > 0, or None.
        filter_eps: backward only: skip ``[BLOCK_N, BLOCK_V]`` tiles whose every ``|d logit|`` is
            below this (Cut Cross-Entropy's gradient filtering, e.g. ``2**-12`` for bf16). ``None``
            (default) is exact.
        exact: backward only, 16-bit weights only. ``True`` (default): every gradient is
            accumulated in float32; d weight takes a second pass that recomputes the logits
            (5 matmuls in all instead of 4). ``False``: d weight is accumulated in the weight's
            dtype within the single pass (Cut Cross-Entropy's scheme): faster, but its 16-bit
            rounding error grows with the number of rows.
        batch_invariant: Triton kernels: a row's outputs are bitwise identical whatever else is in
            the batch (batch size, other rows, ignored rows, position), because the vocabulary
            split, and so the reduction order, is fixed by V and the dtype. Default ``True``: at
            N >= 4096 rows the fixed split launches at least as many programs as the adaptive one
            (so its cost is nil by count; the GPU kit measures it). ``False`` splits the
            vocabulary further for small N (a few hundred rows) to fill the GPU: faster there,
            but a row's last bits then depend on N. The chunked torch path makes no such promise
            (its matmul blocking is the BLAS library's choice).
        deterministic: backward only, Triton kernels: bitwise-identical gradients run to run. The
            default backward adds partial products with floating-point atomics, whose order (and
            so the last bits) varies between runs; ``True`` gives every gradient element one
            owning program that accumulates in a fixed order (no atomics: 6 matmuls instead of
            4-5, always float32 accumulation). Use it to debug a divergence, or for RL
            reproducibility studies that replay a run bit for bit; the kit measures its cost.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else chunked torch),
            ``"triton"`` or ``"torch"``.
        process_group: vocabulary-parallel head (tensor parallelism): ``weight``/``bias`` are this
            rank's ``[V_r, D]``/``[V_r]`` shard (rank order), ``targets`` hold global ids, ``hidden``
            is the same on every rank; see :func:`grpo_kernels.ops.vocab_parallel.vocab_parallel_logprobs`.

    Returns:
        float32 log-probs of the shape of ``targets``; with ``return_entropy`` and/or
        ``return_lse`` a tuple ``(logprobs, entropy, lse)`` of those asked for, entropy and lse
        shaped like hidden's leading shape. Differentiable w.r.t. hidden, weight and bias through
        all of them; gradients come back in the inputs' dtype. Under ``torch.no_grad()`` only the
        forward runs. ``torch.compile(fullgraph=True)`` traces through it (a custom op,
        ``torch.ops.grpo_kernels.token_logprobs``), and meta tensors give the output shapes.
    """
    if process_group is not None:
        unsupported = [name for name, on in (('return_lse', return_lse), ('softcap', softcap is not None),
                       ('deterministic', deterministic), ('K targets per row', targets.dim() == hidden.dim()))
                       if on]
        if unsupported:
            raise ValueError(f"process_group (vocabulary-parallel head) does not support {', '.join(unsupported)} yet")
        from grpo_kernels.ops.vocab_parallel import vocab_parallel_logprobs

        return vocab_parallel_logprobs(
            hidden, weight, targets, process_group, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, filter_eps=filter_eps, exact=exact, backend=backend)
    temperature, filter_eps, softcap = _validate(hidden, weight, targets, bias, temperature, ignore_index,
                                                 filter_eps, softcap)
    backend = resolve_backend(hidden.device, backend)
    lead_shape = hidden.shape[:-1]
    num_targets = targets.shape[-1] if targets.dim() == hidden.dim() else 1
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    weight_c = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias_c = bias.contiguous() if bias is not None else None
    logp, entropy, lse = torch.ops.grpo_kernels.token_logprobs(
        hidden_2d, weight_c, bias_c, targets.reshape(-1, num_targets), temperature, softcap, ignore_index,
        bool(return_entropy), bool(batch_invariant), filter_eps, bool(exact), bool(deterministic), backend)
    outputs = (logp.view(targets.shape),)
    if return_entropy:
        outputs += (entropy.view(lead_shape),)
    if return_lse:
        outputs += (lse.view(lead_shape),)
    return outputs if len(outputs) > 1 else outputs[0]


# ---------------------------------------------------------------------------------------------
# Every configuration the launcher can pick, for the sm_90 compile check
# ---------------------------------------------------------------------------------------------

_FLOAT_ARGS = ("inv_temp", "softcap", "filter_eps")


def _spec(name, kernel, pointers, constexprs, config, forbid_atomics=False):
    """A CompileSpec whose signature is derived from the kernel's arguments: ``pointers`` names the
    pointer arguments' types, ``_FLOAT_ARGS`` are fp32 scalars, every other argument is an i32."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
        else:
            signature[arg] = "fp32" if arg in _FLOAT_ARGS else "i32"
    *_, num_warps, num_stages = config
    return CompileSpec(name=name, kernel=kernel, signature=signature, constexprs=constexprs,
                       num_warps=num_warps, num_stages=num_stages, forbid_atomics=forbid_atomics)


def _tiles(config):
    block_n, block_v, block_d, _, _ = config
    return {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d}


def sm90_compile_specs() -> list[CompileSpec]:
    specs = []
    flags = [(bias, softcap, entropy) for bias in (False, True) for softcap in (False, True) for entropy in (False, True)]
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        common = {"DOT_PRECISION": _dot_precision(dtype), "INTERPRETER": False}
        inputs = {"Hidden": f"*{ty}", "Weight": f"*{ty}", "Bias": f"*{ty}", "Targets": "*i32", "RowIdx": "*i32"}
        grads_in = {"Lse": "*fp32", "MeanLogit": "*fp32", "GradLogp": "*fp32", "GradLogpSum": "*fp32",
                    "GradEnt": "*fp32", "GradHidden": "*fp32", "GradBias": "*fp32"}

        config = _GPU_CONFIG["merge"][dtype]
        for entropy in (False, True):
            specs.append(_spec(
                f"logprobs_merge[{ty},entropy={entropy}]", _logprobs_merge_kernel,
                {name: "*fp32" for name in ("PartMax", "PartSum", "PartEnt", "Lse", "Entropy")},
                {"BLOCK_N": config[0], "COMPUTE_ENTROPY": entropy}, config))

        config = _GPU_CONFIG["fwd"][dtype]
        for bias, softcap, entropy in flags:
            specs.append(_spec(
                f"logprobs_fwd[{ty},bias={bias},softcap={softcap},entropy={entropy}]", _logprobs_fwd_kernel,
                {**inputs, "PartMax": "*fp32", "PartSum": "*fp32", "PartEnt": "*fp32", "TargetLogit": "*fp32"},
                {**_tiles(config), **common, "HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "COMPUTE_ENTROPY": entropy},
                config))

        config = _GPU_CONFIG["bwd"][dtype]
        # (d hidden, d weight, d weight accumulator dtype): pass 1 without / with d weight, and
        # the exact d-weight pass into a float32 chunk buffer (16-bit weights only).
        passes = [(True, False, ty), (True, True, ty)] + ([(False, True, "fp32")] if ty != "fp32" else [])
        for bias, softcap, entropy in flags:
            for hidden_grad, weight_grad, grad_weight_ty in passes:
                specs.append(_spec(
                    (f"logprobs_bwd[{ty},bias={bias},softcap={softcap},entropy={entropy},dH={hidden_grad},"
                     f"dW={weight_grad and grad_weight_ty}]"), _logprobs_bwd_kernel,
                    {**inputs, **grads_in, "GradWeight": f"*{grad_weight_ty}"},
                    {**_tiles(config), **common, "GROUP_N": _GROUP_N, "HAS_BIAS": bias, "HAS_SOFTCAP": softcap,
                     "ENTROPY_GRAD": entropy, "HIDDEN_GRAD": hidden_grad, "WEIGHT_GRAD": weight_grad},
                    config))

        config = _GPU_CONFIG["bwd_det"][dtype]
        for bias, softcap, entropy in flags:
            # (d-hidden pass, d weight, d bias): the d-hidden pass, then the vocabulary pass with
            # d weight and/or d bias (d bias exactly when there is a bias).
            det_passes = [(True, False, False), (False, True, bias)] + ([(False, False, True)] if bias else [])
            for hidden_pass, weight_grad, bias_grad in det_passes:
                specs.append(_spec(
                    (f"logprobs_bwd_det[{ty},bias={bias},softcap={softcap},entropy={entropy},"
                     f"{'dH' if hidden_pass else 'dW' * weight_grad + 'dB' * bias_grad}]"), _logprobs_bwd_det_kernel,
                    {**inputs, **grads_in, "GradWeight": "*fp32"},
                    {**_tiles(config), **common, "HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "ENTROPY_GRAD": entropy,
                     "HIDDEN_PASS": hidden_pass, "WEIGHT_GRAD": weight_grad, "BIAS_GRAD": bias_grad},
                    config, forbid_atomics=True))
    return specs
