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
from grpo_kernels.ops.logprobs.op import check_flags, check_outputs, single_device_logprobs
from grpo_kernels.ops.logprobs.outputs import DRIVER_STATS, TokenStats, top1_rule
from grpo_kernels.ops.logprobs.temperature import check_temperature, check_temperature_values
from grpo_kernels.ops.logprobs.topk import EMPTY_KEY, merge_topk, pack_keys, unpack_keys
from grpo_kernels.ops.utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_positive_finite,
    check_tensor,
    resolve_backend,
)

__all__ = ["vocab_parallel_logprobs", "sharded_head_logprobs", "choose_layout", "check_process_group", "LAYOUTS"]

logger = logging.getLogger(__name__)

LAYOUTS = ("gather_hidden", "gather_weight")
# Set to 1 to check, on every call, that hidden and targets are identical on all TP ranks (one
# float64 checksum per rank rides along in the size all-gather; costs a pass over hidden).
DEBUG_ENV = "GRPO_KERNELS_CHECK_REPLICATED"


# ---------------------------------------------------------------------------------------------
# The log-prob drivers, called here and nowhere else in this module
# ---------------------------------------------------------------------------------------------


def _shard_forward(backend, hidden, weight, bias, local_targets, rows, temperature, compute_entropy, stats, topk):
    """This rank's vocabulary shard through ``logprobs.drivers.BACKENDS[backend]`` (forward).

    ``local_targets`` ``[N, K]`` int32 (K = 0 or 1) are shard-local ids, ``-1`` where the target lies
    in another shard (an id outside ``[0, V_r)`` matches no logit in either driver). Returns the
    drivers' :class:`RowStats` of ``rows`` over this shard: target logit 0 off-shard, lse / entropy /
    log sum p^2 / mean of this shard's softmax, its max z and max z below a local target, its
    top-``topk`` (shard-local ids)."""
    forward_fn, _ = BACKENDS[backend]
    return forward_fn(hidden, weight, bias, local_targets, rows, temperature, compute_entropy, stats=stats, topk=topk)


def _shard_backward(backend, hidden, weight, bias, local_targets, rows, temperature, lse, mean_logit, grad_logp,
                    grad_ent, filter_eps, exact, grad_hidden, grad_weight, grad_bias):
    """This shard's exact gradients, given the *global* lse and mean logit of ``rows``: adds them
    into the buffers (``grad_hidden`` float32 ``[N, D]``). ``local_targets`` ``[N, C]`` int32 and
    ``grad_logp`` ``[M, C]``: every column (target or top-k id) weighs p, in every shard; its
    one-hot term lands where the id is local."""
    _, backward_fn = BACKENDS[backend]
    backward_fn(hidden, weight, bias, local_targets, rows, lse, mean_logit, grad_logp, grad_ent, temperature,
                filter_eps, exact, grad_hidden, grad_weight, grad_bias)


_META = 8


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_process_group(process_group) -> None:
    """A ``torch.distributed.ProcessGroup``, else a TypeError naming ``process_group`` (a string
    or a rank number once failed deep inside with "'str' object has no attribute 'size'")."""
    group_type = getattr(dist, "ProcessGroup", None)
    if group_type is None or not isinstance(process_group, group_type):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD, or a "
                        f"group from dist.new_group) or None for one device, got {type(process_group).__name__} "
                        f"{process_group!r}")


def _checksum(hidden, targets):
    """Two float64 numbers that differ when hidden or targets differ (order-sensitive)."""
    weights = torch.arange(1, hidden.shape[0] + 1, device=hidden.device, dtype=torch.float64)
    rows = hidden.double().sum(1)
    return float(weights @ rows + (hidden.double() ** 2).sum()), float(weights @ targets.double())


