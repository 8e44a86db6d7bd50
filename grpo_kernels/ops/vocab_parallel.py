"""Vocabulary-parallel LM head: per-token log-probs and entropy when the head ``[V, D]`` is split by rows.

Two layouts, both on ``torch.distributed`` collectives over one process group of R ranks whose
weight shards ``[V_r, D]`` are contiguous vocabulary ranges in rank order (uneven sizes allowed):

* **TP layout** (:func:`vocab_parallel_logprobs`, Megatron-style tensor parallelism): ``hidden``
  ``[N, D]`` and the global ``targets`` ``[N]`` are the same on every rank. Each rank streams only
  its shard through the log-prob drivers and gets, per row, its shard's partial state
  ``(lse_r, entropy_r, target logit or 0)``; ONE all-gather of these ``[3, N]`` floats and a local
  merge give every rank the full values::

      lse     = logsumexp_r lse_r
      logp    = sum_r target_r - lse            (exactly one shard holds the target)
      entropy = sum_r w_r (entropy_r + lse - lse_r),   w_r = exp(lse_r - lse)

  (An all-gather rather than an all-reduce: merging the logsumexp needs the max first, i.e. two
  all-reduces, while the gather of 3 N floats per rank is one.) The backward gives each rank's
  drivers the *global* lse and ``E_p[z] = lse - entropy``: that is this shard's exact ``d logits``,
  so ``d weight``/``d bias`` stay local and the ``[N, D]`` float32 ``d hidden`` partial sums are
  all-reduced once.
* **Sharded-head layout** (:func:`sharded_head_logprobs`, FSDP2): ``hidden`` ``[N_r, D]`` and
  ``targets`` differ per rank, the head is row-sharded. ``layout="gather_hidden"`` all-gathers the
  hidden states and targets (``N_total x D``), runs the TP computation on them, keeps this rank's
  rows, and reduce-scatters ``d hidden`` back: the weight and its gradient never leave their
  shard. ``layout="gather_weight"`` all-gathers the weight instead (``V x D``) and runs the plain op;
  ``d weight`` is reduce-scattered. ``"auto"`` picks the smaller gather and logs the choice.

Neither layout ever holds another rank's weight shard (under ``gather_hidden``) or any ``[N, V]``
buffer. Shapes and the collectives per call are in ``docs/vocab_parallel.md``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from grpo_kernels.ops.logprobs.drivers import BACKENDS
from grpo_kernels.ops.logprobs.op import single_device_logprobs
from grpo_kernels.ops.utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_positive_finite,
    check_tensor,
    resolve_backend,
)

__all__ = ["vocab_parallel_logprobs", "sharded_head_logprobs", "choose_layout", "LAYOUTS"]

logger = logging.getLogger(__name__)

LAYOUTS = ("gather_hidden", "gather_weight")
# Set to 1 to check, on every call, that hidden and targets are identical on all TP ranks (one
# float64 checksum per rank rides along in the size all-gather; costs a pass over hidden).
DEBUG_ENV = "GRPO_KERNELS_CHECK_REPLICATED"


# ---------------------------------------------------------------------------------------------
# The log-prob drivers, called here and nowhere else in this module
# ---------------------------------------------------------------------------------------------


def _shard_driver(direction, backend, hidden, weight, bias, local_targets, rows, temperature, *args):
    """One vocabulary shard through ``logprobs.drivers.BACKENDS[backend]`` (see docs: logprob-drivers).

    ``local_targets`` ``[N]`` int32 are shard-local ids, ``-1`` where the target lies in another
    shard (an id outside ``[0, V_r)`` matches no logit in either driver). ``direction="forward"``:
    ``args = (compute_entropy,)``; returns ``(target_logit, lse, entropy or None)``, float32 ``[M]``
    over ``rows``, with target_logit 0 off-shard. ``direction="backward"``: ``args = (lse,
    mean_logit, grad_logp, grad_ent, filter_eps, exact, grad_hidden, grad_weight, grad_bias)`` with
    the *global* lse and mean logit; adds this shard's exact gradients into the buffers
    (``grad_hidden`` float32 ``[N, D]``).
    """
    forward_fn, backward_fn = BACKENDS[backend]
    driver_targets = local_targets.reshape(-1, 1)  # the drivers take [N, K] targets; K = 1 here
    if direction == "forward":
        (compute_entropy,) = args
        logp, lse, entropy = forward_fn(hidden, weight, bias, driver_targets, rows, temperature, compute_entropy)
        # the drivers return target - lse; the shard's target logit is recovered exactly where it
        # exists and is 0 elsewhere
        off_shard = local_targets[rows.long()] < 0
        return torch.where(off_shard, 0.0, logp[:, 0] + lse), lse, entropy
    lse, mean_logit, grad_logp, grad_ent, filter_eps, exact, grad_hidden, grad_weight, grad_bias = args
    backward_fn(hidden, weight, bias, driver_targets, rows, lse, mean_logit, grad_logp.reshape(-1, 1), grad_ent,
                temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias)


_META = 8


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checksum(hidden, targets):
    """Two float64 numbers that differ when hidden or targets differ (order-sensitive)."""
    weights = torch.arange(1, hidden.shape[0] + 1, device=hidden.device, dtype=torch.float64)
    rows = hidden.double().sum(1)
    return float(weights @ rows + (hidden.double() ** 2).sum()), float(weights @ targets.double())


def _local_checks(hidden, weight, bias, targets, temperature, ignore_index, filter_eps):
    """This rank's own checks; raises TypeError/ValueError naming the argument."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("targets", targets, dtypes=INDEX_DTYPES)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be this rank's [V_local] = [{weight.shape[0]}] shard in {hidden.dtype} "
                             f"on {hidden.device}, got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    for name, tensor in (("weight", weight), ("targets", targets)):
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} != this rank's weight shard width {weight.shape[1]} "
                         f"(the shard is [V_local, D])")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_positive_finite("temperature", temperature)
    if filter_eps is not None:
        check_positive_finite("filter_eps", filter_eps)


