"""The chunked PyTorch backend of ``token_logprobs``: what CPU users, the demo and CI run.

Same drivers, same numbers as the Triton kernels in ``logprobs.py`` (see the interface there):
for each compacted row ``n`` and each of its ``K`` targets ``t_k``::

    y    = h_n @ W.T + b                                    # [V]
    z    = softcap * tanh(y / softcap) / T   (or y / T)     # [V]
    lse  = logsumexp_v z ;  logp_k = z[t_k] - lse           # 0 - lse for an id outside [0, V)
    H    = lse - E_p[z]                                     # shift-invariant form, below

Memory: the ``[M, V]`` logits never exist. The logits are formed tile by tile in preallocated
float32 ``[rows, vocab]`` slabs (a fixed byte budget, ``_SLAB_BYTES`` each, at most three alive),
reused in place by every tile; gradients are accumulated in place (``addmm_`` into the
gradient), so the memory above the inputs and gradients is flat in N and V.

Time: 4 matmuls of ``2 M D V`` FLOPs (forward; backward recompute, d hidden, d weight) against
the 3 of a materialized-logits loss, and few elementwise passes over each tile, all in place.

Numerics: float32 throughout (16-bit inputs are upcast tile by tile). The entropy uses the same
shift-invariant form as the Triton kernel, ``H = log s - (sum_v e^x x) / s`` with ``x = z - max z``
and ``s = sum_v e^x``: the naive ``-sum p log p`` loses 1e-3 absolute at ``|z| ~ 1e4`` because
``log p = z - lse`` cancels.
"""

from __future__ import annotations

import torch

# Bytes of one float32 [rows, vocab] slab; a forward holds up to 2, a backward up to 3.
_SLAB_BYTES = 16 * 2**20
# The slab's row count never drops below this (for GEMM efficiency): at vocabularies wider than
# _SLAB_BYTES / (4 * _MIN_SLAB_ROWS) the vocabulary is tiled instead.
_MIN_SLAB_ROWS = 64
# 1 in ``1 - tanh^2`` (one fused addcmul instead of three passes).
_ONE = torch.ones(())


