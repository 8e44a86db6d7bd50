"""The drivers' interface: one LM head, the forward's statistics, and a head's logits on a tile
in PyTorch (the chunked path and the student top-k selection), and the logits at given ids
(the top-k forms, both paths).

A head maps hidden states to logits ``z``, per row ``n`` and vocabulary id ``v``::

    y = hidden @ weight.T + bias                  # [rows, V]: never stored whole
    u = logit_scale * y
    z = softcap * tanh(u / softcap) / T_n         # or u / T_n without a soft-cap

(TRL's order: the scale before the soft-cap, the temperature after). The student and the teacher
are two heads with their own hidden size, dtype, bias, scale and soft-cap, and the same
vocabulary and per-row temperature.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Head(NamedTuple):
    """hidden ``[N, D]`` (row-contiguous), weight ``[V, D]``, bias ``[V]`` or None, in one dtype."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    logit_scale: float
    softcap: Optional[float]


class ForwardStats(NamedTuple):
    """What a forward driver returns, per compacted row (float32; None where not computed)."""

    student_lse: torch.Tensor  # [M]
    entropy: torch.Tensor  # [M], the student's
    teacher_lse: Optional[torch.Tensor] = None  # [M], with a teacher head
    forward_kl: Optional[torch.Tensor] = None  # [M] KL(p_t || p_s), with a teacher head
    reverse_kl: Optional[torch.Tensor] = None  # [M] KL(p_s || p_t), with a teacher head
    jsd: Optional[torch.Tensor] = None  # [M], with a teacher head and 0 < beta < 1
    kl_student_mixture: Optional[torch.Tensor] = None  # [M] KL(p_s || m), with the JSD
    student_id_logits: Optional[torch.Tensor] = None  # [M, K] z_s at the ids (0 for an id of -1)
    teacher_id_logits: Optional[torch.Tensor] = None  # [M, K] z_t at the ids, with a teacher head


class TileLogits:
    """The head's logits tile by tile in float32, for the chunked PyTorch path: a 16-bit weight
    chunk is converted once per vocabulary chunk and reused across row chunks."""

    def __init__(self, head: Head):
        self.head = head
        self._chunk_key, self._chunk = None, None

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        """float32 ``W[v0:v1]`` (a view for a float32 weight; else converted once and cached)."""
        weight = self.head.weight
        if weight.dtype == torch.float32:
            return weight[v0:v1]
        if self._chunk_key != (v0, v1):
            self._chunk = None  # free the previous chunk before converting the next: one alive
            self._chunk_key, self._chunk = (v0, v1), weight[v0:v1].float()
        return self._chunk

    def pre_activation_into(self, slab: torch.Tensor, hidden_rows: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """slab ``[r, v1 - v0]`` <- ``u = scale * y`` from float32 hidden rows ``[r, D]``."""
        weight_chunk = self.weight_chunk(v0, v1)
        if self.head.bias is not None:
            torch.addmm(self.head.bias[v0:v1].float(), hidden_rows, weight_chunk.t(), out=slab)
        else:
            torch.mm(hidden_rows, weight_chunk.t(), out=slab)
        if self.head.logit_scale != 1.0:
            slab.mul_(self.head.logit_scale)
        return slab

    def activate(self, block: torch.Tensor, inv_temp: torch.Tensor, derivative: Optional[torch.Tensor] = None):
        """In place on a row block of ``u``: ``u -> z`` with the rows' ``inv_temp [r]``; optionally
        writes ``dz/dy`` into ``derivative`` (same shape)."""
        softcap = self.head.softcap
        if softcap is not None:
            block.div_(softcap)
            if derivative is not None:
                # 1 / cosh^2, not 1 - tanh^2: the latter cancels to 0 once tanh rounds to +-1
                torch.cosh(block, out=derivative).square_().reciprocal_()
                derivative.mul_(inv_temp[:, None] * self.head.logit_scale)
            block.tanh_().mul_(softcap)
        elif derivative is not None:
            derivative.copy_((inv_temp * self.head.logit_scale)[:, None].expand_as(derivative))
        return block.mul_(inv_temp[:, None])


# float32 bytes of the [rows, K, D] weight rows gathered at once by logits_at_ids
_GATHER_BYTES = 32 * 2**20


def logits_at_ids(head: Head, rows: torch.Tensor, ids: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` float32: the head's z at ``ids [N, K]`` (int, -1: none, giving 0) for the
    compacted ``rows [M]`` (int), as K float32 dot products per row, a chunk of rows at a time (the
    gathered weight rows take at most ``_GATHER_BYTES``). O(M K D) work beside the vocabulary's
    O(M V D): the top-k forms' logits at their ids.

    An elementwise product and a sum, not a batched matmul: a float32 matmul may run in TF32 when
    the caller allows it, and these z must match the kernels' (IEEE float32) normalizers."""
    index = rows.long()
    num_ids, dim = ids.shape[1], head.weight.shape[1]
    out = torch.zeros((index.numel(), num_ids), device=head.hidden.device)
    chunk = max(1, _GATHER_BYTES // (4 * num_ids * dim))
    for r0 in range(0, index.numel(), chunk):
        r1 = min(r0 + chunk, index.numel())
        row_ids = ids.index_select(0, index[r0:r1]).long()
        present = row_ids >= 0
        row_ids = row_ids.clamp(min=0).reshape(-1)
        hidden_rows = head.hidden.index_select(0, index[r0:r1]).float()
        # a fresh float32 [rows, K, D] either way (index_select copies), multiplied in place
        weight_rows = head.weight.index_select(0, row_ids).view(r1 - r0, num_ids, dim).float()
        y = weight_rows.mul_(hidden_rows[:, None, :]).sum(2)
        if head.bias is not None:
            y += head.bias.index_select(0, row_ids).float().view(r1 - r0, num_ids)
        u = y * head.logit_scale
        if head.softcap is not None:
            u = head.softcap * torch.tanh(u / head.softcap)
        out[r0:r1] = torch.where(present, u * inv_temp.index_select(0, index[r0:r1])[:, None], 0.0)
    return out
