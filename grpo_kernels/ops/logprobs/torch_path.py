"""The chunked PyTorch backend of ``token_logprobs``: what CPU users, the demo and CI run.

Same drivers, same numbers as the Triton kernels of this package (see the interface in ``drivers``):
for each compacted row ``n`` and each of its ``K`` targets ``t_k``::

    y    = h_n @ W.T + b                                    # [V]
    z    = softcap * tanh(y / softcap) / T   (or y / T)     # [V]
    lse  = logsumexp_v z ;  logp_k = z[t_k] - lse           # 0 - lse for an id outside [0, V)
    H    = lse - E_p[z]                                     # shift-invariant form, below

Memory: the ``[M, V]`` logits never exist. A call allocates one float32 ``[rows, vocab]`` slab
(``_SLAB_BYTES``) and forms every tile of logits in it with one matmul (``out=``); the
elementwise work then runs over cache-sized row blocks of the slab, in place, with scratch
buffers of ``_BLOCK_BYTES``; gradients are accumulated in place (``addmm_`` into the gradient).
So the memory above the inputs and gradients is the slab plus O(rows) vectors: flat in N and V.

Time: 4 matmuls of ``2 M D V`` FLOPs (forward; backward recompute, d hidden, d weight) against
the 3 of a materialized-logits loss; the elementwise passes touch each tile in cache.

Numerics: float32 throughout (16-bit inputs are upcast tile by tile). The entropy uses the same
shift-invariant form as the Triton kernel, ``H = log s - (sum_v e^x x) / s`` with ``x = z - max z``
and ``s = sum_v e^x``: the naive ``-sum p log p`` loses 1e-3 absolute at ``|z| ~ 1e4`` because
``log p = z - lse`` cancels.
"""

from __future__ import annotations

import torch

from grpo_kernels.ops.logprobs.outputs import DRIVER_STATS, RowStats
from grpo_kernels.ops.logprobs.temperature import inverse_temperature
from grpo_kernels.ops.logprobs.topk import EMPTY_KEY, merge_topk, pack_keys, unpack_keys

# The float32 [rows, vocab] logits slab of one call: the only buffer that grows with N or V.
_SLAB_BYTES = 64 * 2**20
# The slab's row count never drops below this (GEMM efficiency): a vocabulary wider than
# _SLAB_BYTES / (4 * _MIN_SLAB_ROWS) is tiled instead.
_MIN_SLAB_ROWS = 512
# Rows of a tile whose elementwise passes run together: each such block (and its scratch
# buffers) stays in cache across the passes.
_BLOCK_BYTES = 4 * 2**20


