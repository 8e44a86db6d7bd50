"""The Triton kernels of the divergence op: the forward (both heads' online statistics), the merge
of its vocabulary splits, the JSD's second pass, and the d-logits kernel of the backward (see the
package docstring for the math, ``launch`` for the tiles, ``drivers`` for the launches).

Every kernel computes a student tile and, with ``HAS_TEACHER``, the teacher's tile of the same
rows and vocabulary ids: two tile GEMMs (``hidden @ weight.T``, each head with its own hidden
size and dtype) per vocabulary tile, on chip. Bias and soft-cap are runtime switches (an
``if`` on a scalar, the same for the whole program), not constexprs: with two heads in up to
nine dtype pairs, constexpr switches would multiply the compiled configurations by 16.
"""

import triton
import triton.language as tl

from grpo_kernels.ops.logprobs.kernels import _grouped_tile, _logit_tile, _tanh

# What the d-logits kernel differentiates (its KIND constexpr).
FORWARD_KL, REVERSE_KL, JSD, TARGETS = 0, 1, 2, 3
# the same, as the jit functions may read them (globals must be constexprs there)
_FORWARD_KL, _REVERSE_KL, _TARGETS = tl.constexpr(FORWARD_KL), tl.constexpr(REVERSE_KL), tl.constexpr(TARGETS)
# The forward's per-row, per-split online state, in this order along Part's first axis:
# student (max, sum e^{x}, sum e^{x} x) with x = z_s - max_s; teacher (max, sum e^{x}) with
# x = z_t - max_t; the teacher gap sum e^{x_t} (x_t - x_s) and the student gap sum e^{x_s} (x_s - x_t).
NUM_STATES = 7


