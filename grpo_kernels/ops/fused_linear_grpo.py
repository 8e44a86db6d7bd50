"""GRPO loss straight from the last hidden states: ``token_logprobs`` chained with ``grpo_loss``.

The log-prob kernel streams the vocabulary and keeps O(B*T) state; the loss kernel turns the
``[B, T]`` log-probs into the loss and d loss / d logp in one pass; autograd feeds that gradient
(and d loss / d entropy when an entropy bonus is on) to the log-prob kernel's backward, which
recomputes logit tiles on chip. Nothing of size vocabulary is ever stored. Completion tokens with
mask 0 are passed as ``ignore_index``, so padding costs neither forward nor backward work.
"""

from __future__ import annotations

import torch

from grpo_kernels.ops.grpo_loss import grpo_loss_prepared, prepare_loss_inputs
from grpo_kernels.ops.logprobs import token_logprobs
from grpo_kernels.ops.logprobs.temperature import check_temperature
from grpo_kernels.ops.packing import packed_shape
from grpo_kernels.ops.utils import INDEX_DTYPES, check_tensor, resolve_backend

_IGNORE_INDEX = -100


@torch.library.custom_op("grpo_kernels::completion_targets", mutates_args=())
def completion_targets(completion_ids: torch.Tensor, completion_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, T]`` log-prob targets: the completion ids, ``ignore_index`` where the mask is 0.

    Every id under a non-zero mask must be in ``[0, vocab_size)``: the internal ignore index
    (-100) among them would silently get log-prob 0 while counting as a token, and any other
    out-of-range id would be reported by the log-prob kernel under its internal names. One host
    sync, inside this custom op, so that torch.compile traces the caller without a graph break.
    """
    active = completion_mask != 0
    bad = active & ((completion_ids < 0) | (completion_ids >= vocab_size))
    if bool(bad.any()):
        first = completion_ids[bad].flatten()[0].item()
        raise ValueError(f"completion_ids holds {int(bad.sum())} id(s) outside [0, {vocab_size}) under a non-zero "
                         f"completion_mask, e.g. {first} (the vocabulary is lm_head_weight.shape[0] = {vocab_size}; "
                         "ids under mask 0 are never read)")
    return completion_ids.masked_fill(~active, _IGNORE_INDEX)


@completion_targets.register_fake
def _completion_targets_fake(completion_ids, completion_mask, vocab_size):
    return torch.empty_like(completion_ids)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    filter_eps: float | None = None,
    exact: bool = True,
    backward: str = "workspace",
    workspace_bytes: int | None = None,
    backend: str = "auto",
    process_group=None,
    cu_seqlens: torch.Tensor | None = None,
    **options,
):
    """GRPO-family loss of TRL 1.16 from hidden states, without materializing logits.

    Args:
        hidden: ``[B, T, D]`` last hidden states at the positions that predict the completion tokens;
            with ``cu_seqlens``, packed: ``[N, D]`` or ``[1, N, D]`` (verl's remove-padding layout).
        lm_head_weight: ``[V, D]`` LM head (same dtype as ``hidden``); ``bias``: optional ``[V]``.
        completion_ids: ``[B, T]`` sampled token ids (int32/int64); ids under mask 0 are not read.
        completion_mask: ``[B, T]``, 0 for padding.
        advantages: ``[B]`` (or ``[B, T]``).
        old_logprobs, ref_logprobs: ``[B, T]`` log-probs of the sampling / reference policy.
        temperature: the logits are divided by it before the softmax (as TRL does for the policy):
            a float, or a tensor of hidden's leading shape (``[B, T]``; packed ``[N]`` or ``[1, N]``
            as hidden) or one that broadcasts to it (e.g. ``[B, 1]``: one per sequence), see
            ``token_logprobs``.
        filter_eps, exact, backward, workspace_bytes: passed to ``token_logprobs`` (gradient
            filtering, ``None`` is exact; ``backward="workspace"`` (default, no atomics) or
            ``"atomic"``; ``exact=False``: the atomic backward's single pass, d weight accumulated
            in its dtype; the workspace backward's memory budget).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, for both kernels.
        process_group: vocabulary-parallel head, passed to ``token_logprobs`` (``lm_head_weight`` and
            ``bias`` are this rank's shard, ``completion_ids`` global ids, ``hidden`` the same on
            every rank; the loss is then the same on every rank).
        cu_seqlens: packed sequences, int32/int64 ``[S + 1]`` (as :func:`grpo_kernels.grpo_loss`):
            ``completion_ids``, ``completion_mask`` and the other token tensors ``[N]`` or ``[1, N]``,
            ``advantages`` ``[S]`` per completion or per token; the loss, metrics and gradients of
            the padded layout of the same data.
        **options: every option and extra input of :func:`grpo_kernels.grpo_loss` (``beta``,
            ``loss_type`` and its own options, ``importance_sampling_level``, the aggregation,
            ``rollout_is_ratio`` / ``rollout_is_mode``, rollout correction (``rollout_is``,
            ``rollout_rs``, ``bypass_mode``, ... with ``sampling_logprobs`` in decoupled mode),
            ``entropy_coef``, ``top_entropy_quantile``, ``off_policy_mask_threshold``, ...).

    Returns:
        ``(loss, metrics)`` as :func:`grpo_kernels.grpo_loss`; the loss is differentiable w.r.t.
        ``hidden``, ``lm_head_weight`` and ``bias``. The entropy is always computed in the
        log-prob kernel's forward for the ``entropy`` metric (a few flops per logit, no extra pass);
        its backward only runs when ``entropy_coef != 0``.
    """
    check_tensor("lm_head_weight", lm_head_weight, ndim=2)
    if cu_seqlens is None:
        check_tensor("hidden", hidden, ndim=3)
        check_tensor("completion_ids", completion_ids, dtypes=INDEX_DTYPES, ndim=2)
    else:  # packed: hidden [N, D] / [1, N, D], token tensors [N] / [1, N]
        check_tensor("hidden", hidden)
        if hidden.dim() not in (2, 3) or (hidden.dim() == 3 and hidden.shape[0] != 1):
            raise ValueError(f"hidden must be [N, D] or [1, N, D] with cu_seqlens, got shape {tuple(hidden.shape)}")
        check_tensor("completion_ids", completion_ids, dtypes=INDEX_DTYPES)
        if packed_shape("completion_ids", completion_ids.shape) == hidden.shape[-2]:
            completion_ids = completion_ids.reshape(hidden.shape[:-1])  # [N] <-> [1, N], as hidden
    if tuple(completion_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"completion_ids shape {tuple(completion_ids.shape)} must be hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if completion_ids.device != hidden.device:
        raise ValueError(f"completion_ids is on {completion_ids.device} but hidden is on {hidden.device}")
    check_temperature(temperature, hidden.shape[:-1], hidden.device)  # a float or one per token
    if "entropy" in options:
        raise TypeError("fused_linear_grpo_loss computes the entropy itself: do not pass entropy")
    # The loss inputs are checked before the log-prob kernel runs; token_logprobs checks the rest.
    cfg, tensors = prepare_loss_inputs(
        completion_ids.shape, hidden.device, completion_mask, advantages, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, will_have_entropy=True, cu_seqlens=cu_seqlens, **options)
    loss_backend = resolve_backend(hidden.device, backend)

    # A vocabulary shard holds only part of the ids: the vocab-parallel op checks the global range
    # itself (it learns the shard sizes), so here only the negative ids (e.g. -100) are refused.
    vocab_bound = lm_head_weight.shape[0] if process_group is None else torch.iinfo(torch.int32).max
    if cu_seqlens is not None:  # the mask in the ids' layout ([N] or [1, N]: same tokens)
        completion_mask = completion_mask.reshape(completion_ids.shape)
    targets = completion_targets(completion_ids, completion_mask, vocab_bound)
    logprobs, entropy = token_logprobs(
        hidden, lm_head_weight, targets, bias=bias, temperature=temperature, ignore_index=_IGNORE_INDEX,
        return_entropy=True, filter_eps=filter_eps, exact=exact, backward=backward, workspace_bytes=workspace_bytes,
        backend=backend,
        process_group=process_group)
    if cfg.entropy_coef == 0:
        entropy = entropy.detach()  # metric and entropy mask only: no entropy backward
    return grpo_loss_prepared(logprobs, entropy, cfg, tensors, loss_backend)
