"""Vocabulary-parallel log-probs on CPU (gloo, 2 and 4 processes) against the single-process op.

Each world size is spawned once; every case runs inside those processes and reports back per
rank. The reference is ``token_logprobs`` on the unsharded head, computed in the same process
from the same deterministic inputs (the op under test only ever sees this rank's shard).
Shards are uneven (V = 37 prime; a shard of 1 row), targets sit on every shard boundary, rows are
ignored, and both the Triton kernels (interpreter) and the torch path are covered.
"""

import datetime
import logging
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB, DIM = 37, 13
SHARDS = {2: [36, 1], 4: [10, 1, 17, 9]}
ROWS_PER_RANK = {2: [9, 11], 4: [5, 8, 1, 6]}  # sharded-head layout: hidden rows differ per rank


# ---------------------------------------------------------------------------------------------
# Inputs and the single-process reference
# ---------------------------------------------------------------------------------------------


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _head(world, dtype, with_bias, seed=0):
    g = _generator(seed)
    weight = (torch.randn(VOCAB, DIM, generator=g) / 2).to(dtype)
    bias = torch.randn(VOCAB, generator=g).to(dtype) if with_bias else None
    return weight, bias


def _boundary_targets(rows, seed):
    """Global ids: the first and last id of every shard (of both world sizes), two ignored rows,
    the rest random. The same for both world sizes, so that one reference serves both."""
    g = _generator(seed)
    edges = set()
    for sizes in SHARDS.values():
        starts = torch.tensor([0] + sizes).cumsum(0)
        edges |= {int(s) for s in starts[:-1]} | {int(e) - 1 for e in starts[1:]}
    edges = sorted(edges)
    targets = torch.randint(0, VOCAB, (rows,), generator=g)
    targets[: min(rows, len(edges))] = torch.tensor(edges[:rows])
    if rows > len(edges) + 1:
        targets[len(edges)] = targets[-1] = -100
    return targets[torch.randperm(rows, generator=g)]


def _shard(tensor, world, rank):
    start = sum(SHARDS[world][:rank])
    return tensor[start: start + SHARDS[world][rank]]


def _leaf(tensor):
    return None if tensor is None else tensor.detach().clone().requires_grad_()


def _forward_backward(fn, hidden, weight, bias, targets, grad_logp, grad_ent, **kwargs):
    """Values, then the gradients of <grad_logp, logp> + <grad_ent, entropy>."""
    hidden, weight, bias = _leaf(hidden), _leaf(weight), _leaf(bias)
    out = fn(hidden, weight, targets, bias=bias, **kwargs)
    logp, entropy = out if kwargs.get("return_entropy") else (out, None)
    objective = (logp * grad_logp).sum() + ((entropy * grad_ent).sum() if entropy is not None else 0)
    objective.backward()
    grads = [t.grad if t is not None else None for t in (hidden, weight, bias)]
    return [logp.detach(), None if entropy is None else entropy.detach()] + grads