def _tile_sizes(num_rows: int, vocab: int) -> tuple[int, int]:
    """(rows, vocab ids) per tile so that a [rows, vocab ids] float32 slab fits _SLAB_BYTES."""
    elements = max(1, _SLAB_BYTES // 4)
    vocab_chunk = min(vocab, max(1, elements // _MIN_SLAB_ROWS))
    row_chunk = max(1, min(num_rows, elements // vocab_chunk))
    return row_chunk, vocab_chunk


def _spans(total: int, step: int):
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _as_2d_targets(targets: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """[N] (callers of the single-target interface) or [N, K] -> ([N, K], was_1d)."""
    if targets.dim() == 1:
        return targets[:, None], True
    return targets, False


class _Head:
    """The LM head's logits tile by tile: z[rows, v0:v1] into a slab, in place."""

    def __init__(self, weight, bias, temperature, softcap):
        self.weight, self.bias = weight, bias
        self.temperature, self.softcap = float(temperature), softcap
        self._chunk_key, self._chunk = None, None

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        """float32 W[v0:v1] (a view for float32 weights; 16-bit chunks are converted once and cached)."""
        if self.weight.dtype == torch.float32:
            return self.weight[v0:v1]
        if self._chunk_key != (v0, v1):
            self._chunk_key, self._chunk = (v0, v1), self.weight[v0:v1].float()
        return self._chunk

    def logits_into(self, slab, hidden_rows, v0, v1, need_cap_derivative=None):
        """slab [r, v1 - v0] <- z of hidden_rows [r, D] (float32). With a softcap and
        ``need_cap_derivative`` (a slab), also writes 1 - tanh^2(y / softcap) there."""
        weight_chunk = self.weight_chunk(v0, v1)
        # The scalar factor goes onto the [r, D] operand rather than over the [r, V] tile.
        scale = 1.0 / (self.softcap if self.softcap is not None else self.temperature)
        hidden_scaled = hidden_rows * scale if scale != 1.0 else hidden_rows
        if self.bias is not None:
            bias_chunk = self.bias[v0:v1].float()
            if scale != 1.0:
                bias_chunk = bias_chunk * scale
            torch.addmm(bias_chunk, hidden_scaled, weight_chunk.t(), out=slab)
        else:
            torch.mm(hidden_scaled, weight_chunk.t(), out=slab)
        if self.softcap is not None:
            slab.tanh_()
            if need_cap_derivative is not None:
                torch.addcmul(_ONE, slab, slab, value=-1.0, out=need_cap_derivative)
            slab.mul_(self.softcap / self.temperature)
        return slab


def _float_rows(hidden, idx):
    rows = hidden.index_select(0, idx)
    return rows if rows.dtype == torch.float32 else rows.float()


def _target_columns(targets_rows, v0, v1):
    """(column index [r, K] clamped into the tile, bool [r, K] whether the id lies in [v0, v1))."""
    inside = (targets_rows >= v0) & (targets_rows < v1)
    columns = torch.where(inside, targets_rows - v0, 0)
    return columns, inside


def torch_forward(hidden, weight, bias, targets, rows, temperature, compute_entropy, *, softcap=None):
    """Chunked PyTorch forward over the compacted rows.

    hidden [N, D], weight [V, D], bias [V] or None, targets [N, K] (or [N]) int, rows [M] int32.
    Returns (logp [M, K] ([M] for [N] targets), lse [M], entropy [M] or None), float32.
    """
    targets, was_1d = _as_2d_targets(targets)
    num_rows, (vocab, _) = rows.numel(), weight.shape
    device = hidden.device
    head = _Head(weight, bias, temperature, softcap)
    row_chunk, vocab_chunk = _tile_sizes(num_rows, vocab)
    slab = torch.empty(row_chunk * vocab_chunk, device=device, dtype=torch.float32)
    slab_exp = torch.empty_like(slab) if compute_entropy else None

    # Online logsumexp state per row, merged over vocabulary tiles (one tile when V fits).
    run_max = torch.full((num_rows,), float("-inf"), device=device)
    run_sum = torch.zeros(num_rows, device=device)
    run_ent = torch.zeros(num_rows, device=device)  # sum_v e^{z - run_max} (z - run_max)
    target_logit = torch.zeros((num_rows, targets.shape[1]), device=device)
    row_idx = rows.long()

    # Vocabulary outermost: a 16-bit weight chunk is converted once, and W streams through once.
    for v0, v1 in _spans(vocab, vocab_chunk):
        for r0, r1 in _spans(num_rows, row_chunk):
            idx = row_idx[r0:r1]
            shape = (r1 - r0, v1 - v0)
            z = head.logits_into(slab[:shape[0] * shape[1]].view(shape), _float_rows(hidden, idx), v0, v1)
            columns, inside = _target_columns(targets.index_select(0, idx), v0, v1)
            target_logit[r0:r1] += torch.where(inside, z.gather(1, columns), 0.0)

            old_max = run_max[r0:r1]
            new_max = torch.maximum(old_max, z.amax(dim=1))
            x = z.sub_(new_max[:, None])  # x = z - max <= 0
            rescale = torch.exp(old_max - new_max)  # 0 on the first tile (old max -inf)
            if compute_entropy:
                e = torch.exp(x, out=slab_exp[:x.numel()].view(shape))
                tile_sum = e.sum(dim=1)
                tile_ent = e.mul_(x).sum(dim=1)
                # re-base the old sum to the new max: sum e^{z-m'}(z-m') = r (sum e^{z-m}(z-m) + s (m - m'))
                shift = torch.where(run_sum[r0:r1] > 0, old_max - new_max, 0.0)
                run_ent[r0:r1] = rescale * (run_ent[r0:r1] + run_sum[r0:r1] * shift) + tile_ent
            else:
                tile_sum = x.exp_().sum(dim=1)
            run_sum[r0:r1] = run_sum[r0:r1] * rescale + tile_sum
            run_max[r0:r1] = new_max

    log_sum = torch.log(run_sum)
    lse = run_max + log_sum
    logp = target_logit - lse[:, None]
    entropy = log_sum - run_ent / run_sum if compute_entropy else None
    return (logp.squeeze(1) if was_1d else logp), lse, entropy


def torch_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_ent,
                   temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias,
                   *, softcap=None, deterministic=False):
    """Chunked PyTorch backward: float32 accumulation throughout.

    targets [N, K] (or [N], then grad_logp [M]); lse, mean_logit (= E_p[z], or None), grad_ent
    (or None) [M]; grad_logp [M, K]. Writes grad_hidden's ``rows``; adds into grad_weight [V, D]
    and grad_bias [V] float32 (either may be None). ``filter_eps`` and ``exact`` do not apply
    (every tile is exact, in float32); the result is deterministic whatever ``deterministic``.
    """
    del filter_eps, exact, deterministic
    targets, was_1d = _as_2d_targets(targets)
    if was_1d:
        grad_logp = grad_logp[:, None]
    num_rows, (vocab, dim) = rows.numel(), weight.shape
    device = hidden.device
    head = _Head(weight, bias, temperature, softcap)
    row_chunk, vocab_chunk = _tile_sizes(num_rows, vocab)
    slab = torch.empty(row_chunk * vocab_chunk, device=device, dtype=torch.float32)
    slab_exp = torch.empty_like(slab) if grad_ent is not None else None
    slab_cap = torch.empty_like(slab) if softcap is not None else None

    inv_temp = 1.0 / float(temperature)
    # d z_v = sum_k g_k [v == t_k] - p_v (G + g_ent (z_v - E_p[z])), G = sum_k g_k, all / T.
    neg_total = grad_logp.sum(dim=1) * -inv_temp
    neg_ent = grad_ent * -inv_temp if grad_ent is not None else None
    entropy = lse - mean_logit if grad_ent is not None else None
    grad_logp_scaled = grad_logp * inv_temp

    # A 16-bit weight gets a float32 accumulator; vocabulary outermost when that keeps the
    # accumulators smaller ([M, D] for d hidden + a [vocab chunk, D] chunk instead of [V, D]).
    weight_acc_full = grad_weight is not None and grad_weight.dtype != torch.float32
    vocab_outer = weight_acc_full and num_rows < vocab
    hidden_acc = torch.zeros((num_rows if vocab_outer else row_chunk, dim), device=device)
    weight_acc = None
    if weight_acc_full and not vocab_outer:
        weight_acc = torch.zeros((vocab, dim), device=device)
    row_spans, vocab_spans = _spans(num_rows, row_chunk), _spans(vocab, vocab_chunk)
    tiles = ([(r, v) for v in vocab_spans for r in row_spans] if vocab_outer
             else [(r, v) for r in row_spans for v in vocab_spans])
    row_idx = rows.long()

    for (r0, r1), (v0, v1) in tiles:
        idx = row_idx[r0:r1]
        shape = (r1 - r0, v1 - v0)
        numel = shape[0] * shape[1]
        hidden_rows = _float_rows(hidden, idx)
        cap = slab_cap[:numel].view(shape) if slab_cap is not None else None
        dz = head.logits_into(slab[:numel].view(shape), hidden_rows, v0, v1, need_cap_derivative=cap)
        if grad_ent is not None:
            # p = exp(z - lse) = exp((z - E_p[z]) - H)
            centered = dz.sub_(mean_logit[r0:r1, None])
            p = torch.sub(centered, entropy[r0:r1, None], out=slab_exp[:numel].view(shape)).exp_()
            torch.addcmul(neg_total[r0:r1, None], centered, neg_ent[r0:r1, None], out=dz)
            dz.mul_(p)
        else:
            dz.sub_(lse[r0:r1, None]).exp_().mul_(neg_total[r0:r1, None])
        columns, inside = _target_columns(targets.index_select(0, idx), v0, v1)
        dz.scatter_add_(1, columns, torch.where(inside, grad_logp_scaled[r0:r1], 0.0))
        if cap is not None:
            dz.mul_(cap)

        if grad_hidden is not None:
            acc = hidden_acc[r0:r1] if vocab_outer else hidden_acc[:shape[0]]
            if not vocab_outer and v0 == 0:
                torch.mm(dz, head.weight_chunk(v0, v1), out=acc)
            else:
                acc.addmm_(dz, head.weight_chunk(v0, v1))
            if not vocab_outer and v1 == vocab:
                grad_hidden.index_copy_(0, idx, acc.to(grad_hidden.dtype))
        if grad_weight is not None:
            if weight_acc_full and vocab_outer:
                if r0 == 0:
                    weight_acc = torch.mm(dz.t(), hidden_rows)
                else:
                    weight_acc.addmm_(dz.t(), hidden_rows)
                if r1 == num_rows:
                    grad_weight[v0:v1] += weight_acc.to(grad_weight.dtype)
            else:
                (weight_acc[v0:v1] if weight_acc is not None else grad_weight[v0:v1]).addmm_(dz.t(), hidden_rows)
        if grad_bias is not None:
            grad_bias[v0:v1] += dz.sum(dim=0)

    if grad_hidden is not None and vocab_outer:
        grad_hidden.index_copy_(0, row_idx, hidden_acc.to(grad_hidden.dtype))
    if weight_acc is not None and not vocab_outer:
        grad_weight += weight_acc.to(grad_weight.dtype)