def _local_checks(hidden, weight, bias, targets, temperature, ignore_index, filter_eps):
    """This rank's own checks; raises TypeError/ValueError naming the argument. ``targets`` may be
    None (statistics only)."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if targets is not None:
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
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} != this rank's weight shard width {weight.shape[1]} "
                         f"(the shard is [V_local, D])")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    temperature = check_temperature(temperature, hidden.shape[:-1], hidden.device)
    if isinstance(temperature, torch.Tensor):
        check_temperature_values(temperature)
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
        live = targets[targets != ignore_index] if targets is not None else torch.zeros(0, dtype=torch.long)
        num_rows = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        record[1:4] = torch.tensor([weight.shape[0], weight.shape[1], num_rows], dtype=torch.float64)
        record[4:6] = torch.tensor([int(live.min()), int(live.max())] if live.numel() else [0, 0],
                                   dtype=torch.float64)
        if check_replicated:
            ids = targets.reshape(-1) if targets is not None else torch.zeros(num_rows, dtype=torch.long)
            record[6:8] = torch.tensor(_checksum(hidden.reshape(-1, hidden.shape[-1]), ids), dtype=torch.float64)
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
    """Global ids [N, K] -> this shard's ids, -1 where the id is in another shard (or ignored)."""
    local = targets.long() - vocab_start
    outside = (local < 0) | (local >= vocab_local) | (targets == ignore_index)
    return local.masked_fill(outside, -1).to(torch.int32)


def _shard_states(out, targets, rows, vocab_start, vocab_local, names, topk):
    """A shard's per-row states for the merge: a dict of float32 [M] (and int64 top-k keys [M, k],
    global ids) from the drivers' RowStats ``out`` (None for an empty shard)."""
    num_rows = rows.numel()
    empty = torch.zeros(num_rows, device=rows.device)
    minus_inf = torch.full_like(empty, float("-inf"))
    states = {"lse": out.lse if out is not None else minus_inf,
              "target": (out.target_logit[:, 0] if targets.shape[1] else empty) if out is not None else empty}
    if "entropy" in names:
        states["entropy"] = out.entropy if out is not None else empty
    if "log_sum_sq_probs" in names:
        states["log_sum_sq"] = out.log_sum_sq_probs if out is not None else minus_inf
    if "mean_logits" in names:
        states["mean"] = out.mean_logits if out is not None else empty
    if "is_top1" in names:
        states["row_max"] = out.row_max if out is not None else minus_inf
        if out is None:
            states["before"] = minus_inf
        else:
            # a shard wholly below the target: all of it is below; above or not holding it: nothing
            below_all = targets[rows.long(), 0] >= vocab_start + vocab_local
            states["before"] = torch.where(below_all, out.row_max, out.max_before_target)
    keys = None
    if topk:
        keys = torch.full((num_rows, topk), EMPTY_KEY, device=rows.device, dtype=torch.int64)
        if out is not None:
            local_k = out.topk_ids.shape[1]
            keys[:, :local_k] = pack_keys(out.topk_logits, out.topk_ids + vocab_start)
    return states, keys


def _merge(group, world_size, states, keys, vocab_sizes):
    """Per-shard states -> the whole vocabulary's values on every rank: one all-gather of the float
    states ``[S, M]`` (and one of the top-k keys). Returns a dict of [M] tensors (``logp`` from the
    target logits, ``is_top1`` bool, ``topk_logits`` / ``topk_ids`` [M, k])."""
    names = list(states)
    stacked = torch.stack([states[name] for name in names])  # [S, M]
    gathered = _all_gather_cat(group, world_size, stacked).view(world_size, *stacked.shape)  # [R, S, M]
    per_rank = dict(zip(names, gathered.unbind(1)))
    lse_r = per_rank["lse"]
    lse = torch.logsumexp(lse_r, dim=0)
    share = torch.exp(lse_r - lse)  # w_r; 0 for an empty shard (lse_r = -inf)
    target = per_rank["target"].sum(0)  # exactly one shard holds a target; the others add 0
    merged = {"lse": lse, "target": target}
    if "entropy" in per_rank:
        merged["entropy"] = torch.where(share > 0, share * (per_rank["entropy"] + (lse - lse_r)), 0.0).sum(0)
    if "log_sum_sq" in per_rank:
        # sum_v p_v^2 = sum_r w_r^2 sum_{v in r} p_{r,v}^2
        merged["log_sum_sq"] = torch.logsumexp(per_rank["log_sum_sq"] + 2 * (lse_r - lse), dim=0)
    if "mean" in per_rank:
        sizes = torch.tensor(vocab_sizes, device=lse.device, dtype=torch.float32)[:, None]
        merged["mean"] = (per_rank["mean"] * sizes).sum(0) / float(sum(vocab_sizes))
    if "row_max" in per_rank:
        merged["is_top1"] = top1_rule(target, per_rank["row_max"].amax(0), per_rank["before"].amax(0))
    if keys is not None:
        all_keys = _all_gather_cat(group, world_size, keys)  # [R * M, k]
        candidates = all_keys.view(world_size, *keys.shape).permute(1, 0, 2).reshape(keys.shape[0], -1)
        merged["topk_logits"], merged["topk_ids"] = unpack_keys(merge_topk(candidates, keys.shape[1]))
    return merged