def _group_meta(group, hidden, weight, bias, targets, temperature, ignore_index, filter_eps, *, replicated,
                check_replicated):
    """One all-gather of a few float64 per rank: every rank learns every shard's size, and every
    rank raises the same error when any rank's input is bad (so that none waits in a collective).

    Returns ``(world_size, rank, vocab_sizes [R] list, row_counts [R] list)``."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    record = torch.zeros(_META, dtype=torch.float64)
    problem = None
    try:
        _local_checks(hidden, weight, bias, targets, temperature, ignore_index, filter_eps)
    except (TypeError, ValueError) as exc:
        problem = exc
    else:
        live = targets[targets != ignore_index]
        record[1:4] = torch.tensor([weight.shape[0], weight.shape[1], targets.numel()], dtype=torch.float64)
        record[4:6] = torch.tensor([int(live.min()), int(live.max())] if live.numel() else [0, 0],
                                   dtype=torch.float64)
        if check_replicated:
            record[6:8] = torch.tensor(_checksum(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)),
                                       dtype=torch.float64)
        record[0] = 1
    records = [torch.empty_like(record, device=_comm_device(group)) for _ in range(world_size)]
    dist.all_gather(records, record.to(_comm_device(group)), group=group)
    table = torch.stack(records).cpu()
    if problem is not None:
        raise problem
    bad = (table[:, 0] == 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rank(s) {bad} of the process group rejected their inputs (see the error there)")
    vocab_sizes = [int(v) for v in table[:, 1]]
    widths = [int(d) for d in table[:, 2]]
    row_counts = [int(n) for n in table[:, 3]]
    if len(set(widths)) != 1:
        raise ValueError(f"weight shards have different widths D across ranks: {widths} (each shard is "
                         f"[V_local, D] with the same D)")
    vocab = sum(vocab_sizes)
    low, high = int(table[:, 4].min()), int(table[:, 5].max())
    if low < 0 or high >= vocab:
        raise ValueError(f"targets hold global ids outside [0, {vocab}) (the sum of the shard sizes "
                         f"{vocab_sizes}), e.g. {low if low < 0 else high}; ignore_index={ignore_index} is allowed")
    if replicated:
        if len(set(row_counts)) != 1:
            raise ValueError(f"TP layout: hidden must be the same on every rank, but the row counts are {row_counts}")
        if check_replicated and not bool((table[:, 6:8] == table[0, 6:8]).all()):
            differs = (table[:, 6:8] != table[0, 6:8]).any(1).nonzero().flatten().tolist()
            raise ValueError(f"TP layout: hidden/targets on rank(s) {differs} differ from rank 0's "
                             f"(they must be identical on every rank of the group)")
    return world_size, rank, vocab_sizes, row_counts


# ---------------------------------------------------------------------------------------------
# Forward merge and backward, shared by both layouts
# ---------------------------------------------------------------------------------------------


def _local_targets(targets, vocab_start, vocab_local, ignore_index):
    """Global ids -> this shard's ids, -1 where the id is in another shard (or ignored)."""
    local = targets.long() - vocab_start
    outside = (local < 0) | (local >= vocab_local) | (targets == ignore_index)
    return local.masked_fill(outside, -1).to(torch.int32)