@triton.jit
def _head_logits(Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w, scale, softcap, inv_t,
                 has_bias, has_softcap, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, WITH_DERIVATIVE: tl.constexpr):
    """(z, dz/dy) of one head as float32 [BLOCK_N, BLOCK_V] tiles: y = h[rows] @ W[offs_v].T + b,
    u = scale * y, z = (softcap * tanh(u / softcap) or u) * inv_t (inv_t [BLOCK_N], per row).
    dz/dy only with WITH_DERIVATIVE (else the second value is z again, unused)."""
    y = _logit_tile(Hidden, Weight, Bias, rows, offs_v, row_ok, v_ok, D, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_D, False, DOT_PRECISION, INTERPRETER)
    if has_bias:
        y += tl.load(Bias + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    u = y * scale
    row_factor = inv_t[:, None]
    if has_softcap:
        z = softcap * _tanh(u / softcap) * row_factor
        if WITH_DERIVATIVE:
            # 1 - tanh^2(x) = 4 sigmoid(2x) sigmoid(-2x): no cancellation where tanh saturates
            dzdy = 4.0 * tl.sigmoid(2.0 * u / softcap) * tl.sigmoid(-2.0 * u / softcap) * (scale * row_factor)
        else:
            dzdy = z
    else:
        z = u * row_factor
        if WITH_DERIVATIVE:
            dzdy = tl.zeros_like(z) + scale * row_factor
        else:
            dzdy = z
    return z, dzdy


@triton.jit
def _divergence_fwd_kernel(
    SHidden, SWeight, SBias, THidden, TWeight, TBias, InvTemp, RowIdx, Part,
    M, V, DS, DT, stride_sh, stride_sw, stride_th, stride_tw,
    s_scale, s_softcap, t_scale, t_softcap, s_has_bias, s_has_softcap, t_has_bias, t_has_softcap,
    vocab_per_split, num_splits,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    GROUP_N: tl.constexpr, HAS_TEACHER: tl.constexpr, S_DOT_PRECISION: tl.constexpr,
    T_DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """One program: BLOCK_N compacted rows x one vocabulary split (a 1-D grid of row blocks x
    splits in groups of GROUP_N row blocks). Writes the split's online state (NUM_STATES of them,
    3 without a teacher) into Part [NUM_STATES, M, splits]. (The top-k forms' logits at k ids are
    k dot products per row, formed outside: ``head.logits_at_ids``; copying them out of the tiles
    here held registers that spilled.)

    Every running sum is kept relative to its running max (x = z - max), so that nothing cancels
    when |z| ~ 1e4: when a max moves by d, a sum of e^{x} x becomes r (S + s d) with r = e^{d}.
    """
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_N), num_splits, GROUP_N)
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    inv_t = tl.load(InvTemp + rows, mask=row_ok, other=1.0)

    s_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    t_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        zs, _ = _head_logits(SHidden, SWeight, SBias, rows, offs_v, row_ok, v_ok, DS, stride_sh, stride_sw,
                             s_scale, s_softcap, inv_t, s_has_bias, s_has_softcap, BLOCK_N, BLOCK_V, BLOCK_DS,
                             S_DOT_PRECISION, INTERPRETER, False)
        new_s_max = tl.maximum(s_max, tl.max(tl.where(v_ok[None, :], zs, float("-inf")), axis=1))
        s_rescale = tl.exp(s_max - new_s_max)
        s_shift = tl.where(s_sum > 0, s_max - new_s_max, 0.0)
        xs = tl.where(v_ok[None, :], zs - new_s_max[:, None], 0.0)
        ps = tl.where(v_ok[None, :], tl.exp(xs), 0.0)
        if HAS_TEACHER:
            zt, _ = _head_logits(THidden, TWeight, TBias, rows, offs_v, row_ok, v_ok, DT, stride_th, stride_tw,
                                 t_scale, t_softcap, inv_t, t_has_bias, t_has_softcap, BLOCK_N, BLOCK_V, BLOCK_DT,
                                 T_DOT_PRECISION, INTERPRETER, False)
            new_t_max = tl.maximum(t_max, tl.max(tl.where(v_ok[None, :], zt, float("-inf")), axis=1))
            t_rescale = tl.exp(t_max - new_t_max)
            t_shift = tl.where(t_sum > 0, t_max - new_t_max, 0.0)
            xt = tl.where(v_ok[None, :], zt - new_t_max[:, None], 0.0)
            pt = tl.where(v_ok[None, :], tl.exp(xt), 0.0)
            gap = xt - xs
            t_gap = t_rescale * (t_gap + t_sum * (t_shift - s_shift)) + tl.sum(pt * gap, axis=1)
            s_gap = s_rescale * (s_gap + s_sum * (s_shift - t_shift)) - tl.sum(ps * gap, axis=1)
            t_sum = t_sum * t_rescale + tl.sum(pt, axis=1)
            t_max = new_t_max
        s_ent = s_rescale * (s_ent + s_sum * s_shift) + tl.sum(ps * xs, axis=1)
        s_sum = s_sum * s_rescale + tl.sum(ps, axis=1)
        s_max = new_s_max

    state = M * num_splits
    out = Part + offs_m * num_splits + pid_s
    tl.store(out, s_max, mask=row_ok)
    tl.store(out + state, s_sum, mask=row_ok)
    tl.store(out + 2 * state, s_ent, mask=row_ok)
    if HAS_TEACHER:
        tl.store(out + 3 * state, t_max, mask=row_ok)
        tl.store(out + 4 * state, t_sum, mask=row_ok)
        tl.store(out + 5 * state, t_gap, mask=row_ok)
        tl.store(out + 6 * state, s_gap, mask=row_ok)