class _VocabParallelFunction(torch.autograd.Function):
    """Both layouts' vocabulary-parallel math.

    ``rows_sharded=False`` (TP): ``hidden`` [N, D], ``targets`` [N, K] (K = 1, or 0: statistics
    only, every row live) and ``row_temperature`` [N] (or None) replicated; outputs [N] replicated;
    d hidden all-reduced. ``rows_sharded=True`` (gather_hidden): ``hidden`` [N_r, D] per rank,
    gathered (padded to the largest N_r) before the TP math; outputs are this rank's rows; the
    backward all-gathers the incoming gradients and reduce-scatters d hidden.

    Returns ``(logp, entropy, lse, log_sum_sq_probs, mean_logits, is_top1, topk_logprobs, topk_ids)``,
    None for what ``names`` / ``topk`` do not ask for (logp None without targets).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_temperature, group, shard, temperature, ignore_index, names,
                topk, filter_eps, exact, backend, rows_sharded, sum_grad_hidden):
        world_size, rank, vocab_start, row_counts, vocab_sizes = shard
        if rows_sharded:
            hidden, targets, row_temperature = _gather_padded_rows(group, world_size, hidden, targets, row_temperature,
                                                                   max(row_counts), ignore_index)
        driver_temperature = row_temperature if row_temperature is not None else temperature
        local_targets = _local_targets(targets, vocab_start, weight.shape[0], ignore_index)
        live = (targets != ignore_index).any(1) if targets.shape[1] else torch.ones(
            targets.shape[0], dtype=torch.bool, device=targets.device)
        rows = live.nonzero().squeeze(1).to(torch.int32)
        num_rows = hidden.shape[0]
        stats = frozenset(names) & frozenset(DRIVER_STATS)
        compute_entropy = "entropy" in names
        merged = {}
        # rows are the same on every rank (replicated or gathered targets): all skip or none
        if rows.numel() > 0:
            out = None
            if weight.shape[0] > 0:  # an empty shard: exp-sum 0, contributes nothing to the merge
                out = _shard_forward(backend, hidden, weight, bias, local_targets, rows, driver_temperature,
                                     compute_entropy, stats, min(topk, weight.shape[0]))
            states, keys = _shard_states(out, targets, rows, vocab_start, weight.shape[0], names, topk)
            merged = _merge(group, world_size, states, keys, vocab_sizes)

        idx = rows.long()

        def scatter(key, dtype=torch.float32, tail=()):
            full = hidden.new_zeros((num_rows, *tail), dtype=dtype)
            return full.index_copy_(0, idx, merged[key]) if key in merged else full

        lse = scatter("lse")
        logp = scatter("target") - lse if targets.shape[1] else None
        if logp is not None:
            logp = torch.where(live, logp, 0.0)
        entropy = scatter("entropy") if compute_entropy else None
        lse_out = lse if "lse" in names else None
        log_sum_sq = scatter("log_sum_sq") if "log_sum_sq_probs" in names else None
        mean_logits = scatter("mean") if "mean_logits" in names else None
        is_top1 = scatter("is_top1", torch.bool) if "is_top1" in names else None
        topk_logp = topk_ids = None
        if topk:
            topk_ids = scatter("topk_ids", torch.int64, (topk,))
            topk_logp = scatter("topk_logits", torch.float32, (topk,))
            topk_logp = torch.where(live[:, None], topk_logp - lse[:, None], 0.0)
        ctx.save_for_backward(hidden, weight, bias, local_targets, targets, row_temperature, lse, entropy, topk_ids)
        ctx.config = (group, shard, temperature, ignore_index, filter_eps, exact, backend, rows_sharded,
                      sum_grad_hidden)
        ctx.set_materialize_grads(False)
        ctx.lse_output = lse_out is not None
        outputs = [logp, entropy, lse_out, log_sum_sq, mean_logits, is_top1, topk_logp, topk_ids]
        if rows_sharded:
            mine = slice(rank * max(row_counts), rank * max(row_counts) + row_counts[rank])
            outputs = [o[mine] if o is not None else None for o in outputs]
        elif lse_out is not None:
            outputs[2] = lse.clone()  # an output of its own: lse is also saved for the backward
        ctx.mark_non_differentiable(*(o for o in outputs[3:6] + outputs[7:] if o is not None))
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, grad_lse, _grad_log_sum_sq, _grad_mean, _grad_top1, grad_topk,
                 _grad_ids):
        hidden, weight, bias, local_targets, targets, row_temperature, lse, entropy, topk_ids = ctx.saved_tensors
        group, shard, temperature, ignore_index, filter_eps, exact, backend, rows_sharded, sum_grad_hidden = ctx.config
        world_size, rank, vocab_start, row_counts, _ = shard
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        none_tail = (None,) * 13
        has_targets = targets.shape[1] > 0
        if rows_sharded:
            # every rank's rows contribute to every shard's gradient: gather the incoming
            # gradients (None on one rank means zeros there; the collective still runs everywhere)
            if has_targets:
                grad_logp = _gather_padded_grad(group, world_size, grad_logp, row_counts, lse)
            if entropy is not None:
                grad_entropy = _gather_padded_grad(group, world_size, grad_entropy, row_counts, lse)
            if topk_ids is not None:
                grad_topk = _gather_padded_grad(group, world_size, grad_topk, row_counts, topk_ids.float())
            if ctx.lse_output:
                grad_lse = _gather_padded_grad(group, world_size, grad_lse, row_counts, lse)
        elif grad_logp is None and grad_entropy is None and grad_topk is None and grad_lse is None:
            return (None, None, None) + none_tail
        live = (targets != ignore_index).any(1) if has_targets else torch.ones_like(lse, dtype=torch.bool)
        columns, grads = [local_targets], [hidden.new_zeros((lse.shape[0], local_targets.shape[1]),
                                                            dtype=torch.float32)]
        if has_targets and grad_logp is not None:
            grads[0] = grad_logp.float().reshape(-1, 1)
        if topk_ids is not None and grad_topk is not None:
            # the top-k ids are targets too: one-hot where the id is local, p everywhere
            local_ids = topk_ids - vocab_start
            columns.append(torch.where((local_ids >= 0) & (local_ids < weight.shape[0]), local_ids, -1).int())
            grads.append(grad_topk.float())
        if grad_lse is not None:
            # d lse / d z = p: a column that matches no id, with gradient -grad_lse (see the op)
            columns.append(torch.full_like(local_targets[:, :1], -1))
            grads.append(-grad_lse.float()[:, None])
        local_columns, grad_columns = torch.cat(columns, dim=1).contiguous(), torch.cat(grads, dim=1)
        active = (grad_columns != 0).any(1)
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float()
            active |= grad_entropy != 0
        rows = (live & active).nonzero().squeeze(1).to(torch.int32)

        # float32 d hidden: the partial sums of the shards are added across ranks before rounding
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if bias is not None else None
        if rows.numel() > 0 and weight.shape[0] > 0:
            idx = rows.long()
            mean_logit = (lse - entropy)[idx].contiguous() if grad_entropy is not None else None
            _shard_backward(
                backend, hidden, weight, bias, local_columns, rows,
                row_temperature if row_temperature is not None else temperature,
                lse[idx].contiguous(), mean_logit, grad_columns[idx].contiguous(),
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


def _gather_padded_rows(group, world_size, hidden, targets, row_temperature, max_rows, ignore_index):
    """[N_r, D], [N_r, K], [N_r] per rank -> [R * max_rows, ...]; padding rows are ignored (with
    K = 0 they are live, and their outputs dropped), padding temperatures 1."""
    hidden_all = _all_gather_cat(group, world_size, _pad_rows(hidden, max_rows))
    targets_all = _all_gather_cat(group, world_size, _pad_rows(targets.long(), max_rows, ignore_index))
    temperature_all = None
    if row_temperature is not None:
        temperature_all = _all_gather_cat(group, world_size, _pad_rows(row_temperature.double(), max_rows, 1.0))
    return hidden_all, targets_all, temperature_all


def _gather_padded_grad(group, world_size, grad, row_counts, like):
    """This rank's incoming gradient (``like``'s trailing shape; None: zeros) gathered like the rows."""
    grad = like.new_zeros((row_counts[dist.get_rank(group)],) + tuple(like.shape[1:])) if grad is None else grad.float()
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
         exact, backend, rows_sharded, check_replicated, pick_layout=None, sum_grad_hidden=True, outputs=None,
         topk=None, return_lse=False):
    if process_group is None:
        raise ValueError("process_group must be a torch.distributed process group (dist.group.WORLD for all ranks)")
    check_process_group(process_group)
    # the flags, like the other arguments, are the same on every rank: refused everywhere
    check_flags(return_entropy=return_entropy, return_lse=return_lse, exact=exact, sum_grad_hidden=sum_grad_hidden)
    if check_replicated is not None:
        check_bool("check_replicated", check_replicated)
    if check_replicated is None:
        check_replicated = os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    # the same arguments on every rank: a bad one raises everywhere before any collective
    names, k = check_outputs(outputs, topk, targets, hidden, 2**31 - 1, return_entropy, return_lse)
    world_size, rank, vocab_sizes, row_counts = _group_meta(
        process_group, hidden, weight, bias, targets, temperature, ignore_index, filter_eps,
        replicated=not rows_sharded, check_replicated=check_replicated and not rows_sharded)
    if k > sum(vocab_sizes):
        raise ValueError(f"topk={k} exceeds the vocabulary size V={sum(vocab_sizes)}")
    if pick_layout is not None and pick_layout(vocab_sizes, row_counts) == "gather_weight":
        weight_full = _AllGatherShards.apply(weight, process_group, vocab_sizes)
        bias_full = _AllGatherShards.apply(bias, process_group, vocab_sizes) if bias is not None else None
        return single_device_logprobs(
            hidden, weight_full, targets, bias=bias_full, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, return_lse=return_lse, filter_eps=filter_eps, exact=exact,
            backend=backend, outputs=outputs, topk=topk)
    backend = resolve_backend(hidden.device, backend)
    lead_shape = hidden.shape[:-1]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    num_rows = hidden_2d.shape[0]
    targets_2d = (targets.reshape(num_rows, 1) if targets is not None
                  else torch.empty((num_rows, 0), dtype=torch.long, device=hidden.device))
    temperature = check_temperature(temperature, lead_shape, hidden.device)
    row_temperature = temperature.reshape(num_rows) if isinstance(temperature, torch.Tensor) else None
    shard = (world_size, rank, sum(vocab_sizes[:rank]), row_counts, vocab_sizes)
    weight_c = weight if weight.stride(-1) == 1 else weight.contiguous()
    entropy_on = "entropy" in names if outputs is not None else bool(return_entropy)
    op_names = names | ({"entropy"} if entropy_on else set())
    if return_lse:
        op_names |= {"lse"}
    logp, entropy, lse, log_sum_sq, mean_logits, is_top1, topk_logp, topk_ids = _VocabParallelFunction.apply(
        hidden_2d, weight_c, bias.contiguous() if bias is not None else None, targets_2d, row_temperature,
        process_group, shard, 1.0 if row_temperature is not None else temperature, ignore_index,
        frozenset(op_names), k, None if filter_eps is None else float(filter_eps), bool(exact), backend, rows_sharded,
        bool(sum_grad_hidden))

    def shaped(tensor, tail=()):
        return tensor.view(*lead_shape, *tail) if tensor is not None else None

    if outputs is not None:
        return TokenStats(logprobs=shaped(logp), entropy=shaped(entropy), lse=shaped(lse),
                          log_sum_sq_probs=shaped(log_sum_sq),
                          mean_logits=shaped(mean_logits), is_top1=shaped(is_top1),
                          topk_logprobs=shaped(topk_logp, (k,)), topk_ids=shaped(topk_ids, (k,)))
    result = (shaped(logp),) + ((shaped(entropy),) if return_entropy else ()) + ((shaped(lse),) if return_lse else ())
    return result if len(result) > 1 else result[0]


def vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    process_group,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    filter_eps: float | None = None,
    exact: bool = True,
    backend: str = "auto",
    check_replicated: bool | None = None,
    sum_grad_hidden: bool = True,
    outputs: tuple[str, ...] | list[str] | None = None,
    topk: int | None = None,
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
                sum_grad_hidden=sum_grad_hidden, outputs=outputs, topk=topk, return_lse=return_lse)


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
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    filter_eps: float | None = None,
    exact: bool = True,
    backend: str = "auto",
    outputs: tuple[str, ...] | list[str] | None = None,
    topk: int | None = None,
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
                backend=backend, rows_sharded=True, check_replicated=False, pick_layout=pick, outputs=outputs,
                topk=topk, return_lse=return_lse)
