"""The chunked PyTorch drivers of the divergence op (CPU without the Triton interpreter).

The same quantities as the Triton drivers, by the same shift-invariant formulas (see
``kernels``), over ``[rows, vocabulary ids]`` tiles: each head's float32 logits tile is formed in
its own slab with one matmul (``_SLAB_BYTES`` each, the only buffers that grow with the chunk
sizes), and the elementwise work runs over row blocks of ``_BLOCK_BYTES`` whose temporaries stay
in cache. Memory above the inputs and gradients: the two slabs, a few blocks, O(rows) vectors,
and in the backward a float32 d-hidden accumulator ``[M, D]`` and a d-weight accumulator for one
vocabulary chunk. No ``[M, V]`` buffer at any size.
"""

from __future__ import annotations

import math

import torch

from grpo_kernels.ops.divergence.head import ForwardStats, Head, TileLogits, logits_at_ids
from grpo_kernels.ops.divergence.kernels import FORWARD_KL, JSD, REVERSE_KL, TARGETS

# One head's float32 [rows, vocabulary ids] logits slab (the student's and the teacher's: two).
_SLAB_BYTES = 32 * 2**20
# The slab's row count never drops below this (GEMM efficiency): wider vocabularies are tiled.
_MIN_SLAB_ROWS = 512
# Rows of a slab whose elementwise passes run together (their temporaries stay in cache).
_BLOCK_BYTES = 2 * 2**20