def _merge(group, world_size, target_logit, lse, entropy):
    """Per-shard states [M] -> (logp, lse, entropy or None) of the whole vocabulary, one all-gather."""
    states = torch.stack([lse, target_logit] + ([entropy] if entropy is not None else []))  # [k, M]
    gathered = _all_gather_cat(group, world_size, states).view(world_size, *states.shape)  # [R, k, M]
    lse_r = gathered[:, 0]
    lse_all = torch.logsumexp(lse_r, dim=0)
    logp = gathered[:, 1].sum(0) - lse_all
    merged_entropy = None
    if entropy is not None:
        share = torch.exp(lse_r - lse_all)  # w_r; 0 for an empty shard (lse_r = -inf)
        merged_entropy = torch.where(share > 0, share * (gathered[:, 2] + (lse_all - lse_r)), 0.0).sum(0)
    return logp, lse_all, merged_entropy


class _VocabParallelFunction(torch.autograd.Function):
    """Both layouts' vocabulary-parallel math.

    ``rows_sharded=False`` (TP): ``hidden`` [N, D] and ``targets`` [N] replicated; outputs [N]
    replicated; d hidden all-reduced. ``rows_sharded=True`` (gather_hidden): ``hidden`` [N_r, D]
    per rank, gathered (padded to the largest N_r) before the TP math; outputs are this rank's
    rows; the backward all-gathers the incoming gradients and reduce-scatters d hidden.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, group, shard, temperature, ignore_index, return_entropy,
                filter_eps, exact, backend, rows_sharded, sum_grad_hidden):
        world_size, rank, vocab_start, row_counts = shard
        if rows_sharded:
            hidden, targets = _gather_padded_rows(group, world_size, hidden, targets, max(row_counts), ignore_index)
        local_targets = _local_targets(targets, vocab_start, weight.shape[0], ignore_index)
        rows = (targets != ignore_index).nonzero().squeeze(1).to(torch.int32)
        num_rows = hidden.shape[0]
        # rows are the same on every rank (replicated or gathered targets): all skip or none
        if rows.numel() > 0:
            if weight.shape[0] > 0:
                target_logit, lse_r, entropy_r = _shard_driver(
                    "forward", backend, hidden, weight, bias, local_targets, rows, temperature, return_entropy)
            else:  # an empty shard: exp-sum 0, contributes nothing to the merge
                target_logit = hidden.new_zeros(rows.numel(), dtype=torch.float32)
                lse_r = torch.full_like(target_logit, float("-inf"))
                entropy_r = torch.zeros_like(target_logit) if return_entropy else None
            logp_rows, lse_rows, entropy_rows = _merge(group, world_size, target_logit, lse_r, entropy_r)
        else:
            logp_rows = lse_rows = entropy_rows = hidden.new_zeros(0, dtype=torch.float32)

        idx = rows.long()
        logp = hidden.new_zeros(num_rows, dtype=torch.float32).index_copy_(0, idx, logp_rows)
        lse = hidden.new_zeros(num_rows, dtype=torch.float32).index_copy_(0, idx, lse_rows)
        entropy = None
        if return_entropy:
            entropy = hidden.new_zeros(num_rows, dtype=torch.float32).index_copy_(0, idx, entropy_rows)
        ctx.save_for_backward(hidden, weight, bias, local_targets, targets, lse, entropy)
        ctx.config = (group, shard, temperature, ignore_index, filter_eps, exact, backend, rows_sharded,
                      sum_grad_hidden)
        ctx.set_materialize_grads(False)
        if rows_sharded:
            mine = slice(rank * max(row_counts), rank * max(row_counts) + row_counts[rank])
            logp = logp[mine]
            entropy = entropy[mine] if entropy is not None else None
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, local_targets, targets, lse, entropy = ctx.saved_tensors
        group, shard, temperature, ignore_index, filter_eps, exact, backend, rows_sharded, sum_grad_hidden = ctx.config
        world_size, rank, _, row_counts = shard
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        none_tail = (None,) * 11
        if rows_sharded:
            # every rank's rows contribute to every shard's gradient: gather the incoming
            # gradients (None on one rank means zeros there; the collective still runs everywhere)
            grad_logp = _gather_padded_grad(group, world_size, grad_logp, row_counts, lse)
            if entropy is not None:
                grad_entropy = _gather_padded_grad(group, world_size, grad_entropy, row_counts, lse)
        elif grad_logp is None and grad_entropy is None:
            return (None, None, None) + none_tail
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
        active = (targets != ignore_index) & (grad_logp != 0)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float()
            active |= (targets != ignore_index) & (grad_entropy != 0)
        rows = active.nonzero().squeeze(1).to(torch.int32)

        # float32 d hidden: the partial sums of the shards are added across ranks before rounding
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if bias is not None else None
        if rows.numel() > 0 and weight.shape[0] > 0:
            idx = rows.long()
            mean_logit = (lse - entropy)[idx].contiguous() if grad_entropy is not None else None
            _shard_driver(
                "backward", backend, hidden, weight, bias, local_targets, rows, temperature,
                lse[idx].contiguous(), mean_logit, grad_logp[idx].contiguous(),
                grad_entropy[idx].contiguous() if grad_entropy is not None else None,
                filter_eps, exact, grad_hidden, grad_weight, grad_bias)
        if rows_sharded:
            # the gathered hidden's gradient goes back to its owners, summed over the shards
            grad_hidden = _reduce_scatter_rows(group, world_size, grad_hidden, row_counts[rank])
        elif need_hidden and sum_grad_hidden:
            dist.all_reduce(grad_hidden, group=group)
        return (
            grad_hidden.to(hidden.dtype) if need_hidden else None,
            grad_weight,
            grad_bias.to(bias.dtype) if need_bias else None,
        ) + none_tail


# ---------------------------------------------------------------------------------------------
# Row gathers for the sharded-head layout (row counts may differ: padded to the largest)
# ---------------------------------------------------------------------------------------------


def _pad_rows(tensor, rows, fill=0):
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    padded = tensor.new_full((rows,) + tuple(tensor.shape[1:]), fill)
    padded[: tensor.shape[0]] = tensor
    return padded


# torch >= 2.10 names them *_single (the *_tensor names warn); earlier releases only have *_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_cat(group, world_size, tensor):
    """Every rank's ``tensor`` (same shape everywhere) concatenated along dim 0, rank order."""
    out = tensor.new_empty((world_size * tensor.shape[0],) + tuple(tensor.shape[1:]))
    _all_gather_single(out, tensor.contiguous(), group=group)
    return out


