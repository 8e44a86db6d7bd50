"""Top-k by packed keys: a logit and its id in one int64 whose signed order is the order we want.

A row's top-k (largest z first, ties broken by the lower id) is the k largest of the int64 keys::

    key = ordered(z) << 32 | (2**31 - 1 - id)

``ordered`` maps a float32 to an int32 of the same order (the sign bit kept, the magnitude bits of
negative numbers flipped; -0.0 is taken as +0.0 first, so that it ties with +0.0 by id). Keys are
distinct within a row (distinct ids), so the top-k set and its order are unique: any exact
selection, in any order of partial results, gives the same bits. That is what makes the top-k
batch-invariant: the Triton forward keeps a top-k per vocabulary split (``kernels._topk_keys``,
the same packing), and :func:`merge_topk` combines the splits; the torch path and the
vocabulary-parallel head merge their tiles and shards with the same function.

``EMPTY_KEY`` (int64 min) marks a slot with no candidate (a split with fewer than k ids); it
never reaches the result, since k <= V is checked.
"""

from __future__ import annotations

import torch

EMPTY_KEY = -(2**63)
_ID_BASE = 2**31 - 1
_LOW_BITS = 2**32 - 1


def pack_keys(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 ``logits`` and int ``ids`` (broadcastable) -> int64 keys (see the module docstring)."""
    bits = torch.where(logits == 0, 0.0, logits).contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.long() << 32) | (_ID_BASE - ids.long())


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (float32 logits, int64 ids), the inverse of :func:`pack_keys`."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), _ID_BASE - (keys & _LOW_BITS)


def merge_topk(keys: torch.Tensor, k: int) -> torch.Tensor:
    """``[M, C]`` candidate keys (C >= k) -> ``[M, k]``: the k largest, descending."""
    return torch.topk(keys, k, dim=1, largest=True, sorted=True).values
