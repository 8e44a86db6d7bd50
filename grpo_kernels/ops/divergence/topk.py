"""The top-k forms: the divergence between two distributions coarse-grained onto a top-k support,
and the student's top-k ids.

A support is ``k`` vocabulary ids per row (the teacher's top-k, or the student's); the op gives
both models' full-vocabulary log-probs at those ids (``log q_i`` student, ``log p_i`` teacher;
some entries may be absent). Two ways to make distributions of them (docs/semantics.md,
"Distillation divergences"):

- ``tail="bucket"``: the ``k`` ids plus one tail category holding the rest of the mass,
  ``log(1 - sum_i e^{log q_i})`` (TRL's ``_add_tail_bucket``: the log of the mass is clamped to
  at most ``-1e-7`` first, so that the tail is never 0; its gradient flows into the student's
  top-k log-probs, and through them into every logit).
- ``tail="renormalize"``: the ``k`` ids alone, each model's log-probs renormalized over them
  (TRL's ``loss_add_tail=False``).

Then the same ``beta`` family as the full vocabulary: 0 forward KL(p || q), 1 reverse KL(q || p),
in between the generalized JSD with mixture ``(1 - beta) q + beta p`` (TRL's ``_jsd_divergence``
on the support). O(N k) work in float64, differentiable through autograd.
"""

from __future__ import annotations

import math

import torch

from grpo_kernels.ops.divergence.head import Head, TileLogits

TAILS = ("bucket", "renormalize")
# TRL's clamp on the log of the top-k mass before the tail bucket (server_distillation_trainer's
# _add_tail_bucket): the tail is at least 1 - e^{-1e-7} ~ 1e-7.
TAIL_LOG_MASS_MAX = -1e-7


def _log_mass(log_probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """log sum_i e^{log_probs_i} over the support, per row; rows with an empty support get -inf
    through a finite stand-in (so that no NaN reaches the backward)."""
    has_support = support.any(dim=-1, keepdim=True)
    masked = torch.where(support, log_probs, -math.inf)
    masked = torch.where(has_support, masked, 0.0)
    return torch.where(has_support.squeeze(-1), torch.logsumexp(masked, dim=-1), -math.inf)


def _categories(log_probs: torch.Tensor, support: torch.Tensor, tail: str):
    """(log-probs [N, c], support [N, c]) of the coarse-grained distribution: c = k + 1 with the
    tail bucket, k renormalized."""
    log_mass = _log_mass(log_probs, support)
    if tail == "bucket":
        clamped = log_mass.clamp(max=TAIL_LOG_MASS_MAX)
        tail_log_prob = torch.log(-torch.expm1(clamped))
        return (torch.cat([log_probs, tail_log_prob[:, None]], dim=-1),
                torch.cat([support, support.new_ones((support.shape[0], 1))], dim=-1))
    finite_mass = torch.where(torch.isfinite(log_mass), log_mass, 0.0)
    return log_probs - finite_mass[:, None], support


def beta_divergence(log_q: torch.Tensor, log_p: torch.Tensor, support: torch.Tensor, beta: float) -> torch.Tensor:
    """Per row, over the categories in ``support``: beta = 0 KL(p || q), 1 KL(q || p), in
    between beta KL(p || m) + (1 - beta) KL(q || m) with m = (1 - beta) q + beta p. ``q`` is the
    student, ``p`` the teacher; categories outside the support count 0."""
    safe_q = torch.where(support, log_q, 0.0)
    safe_p = torch.where(support, log_p, 0.0)
    q = torch.where(support, safe_q.exp(), 0.0)
    p = torch.where(support, safe_p.exp(), 0.0)
    if beta == 0.0:
        terms = p * (safe_p - safe_q)
    elif beta == 1.0:
        terms = q * (safe_q - safe_p)
    else:
        log_m = torch.logaddexp(safe_q + math.log1p(-beta), safe_p + math.log(beta))
        terms = beta * p * (safe_p - log_m) + (1.0 - beta) * q * (safe_q - log_m)
    return terms.sum(dim=-1)


def topk_divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, support: torch.Tensor, beta: float,
                    tail: str):
    """(divergence [N], student top-k mass [N], teacher top-k mass [N]) from the models'
    full-vocabulary log-probs at the support's ids (``[N, k]``; ``support [N, k]`` bool marks
    the entries that exist). Float64 inside, float32 out; differentiable w.r.t. ``student_logp``
    only (the teacher's are constants)."""
    log_q = student_logp.double()
    log_p = teacher_logp.detach().double()
    q_categories, categories = _categories(log_q, support, tail)
    p_categories, _ = _categories(log_p, support, tail)
    divergence = beta_divergence(q_categories, p_categories, categories, beta)
    with torch.no_grad():
        student_mass = torch.where(support, log_q.exp(), 0.0).sum(dim=-1).float()
        teacher_mass = torch.where(support, log_p.exp(), 0.0).sum(dim=-1).float()
    return divergence.float(), student_mass, teacher_mass