@triton.jit
def _divergence_merge_kernel(
    Part, SLse, Entropy, TLse, ForwardKL, ReverseKL, M, num_splits,
    BLOCK_N: tl.constexpr, HAS_TEACHER: tl.constexpr,
):
    """Per row, the forward's split states merged split by split in index order (the same
    operations whatever M is: batch-invariant), then: student lse and entropy; with a teacher,
    its lse and both KLs (forward KL(p_t || p_s), reverse KL(p_s || p_t))."""
    offs_m = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    state = M * num_splits
    s_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    t_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(num_splits):
        src = Part + offs_m * num_splits + s
        p_s_max = tl.load(src, mask=row_ok, other=0.0)
        p_s_sum = tl.load(src + state, mask=row_ok, other=1.0)
        p_s_ent = tl.load(src + 2 * state, mask=row_ok, other=0.0)
        new_s_max = tl.maximum(s_max, p_s_max)
        s_shift = tl.where(s_sum > 0, s_max - new_s_max, 0.0)
        p_s_shift = p_s_max - new_s_max
        s_scale, p_s_scale = tl.exp(s_max - new_s_max), tl.exp(p_s_shift)
        if HAS_TEACHER:
            p_t_max = tl.load(src + 3 * state, mask=row_ok, other=0.0)
            p_t_sum = tl.load(src + 4 * state, mask=row_ok, other=1.0)
            p_t_gap = tl.load(src + 5 * state, mask=row_ok, other=0.0)
            p_s_gap = tl.load(src + 6 * state, mask=row_ok, other=0.0)
            new_t_max = tl.maximum(t_max, p_t_max)
            t_shift = tl.where(t_sum > 0, t_max - new_t_max, 0.0)
            p_t_shift = p_t_max - new_t_max
            t_scale, p_t_scale = tl.exp(t_max - new_t_max), tl.exp(p_t_shift)
            t_gap = (t_scale * (t_gap + t_sum * (t_shift - s_shift))
                     + p_t_scale * (p_t_gap + p_t_sum * (p_t_shift - p_s_shift)))
            s_gap = (s_scale * (s_gap + s_sum * (s_shift - t_shift))
                     + p_s_scale * (p_s_gap + p_s_sum * (p_s_shift - p_t_shift)))
            t_sum = t_sum * t_scale + p_t_sum * p_t_scale
            t_max = new_t_max
        s_ent = s_scale * (s_ent + s_sum * s_shift) + p_s_scale * (p_s_ent + p_s_sum * p_s_shift)
        s_sum = s_sum * s_scale + p_s_sum * p_s_scale
        s_max = new_s_max
    s_sum = tl.where(row_ok, s_sum, 1.0)
    log_s_sum = tl.log(s_sum)
    tl.store(SLse + offs_m, s_max + log_s_sum, mask=row_ok)
    tl.store(Entropy + offs_m, log_s_sum - s_ent / s_sum, mask=row_ok)
    if HAS_TEACHER:
        t_sum = tl.where(row_ok, t_sum, 1.0)
        log_t_sum = tl.log(t_sum)
        tl.store(TLse + offs_m, t_max + log_t_sum, mask=row_ok)
        # KL(p_t || p_s) = E_pt[(z_t - max_t) - (z_s - max_s)] - log sum_t + log sum_s, and mirrored
        tl.store(ForwardKL + offs_m, t_gap / t_sum - log_t_sum + log_s_sum, mask=row_ok)
        tl.store(ReverseKL + offs_m, s_gap / s_sum - log_s_sum + log_t_sum, mask=row_ok)