def _tile_sizes(num_rows: int, vocab: int) -> tuple[int, int]:
    """(rows, vocabulary ids) per tile so that a float32 slab fits ``_SLAB_BYTES``."""
    elements = max(1, _SLAB_BYTES // 4)
    vocab_chunk = min(vocab, max(1, elements // _MIN_SLAB_ROWS))
    return max(1, min(num_rows, elements // vocab_chunk)), vocab_chunk


def _spans(total: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _row_blocks(rows: int, vocab_chunk: int) -> list[tuple[int, int]]:
    return _spans(rows, max(1, min(rows, _BLOCK_BYTES // (4 * vocab_chunk))))


def _id_columns(ids_rows: torch.Tensor, v0: int, v1: int):
    """(column [r, K] clamped into the tile, bool [r, K] whether the id lies in [v0, v1))."""
    inside = (ids_rows >= v0) & (ids_rows < v1)
    return torch.where(inside, ids_rows - v0, 0).long(), inside


class _Tiles:
    """Both heads' activated logits on one [rows, ids] tile, in two slabs."""

    def __init__(self, student: Head, teacher: Head | None, rows: torch.Tensor, inv_temp: torch.Tensor):
        self.heads = [TileLogits(student)] + ([TileLogits(teacher)] if teacher is not None else [])
        self.rows, self.inv_temp = rows.long(), inv_temp
        self.row_chunk, self.vocab_chunk = _tile_sizes(rows.numel(), student.weight.shape[0])
        device = student.hidden.device
        self.slabs = [torch.empty(self.row_chunk * self.vocab_chunk, device=device) for _ in self.heads]

    def spans(self):
        """(r0, r1, v0, v1) of every tile: vocabulary outermost (a weight chunk converted once)."""
        rows, vocab = _spans(self.rows.numel(), self.row_chunk), _spans(self.heads[0].head.weight.shape[0],
                                                                          self.vocab_chunk)
        return [(r0, r1, v0, v1) for v0, v1 in vocab for r0, r1 in rows]

    def hidden_rows(self, head_index: int, r0: int, r1: int) -> torch.Tensor:
        return self.heads[head_index].head.hidden.index_select(0, self.rows[r0:r1]).float()

    def logits(self, head_index: int, r0: int, r1: int, v0: int, v1: int, derivative=None) -> torch.Tensor:
        """z [r1 - r0, v1 - v0] of a head, in its slab (``derivative``: a buffer for dz/dy)."""
        tile = self.heads[head_index]
        shape = (r1 - r0, v1 - v0)
        slab = self.slabs[head_index][:shape[0] * shape[1]].view(shape)
        tile.pre_activation_into(slab, self.hidden_rows(head_index, r0, r1), v0, v1)
        inv_temp = self.inv_temp[self.rows[r0:r1]]
        for b0, b1 in _row_blocks(shape[0], shape[1]):
            tile.activate(slab[b0:b1], inv_temp[b0:b1], derivative[b0:b1] if derivative is not None else None)
        return slab


def _merge(run: list, part: list) -> None:
    """The online states ``run`` (in place) and ``part`` (lists of [r] tensors, ``kernels``'
    NUM_STATES order, 3 without a teacher) merged: the merge kernel's formulas."""
    s_max, s_sum, s_ent = run[:3]
    p_s_max, p_s_sum, p_s_ent = part[:3]
    new_s_max = torch.maximum(s_max, p_s_max)
    s_shift = torch.where(s_sum > 0, s_max - new_s_max, 0.0)
    p_s_shift = p_s_max - new_s_max
    s_scale, p_s_scale = torch.exp(s_max - new_s_max), torch.exp(p_s_shift)
    if len(run) > 3:
        t_max, t_sum, t_gap, s_gap = run[3:]
        p_t_max, p_t_sum, p_t_gap, p_s_gap = part[3:]
        new_t_max = torch.maximum(t_max, p_t_max)
        t_shift = torch.where(t_sum > 0, t_max - new_t_max, 0.0)
        p_t_shift = p_t_max - new_t_max
        t_scale, p_t_scale = torch.exp(t_max - new_t_max), torch.exp(p_t_shift)
        t_gap.copy_(t_scale * (t_gap + t_sum * (t_shift - s_shift))
                    + p_t_scale * (p_t_gap + p_t_sum * (p_t_shift - p_s_shift)))
        s_gap.copy_(s_scale * (s_gap + s_sum * (s_shift - t_shift))
                    + p_s_scale * (p_s_gap + p_s_sum * (p_s_shift - p_t_shift)))
        t_sum.copy_(t_sum * t_scale + p_t_sum * p_t_scale)
        t_max.copy_(new_t_max)
    s_ent.copy_(s_scale * (s_ent + s_sum * s_shift) + p_s_scale * (p_s_ent + p_s_sum * p_s_shift))
    s_sum.copy_(s_sum * s_scale + p_s_sum * p_s_scale)
    s_max.copy_(new_s_max)


def _block_states(zs: torch.Tensor, zt: torch.Tensor | None) -> list:
    """A row block's online state (relative to the block's own maxima), ``_merge``'s order."""
    s_max = zs.amax(dim=1)
    xs = zs - s_max[:, None]
    ps = xs.exp()
    states = [s_max, ps.sum(dim=1), (ps * xs).sum(dim=1)]
    if zt is not None:
        t_max = zt.amax(dim=1)
        xt = zt - t_max[:, None]
        pt = xt.exp()
        gap = xt.sub_(xs)
        states += [t_max, pt.sum(dim=1), (pt * gap).sum(dim=1), -(ps * gap).sum(dim=1)]
    return states


def torch_forward(student: Head, teacher: Head | None, rows: torch.Tensor, inv_temp: torch.Tensor,
                  ids: torch.Tensor | None, beta: float) -> ForwardStats:
    """Chunked PyTorch forward over the compacted ``rows [M]`` (int32): ``inv_temp [N]`` float32,
    ``ids [N, K]`` int32 (-1 matches nothing) or None. With a teacher: both KLs, and when
    ``0 < beta < 1`` the JSD's second pass."""
    num_rows, device = rows.numel(), student.hidden.device
    tiles = _Tiles(student, teacher, rows, inv_temp)
    num_states = 7 if teacher is not None else 3
    run = [torch.zeros(num_rows, device=device) for _ in range(num_states)]
    run[0].fill_(-math.inf)
    if teacher is not None:
        run[3].fill_(-math.inf)
    for r0, r1, v0, v1 in tiles.spans():
        zs = tiles.logits(0, r0, r1, v0, v1)
        zt = tiles.logits(1, r0, r1, v0, v1) if teacher is not None else None
        for b0, b1 in _row_blocks(r1 - r0, v1 - v0):
            part = _block_states(zs[b0:b1], zt[b0:b1] if zt is not None else None)
            _merge([state[r0 + b0:r0 + b1] for state in run], part)

    log_s_sum = run[1].log()
    stats = {"student_lse": run[0] + log_s_sum, "entropy": log_s_sum - run[2] / run[1]}
    if ids is not None:  # the Triton driver's way too: K dot products per row
        stats["student_id_logits"] = logits_at_ids(student, rows, ids, inv_temp)
        if teacher is not None:
            stats["teacher_id_logits"] = logits_at_ids(teacher, rows, ids, inv_temp)
    if teacher is not None:
        log_t_sum = run[4].log()
        stats.update(teacher_lse=run[3] + log_t_sum, forward_kl=run[5] / run[4] - log_t_sum + log_s_sum,
                     reverse_kl=run[6] / run[1] - log_s_sum + log_t_sum)
        if 0.0 < beta < 1.0:
            stats["jsd"], stats["kl_student_mixture"] = _jsd_pass(tiles, stats["student_lse"], stats["teacher_lse"],
                                                                  beta)
    return ForwardStats(**stats)


def _jsd_pass(tiles: _Tiles, student_lse, teacher_lse, beta: float):
    """(sum_v beta p_t log(p_t / m) + (1 - beta) p_s log(p_s / m), KL(p_s || m)) per row."""
    num_rows = student_lse.numel()
    jsd = torch.zeros(num_rows, device=student_lse.device)
    kl_student = torch.zeros_like(jsd)
    log_beta, log_one_minus_beta = math.log(beta), math.log1p(-beta)
    for r0, r1, v0, v1 in tiles.spans():
        zs, zt = tiles.logits(0, r0, r1, v0, v1), tiles.logits(1, r0, r1, v0, v1)
        for b0, b1 in _row_blocks(r1 - r0, v1 - v0):
            rb = slice(r0 + b0, r0 + b1)
            log_ps = zs[b0:b1].sub_(student_lse[rb, None])
            log_pt = zt[b0:b1].sub_(teacher_lse[rb, None])
            log_m = torch.logaddexp(log_ps + log_one_minus_beta, log_pt + log_beta)
            kl_s = log_ps.exp() * (log_ps - log_m)
            jsd[rb] += (beta * log_pt.exp() * (log_pt - log_m) + (1.0 - beta) * kl_s).sum(dim=1)
            kl_student[rb] += kl_s.sum(dim=1)
    return jsd, kl_student


def torch_backward(student: Head, teacher: Head | None, rows, inv_temp, kind: int, beta: float, student_lse,
                   teacher_lse, aux, grad_row, ids, grad_logp, grad_hidden, grad_weight, grad_bias,
                   workspace_bytes=None) -> None:
    """Chunked PyTorch backward, float32 accumulation throughout; the arguments as in
    ``drivers.triton_backward``. ``workspace_bytes`` does not apply (this module's own slabs)."""
    del workspace_bytes
    num_rows, (vocab, dim) = rows.numel(), student.weight.shape
    device = student.hidden.device
    tiles = _Tiles(student, teacher if kind != TARGETS else None, rows, inv_temp)
    derivative_slab = torch.empty(tiles.row_chunk * tiles.vocab_chunk, device=device)
    hidden_acc = torch.zeros((num_rows, dim), device=device)
    row_ids = ids.index_select(0, tiles.rows) if kind == TARGETS else None
    log_beta, log_one_minus_beta = (math.log(beta), math.log1p(-beta)) if kind == JSD else (0.0, 0.0)
    weight_acc = None

    for r0, r1, v0, v1 in tiles.spans():
        shape = (r1 - r0, v1 - v0)
        dzdy = derivative_slab[:shape[0] * shape[1]].view(shape)
        dz = tiles.logits(0, r0, r1, v0, v1, derivative=dzdy)  # z_s, turned into d loss / d y in place
        zt = tiles.logits(1, r0, r1, v0, v1) if kind != TARGETS else None
        for b0, b1 in _row_blocks(shape[0], shape[1]):
            rb = slice(r0 + b0, r0 + b1)
            log_ps = dz[b0:b1].sub_(student_lse[rb, None])
            ps = log_ps.exp()
            if kind == TARGETS:
                grad = ps.mul_(-grad_row[rb, None])
            else:
                log_pt = zt[b0:b1].sub_(teacher_lse[rb, None])
                if kind == FORWARD_KL:
                    grad = ps.sub_(log_pt.exp())
                elif kind == REVERSE_KL:
                    grad = ps.mul_(log_ps - log_pt - aux[rb, None])
                else:
                    log_m = torch.logaddexp(log_ps + log_one_minus_beta, log_pt + log_beta)
                    grad = ps.mul_(log_ps - log_m - aux[rb, None]).mul_(1.0 - beta)
                grad.mul_(grad_row[rb, None])
            log_ps.copy_(grad)
        if kind == TARGETS:
            columns, inside = _id_columns(row_ids[r0:r1], v0, v1)
            dz.scatter_add_(1, columns, torch.where(inside, grad_logp[r0:r1], 0.0))
        dz.mul_(dzdy)

        hidden_acc[r0:r1].addmm_(dz, tiles.heads[0].weight_chunk(v0, v1))
        if grad_weight is not None:
            if r0 == 0:
                weight_acc = torch.zeros((shape[1], dim), device=device)
            weight_acc.addmm_(dz.t(), tiles.hidden_rows(0, r0, r1))
            if r1 == num_rows:
                grad_weight[v0:v1] = weight_acc.to(grad_weight.dtype)
        if grad_bias is not None:
            grad_bias[v0:v1] += dz.sum(dim=0)
    grad_hidden.index_copy_(0, tiles.rows, hidden_acc.to(grad_hidden.dtype))