def _gather_padded_rows(group, world_size, hidden, targets, max_rows, ignore_index):
    """[N_r, D], [N_r] per rank -> [R * max_rows, D], [R * max_rows]; padding rows are ignored."""
    hidden_all = _all_gather_cat(group, world_size, _pad_rows(hidden, max_rows))
    targets_all = _all_gather_cat(group, world_size, _pad_rows(targets.long(), max_rows, ignore_index))
    return hidden_all, targets_all


def _gather_padded_grad(group, world_size, grad, row_counts, like):
    grad = like.new_zeros(row_counts[dist.get_rank(group)]) if grad is None else grad.float()
    return _all_gather_cat(group, world_size, _pad_rows(grad, max(row_counts)))


def _reduce_scatter_rows(group, world_size, tensor, own_rows):
    """[R * max_rows, ...] partial sums -> this rank's [own_rows, ...] block, summed over ranks."""
    out = tensor.new_empty((tensor.shape[0] // world_size,) + tuple(tensor.shape[1:]))
    _reduce_scatter_single(out, tensor.contiguous(), group=group)
    return out[:own_rows]


class _AllGatherShards(torch.autograd.Function):
    """[V_r, ...] shards, rank order -> the whole [V, ...]; backward: the gradient's rows summed
    over ranks back into each shard (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, shard, group, sizes):
        world_size, rank = len(sizes), dist.get_rank(group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        padded = _all_gather_cat(group, world_size, _pad_rows(shard, max(sizes)))
        if len(set(sizes)) == 1:
            return padded
        return torch.cat([block[:size] for block, size in zip(padded.chunk(world_size), sizes)])

    @staticmethod
    def backward(ctx, grad):
        padded = grad if len(set(ctx.sizes)) == 1 else torch.cat(
            [_pad_rows(block, max(ctx.sizes)) for block in grad.split(ctx.sizes)])
        return _reduce_scatter_rows(ctx.group, len(ctx.sizes), padded, ctx.sizes[ctx.rank]), None, None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _run(hidden, weight, targets, process_group, *, bias, temperature, ignore_index, return_entropy, filter_eps,
         exact, backend, rows_sharded, check_replicated, pick_layout=None, sum_grad_hidden=True):
    if process_group is None:
        raise ValueError("process_group must be a torch.distributed process group (dist.group.WORLD for all ranks)")
    if check_replicated is None:
        check_replicated = os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    world_size, rank, vocab_sizes, row_counts = _group_meta(
        process_group, hidden, weight, bias, targets, temperature, ignore_index, filter_eps,
        replicated=not rows_sharded, check_replicated=check_replicated and not rows_sharded)
    if pick_layout is not None and pick_layout(vocab_sizes, row_counts) == "gather_weight":
        weight_full = _AllGatherShards.apply(weight, process_group, vocab_sizes)
        bias_full = _AllGatherShards.apply(bias, process_group, vocab_sizes) if bias is not None else None
        return single_device_logprobs(
            hidden, weight_full, targets, bias=bias_full, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, filter_eps=filter_eps, exact=exact, backend=backend)
    backend = resolve_backend(hidden.device, backend)
    lead_shape = targets.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    shard = (world_size, rank, sum(vocab_sizes[:rank]), row_counts)
    weight_c = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = _VocabParallelFunction.apply(
        hidden_2d, weight_c, bias.contiguous() if bias is not None else None, targets.reshape(-1), process_group, shard,
        float(temperature), ignore_index, bool(return_entropy), None if filter_eps is None else float(filter_eps),
        bool(exact), backend, rows_sharded, bool(sum_grad_hidden))
    if return_entropy:
        return out[0].view(lead_shape), out[1].view(lead_shape)
    return out.view(lead_shape)


def vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    process_group,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    filter_eps: float | None = None,
    exact: bool = True,
    backend: str = "auto",
    check_replicated: bool | None = None,
    sum_grad_hidden: bool = True,
):
    """``token_logprobs`` with the LM head split by vocabulary over ``process_group`` (TP layout).

    Args:
        hidden: ``[..., D]``, identical on every rank of the group.
        weight: ``[V_r, D]`` this rank's contiguous vocabulary shard; shards in rank order, sizes
            may differ (found by one small all-gather). ``bias``: this rank's ``[V_r]`` shard.
        targets: ``[...]`` **global** token ids in ``[0, sum_r V_r)`` or ``ignore_index``,
            identical on every rank.
        check_replicated: check that hidden and targets really are identical on every rank (a
            float64 checksum per rank in the same small all-gather). ``None``: on when the
            environment variable ``GRPO_KERNELS_CHECK_REPLICATED=1``.
        sum_grad_hidden: ``True`` (default): d hidden is all-reduced over the group, the full
            gradient on every rank. ``False``: each rank gets its shard's partial d hidden, for
            callers whose own collective sums it (Megatron's sequence-parallel gather, whose
            backward is a reduce-scatter; verl's kernel has this contract).
        Everything else as :func:`grpo_kernels.token_logprobs`.

    Returns:
        The full per-token values (float32, shaped like ``targets``) on every rank, as
        ``token_logprobs`` on the unsharded head. Backward: d weight / d bias for this rank's
        shard; d hidden summed over the group (all-reduce), so the same on every rank (unless
        ``sum_grad_hidden=False``).
        Every rank must call it (it is collective); a bad input on any rank raises on all.
    """
    return _run(hidden, weight, targets, process_group, bias=bias, temperature=temperature,
                ignore_index=ignore_index, return_entropy=return_entropy, filter_eps=filter_eps, exact=exact,
                backend=backend, rows_sharded=False, check_replicated=check_replicated,
                sum_grad_hidden=sum_grad_hidden)


def choose_layout(total_rows: int, vocab: int) -> str:
    """The cheaper FSDP2 layout for ``total_rows`` hidden rows (all ranks) and a ``vocab``-row head.

    Both layouts gather ``rows x D`` elements in the forward and send back as many gradient
    elements in the backward, and hold the gathered rows and their gradient: gathering the
    hidden states is cheaper iff there are fewer rows than vocabulary entries.
    """
    return "gather_hidden" if total_rows <= vocab else "gather_weight"


_last_logged_layout = {}


def _log_layout(group, layout, reason):
    key = id(group)
    if _last_logged_layout.get(key) != layout:
        _last_logged_layout[key] = layout
        logger.info("sharded_head_logprobs: layout %s (%s)", layout, reason)


def sharded_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    process_group,
    *,
    layout: str = "auto",
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    filter_eps: float | None = None,
    exact: bool = True,
    backend: str = "auto",
):
    """``token_logprobs`` for FSDP-style data parallelism with a row-sharded head.

    Args:
        hidden: ``[..., D]`` this rank's hidden states (they differ per rank; row counts may too).
        targets: ``[...]`` this rank's global token ids (or ``ignore_index``).
        weight: ``[V_r, D]`` this rank's contiguous vocabulary shard (rank order), ``bias`` ``[V_r]``.
        layout: ``"gather_hidden"`` (all-gather hidden + targets, vocabulary-parallel math,
            reduce-scatter d hidden; the weight never moves), ``"gather_weight"`` (all-gather the
            weight, plain op, reduce-scatter d weight), or ``"auto"``: :func:`choose_layout` on
            ``sum_r N_r`` vs ``V``. The layout that runs is logged (``logging``, INFO, logger
            ``grpo_kernels.ops.vocab_parallel``) whenever it changes.
        Everything else as :func:`grpo_kernels.token_logprobs`.

    Returns:
        This rank's per-token values, as ``token_logprobs(hidden, full_weight, targets)``.
        Backward: d hidden for this rank's rows; d weight / d bias for this rank's shard, summed
        over every rank's loss (the gradient of ``sum_r loss_r``; divide by R for a mean).
    """
    if layout not in ("auto",) + LAYOUTS:
        raise ValueError(f"layout must be 'auto', 'gather_hidden' or 'gather_weight', got {layout!r}")

    def pick(vocab_sizes, row_counts):
        world = len(vocab_sizes)
        padded_rows, padded_vocab = world * max(row_counts), world * max(vocab_sizes)
        chosen = choose_layout(padded_rows, padded_vocab) if layout == "auto" else layout
        _log_layout(process_group, chosen, f"{'chosen' if layout == 'auto' else 'requested'}: "
                    f"{padded_rows} gathered hidden rows vs {padded_vocab} gathered weight rows over {world} ranks")
        return chosen

    return _run(hidden, weight, targets, process_group, bias=bias, temperature=temperature,
                ignore_index=ignore_index, return_entropy=return_entropy, filter_eps=filter_eps, exact=exact,
                backend=backend, rows_sharded=True, check_replicated=False, pick_layout=pick)
