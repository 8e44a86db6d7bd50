"""The Triton kernels of the log-prob op: the forward, the merge of its vocabulary splits, the
d-logits kernel of the default (workspace) backward and the atomic backward (see the package
docstring for the math; ``launch`` holds their tile configurations, ``drivers`` launches them)."""

import triton
import triton.language as tl


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


# tanh(x) / x = sum_n c_n x^(2n) (Taylor: c_n = 2^(2n+2) (2^(2n+2) - 1) B_(2n+2) / (2n+2)!), its
# first 8 terms: within 2 float32 ulps of tanh for |x| < _TANH_SERIES_BOUND (the next term is
# below 1e-9 there); beyond it tanh |x| = (1 - e^(-2|x|)) / (1 + e^(-2|x|)) loses at most 2 ulps.
_TANH_SERIES_BOUND = tl.constexpr(0.5)
_TANH_C1 = tl.constexpr(-1.0 / 3.0)
_TANH_C2 = tl.constexpr(2.0 / 15.0)
_TANH_C3 = tl.constexpr(-17.0 / 315.0)
_TANH_C4 = tl.constexpr(62.0 / 2835.0)
_TANH_C5 = tl.constexpr(-1382.0 / 155925.0)
_TANH_C6 = tl.constexpr(21844.0 / 6081075.0)
_TANH_C7 = tl.constexpr(-929569.0 / 638512875.0)


@triton.jit
def _tanh_ratio(x2):
    """tanh(x) / x from x^2, for |x| < _TANH_SERIES_BOUND."""
    ratio = _TANH_C7 * x2 + _TANH_C6
    ratio = ratio * x2 + _TANH_C5
    ratio = ratio * x2 + _TANH_C4
    ratio = ratio * x2 + _TANH_C3
    ratio = ratio * x2 + _TANH_C2
    ratio = ratio * x2 + _TANH_C1
    return ratio * x2 + 1.0


@triton.jit
def _softcap(y, softcap):
    """``softcap * tanh(y / softcap)`` within a few float32 ulps of its own size, for every y and
    every normal float32 softcap. TRL's ``2 sigmoid(2x) - 1`` carries ~6e-8 absolute error in tanh,
    which the cap multiplies: 8e-4 in the logits at softcap = 1e4, 1.4 at 1e30 (which must be no
    cap at all). Small |x| = |y / softcap| takes ``y * (tanh(x) / x)`` from the series, so a huge
    cap gives y itself (x^2 may even underflow to 0: the series is then 1); large |x| the
    exponential form, exact at saturation."""
    x = y / softcap
    e = tl.exp(-2.0 * tl.abs(x))
    saturating = softcap * ((1.0 - e) / (1.0 + e))
    return tl.where(tl.abs(x) < _TANH_SERIES_BOUND, y * _tanh_ratio(x * x),
                    tl.where(y < 0.0, -saturating, saturating))


@triton.jit
def _softcap_grad(y, softcap):
    """(``_softcap(y, softcap)``, its derivative ``1 - tanh^2(x)``). The derivative as
    ``4 sigmoid(2x) sigmoid(-2x)``: accurate where tanh saturates (1 - t^2 would cancel to a few
    ulps of 1 once |x| > 4), relative error of a few ulps everywhere, 1 for a huge cap. (Forming it
    from the series' exponential instead compiled to 48-180 B of register spills in the 16-bit
    d-logits kernel.)"""
    x = y / softcap
    return _softcap(y, softcap), 4.0 * tl.sigmoid(2.0 * x) * tl.sigmoid(-2.0 * x)


@triton.jit
def _row_scale(InvTemp, rows, row_ok, inv_temp, ROW_TEMP: tl.constexpr):
    """1 / temperature for the tile's rows: the scalar ``inv_temp``, or with ROW_TEMP a [BLOCK_N, 1]
    column read from InvTemp [N] (one per original row). A switch, not always the column: held
    across the vocabulary loop it costs registers (ptxas spilled the float32 forward with it), so
    a call with one temperature compiles without it."""
    if ROW_TEMP:
        return tl.load(InvTemp + rows, mask=row_ok, other=1.0)[:, None]
    else:
        return inv_temp