def _in_rank_order(values: torch.Tensor, ids: torch.Tensor):
    """(values, ids) sorted by value, descending, equal values by id, ascending."""
    by_id = torch.argsort(ids, dim=1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_value), ids.gather(1, by_value)


def _tile_topk(z: torch.Tensor, k: int):
    """(values, ids) of the min(k, width) largest entries of each row of a tile, in rank order,
    ties with the lower id first. torch.topk picks among values tied at the k-th place as it likes:
    the rows where such a tie leaves an entry out are redone with a stable sort of the row."""
    values, ids = torch.topk(z, min(k, z.shape[1]), dim=1)
    values, ids = _in_rank_order(values, ids)
    threshold = values[:, -1:]
    ambiguous = ((z == threshold).sum(dim=1) > (values == threshold).sum(dim=1)).nonzero().squeeze(1)
    if ambiguous.numel() > 0:
        exact_values, exact_ids = torch.sort(z[ambiguous], dim=1, descending=True, stable=True)
        values[ambiguous], ids[ambiguous] = exact_values[:, :values.shape[1]], exact_ids[:, :values.shape[1]]
    return values, ids


def select_student_topk(student: Head, rows: torch.Tensor, inv_temp: torch.Tensor, k: int,
                        slab_bytes: int = 32 * 2**20) -> torch.Tensor:
    """The student's ``k`` largest logits' ids per row (ties: the lower id first), ``[N, k]``
    int32, -1 on rows not in ``rows`` (int32, compacted).

    Chunked PyTorch over ``[rows, vocabulary ids]`` tiles of at most ``slab_bytes`` float32 (no
    ``[N, V]`` buffer): every tile's top-k in rank order (``_tile_topk``) is merged with the
    running top-k, which holds only lower ids, so that a stable sort keeps ties in id order.
    The logits are the head's z (after scale, soft-cap and temperature; ranking z and not y keeps
    ties that the soft-cap's rounding creates).
    """
    vocab = student.weight.shape[0]
    num_rows, device = rows.numel(), student.hidden.device
    ids = torch.full((student.hidden.shape[0], k), -1, device=device, dtype=torch.int32)
    if num_rows == 0:
        return ids
    elements = max(1, slab_bytes // 4)
    vocab_chunk = min(vocab, max(k, elements // 64))
    row_chunk = max(1, min(num_rows, elements // vocab_chunk))
    tiles = TileLogits(student)
    index = rows.long()
    slab = torch.empty(row_chunk * vocab_chunk, device=device)
    for r0 in range(0, num_rows, row_chunk):
        r1 = min(r0 + row_chunk, num_rows)
        hidden_rows = student.hidden.index_select(0, index[r0:r1]).float()
        best_values = best_ids = None
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            z = tiles.pre_activation_into(slab[:(r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0), hidden_rows, v0, v1)
            tiles.activate(z, inv_temp[index[r0:r1]])
            values, chunk_ids = _tile_topk(z, k)
            chunk_ids += v0
            if best_values is not None:
                values = torch.cat([best_values, values], dim=1)
                chunk_ids = torch.cat([best_ids, chunk_ids], dim=1)
                values, order = torch.sort(values, dim=1, descending=True, stable=True)
                values, chunk_ids = values[:, :k], chunk_ids.gather(1, order[:, :k])
            best_values, best_ids = values, chunk_ids
        ids[index[r0:r1]] = best_ids.to(torch.int32)
    return ids