def _close32(a, b, name="gradient", whole=None):
    """float32 results of the same math summed in another order: relative error (norm) <= 1e-6 for
    values, 2e-6 for gradients (the shard's d logits use the merged lse, one rounding apart).
    ``whole``: the unsharded gradient of which ``b`` is a shard; the error is relative to it (a
    one-row shard's d bias is a single sum that may cancel to almost nothing)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    bound = 1e-6 if name in ("logp", "entropy", "loss") else 2e-6
    scale = max(b.double().norm().item(), 0.0 if whole is None else whole.double().norm().item(), 1e-30)
    error = ((a.double() - b.double()).norm() / scale).item()
    assert error <= bound, f"{name}: relative error {error:.2e} > {bound}"


def _assert_close(got, want, dtype, names=("logp", "entropy", "d hidden", "d weight", "d bias")):
    """float32: relative error (norm) as :func:`_close32`; bfloat16: every entry within bf16 rounding.
    ``want`` may end with ``{name: unsharded gradient}``."""
    wholes = want[5] if len(want) > 5 else {}
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        if dtype == torch.float32:
            _close32(a, b, name, wholes.get(name))
        else:
            tolerance = dict(rtol=1e-5, atol=1e-5) if name in ("logp", "entropy") else dict(rtol=2**-7, atol=1e-5)
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Cases (each runs on every rank; a failure raises, and is reported by rank)
# ---------------------------------------------------------------------------------------------

# Numeric cases: fn(world, rank, group) -> [logp, entropy, d hidden, d weight, d bias] of this rank
# under the op (group given, run in the workers) or under the single-process op on the whole head
# (group None, run once in the test process and sliced to the rank).
NUMERIC = {}
# Check cases: fn(world, rank) raises on failure; run in the workers.
CHECKS = {}
_REFERENCES = {}


def check(name, worlds=(2, 4)):
    def register(fn):
        CHECKS[name] = (fn, worlds)
        return fn
    return register


def _reference(key, thunk):
    if key not in _REFERENCES:
        _REFERENCES[key] = thunk()
    return _REFERENCES[key]


def _tp_case(world, rank, group, *, backend, dtype, with_bias, entropy, temperature, via_token_logprobs=False,
             lead_shape=(13,)):
    import grpo_kernels as gk
    from grpo_kernels.ops.vocab_parallel import vocab_parallel_logprobs

    weight, bias = _head(world, dtype, with_bias)
    rows = int(torch.tensor(lead_shape).prod())
    g = _generator(1)
    hidden = torch.randn(*lead_shape, DIM, generator=g).to(dtype)
    targets = _boundary_targets(rows, 2).view(lead_shape)
    grad_logp, grad_ent = torch.randn(lead_shape, generator=g), torch.randn(lead_shape, generator=g)
    options = dict(temperature=temperature, return_entropy=entropy, backend=backend)
    if group is None:
        key = (backend, dtype, with_bias, entropy, temperature, lead_shape)
        full = _reference(key, lambda: _forward_backward(
            gk.token_logprobs, hidden, weight, bias, targets, grad_logp, grad_ent, **options))
        return full[:3] + [_shard(full[3], world, rank), None if bias is None else _shard(full[4], world, rank),
                           {"d weight": full[3], "d bias": full[4]}]
    if via_token_logprobs:
        def fn(h, w, t, **kw):
            return gk.token_logprobs(h, w, t, process_group=group, **kw)
    else:
        def fn(h, w, t, **kw):
            return vocab_parallel_logprobs(h, w, t, group, **kw)
    return _forward_backward(fn, hidden, _shard(weight, world, rank),
                             None if bias is None else _shard(bias, world, rank), targets, grad_logp, grad_ent,
                             **options)


# Triton (interpreter) in float32; bfloat16 through the torch path here and through the Triton
# kernels in the sharded-head cases below (the interpreter is slow in bf16).
for _backend, _dtype, _with_bias, _entropy, _temperature in (
        ("triton", torch.float32, True, True, 0.7), ("triton", torch.float32, False, False, 1.0),
        ("torch", torch.float32, True, True, 0.7), ("torch", torch.float32, False, False, 1.0),
        ("torch", torch.bfloat16, True, True, 1.3)):
    NUMERIC[f"tp[{_backend},{str(_dtype)[6:]},bias={_with_bias},entropy={_entropy},T={_temperature}]"] = (
        lambda world, rank, group, b=_backend, d=_dtype, wb=_with_bias, e=_entropy, t=_temperature: _tp_case(
            world, rank, group, backend=b, dtype=d, with_bias=wb, entropy=e, temperature=t),
        (2, 4), _dtype)
NUMERIC["tp[token_logprobs(process_group=), 3-D hidden]"] = (
    lambda world, rank, group: _tp_case(world, rank, group, backend="triton", dtype=torch.float32, with_bias=False,
                                        entropy=True, temperature=1.5, via_token_logprobs=True, lead_shape=(2, 5)),
    (2,), torch.float32)


@check("group of size 1 equals the plain op", worlds=(2,))
def _(world, rank):
    import grpo_kernels as gk
    from grpo_kernels.ops.vocab_parallel import vocab_parallel_logprobs

    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    weight, bias = _head(world, torch.float32, True)
    hidden = torch.randn(7, DIM, generator=_generator(3 + rank))  # differs per rank: groups are separate
    targets = torch.randint(0, VOCAB, (7,), generator=_generator(4))
    grad_logp, grad_ent = torch.randn(7), torch.randn(7)
    options = dict(temperature=0.9, return_entropy=True)
    want = _forward_backward(gk.token_logprobs, hidden, weight, bias, targets, grad_logp, grad_ent, **options)
    got = _forward_backward(lambda h, w, t, **kw: vocab_parallel_logprobs(h, w, t, groups[rank], **kw),
                            hidden, weight, bias, targets, grad_logp, grad_ent, **options)
    _assert_close(got, want, torch.float32)


@check("every output (statistics, lse, top-k), per-row temperature, targets=None; both layouts")
def _(world, rank):
    # Against the single-process op in the same process; with 4 ranks a 1-id shard is below k.
    import grpo_kernels as gk
    from grpo_kernels.ops.vocab_parallel import sharded_head_logprobs

    weight, bias = _head(world, torch.float32, True)
    g = _generator(11)
    hidden = torch.randn(13, DIM, generator=g)
    targets = _boundary_targets(13, 12)
    temperature = torch.rand(13, generator=g) + 0.5
    names = ("entropy", "lse", "log_sum_sq_probs", "mean_logits", "is_top1", "topk")
    cotangents = {"logprobs": torch.randn(13, generator=g), "entropy": torch.randn(13, generator=g),
                  "lse": torch.randn(13, generator=g), "topk_logprobs": torch.randn(13, 5, generator=g)}

    def run(fn, w, b, rows=slice(None)):
        h, w, b = _leaf(hidden[rows]), _leaf(w), _leaf(b)
        stats = fn(h, w, b)
        sum((getattr(stats, name) * grad[rows]).sum() for name, grad in cotangents.items()
            if getattr(stats, name) is not None).backward()
        return stats, (h.grad, w.grad, b.grad)

    want, want_grads = run(lambda h, w, b: gk.token_logprobs(
        h, w, targets, bias=b, outputs=names, topk=5, temperature=temperature, backend="triton"), weight, bias)
    got, got_grads = run(lambda h, w, b: gk.token_logprobs(
        h, w, targets, bias=b, outputs=names, topk=5, temperature=temperature, backend="triton",
        process_group=dist.group.WORLD), _shard(weight, world, rank), _shard(bias, world, rank))
    for name in ("logprobs", "entropy", "lse", "log_sum_sq_probs", "mean_logits", "topk_logprobs"):
        _close32(getattr(got, name), getattr(want, name), "logp" if name != "topk_logprobs" else "gradient")
    assert torch.equal(got.is_top1, want.is_top1) and torch.equal(got.topk_ids, want.topk_ids)
    for name, a, b, whole in zip(("d hidden", "d weight", "d bias"), got_grads,
                                 (want_grads[0], _shard(want_grads[1], world, rank),
                                  _shard(want_grads[2], world, rank)), (None,) + want_grads[1:]):
        _close32(a, b, name, whole)
    none = gk.token_logprobs(hidden, _shard(weight, world, rank), None, bias=_shard(bias, world, rank),
                             outputs=("topk", "mean_logits"), topk=5, temperature=temperature,
                             process_group=dist.group.WORLD, backend="torch")
    live = targets != -100  # want's ignored rows hold zeros; without targets every row is live
    assert none.logprobs is None and torch.equal(none.topk_ids[live], want.topk_ids[live])
    _close32(none.mean_logits[live], want.mean_logits[live], "logp")
    # sharded-head layout (gather_hidden): this rank's rows of the same outputs
    mine = slice(3 * rank, 3 * rank + 3)
    sharded, _ = run(lambda h, w, b: sharded_head_logprobs(
        h, w, targets[mine], dist.group.WORLD, layout="gather_hidden", bias=b, outputs=names, topk=5,
        temperature=temperature[mine], backend="torch"), _shard(weight, world, rank), _shard(bias, world, rank),
        rows=mine)
    for name in ("logprobs", "entropy", "lse", "log_sum_sq_probs", "topk_logprobs"):
        _close32(getattr(sharded, name), getattr(want, name)[mine], "logp" if name != "topk_logprobs" else "gradient")
    assert torch.equal(sharded.topk_ids, want.topk_ids[mine]) and torch.equal(sharded.is_top1, want.is_top1[mine])


def _raises_everywhere(rank, bad_rank, fn, own_message, other_message):
    with pytest.raises(ValueError) as info:
        fn()
    expected = own_message if rank == bad_rank or bad_rank is None else other_message
    assert expected in str(info.value), (expected, str(info.value))


@check("bad input: a shard of the wrong width")
def _(world, rank):
    from grpo_kernels.ops.vocab_parallel import vocab_parallel_logprobs

    weight, _ = _head(world, torch.float32, False)
    hidden = torch.randn(4, DIM, generator=_generator(5))
    targets = torch.tensor([0, 5, 9, -100])
    shard = _shard(weight, world, rank)
    if rank == 1:
        shard = torch.randn(shard.shape[0], DIM + 1)
    _raises_everywhere(rank, 1, lambda: vocab_parallel_logprobs(hidden, shard, targets, dist.group.WORLD),
                       "weight shard width", "rank(s) [1] of the process group rejected their inputs")
    # consistent on each rank, but D differs between ranks
    wide = 1 if rank == world - 1 else 0
    _raises_everywhere(
        rank, None, lambda: vocab_parallel_logprobs(
            torch.randn(4, DIM + wide), torch.randn(shard.shape[0], DIM + wide), targets, dist.group.WORLD),
        "weight shards have different widths D across ranks", "")


@check("bad input: hidden differing across TP ranks (check_replicated)")
def _(world, rank):
    from grpo_kernels.ops.vocab_parallel import DEBUG_ENV, vocab_parallel_logprobs

    weight, _ = _head(world, torch.float32, False)
    hidden = torch.randn(4, DIM, generator=_generator(6))
    targets = torch.tensor([0, 5, 9, 36])
    shard = _shard(weight, world, rank)
    vocab_parallel_logprobs(hidden, shard, targets, dist.group.WORLD, check_replicated=True)  # identical: fine
    if rank == world - 1:
        hidden = hidden.clone()
        hidden[2, 3] += 1e-3
    message = f"hidden/targets on rank(s) [{world - 1}] differ from rank 0's"
    _raises_everywhere(rank, None, lambda: vocab_parallel_logprobs(
        hidden, shard, targets, dist.group.WORLD, check_replicated=True), message, "")
    os.environ[DEBUG_ENV] = "1"
    try:
        _raises_everywhere(rank, None, lambda: vocab_parallel_logprobs(hidden, shard, targets, dist.group.WORLD),
                           message, "")
    finally:
        del os.environ[DEBUG_ENV]


@check("bad input: global target ids out of range, non-tensor, missing group")
def _(world, rank):
    from grpo_kernels.ops.vocab_parallel import vocab_parallel_logprobs

    weight, _ = _head(world, torch.float32, False)
    hidden = torch.randn(3, DIM, generator=_generator(7))
    shard = _shard(weight, world, rank)
    _raises_everywhere(rank, None, lambda: vocab_parallel_logprobs(
        hidden, shard, torch.tensor([0, VOCAB, 2]), dist.group.WORLD),
        f"targets hold global ids outside [0, {VOCAB})", "")
    bad_targets = [0, 1, 2] if rank == 0 else torch.tensor([0, 1, 2])
    with pytest.raises((TypeError, ValueError), match="targets must be a torch.Tensor|rank\\(s\\) \\[0\\]"):
        vocab_parallel_logprobs(hidden, shard, bad_targets, dist.group.WORLD)
    with pytest.raises(ValueError, match="process_group must be"):
        vocab_parallel_logprobs(hidden, shard, torch.tensor([0, 1, 2]), None)


@check("bad input: flags that are not bools, numbers that are not numbers", worlds=(2,))
def _(world, rank):
    from grpo_kernels.ops.vocab_parallel import sharded_head_logprobs, vocab_parallel_logprobs

    weight, _ = _head(world, torch.float32, False)
    hidden, targets = torch.randn(3, DIM, generator=_generator(7)), torch.tensor([0, 1, 2])
    shard = _shard(weight, world, rank)
    for fn in (vocab_parallel_logprobs, sharded_head_logprobs):
        for flag in ("return_entropy", "return_lse", "exact") + (
                ("sum_grad_hidden", "check_replicated") if fn is vocab_parallel_logprobs else ()):
            with pytest.raises(TypeError, match=f"{flag} must be a bool"):
                fn(hidden, shard, targets, dist.group.WORLD, **{flag: "no"})
        for name, value in (("temperature", "0.5"), ("temperature", True), ("filter_eps", "1e-3")):
            with pytest.raises(TypeError, match=f"{name} must be a number"):
                fn(hidden, shard, targets, dist.group.WORLD, **{name: value})


def _sharded_head_case(world, rank, group, *, layout, backend, dtype, expect_layout=None):
    import grpo_kernels as gk
    from grpo_kernels.ops.vocab_parallel import sharded_head_logprobs

    weight, bias = _head(world, dtype, True)
    counts = ROWS_PER_RANK[world]
    g = _generator(8)
    hidden_all = torch.randn(sum(counts), DIM, generator=g).to(dtype)
    targets_all = _boundary_targets(sum(counts), 10)
    grad_logp, grad_ent = torch.randn(sum(counts), generator=g), torch.randn(sum(counts), generator=g)
    options = dict(temperature=0.8, return_entropy=True, backend=backend)
    mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    if group is None:  # one process, every rank's rows, the whole head: sum_r loss_r
        full = _reference(("sharded", backend, dtype), lambda: _forward_backward(
            gk.token_logprobs, hidden_all, weight, bias, targets_all, grad_logp, grad_ent, **options))
        return [full[0][mine], full[1][mine], full[2][mine], _shard(full[3], world, rank), _shard(full[4], world, rank),
                {"d weight": full[3], "d bias": full[4]}]

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("grpo_kernels.ops.vocab_parallel")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        got = _forward_backward(
            lambda h, w, t, **kw: sharded_head_logprobs(h, w, t, group, layout=layout, **kw),
            hidden_all[mine], _shard(weight, world, rank), _shard(bias, world, rank), targets_all[mine],
            grad_logp[mine], grad_ent[mine], **options)
    finally:
        log.removeHandler(handler)
    if expect_layout is not None:
        assert any(f"layout {expect_layout}" in r.getMessage() for r in records), [r.getMessage() for r in records]
    return got


for _layout, _backend, _dtype, _expect in (("gather_hidden", "triton", torch.float32, None),
                                           ("gather_hidden", "torch", torch.float32, None),
                                           ("gather_hidden", "triton", torch.bfloat16, None),
                                           ("gather_weight", "torch", torch.float32, None),
                                           ("auto", "triton", torch.float32, "gather_hidden")):
    NUMERIC[f"sharded_head[{_layout},{_backend},{str(_dtype)[6:]}]"] = (
        lambda world, rank, group, l=_layout, b=_backend, d=_dtype, e=_expect: _sharded_head_case(
            world, rank, group, layout=l, backend=b, dtype=d, expect_layout=e),
        (2, 4), _dtype)


@check("fused_linear_grpo_loss and FusedLinearGRPOLoss with process_group", worlds=(2,))
def _(world, rank):
    import grpo_kernels as gk

    weight, bias = _head(world, torch.float32, True)
    g = _generator(11)
    hidden = torch.randn(2, 5, DIM, generator=g)
    ids = torch.randint(0, VOCAB, (2, 5), generator=g)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    advantages, old = torch.tensor([0.7, -1.2]), -torch.rand(2, 5, generator=g) * 3
    # the module has no backend argument: "auto" takes the torch path while the interpreter is off
    # (the Triton kernels are covered by the cases above; the loss kernel is slow interpreted)
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        results = []
        for group in (None, dist.group.WORLD):
            h = _leaf(hidden)
            w = _leaf(weight if group is None else _shard(weight, world, rank))
            b = _leaf(bias if group is None else _shard(bias, world, rank))
            loss, _ = gk.FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, temperature=0.7, process_group=group)(
                h, w, ids, mask, advantages, bias=b, old_per_token_logps=old)
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad, b.grad))
        (loss_1, dh_1, dw_1, db_1), (loss_tp, dh_tp, dw_tp, db_tp) = results
        _close32(loss_tp, loss_1, "loss")
        _close32(dh_tp, dh_1)
        _close32(dw_tp, _shard(dw_1, world, rank), whole=dw_1)
        _close32(db_tp, _shard(db_1, world, rank), whole=db_1)
        h, w = _leaf(hidden), _leaf(_shard(weight, world, rank))  # the function, with an entropy bonus
        loss, _ = gk.fused_linear_grpo_loss(h, w, ids, mask, advantages, entropy_coef=0.1, process_group=dist.group.WORLD)
        loss.backward()
        h1, w1 = _leaf(hidden), _leaf(weight)
        loss_1, _ = gk.fused_linear_grpo_loss(h1, w1, ids, mask, advantages, entropy_coef=0.1)
        loss_1.backward()
        _close32(loss, loss_1, "loss")
        _close32(h.grad, h1.grad)
        _close32(w.grad, _shard(w1.grad, world, rank), whole=w1.grad)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


@check("verl linear_cross_entropy with dist_process_group: partial d hidden, as verl's kernel", worlds=(2,))
def _(world, rank):
    from grpo_kernels.integrations.verl import linear_cross_entropy

    weight, _ = _head(world, torch.float32, False)
    g = _generator(12)
    hidden = torch.randn(1, 6, DIM, generator=g)
    labels = torch.randint(0, VOCAB, (1, 6), generator=g)
    grad_logp, grad_ent = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    results = []
    for group in (None, dist.group.WORLD):
        h, w = _leaf(hidden), _leaf(weight if group is None else _shard(weight, world, rank))
        logp, entropy = linear_cross_entropy(h, w, labels, 0.6, "none", group)
        ((logp * grad_logp).sum() + (entropy * grad_ent).sum()).backward()
        results.append((logp.detach(), entropy.detach(), h.grad, w.grad))
    (logp_1, ent_1, dh_1, dw_1), (logp_tp, ent_tp, dh_tp, dw_tp) = results
    summed = dh_tp.clone()
    dist.all_reduce(summed)
    _close32(logp_tp, logp_1, "logp")
    _close32(ent_tp, ent_1, "entropy")
    _close32(dw_tp, _shard(dw_1, world, rank), whole=dw_1)
    _close32(summed, dh_1)  # partial sums that add up to the gradient
    if rank == 1:  # the one-row shard's part is far from the whole
        assert not torch.allclose(dh_tp, dh_1)


# ---------------------------------------------------------------------------------------------
# The processes
# ---------------------------------------------------------------------------------------------


def _worker(rank, world, port, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.update(VP_OUT=out_dir, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for kind, cases in (("numeric", NUMERIC), ("check", CHECKS)):
            for name, (fn, worlds, *_) in cases.items():
                if world not in worlds:
                    continue
                started = time.perf_counter()
                try:
                    results[name] = fn(world, rank, dist.group.WORLD) if kind == "numeric" else fn(world, rank)
                except Exception:  # noqa: BLE001 - reported to the test, per rank
                    results[name] = traceback.format_exc(limit=8)
                if os.environ.get("VP_TIMING"):
                    print(f"rank {rank} {time.perf_counter() - started:6.2f}s {name}", flush=True)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNS, _OUT_DIRS = {}, {}


def _results(world, tmp_path_factory):
    if world not in _RUNS:
        out_dir = _OUT_DIRS[world] = str(tmp_path_factory.mktemp(f"vocab_parallel_{world}"))
        mp.spawn(_worker, args=(world, _free_port(), out_dir), nprocs=world, join=True)
        _RUNS[world] = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return _RUNS[world]


def _errors(per_rank, name):
    return {rank: results.get(name, "did not run") for rank, results in enumerate(per_rank)
            if isinstance(results.get(name, "did not run"), str)}


@pytest.mark.parametrize("world, name", [(w, n) for w in (2, 4) for n, (_, worlds, _) in NUMERIC.items() if w in worlds])
def test_equals_single_process(world, name, tmp_path_factory):
    per_rank = _results(world, tmp_path_factory)
    errors = _errors(per_rank, name)
    assert not errors, "\n".join(f"rank {rank}:\n{error}" for rank, error in errors.items())
    fn, _, dtype = NUMERIC[name]
    for rank in range(world):
        _assert_close(per_rank[rank][name], fn(world, rank, None), dtype)


@pytest.mark.parametrize("world, name", [(w, n) for w in (2, 4) for n, (_, worlds) in CHECKS.items() if w in worlds])
def test_distributed_check(world, name, tmp_path_factory):
    per_rank = _results(world, tmp_path_factory)
    errors = _errors(per_rank, name)
    assert not errors, "\n".join(f"rank {rank}:\n{error}" for rank, error in errors.items())


def test_choose_layout():
    from grpo_kernels.ops.vocab_parallel import choose_layout, sharded_head_logprobs

    assert choose_layout(16384, 151936) == "gather_hidden"
    assert choose_layout(200000, 151936) == "gather_weight"
    with pytest.raises(ValueError, match="layout must be"):
        sharded_head_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), None,
                              layout="rows")


# ---------------------------------------------------------------------------------------------
# The thin trainer under FSDP2 with an untied head: the sharded-head layout, no weight gather
# ---------------------------------------------------------------------------------------------


def _untied_trainer(mode, output_dir):
    from test_train_distributed import ROWS, FixedRolloutTrainer, _length_reward

    from grpo_kernels.demo import addition_reward, build_model, build_tokenizer
    from grpo_kernels.train import GRPOConfig

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, seed=0)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone() * 0.5)
    # 47 rows (tokens the tokenizer never produces included): more than the 2 x 4 x 5 hidden rows
    # of a micro-batch, so that the layout is gather_hidden, and shards of 24 + 23 rows
    torch.manual_seed(1)
    model.resize_token_embeddings(47, mean_resizing=False)
    config = GRPOConfig(
        mode=mode, loss_type="dapo", prompts_per_step=4, num_generations=3, max_new_tokens=5, micro_batch_size=4,
        num_iterations=2, beta=0.04, reward_weights=[1.0, 0.5], scale_rewards="batch", max_grad_norm=0.05,
        learning_rate=1e-2, max_steps=1, seed=0, output_dir=output_dir, progress_bar=False, save_final_model=False,
        entropy_coef=0.01,
    )
    return FixedRolloutTrainer(config, model=model, tokenizer=tokenizer, dataset=ROWS,
                               reward_funcs=[addition_reward, _length_reward])


def _trainer_state(trainer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: value.detach().clone() for key, value in state.items()}


@check("fsdp2 trainer step, untied head sharded by hand", worlds=(2,))
def _(world, rank):
    from torch.distributed.tensor import DTensor

    from grpo_kernels.ops import vocab_parallel

    vocab_parallel._last_logged_layout.clear()  # the layout is logged when it changes: from here on
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("grpo_kernels.ops.vocab_parallel")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        trainer = _untied_trainer("fsdp2", os.path.join(os.environ["VP_OUT"], "fsdp2-untied"))
        head = trainer.model.get_output_embeddings().weight
        assert isinstance(head, DTensor) and head.to_local().shape[0] < head.shape[0]
        history = trainer.train()
        # real sampling through the wrapped model: the head is gathered for generate only
        from grpo_kernels.train import GRPOTrainer

        rollout = GRPOTrainer.rollout(trainer, trainer.rows[:1])
        assert rollout.completion_ids.shape[0] == trainer.config.num_generations
        assert isinstance(trainer.model.get_output_embeddings().weight, DTensor)  # sharded again
    finally:
        log.removeHandler(handler)
    state = _trainer_state(trainer)
    if rank == 0:
        torch.save({"history": history, "state": state,
                    "layouts": sorted({r.getMessage().split()[2] for r in records})},
                   os.path.join(os.environ["VP_OUT"], "fsdp2-untied.pt"))
    del trainer
    dist.barrier()


def test_fsdp2_trainer_with_sharded_head_matches_one_process(tmp_path_factory, tmp_path):
    per_rank = _results(2, tmp_path_factory)
    errors = _errors(per_rank, "fsdp2 trainer step, untied head sharded by hand")
    assert not errors, "\n".join(f"rank {rank}:\n{error}" for rank, error in errors.items())
    result = torch.load(os.path.join(_OUT_DIRS[2], "fsdp2-untied.pt"), weights_only=False)
    assert result["layouts"] == ["gather_hidden"], result["layouts"]
    single = _untied_trainer("single", str(tmp_path))
    single_history = single.train()
    single_state = _trainer_state(single)
    for distributed, reference in zip(result["history"], single_history):
        for key in ("loss", "loss_last_iteration", "kl", "entropy", "grad_norm", "clip_ratio/region_mean"):
            assert distributed[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
    assert set(result["state"]) == set(single_state)
    for key, value in single_state.items():
        torch.testing.assert_close(result["state"][key], value, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    head = "model.lm_head.weight"
    assert (result["state"][head] - single_state[head]).abs().max() < 1e-5