@triton.jit
def _grouped_tile(pid, num_row_blocks, num_cols, GROUP_N: tl.constexpr):
    """(row block, column) of program ``pid`` in a grid of num_row_blocks x num_cols, rastered in
    groups of GROUP_N row blocks: inside a group the row block varies fastest, then the column
    (a vocabulary split or tile). The programs running together then share a few row blocks of
    hidden and each column's weight tiles in L2 (see launch.FORWARD_GROUP_ROWS)."""
    per_group = GROUP_N * num_cols
    first_row = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(num_row_blocks - first_row, GROUP_N)
    in_group = pid % per_group
    return first_row + in_group % group_rows, in_group // group_rows


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


# int64 keys (see topk.py) of "no candidate" (below every real key) and of a slot beyond k (above
# every real key, so never the list's minimum: never evicted).
_EMPTY_KEY = tl.constexpr(-9223372036854775808)
_UNUSED_SLOT = tl.constexpr(9223372036854775807)


@triton.jit
def _topk_keys(z, ids):
    """int64 keys ordered as (z, -id): ``ordered(z) << 32 | (2**31 - 1 - id)``; the same packing
    as ``topk.pack_keys`` (-0.0 taken as +0.0, so that it ties with +0.0 by id)."""
    bits = tl.where(z == 0.0, 0.0, z).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - ids).to(tl.int64)


@triton.jit
def _merge_topk(run_top, keys, TOPK: tl.constexpr):
    """The running top-k keys ``run_top`` [BLOCK_N, TOPK] (slots beyond k hold _UNUSED_SLOT)
    updated with a tile's keys [BLOCK_N, BLOCK_V] (_EMPTY_KEY where there is no id).

    Insertion by threshold: while some row has a tile key above its list's minimum (its k-th
    largest so far), the largest such key replaces that minimum. Only reductions over the tile, no
    sorting network (tl.topk's shuffles of [BLOCK_N, 2 TOPK] int64 spilled registers at 64 slots),
    and after the first tiles of a split few keys pass the threshold. Keys are distinct within a
    row, so the result is the exact top-k whatever the order of insertion."""
    threshold = tl.min(run_top, axis=1)
    best = tl.max(tl.where(keys > threshold[:, None], keys, _EMPTY_KEY), axis=1)
    while tl.max(best, axis=0) > _EMPTY_KEY:
        # the list's keys are distinct (empty slots too, see _logprobs_fwd_kernel): one minimum
        insert = (best > _EMPTY_KEY)[:, None] & (run_top == threshold[:, None])
        run_top = tl.where(insert, best[:, None], run_top)
        keys = tl.where(keys == best[:, None], _EMPTY_KEY, keys)
        threshold = tl.min(run_top, axis=1)
        best = tl.max(tl.where(keys > threshold[:, None], keys, _EMPTY_KEY), axis=1)
    return run_top


