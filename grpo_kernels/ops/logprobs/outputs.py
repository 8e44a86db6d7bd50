"""What the log-prob op can compute per row, besides the log-probs: names, the public result
:class:`TokenStats`, the drivers' per-row result :class:`RowStats`, and TRL's top-1 rule.

Definitions (TRL 1.16's ``trl/kernels/chunked_logprob.py``; z the transformed, temperature-scaled
logits of a row, p = softmax(z), V the vocabulary size):

- ``entropy``          = -sum_v p_v log p_v (differentiable)
- ``lse``              = logsumexp_v z_v (differentiable)
- ``log_sum_sq_probs`` = log sum_v p_v^2 (DPO's WPO weights; exp() of it is verl's sum pi^2)
- ``mean_logits``      = sum_v z_v / V
- ``is_top1``          = the target is argmax's pick: z_t >= max_v z_v and z_t > z_v for every v < t
                         (a tie with a lower id is not a top-1 prediction; one target per row only)
- ``topk``             = the k largest log-probs of the row and their ids, descending, ties broken by
                         the lower id (differentiable in the log-probs; ids are integers)

``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` are not differentiable (as in TRL).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Names accepted in ``outputs=`` of token_logprobs (the log-probs themselves come with targets).
OUTPUT_NAMES = ("entropy", "lse", "log_sum_sq_probs", "mean_logits", "is_top1", "topk")
# Statistics the forward drivers compute on request, besides lse and entropy.
DRIVER_STATS = ("log_sum_sq_probs", "mean_logits", "is_top1")
MAX_TOPK = 64


class TokenStats(NamedTuple):
    """Per-token outputs of ``token_logprobs(..., outputs=...)``; fields not asked for are None.

    Shapes: ``logprobs`` the shape of targets (None without targets); ``entropy``, ``lse``,
    ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` (bool) hidden's leading shape;
    ``topk_logprobs`` (float32, descending) and ``topk_ids`` (int64) leading shape + ``(k,)``.
    Floats are float32. Ignored rows hold 0 (False for ``is_top1``; id 0 for ``topk_ids``).
    """

    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None


class RowStats(NamedTuple):
    """What a forward driver returns for the ``M`` rows it was given (float32 unless stated; None
    when not asked for). The caller forms log-probs as ``target_logit - lse``.

    ``target_logit`` ``[M, K]``: z at each target id, 0 for an id outside ``[0, V)``; ``lse``,
    ``entropy``, ``log_sum_sq_probs``, ``mean_logits`` ``[M]``; ``row_max`` and
    ``max_before_target`` ``[M]`` (the largest z of the row, and of the ids below its first target:
    the state of the top-1 rule, ``-inf`` when there is none); ``topk_logits`` ``[M, k]`` (z,
    descending) and ``topk_ids`` ``[M, k]`` int64.
    """

    target_logit: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    row_max: torch.Tensor | None = None
    max_before_target: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None


def top1_rule(target_logit: torch.Tensor, row_max: torch.Tensor, max_before_target: torch.Tensor) -> torch.Tensor:
    """TRL's is_top1: the target's logit reaches the row's max and beats every lower id (argmax's
    first-maximum rule). All ``[M]``; returns bool ``[M]``."""
    return (target_logit >= row_max) & (target_logit > max_before_target)


def parse_outputs(outputs, topk) -> tuple[frozenset, int]:
    """``outputs`` (a tuple/list of OUTPUT_NAMES) and ``topk`` -> (the set of names, k or 0);
    raises TypeError/ValueError naming the argument."""
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple or list of names among {OUTPUT_NAMES}, got "
                        f"{type(outputs).__name__}")
    names = []
    for name in outputs:
        if not isinstance(name, str) or name not in OUTPUT_NAMES:
            hint = " (log-probs are always returned when targets are given)" if name == "logprobs" else ""
            raise ValueError(f"outputs: unknown name {name!r}{hint}; known: {OUTPUT_NAMES}")
        names.append(name)
    chosen = frozenset(names)
    if "topk" in chosen:
        if topk is None:
            raise ValueError(f"outputs holds 'topk': pass topk=k, an int in [1, {MAX_TOPK}]")
        if isinstance(topk, bool) or not isinstance(topk, int):
            raise TypeError(f"topk must be an int in [1, {MAX_TOPK}], got {type(topk).__name__}")
        if not 1 <= topk <= MAX_TOPK:
            raise ValueError(f"topk must be in [1, {MAX_TOPK}], got {topk}")
        return chosen, topk
    if topk is not None:
        raise ValueError("topk= is given but outputs does not hold 'topk'")
    return chosen, 0