def _tile_sizes(num_rows: int, vocab: int) -> tuple[int, int]:
    """(rows, vocab ids) per tile so that a [rows, vocab ids] float32 slab fits _SLAB_BYTES."""
    elements = max(1, _SLAB_BYTES // 4)
    vocab_chunk = min(vocab, max(1, elements // _MIN_SLAB_ROWS))
    row_chunk = max(1, min(num_rows, elements // vocab_chunk))
    return row_chunk, vocab_chunk


def _block_rows(row_chunk: int, vocab_chunk: int) -> int:
    return max(1, min(row_chunk, _BLOCK_BYTES // (4 * vocab_chunk)))


def _spans(total: int, step: int):
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _as_2d_targets(targets: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """[N] (callers of the single-target interface) or [N, K] -> ([N, K], was_1d)."""
    if targets.dim() == 1:
        return targets[:, None], True
    return targets, False


class _Rows:
    """The compacted rows, by chunk: slices when they are one contiguous range (the usual case:
    no copy of hidden, gradients written in place), else gathers."""

    def __init__(self, rows: torch.Tensor):
        self.index = rows.long()
        self.count = rows.numel()
        contiguous = self.count > 0 and bool((self.index.diff() == 1).all())
        self.offset = int(self.index[0]) if contiguous else None

    def take(self, tensor, r0, r1):
        if self.offset is not None:
            return tensor[self.offset + r0:self.offset + r1]
        return tensor.index_select(0, self.index[r0:r1])

    def float_rows(self, hidden, r0, r1):
        rows = self.take(hidden, r0, r1)
        return rows if rows.dtype == torch.float32 else rows.float()


class _Head:
    """The LM head's logits tile by tile: z[rows, v0:v1] into the slab.

    ``temperature``: a float, or a ``[M]`` float32 tensor of ``1 / T`` per compacted row
    (``inv_temp_rows``); row arguments ``r0`` are compacted positions."""

    def __init__(self, weight, bias, temperature, softcap):
        self.weight, self.bias, self.softcap = weight, bias, softcap
        if isinstance(temperature, torch.Tensor):
            self.temperature, self.inv_temp_rows = None, temperature
        else:
            self.temperature, self.inv_temp_rows = float(temperature), None
        self._chunk_key, self._chunk = None, None

    def inv_temp(self, r0: int, r1: int):
        """1 / T of rows [r0, r1): a float, or a [r1 - r0, 1] column."""
        if self.inv_temp_rows is None:
            return 1.0 / self.temperature
        return self.inv_temp_rows[r0:r1, None]

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        """float32 W[v0:v1] (a view for float32 weights; a 16-bit chunk is converted once, cached)."""
        if self.weight.dtype == torch.float32:
            return self.weight[v0:v1]
        if self._chunk_key != (v0, v1):
            self._chunk = None  # drop the previous chunk before converting the next: one alive
            self._chunk_key, self._chunk = (v0, v1), self.weight[v0:v1].float()
        return self._chunk

    def pre_activation_into(self, slab, hidden_rows, v0, v1, r0):
        """slab [r, v1 - v0] <- z, or y / softcap under a softcap (``activate`` finishes it)."""
        r1 = r0 + hidden_rows.shape[0]
        # The factor goes onto the [r, D] operand rather than over the [r, V] tile.
        if self.softcap is not None:
            scale = 1.0 / self.softcap
        else:
            scale = self.inv_temp(r0, r1)
        per_row = isinstance(scale, torch.Tensor)
        hidden_scaled = hidden_rows * scale if per_row or scale != 1.0 else hidden_rows
        weight_chunk = self.weight_chunk(v0, v1)
        if self.bias is not None and per_row:
            torch.mm(hidden_scaled, weight_chunk.t(), out=slab)
            slab.addcmul_(scale, self.bias[v0:v1].float()[None, :])  # + b / T, row by row
        elif self.bias is not None:
            bias_chunk = self.bias[v0:v1].float()
            torch.addmm(bias_chunk * scale if scale != 1.0 else bias_chunk, hidden_scaled, weight_chunk.t(),
                        out=slab)
        else:
            torch.mm(hidden_scaled, weight_chunk.t(), out=slab)
        return slab

    def activate(self, block, r0, cap_derivative=None):
        """In place on a row block starting at compacted row ``r0``: y / softcap -> z (no-op
        without a softcap); optionally writes 1 - tanh^2(y / softcap) into ``cap_derivative``."""
        if self.softcap is not None:
            if cap_derivative is not None:
                # 1 / cosh^2(x), not 1 - tanh^2(x): the latter cancels to 0 or a few ulps once tanh
                # rounds to +-1 (|x| > ~9 in float32), where the true derivative is e^{-2|x|}-small
                # but not 0 (cosh overflowing to inf gives the right 0 beyond |x| ~ 89)
                torch.cosh(block, out=cap_derivative).square_().reciprocal_()
            block.tanh_()
            if self.inv_temp_rows is None:
                block.mul_(self.softcap / self.temperature)
            else:
                block.mul_(self.inv_temp(r0, r0 + block.shape[0]) * self.softcap)
        return block

    def activated(self, values, r0):
        """z of a few gathered pre-activation values ``[r, K]`` of rows from ``r0`` (out of place):
        what ``activate`` gives."""
        return values if self.softcap is None else self.activate(values.clone(), r0)

    def cap_derivative(self, values):
        """1 - tanh^2(y / softcap) of gathered pre-activation values y / softcap (None without a softcap)."""
        return None if self.softcap is None else values.cosh().square().reciprocal()


def _scratch(numel, device, needed=True):
    return torch.empty(numel, device=device, dtype=torch.float32) if needed else None


def _view(buffer, shape):
    return buffer[:shape[0] * shape[1]].view(shape) if buffer is not None else None


def _target_columns(targets_rows, v0, v1):
    """(column index [r, K] clamped into the tile, bool [r, K] whether the id lies in [v0, v1))."""
    inside = (targets_rows >= v0) & (targets_rows < v1)
    columns = torch.where(inside, targets_rows - v0, 0)
    return columns, inside


def _merge(run_max, run_sum, run_ent, tile_max, tile_sum, tile_ent, run_sq=None, tile_sq=None):
    """Online logsumexp (and sum e^{z-m} (z-m), sum e^{2(z-m)}) state merged with a tile's, in place
    into run_*."""
    new_max = torch.maximum(run_max, tile_max)
    old_scale, tile_scale = torch.exp(run_max - new_max), torch.exp(tile_max - new_max)
    if run_ent is not None:
        # re-base each sum to the new max: sum e^{z-m'}(z-m') = r (sum e^{z-m}(z-m) + s (m - m'))
        old_shift = torch.where(run_sum > 0, run_max - new_max, 0.0)
        run_ent.copy_(old_scale * (run_ent + run_sum * old_shift)
                      + tile_scale * (tile_ent + tile_sum * (tile_max - new_max)))
    if run_sq is not None:
        run_sq.copy_(run_sq * old_scale.square() + tile_sq * tile_scale.square())
    run_sum.copy_(run_sum * old_scale + tile_sum * tile_scale)
    run_max.copy_(new_max)


def _row_inv_temp(temperature, by_rows):
    """A float temperature as is; a [N] tensor -> [M] float32 1 / T of the compacted rows."""
    if isinstance(temperature, torch.Tensor):
        return inverse_temperature(temperature, temperature.numel(), temperature.device)[by_rows.index]
    return temperature


def torch_forward(hidden, weight, bias, targets, rows, temperature, compute_entropy, *, softcap=None,
                  stats=frozenset(), topk=0) -> RowStats:
    """Chunked PyTorch forward over the compacted rows.

    hidden [N, D], weight [V, D], bias [V] or None, targets [N, K] (K may be 0) or [N] int, rows [M]
    int32, temperature a float or a [N] tensor (per row). ``stats``: names among
    ``outputs.DRIVER_STATS``, ``topk``: k (0: none); only what is asked for is computed.
    Returns :class:`RowStats` (target_logit [M, K], or [M] for [N] targets), float32.
    """
    targets, was_1d = _as_2d_targets(targets)
    num_rows, (vocab, _) = rows.numel(), weight.shape
    device = hidden.device
    by_rows = _Rows(rows)
    head = _Head(weight, bias, _row_inv_temp(temperature, by_rows), softcap)
    want_sq, want_mean, want_top1 = (name in stats for name in DRIVER_STATS)
    row_chunk, vocab_chunk = _tile_sizes(num_rows, vocab)
    block = _block_rows(row_chunk, vocab_chunk)
    slab = torch.empty(row_chunk * vocab_chunk, device=device, dtype=torch.float32)
    scratch = _scratch(block * vocab_chunk, device, compute_entropy or want_sq or want_top1)

    def row_state(fill=0.0, needed=True):
        return torch.full((num_rows,), fill, device=device) if needed else None

    def tile_state(needed=True):
        return torch.empty(row_chunk, device=device) if needed else None

    # Online logsumexp state per row, merged over vocabulary tiles (one tile when V fits).
    run_max, run_sum, run_ent = row_state(float("-inf")), row_state(), row_state(needed=compute_entropy)
    run_sq, run_z = row_state(needed=want_sq), row_state(needed=want_mean)
    run_before = row_state(float("-inf"), needed=want_top1)
    top_keys = torch.full((num_rows, topk), EMPTY_KEY, device=device, dtype=torch.int64) if topk else None
    target_logit = torch.zeros((num_rows, targets.shape[1]), device=device)
    first_target = (by_rows.take(targets, 0, num_rows)[:, 0] if targets.shape[1]
                    else torch.full((num_rows,), -1, device=device)).long() if want_top1 else None
    tile_max, tile_sum = tile_state(), tile_state()
    tile_ent, tile_sq = tile_state(compute_entropy), tile_state(want_sq)

    # Vocabulary outermost: a 16-bit weight chunk is converted once, and W streams through once.
    for v0, v1 in _spans(vocab, vocab_chunk):
        ids = torch.arange(v0, v1, device=device) if (want_top1 or topk) else None
        for r0, r1 in _spans(num_rows, row_chunk):
            shape = (r1 - r0, v1 - v0)
            z = head.pre_activation_into(_view(slab, shape), by_rows.float_rows(hidden, r0, r1), v0, v1, r0)
            columns, inside = _target_columns(by_rows.take(targets, r0, r1), v0, v1)
            target_logit[r0:r1] += torch.where(inside, head.activated(z.gather(1, columns), r0), 0.0)
            for b0, b1 in _spans(shape[0], block):
                rb = slice(r0 + b0, r0 + b1)
                x = head.activate(z[b0:b1], r0 + b0)
                if want_mean:
                    run_z[rb] += x.sum(dim=1)
                if want_top1:
                    # the largest z below the row's first target: argmax's first-maximum rule
                    below = _view(scratch, x.shape).copy_(x).masked_fill_(ids[None, :] >= first_target[rb, None],
                                                                          float("-inf"))
                    torch.maximum(run_before[rb], below.amax(dim=1), out=run_before[rb])
                if topk:
                    _fold_topk(top_keys[rb], x, ids, topk, block)
                row_max = torch.amax(x, dim=1, out=tile_max[b0:b1])
                x.sub_(row_max[:, None])  # x = z - max <= 0
                if compute_entropy or want_sq:
                    e = torch.exp(x, out=_view(scratch, x.shape))
                    torch.sum(e, dim=1, out=tile_sum[b0:b1])
                    if want_sq:  # sum e^2 row by row (a batched dot: no [b, v] temporary)
                        tile_sq[b0:b1] = torch.einsum("ij,ij->i", e, e)
                    if compute_entropy:
                        torch.sum(e.mul_(x), dim=1, out=tile_ent[b0:b1])
                else:
                    torch.sum(x.exp_(), dim=1, out=tile_sum[b0:b1])
            n = shape[0]
            _merge(run_max[r0:r1], run_sum[r0:r1], run_ent[r0:r1] if compute_entropy else None,
                   tile_max[:n], tile_sum[:n], tile_ent[:n] if compute_entropy else None,
                   run_sq[r0:r1] if want_sq else None, tile_sq[:n] if want_sq else None)

    log_sum = torch.log(run_sum)
    lse = run_max + log_sum
    entropy = log_sum - run_ent / run_sum if compute_entropy else None
    log_sum_sq = torch.log(run_sq) - 2 * log_sum if want_sq else None
    mean_logits = run_z / vocab if want_mean else None
    topk_logits, topk_ids = unpack_keys(top_keys) if topk else (None, None)
    return RowStats(target_logit.squeeze(1) if was_1d else target_logit, lse, entropy, log_sum_sq, mean_logits,
                    run_max if want_top1 else None, run_before, topk_logits, topk_ids)


def _fold_topk(run_keys, block, ids, k, block_rows):
    """The k largest (z, -id) keys of ``block`` [b, v] (z) folded into ``run_keys`` [b, k], in
    place; keys are formed a few rows at a time (their int64 temporaries, some 8 float32 copies of
    those rows, stay below half a block)."""
    step = max(1, block_rows // 16)
    for s0, s1 in _spans(block.shape[0], step):
        keys = pack_keys(block[s0:s1], ids[None, :])
        tile_top = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
        run_keys[s0:s1] = merge_topk(torch.cat([run_keys[s0:s1], tile_top], dim=1), k)


def torch_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_ent,
                   temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias,
                   *, softcap=None, backward="workspace", workspace_bytes=None):
    """Chunked PyTorch backward: float32 accumulation throughout.

    targets [N, K] (or [N], then grad_logp [M]); lse, mean_logit (= E_p[z], or None), grad_ent
    (or None) [M]; grad_logp [M, K]. Writes grad_hidden's ``rows`` (grad_hidden may be None);
    adds into grad_weight [V, D] and grad_bias [V] float32 (either may be None). ``filter_eps``
    ``exact``, ``backward`` and ``workspace_bytes`` do not apply (every tile is exact, in float32,
    within this module's own slab); the result is deterministic (fixed-order float32 sums, no
    atomics).
    """
    del filter_eps, exact, backward, workspace_bytes
    targets, was_1d = _as_2d_targets(targets)
    if was_1d:
        grad_logp = grad_logp[:, None]
    num_rows, (vocab, dim) = rows.numel(), weight.shape
    device = hidden.device
    by_rows = _Rows(rows)
    head = _Head(weight, bias, _row_inv_temp(temperature, by_rows), softcap)
    row_chunk, vocab_chunk = _tile_sizes(num_rows, vocab)
    block = _block_rows(row_chunk, vocab_chunk)
    slab = torch.empty(row_chunk * vocab_chunk, device=device, dtype=torch.float32)
    scratch_p = _scratch(block * vocab_chunk, device, grad_ent is not None)
    scratch_cap = _scratch(block * vocab_chunk, device, softcap is not None)

    # [M] 1 / T per row (a float temperature broadcast)
    inv_temp = head.inv_temp(0, num_rows)
    if not isinstance(inv_temp, torch.Tensor):
        inv_temp = torch.full((num_rows, 1), inv_temp, device=device)
    inv_temp = inv_temp[:, 0]
    # d z_v = sum_k g_k [v == t_k] - p_v (G + g_ent (z_v - E_p[z])), G = sum_k g_k, all / T.
    neg_total = grad_logp.sum(dim=1) * -inv_temp
    entropy = lse - mean_logit if grad_ent is not None else None
    if grad_ent is not None:
        # With the entropy term the 1 / T goes into p instead (p / T = exp(z - lse - log T)): the
        # centred logits z - E_p[z] reach |y| / T, and times g_ent / T they overflowed float32 for
        # T <= 1e-19 (a NaN gradient) while p (z - E_p[z]) / T itself stays finite.
        neg_total = -grad_logp.sum(dim=1)
        neg_ent = -grad_ent
        p_shift = entropy + torch.log(inv_temp).neg_()  # exp(centred - p_shift) = p / T
    grad_logp_scaled = grad_logp * inv_temp[:, None]

    # A 16-bit weight gets a float32 accumulator; vocabulary outermost when that keeps the
    # accumulators smaller ([M, D] for d hidden + a [vocab chunk, D] chunk instead of [V, D]).
    weight_acc_full = grad_weight is not None and grad_weight.dtype != torch.float32
    vocab_outer = weight_acc_full and num_rows < vocab
    # d hidden goes straight into grad_hidden when its rows are one float32 range, else into a
    # float32 buffer that is copied into grad_hidden's rows.
    hidden_in_place = (grad_hidden is not None and grad_hidden.dtype == torch.float32
                       and by_rows.offset is not None)
    hidden_acc = None
    if grad_hidden is not None and not hidden_in_place:
        hidden_acc = torch.zeros((num_rows if vocab_outer else row_chunk, dim), device=device)
    weight_acc = None
    if weight_acc_full and not vocab_outer:
        weight_acc = torch.zeros((vocab, dim), device=device)
    row_spans, vocab_spans = _spans(num_rows, row_chunk), _spans(vocab, vocab_chunk)
    tiles = ([(r, v) for v in vocab_spans for r in row_spans] if vocab_outer
             else [(r, v) for r in row_spans for v in vocab_spans])

    for (r0, r1), (v0, v1) in tiles:
        shape = (r1 - r0, v1 - v0)
        hidden_rows = by_rows.float_rows(hidden, r0, r1)
        dz = head.pre_activation_into(_view(slab, shape), hidden_rows, v0, v1, r0)
        # the one-hot term sum_k g_k [v == t_k] (times d z / d y at t_k), added after the blocks
        columns, inside = _target_columns(by_rows.take(targets, r0, r1), v0, v1)
        target_grad = torch.where(inside, grad_logp_scaled[r0:r1], 0.0)
        if softcap is not None:
            target_grad = target_grad * head.cap_derivative(dz.gather(1, columns))
        for b0, b1 in _spans(shape[0], block):
            rb = slice(r0 + b0, r0 + b1)
            cap = _view(scratch_cap, (b1 - b0, shape[1]))
            d = head.activate(dz[b0:b1], r0 + b0, cap_derivative=cap)
            if grad_ent is not None:
                # p / T = exp(z - lse - log T) = exp((z - E_p[z]) - H - log T)
                centered = d.sub_(mean_logit[rb, None])
                p = torch.sub(centered, p_shift[rb, None], out=_view(scratch_p, d.shape)).exp_()
                torch.addcmul(neg_total[rb, None], centered, neg_ent[rb, None], out=d)
                d.mul_(p)
            else:
                d.sub_(lse[rb, None]).exp_().mul_(neg_total[rb, None])
            if cap is not None:
                d.mul_(cap)
        dz.scatter_add_(1, columns, target_grad)

        if grad_hidden is not None:
            if hidden_in_place:
                acc = by_rows.take(grad_hidden, r0, r1)
            else:
                acc = hidden_acc[r0:r1] if vocab_outer else hidden_acc[:shape[0]]
            if v0 == 0 and not vocab_outer:
                torch.mm(dz, head.weight_chunk(v0, v1), out=acc)
            else:
                acc.addmm_(dz, head.weight_chunk(v0, v1))
            if not hidden_in_place and not vocab_outer and v1 == vocab:
                grad_hidden.index_copy_(0, by_rows.index[r0:r1], acc.to(grad_hidden.dtype))
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

    if hidden_acc is not None and vocab_outer:
        grad_hidden.index_copy_(0, by_rows.index, hidden_acc.to(grad_hidden.dtype))
    if weight_acc is not None and not vocab_outer:
        grad_weight += weight_acc.to(grad_weight.dtype)