@triton.jit
def _logprobs_fwd_kernel(
    Hidden, Weight, Bias, Targets, RowIdx, InvTemp,
    PartMax, PartSum, PartEnt, PartSq, PartZsum, PartBefore, PartTopk, TargetLogit,
    M, V, D, K, stride_h, stride_w, stride_t, inv_temp, softcap, vocab_per_split, num_splits, topk,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    LOG_SUM_SQ: tl.constexpr, MEAN_LOGITS: tl.constexpr, TOP1: tl.constexpr, TOPK: tl.constexpr,
    ROW_TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One program: BLOCK_N rows x one vocabulary split (a 1-D grid of row blocks x splits, rastered
    in groups of GROUP_N row blocks: see _grouped_tile). Writes per-split partial states
    (running max, sum of exp(z - max), sum of exp(z - max) * (z - max)) into Part* [M, splits],
    and the logit of every target id in the split into TargetLogit [M, K] (each (row, k) lies in
    at most one tile of one split, so the stores never collide). 1 / temperature: the scalar
    inv_temp, or with ROW_TEMP InvTemp [N], one per original row (see _row_scale).

    Optional partial states, each behind its constexpr switch (no cost when off): LOG_SUM_SQ
    sum exp(2 (z - max)) (PartSq); MEAN_LOGITS sum z (PartZsum); TOP1 the largest z of the ids
    below the row's first target (PartBefore); TOPK > 0 (a power of 2 >= topk) the split's topk
    largest (z, -id) keys, unordered (PartTopk [M, splits, TOPK] int64, _EMPTY_KEY in the slots
    beyond topk; see _topk_keys, _merge_topk)."""
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_N), num_splits, GROUP_N)
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    t_ptrs = Targets + rows.to(tl.int64) * stride_t
    scale = _row_scale(InvTemp, rows, row_ok, inv_temp, ROW_TEMP)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # sum_v exp(z - run_max) * (z - run_max): shift-invariant form of sum p z, so that the
    # entropy does not cancel catastrophically when |z| ~ 1e4.
    run_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_before = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    if TOPK > 0:
        # distinct placeholders: empty slots EMPTY + j (below every real key), slots beyond k
        # UNUSED - j (above every key: never the minimum, never evicted)
        slot_ids = tl.arange(0, TOPK)
        placeholders = tl.where(slot_ids < topk, _EMPTY_KEY + slot_ids.to(tl.int64), _UNUSED_SLOT - slot_ids.to(tl.int64))
        run_top = tl.zeros((BLOCK_N, TOPK), dtype=tl.int64) + placeholders[None, :]

    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        y = _logit_tile(Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_PRECISION, INTERPRETER)
        if HAS_SOFTCAP:
            z = _softcap(y, softcap) * scale
        else:
            z = y * scale
        if MEAN_LOGITS:
            run_z += tl.sum(tl.where(v_ok[None, :], z, 0.0), axis=1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        if TOP1:
            # the row's first target, read again for every tile rather than held across the loop
            # (t_ptrs is live anyway; an L1 hit); K = 0 (statistics only): nothing below it
            # (the mask compared as a tensor: Triton 3.9's interpreter makes `row_ok & (K > 0)` int32
            # and refuses it as a mask)
            first_target = tl.load(t_ptrs, mask=row_ok & ((tl.zeros_like(rows) + K) > 0), other=-1)
            below = offs_v[None, :] < first_target[:, None]
            run_before = tl.maximum(run_before, tl.max(tl.where(below, z, float("-inf")), axis=1))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        z_shift = tl.where(v_ok[None, :], z - new_max[:, None], 0.0)
        p = tl.where(v_ok[None, :], tl.exp(z_shift), 0.0)
        if COMPUTE_ENTROPY:
            # re-base the old sum to the new max: sum e^{z-m'}(z-m') = r * (sum e^{z-m}(z-m) + s (m-m'))
            shift = tl.where(run_sum > 0, run_max - new_max, 0.0)
            run_ent = rescale * (run_ent + run_sum * shift) + tl.sum(p * z_shift, axis=1)
        if LOG_SUM_SQ:
            run_sq = run_sq * (rescale * rescale) + tl.sum(p * p, axis=1)
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
        if TOPK > 0:
            # last: the int64 keys replace z (dead from here), rather than living beside it
            keys = tl.where(v_ok[None, :], _topk_keys(z, offs_v[None, :]), _EMPTY_KEY)
            run_top = _merge_topk(run_top, keys, TOPK)

    out = offs_m * num_splits + pid_s
    tl.store(PartMax + out, run_max, mask=row_ok)
    tl.store(PartSum + out, run_sum, mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(PartEnt + out, run_ent, mask=row_ok)
    if LOG_SUM_SQ:
        tl.store(PartSq + out, run_sq, mask=row_ok)
    if MEAN_LOGITS:
        tl.store(PartZsum + out, run_z, mask=row_ok)
    if TOP1:
        tl.store(PartBefore + out, run_before, mask=row_ok)
    if TOPK > 0:
        slots = out.to(tl.int64)[:, None] * TOPK + slot_ids[None, :]
        tl.store(PartTopk + slots, tl.where(slot_ids[None, :] < topk, run_top, _EMPTY_KEY), mask=row_ok[:, None])


@triton.jit
def _logprobs_merge_kernel(
    PartMax, PartSum, PartEnt, PartSq, PartZsum, PartBefore,
    Lse, Entropy, LogSumSq, MeanLogits, RowMax, MaxBefore, M, V, num_splits,
    BLOCK_N: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, LOG_SUM_SQ: tl.constexpr, MEAN_LOGITS: tl.constexpr,
    TOP1: tl.constexpr,
):
    """lse [M] (and entropy, log sum p^2, mean z, and the top-1 rule's max z and max z below the
    target, each [M] behind its switch) from the per-split partial states [M, splits], merged
    split by split in index order: the same operations for a row whatever M is (batch-invariant)."""
    offs_m = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_before = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        part = offs_m * num_splits + s
        part_max = tl.load(PartMax + part, mask=row_ok, other=0.0)
        part_sum = tl.load(PartSum + part, mask=row_ok, other=0.0)
        new_max = tl.maximum(run_max, part_max)
        old_scale = tl.exp(run_max - new_max)
        part_scale = tl.exp(part_max - new_max)
        if COMPUTE_ENTROPY:
            part_ent = tl.load(PartEnt + part, mask=row_ok, other=0.0)
            old_shift = tl.where(run_sum > 0, run_max - new_max, 0.0)
            run_ent = (old_scale * (run_ent + run_sum * old_shift)
                       + part_scale * (part_ent + part_sum * (part_max - new_max)))
        if LOG_SUM_SQ:
            part_sq = tl.load(PartSq + part, mask=row_ok, other=0.0)
            run_sq = run_sq * (old_scale * old_scale) + part_sq * (part_scale * part_scale)
        if MEAN_LOGITS:
            run_z += tl.load(PartZsum + part, mask=row_ok, other=0.0)
        if TOP1:
            run_before = tl.maximum(run_before, tl.load(PartBefore + part, mask=row_ok, other=0.0))
        run_sum = run_sum * old_scale + part_sum * part_scale
        run_max = new_max
    log_sum = tl.log(tl.where(row_ok, run_sum, 1.0))
    run_sum = tl.where(row_ok, run_sum, 1.0)
    tl.store(Lse + offs_m, run_max + log_sum, mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(Entropy + offs_m, log_sum - run_ent / run_sum, mask=row_ok)
    if LOG_SUM_SQ:
        tl.store(LogSumSq + offs_m, tl.log(tl.where(row_ok, run_sq, 1.0)) - 2.0 * log_sum, mask=row_ok)
    if MEAN_LOGITS:
        tl.store(MeanLogits + offs_m, run_z / V, mask=row_ok)
    if TOP1:
        tl.store(RowMax + offs_m, run_max, mask=row_ok)
        tl.store(MaxBefore + offs_m, run_before, mask=row_ok)


@triton.jit
def _grad_logit_tile(
    Hidden, Weight, Bias, Targets, rows, offs_m, offs_v, row_ok, v_ok, tile_begin, tile_end,
    InvTemp, Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
    D, K, stride_h, stride_w, stride_t, inv_temp, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ENTROPY_GRAD: tl.constexpr, ROW_TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """d loss / d y for one [BLOCK_N, BLOCK_V] tile (y = h W^T + b), float32, 0 outside the valid
    rows x ids. Rows are indexed by the compacted position ``offs_m`` (Lse, GradLogp, ...) and by
    the original row ``rows`` (Hidden, Targets and, with ROW_TEMP, InvTemp: see _row_scale)."""
    scale = _row_scale(InvTemp, rows, row_ok, inv_temp, ROW_TEMP)
    y = _logit_tile(Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_PRECISION, INTERPRETER)
    if HAS_SOFTCAP:
        capped, dcap = _softcap_grad(y, softcap)
        z = capped * scale
    else:
        z = y * scale
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
        grad = grad * (dcap * scale)
    else:
        grad = grad * scale
    return tl.where(row_ok[:, None] & v_ok[None, :], grad, 0.0)


@triton.jit
def _logprobs_bwd_atomic_kernel(
    Hidden, Weight, Bias, Targets, RowIdx, InvTemp, Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
    GradHidden, GradWeight, GradBias,
    M, v_begin, v_end, D, K, stride_h, stride_w, stride_t, stride_gh, stride_gw, inv_temp, softcap,
    filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    HIDDEN_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr, ROW_TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The atomic backward's kernel (``backward="atomic"``): one program forms a [BLOCK_N, BLOCK_V]
    tile of d logits and scatters its products into d hidden and/or d weight with atomic adds.

    Covers the M compacted rows x vocabulary ids [v_begin, v_end). GradHidden is indexed by the
    compacted row position ``offs_m``; GradWeight by ``offs_v - v_begin`` (so that it can be a
    chunk buffer); hidden/targets by the original row ``rows``. With HIDDEN_GRAD the bias
    gradient is added too. The row-block index varies fastest inside groups of GROUP_N row
    blocks, so that programs running together share weight tiles in L2.
    """
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_N), tl.cdiv(v_end - v_begin, BLOCK_V), GROUP_N)

    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    tile_begin = v_begin + pid_v * BLOCK_V
    offs_v = tile_begin + tl.arange(0, BLOCK_V)
    v_ok = offs_v < v_end
    grad_y = _grad_logit_tile(
        Hidden, Weight, Bias, Targets, rows, offs_m, offs_v, row_ok, v_ok, tile_begin,
        tl.minimum(tile_begin + BLOCK_V, v_end), InvTemp, Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
        D, K, stride_h, stride_w, stride_t, inv_temp, softcap, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS,
        HAS_SOFTCAP, ENTROPY_GRAD, ROW_TEMP, DOT_PRECISION, INTERPRETER)

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
def _logprobs_dlogits_kernel(
    Hidden, Weight, Bias, Targets, RowIdx, InvTemp, Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
    GradLogits, BiasPartial,
    M, v_begin, v_end, D, K, stride_h, stride_w, stride_t, stride_g, inv_temp, softcap, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    ROW_TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """The workspace backward's kernel: one program recomputes one [BLOCK_N, BLOCK_V] logit tile
    and stores its d logits (d loss / d y) into the chunk buffer; no atomics, every element of the
    buffer has exactly one writer.

    Covers the M compacted rows x vocabulary ids [v_begin, v_end) of one chunk. GradLogits is
    ``[M, v_end - v_begin]`` (row stride ``stride_g``) in its own dtype (the input dtype), indexed by
    the compacted row position and ``offs_v - v_begin``. A tile whose every ``|d y|`` is below
    filter_eps is stored as zeros (Cut Cross-Entropy's gradient filtering). With HAS_BIAS the
    tile's float32 column sums go to ``BiasPartial[row block, offs_v - v_begin]`` (``[row blocks,
    v_end - v_begin]``), which the driver sums over row blocks in order: d bias without atomics.
    Programs are rastered in groups of GROUP_N row blocks (_grouped_tile).
    """
    num_ids = v_end - v_begin
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_N), tl.cdiv(num_ids, BLOCK_V), GROUP_N)
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    tile_begin = v_begin + pid_v * BLOCK_V
    offs_v = tile_begin + tl.arange(0, BLOCK_V)
    v_ok = offs_v < v_end
    grad_y = _grad_logit_tile(
        Hidden, Weight, Bias, Targets, rows, offs_m, offs_v, row_ok, v_ok, tile_begin,
        tl.minimum(tile_begin + BLOCK_V, v_end), InvTemp, Lse, MeanLogit, GradLogp, GradLogpSum, GradEnt,
        D, K, stride_h, stride_w, stride_t, inv_temp, softcap, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS,
        HAS_SOFTCAP, ENTROPY_GRAD, ROW_TEMP, DOT_PRECISION, INTERPRETER)
    # filter_eps = 0 (no filtering) keeps every tile: no |d y| is below 0.
    keep = tl.max(tl.max(tl.abs(grad_y), axis=1), axis=0) >= filter_eps
    grad_y = tl.where(keep, grad_y, 0.0)
    cols = offs_v - v_begin
    g_ptrs = GradLogits + offs_m.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(g_ptrs, grad_y.to(GradLogits.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
    if HAS_BIAS:
        tl.store(BiasPartial + pid_n.to(tl.int64) * num_ids + cols, tl.sum(grad_y, axis=0), mask=v_ok)
