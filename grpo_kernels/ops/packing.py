"""Packed sequences: the ``cu_seqlens`` layout and the checks every entry point that accepts it shares.

A packed batch stores S sequences back to back along one token dimension of N = total tokens (TRL's
``padding_free``, verl's ``use_remove_padding``, prime-rl's packed micro-batches): sequence ``i`` is
tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``, with ``cu_seqlens`` the ``[S + 1]`` int32/int64
cumulative lengths of flash-attn's varlen API and verl (``cu_seqlens[0] = 0``, non-decreasing,
``cu_seqlens[-1] = N``; equal neighbours are empty sequences). Token tensors are ``[N]`` or
``[1, N]`` (verl's remove-padding layout), per-sequence tensors ``[S]``.

It is the padded ``[S, T]`` layout without its padding: row ``i`` of that layout holds sequence
``i``'s tokens in its first ``len_i`` positions (docs/semantics.md, "Packed sequences").
"""

from __future__ import annotations

import torch

from grpo_kernels.ops.utils import INDEX_DTYPES, check_tensor


def check_cu_seqlens(cu_seqlens, device) -> torch.Tensor:
    """``cu_seqlens`` checked for what its shape and dtype tell (no host sync), as int64 ``[S + 1]``.

    Its values are checked by :func:`cu_seqlens_value_checks` in the caller's one host sync.
    """
    check_tensor("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES, ndim=1)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [S + 1] for S >= 1 sequences (cumulative lengths starting at 0), "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the token tensors are on {device}")
    return cu_seqlens.to(torch.int64).contiguous()


def cu_seqlens_value_checks(cu_seqlens: torch.Tensor, num_tokens: int) -> list:
    """``[(message, failed 0-d bool tensor)]`` for the values of ``cu_seqlens`` (int64 ``[S + 1]``):
    it starts at 0, never decreases, and ends at the number of tokens. The caller syncs them once,
    together with its own checks."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return [
        ("cu_seqlens[0] must be 0 (cumulative sequence lengths)", cu_seqlens[0] != 0),
        ("cu_seqlens must be non-decreasing (a sequence length is >= 0)", (lengths < 0).any()),
        (f"cu_seqlens[-1] must equal the number of tokens, {num_tokens} (every token belongs to a sequence)",
         cu_seqlens[-1] != num_tokens),
    ]


def raise_failed(checks) -> None:
    """One host sync for ``[(message, failed 0-d bool tensor)]``: a ``ValueError`` naming every failure."""
    if not checks:
        return
    failed = torch.stack([flag for _, flag in checks]).tolist()
    messages = [message for (message, _), bad in zip(checks, failed) if bad]
    if messages:
        raise ValueError("; ".join(messages))


def packed_shape(name: str, shape, what: str = "the number of tokens") -> int:
    """N of a token tensor's shape ``[N]`` or ``[1, N]``; a ``ValueError`` naming ``name`` otherwise."""
    shape = tuple(shape)
    if len(shape) == 1 or (len(shape) == 2 and shape[0] == 1):
        return shape[-1]
    raise ValueError(f"{name} must be [N] or [1, N] (N = {what}) with cu_seqlens, got shape {shape}")


def as_tokens(name: str, tensor: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A packed token tensor ``[N]`` or ``[1, N]`` as a ``[N]`` view (``ValueError`` naming ``name`` otherwise)."""
    if packed_shape(name, tensor.shape) != num_tokens:
        raise ValueError(f"{name} must have N = {num_tokens} tokens ([N] or [1, N]) with cu_seqlens, "
                         f"got shape {tuple(tensor.shape)}")
    return tensor.reshape(num_tokens)


def sequence_of_token(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[N]`` int64: the sequence each token belongs to (empty sequences own none). No host sync."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def sequence_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[S]`` int64 sequence lengths."""
    return cu_seqlens[1:] - cu_seqlens[:-1]