@triton.jit
def _log_mixture(log_ps, log_pt, log_beta, log_one_minus_beta):
    """log((1 - beta) p_s + beta p_t) from log p_s and log p_t, without overflow."""
    a = log_ps + log_one_minus_beta
    b = log_pt + log_beta
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _divergence_jsd_kernel(
    SHidden, SWeight, SBias, THidden, TWeight, TBias, InvTemp, RowIdx, SLse, TLse, Part,
    M, V, DS, DT, stride_sh, stride_sw, stride_th, stride_tw,
    s_scale, s_softcap, t_scale, t_softcap, s_has_bias, s_has_softcap, t_has_bias, t_has_softcap,
    beta, log_beta, log_one_minus_beta, vocab_per_split, num_splits,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    GROUP_N: tl.constexpr, S_DOT_PRECISION: tl.constexpr, T_DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The generalized JSD's second pass (it needs both final normalizers for the mixture
    m = (1 - beta) p_s + beta p_t): per row and split, the partial sums of
    beta p_t log(p_t / m) + (1 - beta) p_s log(p_s / m) and of p_s log(p_s / m) (= KL(p_s || m),
    which the backward needs) into Part [2, M, splits]. Same grid as the forward."""
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_N), num_splits, GROUP_N)
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    inv_t = tl.load(InvTemp + rows, mask=row_ok, other=1.0)
    s_lse = tl.load(SLse + offs_m, mask=row_ok, other=0.0)
    t_lse = tl.load(TLse + offs_m, mask=row_ok, other=0.0)
    jsd = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kl_student = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        zs, _ = _head_logits(SHidden, SWeight, SBias, rows, offs_v, row_ok, v_ok, DS, stride_sh, stride_sw,
                             s_scale, s_softcap, inv_t, s_has_bias, s_has_softcap, BLOCK_N, BLOCK_V, BLOCK_DS,
                             S_DOT_PRECISION, INTERPRETER, False)
        zt, _ = _head_logits(THidden, TWeight, TBias, rows, offs_v, row_ok, v_ok, DT, stride_th, stride_tw,
                             t_scale, t_softcap, inv_t, t_has_bias, t_has_softcap, BLOCK_N, BLOCK_V, BLOCK_DT,
                             T_DOT_PRECISION, INTERPRETER, False)
        log_ps = tl.where(v_ok[None, :], zs - s_lse[:, None], 0.0)
        log_pt = tl.where(v_ok[None, :], zt - t_lse[:, None], 0.0)
        log_m = _log_mixture(log_ps, log_pt, log_beta, log_one_minus_beta)
        ps = tl.where(v_ok[None, :], tl.exp(log_ps), 0.0)
        pt = tl.where(v_ok[None, :], tl.exp(log_pt), 0.0)
        kl_s = ps * (log_ps - log_m)
        jsd += tl.sum(beta * pt * (log_pt - log_m) + (1.0 - beta) * kl_s, axis=1)
        kl_student += tl.sum(kl_s, axis=1)
    out = Part + offs_m * num_splits + pid_s
    tl.store(out, jsd, mask=row_ok)
    tl.store(out + M * num_splits, kl_student, mask=row_ok)


@triton.jit
def _split_sum_kernel(Part, Out, M, num_splits, NUM_SUMS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out [NUM_SUMS, M] = Part [NUM_SUMS, M, splits] summed over splits in index order."""
    offs_m = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    for i in range(NUM_SUMS):
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(num_splits):
            total += tl.load(Part + i * M * num_splits + offs_m * num_splits + s, mask=row_ok, other=0.0)
        tl.store(Out + i * M + offs_m, total, mask=row_ok)


@triton.jit
def _divergence_dlogits_kernel(
    SHidden, SWeight, SBias, THidden, TWeight, TBias, InvTemp, RowIdx, Ids, SLse, TLse, Aux, GradRow, GradLogp,
    GradLogits, BiasPartial,
    M, v_begin, v_end, DS, DT, K, stride_sh, stride_sw, stride_th, stride_tw, stride_ids, stride_g,
    s_scale, s_softcap, t_scale, t_softcap, s_has_bias, s_has_softcap, t_has_bias, t_has_softcap,
    beta, log_beta, log_one_minus_beta,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    GROUP_N: tl.constexpr, KIND: tl.constexpr, S_DOT_PRECISION: tl.constexpr, T_DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """The backward's kernel: one program recomputes one [BLOCK_N, BLOCK_V] student tile (and,
    for the full-vocabulary kinds, the teacher's) and stores the student's d loss / d y into the
    workspace chunk GradLogits [M, v_end - v_begin] (row stride stride_g, the student's dtype);
    every element has one writer, no atomics. With a student bias, the tile's float32 column sums
    go to BiasPartial [row blocks, v_end - v_begin] (summed over row blocks, in order, by the
    driver). Per row (compacted position offs_m; Hidden/Ids/InvTemp by the original row)::

        KIND FORWARD_KL  d z_s = g (p_s - p_t)
        KIND REVERSE_KL  d z_s = g p_s (log p_s - log p_t - KL(p_s || p_t))      Aux = the KL
        KIND JSD         d z_s = g (1 - beta) p_s (log p_s - log m - KL(p_s || m))  Aux = that KL
        KIND TARGETS     d z_s = sum_k g_k [v == id_k] - p_s sum_k g_k        (no teacher tile)

    with g = GradRow (the incoming gradient of the row's divergence; for TARGETS, GradRow holds
    sum_k g_k and GradLogp [M, K] the g_k), then d y = d z_s * dz_s/dy.
    """
    num_ids = v_end - v_begin
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_N), tl.cdiv(num_ids, BLOCK_V), GROUP_N)
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_ok, other=0)
    inv_t = tl.load(InvTemp + rows, mask=row_ok, other=1.0)
    tile_begin = v_begin + pid_v * BLOCK_V
    offs_v = tile_begin + tl.arange(0, BLOCK_V)
    v_ok = offs_v < v_end
    zs, dzdy = _head_logits(SHidden, SWeight, SBias, rows, offs_v, row_ok, v_ok, DS, stride_sh, stride_sw,
                            s_scale, s_softcap, inv_t, s_has_bias, s_has_softcap, BLOCK_N, BLOCK_V, BLOCK_DS,
                            S_DOT_PRECISION, INTERPRETER, True)
    log_ps = zs - tl.load(SLse + offs_m, mask=row_ok, other=0.0)[:, None]
    ps = tl.exp(log_ps)
    grad_row = tl.load(GradRow + offs_m, mask=row_ok, other=0.0)[:, None]
    if KIND == _TARGETS:
        grad = -ps * grad_row
        ids_ptrs = Ids + rows.to(tl.int64) * stride_ids
        tile_end = tl.minimum(tile_begin + BLOCK_V, v_end)
        for k in range(K):
            target = tl.load(ids_ptrs + k, mask=row_ok, other=-1)
            hit = row_ok & (target >= tile_begin) & (target < tile_end)
            if tl.sum(hit.to(tl.int32), axis=0) > 0:
                grad_k = tl.load(GradLogp + offs_m.to(tl.int64) * K + k, mask=hit, other=0.0)
                grad += tl.where(offs_v[None, :] == target[:, None], grad_k[:, None], 0.0)
    else:
        zt, _ = _head_logits(THidden, TWeight, TBias, rows, offs_v, row_ok, v_ok, DT, stride_th, stride_tw,
                             t_scale, t_softcap, inv_t, t_has_bias, t_has_softcap, BLOCK_N, BLOCK_V, BLOCK_DT,
                             T_DOT_PRECISION, INTERPRETER, False)
        log_pt = zt - tl.load(TLse + offs_m, mask=row_ok, other=0.0)[:, None]
        if KIND == _FORWARD_KL:
            grad = ps - tl.exp(log_pt)
        else:
            aux = tl.load(Aux + offs_m, mask=row_ok, other=0.0)[:, None]
            if KIND == _REVERSE_KL:
                grad = ps * (log_ps - log_pt - aux)
            else:
                log_m = _log_mixture(log_ps, log_pt, log_beta, log_one_minus_beta)
                grad = (1.0 - beta) * ps * (log_ps - log_m - aux)
        grad = grad * grad_row
    grad = tl.where(row_ok[:, None] & v_ok[None, :], grad * dzdy, 0.0)
    cols = offs_v - v_begin
    g_ptrs = GradLogits + offs_m.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(g_ptrs, grad.to(GradLogits.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
    if s_has_bias:
        tl.store(BiasPartial + pid_n.to(tl.int64) * num_ids + cols, tl.sum(grad, axis=0), mask=v_ok)
