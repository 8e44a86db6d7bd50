"""token_logprobs(..., outputs=...): every per-token statistic, the top-k and per-row temperature.

Each output against the float64 reference written from the definitions (grpo_kernels.reference.
token_stats_reference) and against TRL 1.16's own ChunkedLogProbFunction (its torch fallback on
CPU) on the same inputs; ties built on purpose for is_top1 and the top-k; the top-k's batch
invariance bitwise; per-row temperatures against the same float broadcast; the temperature range.
Both CPU paths: the Triton kernels under the interpreter and the chunked torch path.
"""

import math

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.ops.logprobs import launch as launch_module
from grpo_kernels.reference import token_stats_reference

BACKENDS = ["triton", "torch"]
ALL = ("entropy", "lse", "log_sum_sq_probs", "mean_logits", "is_top1", "topk")
# (relative error bound on values, on gradients) per input dtype, as in test_logprobs.py
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-3, 2e-2)}
DIFFERENTIABLE = ("logprobs", "entropy", "lse", "topk_logprobs")


def rel_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_inputs(lead_shape, dim, vocab, dtype, *, bias=False, masked=0, logit_scale=1.0, k_targets=None):
    hidden = torch.randn(*lead_shape, dim).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim) * logit_scale / math.sqrt(dim)).to(dtype).requires_grad_()
    bias_t = torch.randn(vocab).to(dtype).requires_grad_() if bias else None
    shape = lead_shape if k_targets is None else (*lead_shape, k_targets)
    targets = torch.randint(0, vocab, shape)
    if masked:
        rows = targets.view(-1, 1 if k_targets is None else k_targets)
        rows[torch.randperm(rows.shape[0])[:masked]] = -100
    return hidden, weight, bias_t, targets


def forward_backward(fn, leaves, cotangents, **kwargs):
    """Outputs of fn(hidden, weight, targets, bias=...) (a dict of detached tensors) and the
    gradients of sum <cotangent, output> over the differentiable outputs."""
    hidden, weight, bias, targets = leaves
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    out = fn(hidden, weight, targets, bias=bias, **kwargs)
    out = out._asdict() if hasattr(out, "_asdict") else out
    objective = sum((out[name] * g).sum() for name, g in cotangents.items() if out.get(name) is not None)
    objective.backward()
    grads = [t.grad.clone() if t is not None and t.grad is not None else None for t in (hidden, weight, bias)]
    return {name: (v.detach() if isinstance(v, torch.Tensor) else v) for name, v in out.items()}, grads


def cotangents_for(targets, lead_shape, topk):
    return {"logprobs": torch.randn(targets.shape) if targets is not None else None,
            "entropy": torch.randn(lead_shape), "lse": torch.randn(lead_shape),
            "topk_logprobs": torch.randn(*lead_shape, topk) if topk else None}


def value_err(actual, expected, scale):
    """||actual - expected|| relative to ||expected||, or to ||scale|| when that is larger: float32
    logits carry ~1e-7 |z| of rounding, so a log-prob or log sum p^2 near 0 (a one-hot row) is
    only that precise in absolute terms. ``scale``: |lse| + 1 per row, broadcast."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = scale.double().expand_as(expected) if scale.dim() == expected.dim() else \
        scale.double().reshape(*scale.shape, *([1] * (expected.dim() - scale.dim()))).expand_as(expected)
    return ((actual - expected).norm() / max(expected.norm().item(), scale.norm().item(), 1e-30)).item()


def check_topk(got_values, got_ids, reference_log_p_at, want_values, tolerance, scale):
    """The top-k ids are distinct and descending in value; the reference's log-probs at them equal
    the returned values and the reference's own top-k values (near-ties at float32 precision may
    swap two ids, never a value)."""
    assert got_ids.dtype == torch.int64 and got_values.dtype == torch.float32
    sorted_ids = got_ids.sort(-1).values
    assert (sorted_ids[..., 1:] != sorted_ids[..., :-1]).all(), "repeated id in a top-k"
    assert (got_values[..., 1:] <= got_values[..., :-1]).all(), "top-k not descending"
    assert value_err(got_values, reference_log_p_at(got_ids), scale) < tolerance
    assert value_err(got_values, want_values, scale) < tolerance


def reference_log_p(hidden, weight, bias, temperature, softcap):
    """float64 log-softmax [rows, V] of the reference's logits, for looking values up."""
    y = hidden.detach().reshape(-1, hidden.shape[-1]).double() @ weight.detach().double().t()
    if bias is not None:
        y = y + bias.detach().double()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.double().expand(hidden.shape[:-1]).reshape(-1, 1)
    return torch.log_softmax(y / temperature, dim=-1)


def check_against_reference(leaves, *, dtype, topk=None, outputs=ALL, temperature=1.0, softcap=None, **kwargs):
    hidden, weight, bias, targets = leaves
    lead_shape = hidden.shape[:-1]
    cotangents = {name: g for name, g in cotangents_for(targets, lead_shape, topk).items()
                  if g is not None and (name == "logprobs" or name in outputs or name == "topk_logprobs")}
    got, got_grads = forward_backward(gk.token_logprobs, leaves, cotangents, outputs=outputs, topk=topk,
                                      temperature=temperature, softcap=softcap, **kwargs)
    want, want_grads = forward_backward(token_stats_reference, leaves, cotangents, topk=topk,
                                        temperature=temperature, softcap=softcap)
    value_tol, grad_tol = TOLERANCE[dtype]
    live = (targets != -100).reshape(*lead_shape, -1).any(-1) if targets is not None else torch.ones(lead_shape,
                                                                                                    dtype=torch.bool)
    scale = want["lse"].detach().abs() + 1  # [lead]: the size of the logits' rounding, per row
    for name in ("logprobs", "entropy", "lse", "log_sum_sq_probs"):
        if got[name] is None:
            assert name != "logprobs" or targets is None
            continue
        assert got[name].dtype == torch.float32 and got[name].shape == want[name].shape, name
        assert value_err(got[name], want[name], scale) < value_tol, name
    if got["mean_logits"] is not None:
        # a sum of V logits of either sign: relative to the logits' scale, not the (maybe ~0) mean
        largest = want["lse"].abs().max().clamp_min(1.0)
        assert (got["mean_logits"] - want["mean_logits"]).abs().max() <= value_tol * largest
    if got["is_top1"] is not None:
        assert got["is_top1"].dtype == torch.bool and torch.equal(got["is_top1"], want["is_top1"])
        assert not got["is_top1"][~live].any()
    if topk:
        log_p = reference_log_p(hidden, weight, bias, temperature, softcap)
        ids = got["topk_ids"].reshape(-1, topk)

        def at(ids_):
            return torch.where(live.reshape(-1, 1), log_p.gather(1, ids_.reshape(-1, topk)), 0.0)

        check_topk(got["topk_logprobs"][live], got["topk_ids"][live], lambda i: at(got["topk_ids"])[live.reshape(-1)],
                   want["topk_logprobs"][live], value_tol, scale[live])
        assert (got["topk_logprobs"][~live] == 0).all() and (ids.reshape(*lead_shape, topk)[~live] == 0).all()
    for name, g, w, t in zip(("hidden", "weight", "bias"), got_grads, want_grads, leaves[:3]):
        if t is not None and t.requires_grad:
            assert g.dtype == t.dtype, f"grad {name} dtype"
            assert rel_err(g, w) < grad_tol, f"grad {name}"
    return got, want


# ---------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,lead_shape,dim,vocab,bias,masked,temperature,softcap,topk",
    [
        (torch.float32, (1,), 7, 13, False, 0, 1.0, None, 1),  # N = 1, k = 1
        (torch.bfloat16, (1,), 7, 13, True, 0, 1.7, 2.0, 3),
        # D odd, V prime (4 splits), ignored rows, per-row temperature
        (torch.float32, (23,), 29, 101, True, 4, "rows", None, 5),
        (torch.bfloat16, (23,), 29, 101, True, 4, "rows", None, 5),
        # [B, T, D], soft-cap, k = 64 > a split's 32 ids (the interpreter's slow case: fp32 only)
        (torch.float32, (3, 5), 16, 67, False, 2, 0.6, 4.0, 64),
    ],
)
def test_every_output_matches_reference(backend, dtype, lead_shape, dim, vocab, bias, masked, temperature, softcap,
                                        topk):
    leaves = make_inputs(lead_shape, dim, vocab, dtype, bias=bias, masked=masked, logit_scale=3.0)
    if temperature == "rows":
        temperature = torch.rand(lead_shape) * 1.5 + 0.25
    check_against_reference(leaves, dtype=dtype, topk=topk, temperature=temperature, softcap=softcap,
                            backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_targets_and_no_targets(backend):
    # K targets per row: the statistics and the top-k are per row (is_top1 needs one target).
    hidden, weight, bias, targets = make_inputs((11,), 12, 37, torch.float32, bias=True, k_targets=3)
    targets[4] = -100  # a row with every target ignored: zeros
    outputs = ("entropy", "lse", "log_sum_sq_probs", "mean_logits", "topk")
    got, _ = check_against_reference((hidden, weight, bias, targets), dtype=torch.float32, topk=4, outputs=outputs,
                                     temperature=0.8, backend=backend)
    assert got["logprobs"].shape == (11, 3) and got["is_top1"] is None
    # targets=None: every row live, no log-probs; the same statistics as with targets
    none, _ = check_against_reference((hidden, weight, bias, None), dtype=torch.float32, topk=4, outputs=outputs,
                                      temperature=0.8, backend=backend)
    assert none["logprobs"] is None and none["entropy"][4] > 0
    live = torch.arange(11) != 4
    for name in ("entropy", "lse", "log_sum_sq_probs", "mean_logits", "topk_logprobs", "topk_ids"):
        if backend == "triton":  # batch-invariant: the extra live row changes no other row's bits
            assert torch.equal(none[name][live], got[name][live]), name
        else:  # the torch path's BLAS blocks depend on the row count
            torch.testing.assert_close(none[name][live], got[name][live], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unrequested_fields_are_none_and_topk_logprobs_match_targets(backend):
    hidden, weight, _, targets = make_inputs((9,), 8, 23, torch.float32)
    stats = gk.token_logprobs(hidden, weight, targets, outputs=("mean_logits",), backend=backend)
    assert isinstance(stats, gk.TokenStats) and stats.logprobs.shape == (9,) and stats.mean_logits.shape == (9,)
    assert all(getattr(stats, name) is None for name in stats._fields if name not in ("logprobs", "mean_logits"))
    # the top-1 log-prob at the argmax target is the target's log-prob, bitwise (one pass, same z)
    argmax = (hidden @ weight.t()).argmax(-1)
    stats = gk.token_logprobs(hidden, weight, argmax, outputs=("topk", "is_top1"), topk=1, backend=backend)
    assert torch.equal(stats.topk_ids[:, 0], argmax) and stats.is_top1.all()
    assert torch.equal(stats.topk_logprobs[:, 0], stats.logprobs)
    # the legacy interface is unchanged
    logp = gk.token_logprobs(hidden, weight, targets, backend=backend)
    assert torch.equal(logp, gk.token_logprobs(hidden, weight, targets, outputs=(), backend=backend).logprobs)


# ---------------------------------------------------------------------------------------------
# Against TRL 1.16's ChunkedLogProbFunction (its torch fallback on CPU)
# ---------------------------------------------------------------------------------------------


def trl_outputs(hidden, weight, bias, targets, temperature, softcap, cotangents):
    """TRL's values and the gradients of <g_logp, logp> + <g_ent, entropy>; a per-row temperature
    tensor runs TRL once per distinct value (TRL takes a float) and sums the gradients."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h2, flat_targets = leaves[0].reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    temps = (temperature.expand(targets.shape).reshape(-1) if isinstance(temperature, torch.Tensor)
             else torch.full(flat_targets.shape, float(temperature)))
    results = torch.zeros(5, flat_targets.numel(), dtype=torch.float64)
    objective = 0
    for value in temps.unique():
        rows = (temps == value).nonzero().squeeze(1)
        out = ChunkedLogProbFunction.apply(h2[rows], leaves[1], leaves[2], flat_targets[rows], float(value), 16,
                                           softcap, 1.0, OPTIONAL_OUTPUTS)
        results[:, rows] = torch.stack([o.double() for o in out])
        objective = objective + (out[0] * cotangents["logprobs"].reshape(-1)[rows]).sum() \
            + (out[1] * cotangents["entropy"].reshape(-1)[rows]).sum()
    objective.backward()
    names = ("logprobs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    values = {name: results[i].reshape(targets.shape) for i, name in enumerate(names)}
    values["is_top1"] = values["is_top1"].bool()
    return values, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,softcap,temperature", [(torch.float32, None, "rows"), (torch.float32, 3.0, 0.7),
                                                       (torch.bfloat16, 3.0, "rows")])
def test_matches_trl(backend, dtype, softcap, temperature):
    hidden, weight, bias, targets = make_inputs((4, 6), 20, 53, dtype, bias=True, logit_scale=3.0, masked=3)
    if temperature == "rows":
        temperature = torch.tensor([[0.5], [0.9], [1.25], [0.9]])  # per sequence: [B, 1]
    live = targets != -100
    cotangents = {"logprobs": torch.randn(targets.shape) * live, "entropy": torch.randn(targets.shape) * live}
    got, got_grads = forward_backward(gk.token_logprobs, (hidden, weight, bias, targets), cotangents, outputs=ALL,
                                      topk=3, temperature=temperature, softcap=softcap, backend=backend)
    trl, trl_grads = trl_outputs(hidden, weight, bias, targets, temperature, softcap, cotangents)
    # TRL rounds its bf16 logits tile to bf16 before the softmax (we keep float32 logits):
    # compare bf16 at that precision.
    value_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 5e-2)
    for name in ("logprobs", "entropy", "log_sum_sq_probs"):
        assert rel_err(got[name][live], trl[name][live]) < value_tol, name
    assert (got["mean_logits"] - trl["mean_logits"])[live].abs().max() < value_tol * 10
    if dtype == torch.float32:  # TRL's bf16 logits make near-ties its own
        assert torch.equal(got["is_top1"][live], trl["is_top1"][live])
    assert not got["is_top1"][~live].any()
    for name, g, w in zip(("hidden", "weight", "bias"), got_grads, trl_grads):
        assert rel_err(g, w.to(g.dtype)) < grad_tol, f"grad {name}"


# ---------------------------------------------------------------------------------------------
# Ties, built on purpose
# ---------------------------------------------------------------------------------------------


def tied_head(vocab=67, dim=6):
    """Integer hidden states and head rows, so that every logit is exact in float32 whatever the
    summation order (BLAS blocks sum edge columns in another order than inner ones); rows 5, 40
    and 66 of the head are equal and the longest, so they tie for every row's maximum, in three
    different vocabulary splits of the interpreter (32 ids each). Many other logits tie too."""
    weight = torch.randint(-2, 3, (vocab, dim)).float()
    weight[[5, 40, 66]] = 3.0
    # h >= 1: h . w_v <= 2 sum h < 3 sum h = h . w5
    hidden = (torch.randint(2, 5, (4, 1)) + torch.randint(-1, 2, (4, dim))).float()
    return hidden, weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_tie_rule(backend):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    hidden, weight = tied_head()
    z = hidden @ weight.t()
    assert torch.equal(z[:, 5], z[:, 40]) and (z.argmax(-1) == 5).all()
    second = z.clone()
    second[:, [5, 40, 66]] = float("-inf")
    targets = torch.stack([torch.tensor(5), torch.tensor(40), torch.tensor(66), second[3].argmax()])
    stats = gk.token_logprobs(hidden, weight, targets, outputs=("is_top1",), temperature=0.5, backend=backend)
    # the lowest of the tied maximal ids counts; a tied higher id does not (argmax's first maximum)
    assert stats.is_top1.tolist() == [True, False, False, False]
    trl = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.5, 16, None, 1.0, ("is_top1",))[4]
    assert torch.equal(stats.is_top1, trl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ties_broken_by_lower_id(backend):
    hidden, weight = tied_head()
    stats = gk.token_logprobs(hidden, weight, None, outputs=("topk",), topk=8, backend=backend)
    assert (stats.topk_ids[:, :3] == torch.tensor([5, 40, 66])).all()
    assert (stats.topk_logprobs[:, 0] == stats.topk_logprobs[:, 2]).all()
    # exact logits: the reference's stable sort gives the very same ids, ties among the others too
    assert torch.equal(stats.topk_ids, token_stats_reference(hidden, weight, None, topk=8)["topk_ids"])
    # a whole row of equal logits: ids 0..k-1; k = V: the whole vocabulary, in order
    flat = gk.token_logprobs(torch.zeros(2, 6), weight, None, outputs=("topk",), topk=8, backend=backend)
    assert torch.equal(flat.topk_ids, torch.arange(8).expand(2, 8))
    assert torch.allclose(flat.topk_logprobs, torch.full((2, 8), -math.log(67)))
    everything = gk.token_logprobs(hidden, weight[:8], None, outputs=("topk",), topk=8, backend=backend)
    assert torch.equal(everything.topk_ids.sort(-1).values, torch.arange(8).expand(4, 8))


def test_topk_and_statistics_batch_invariant(monkeypatch):
    # The same probe rows alone and in batches of 7 and 70 at random positions, ignored rows in
    # between: bitwise-equal statistics, top-k values and ids (Triton; V = 67: 3 splits).
    monkeypatch.setattr(launch_module, "INTERPRETER_CONFIG", launch_module.LaunchConfig(32, 16, 16, 1, 1))
    monkeypatch.setattr(launch_module, "FORWARD_GROUP_ROWS", 2)
    dim, vocab = 16, 67
    weight = torch.randn(vocab, dim) / 4
    weight[50] = weight[3]  # a tie across splits
    probe_hidden = torch.randn(3, dim)
    probe_targets = torch.randint(0, vocab, (3,))
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "topk")

    def probe(hidden, targets, position, probes):
        hidden, targets = hidden.clone(), targets.clone()
        hidden[position], targets[position] = probe_hidden[probes], probe_targets[probes]
        stats = gk.token_logprobs(hidden, weight, targets, outputs=outputs, topk=8, temperature=0.7,
                                  backend="triton")
        floats = torch.cat([stats.logprobs[position, None], stats.entropy[position, None],
                            stats.log_sum_sq_probs[position, None], stats.mean_logits[position, None],
                            stats.topk_logprobs[position]], dim=1)
        return floats, stats.topk_ids[position], stats.is_top1[position]

    alone = [probe(probe_hidden[i:i + 1], probe_targets[i:i + 1], torch.tensor([0]), torch.tensor([i]))
             for i in range(3)]
    alone = [torch.cat(parts) for parts in zip(*alone)]
    for batch_size in (7, 70):
        hidden = torch.randn(batch_size, dim)
        targets = torch.randint(0, vocab, (batch_size,))
        targets[torch.rand(batch_size) < 0.3] = -100
        position = torch.randperm(batch_size)[:3]
        for got, want in zip(probe(hidden, targets, position, torch.arange(3)), alone):
            assert torch.equal(got, want), batch_size


# ---------------------------------------------------------------------------------------------
# Per-row temperature
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_temperature_equals_float_broadcast(backend):
    hidden, weight, bias, targets = make_inputs((3, 4), 10, 29, torch.float32, bias=True, masked=2)
    cotangents = cotangents_for(targets, (3, 4), 3)
    runs = []
    for temperature in (0.75, torch.full((3, 4), 0.75), torch.full((3, 1), 0.75, dtype=torch.float64)):
        runs.append(forward_backward(gk.token_logprobs, (hidden, weight, bias, targets), cotangents, outputs=ALL,
                                     topk=3, temperature=temperature, softcap=2.0, backend=backend))
    for (got, got_grads) in runs[1:]:
        for name, value in runs[0][0].items():
            if backend == "triton":  # the kernels read 1/T per row either way: the same bits
                assert torch.equal(got[name], value), name
            else:  # the torch path scales rows of hidden instead of a scalar: float32 rounding apart
                torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6)
        for g, w in zip(got_grads, runs[0][1]):
            torch.testing.assert_close(g, w, rtol=0 if backend == "triton" else 1e-5, atol=0 if backend == "triton"
                                       else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [2.0**-64, 1e-19, 1e-6, 1e5, 2.0**64])
def test_extreme_temperatures(backend, temperature):
    # T = 1e-19 once made the torch path's entropy gradient NaN ((z - E z) * g / T overflowed);
    # at the bounds of the range everything is finite and right.
    hidden, weight, bias, targets = make_inputs((7,), 8, 19, torch.float32, bias=True)
    leaves = (hidden, weight, bias, targets)
    cotangents = cotangents_for(targets, (7,), 2)
    got, got_grads = forward_backward(gk.token_logprobs, leaves, cotangents, outputs=ALL, topk=2,
                                      temperature=temperature, backend=backend)
    want, want_grads = forward_backward(token_stats_reference, leaves, cotangents, topk=2, temperature=temperature)
    for name in ("logprobs", "entropy", "lse", "topk_logprobs"):
        assert torch.isfinite(got[name]).all(), name
        # a one-hot softmax at tiny T: entropies ~0, so an absolute bound on the scale of the values
        assert (got[name] - want[name]).abs().max() <= 1e-5 * (1 + want[name].abs().max()), name
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all()
        assert (g - w).abs().max() <= 1e-4 * w.abs().max().clamp_min(1e-30), (g - w).abs().max()


@pytest.mark.parametrize("temperature,error,match", [
    (1e-40, ValueError, r"temperature must be in \[2\*\*-64"),
    (2.0**-65, ValueError, r"temperature must be in \[2\*\*-64"),
    (2.0**65, ValueError, r"temperature must be in \[2\*\*-64"),
    (0.0, ValueError, "temperature must be finite and > 0"),
    (float("nan"), ValueError, "temperature must be finite and > 0"),
    (True, TypeError, "temperature must be a number"),
    ("0.7", TypeError, "temperature must be a number"),
    (torch.tensor([1, 2, 3, 4]), TypeError, "floating-point tensor"),
    (torch.ones(3), ValueError, "leading shape"),
    (torch.tensor([1.0, 1e-40, 1.0, 1.0]), ValueError, "temperature holds 1 value"),
    (torch.tensor([1.0, float("nan"), 1.0, -1.0]), ValueError, "temperature holds 2 value"),
])
def test_bad_temperature(temperature, error, match):
    hidden, weight, targets = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(error, match=match):
        gk.token_logprobs(hidden, weight, targets, temperature=temperature)
    if not isinstance(temperature, torch.Tensor):
        with pytest.raises(error, match=match):
            gk.token_logprobs(hidden, weight, targets, outputs=("entropy",), temperature=temperature)


def test_fused_loss_per_token_temperature():
    hidden, weight, _, ids = make_inputs((4, 5), 12, 31, torch.float32)
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    advantages = torch.randn(4)
    results = []
    for temperature in (0.8, torch.full((4, 1), 0.8)):
        hidden.grad = weight.grad = None
        loss, _ = gk.fused_linear_grpo_loss(hidden, weight, ids, mask, advantages, temperature=temperature)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        gk.fused_linear_grpo_loss(hidden, weight, ids, mask, advantages, temperature=torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Bad input, meta tensors, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    ({"outputs": "entropy"}, TypeError, "outputs must be a tuple or list"),
    ({"outputs": ("entropy", "perplexity")}, ValueError, "unknown name 'perplexity'"),
    ({"outputs": ("logprobs",)}, ValueError, "always returned"),
    ({"outputs": ("topk",)}, ValueError, "pass topk=k"),
    ({"outputs": ("entropy",), "topk": 3}, ValueError, "does not hold 'topk'"),
    ({"topk": 3}, ValueError, "topk= needs outputs"),
    ({"outputs": ("topk",), "topk": 0}, ValueError, r"topk must be in \[1, 64\]"),
    ({"outputs": ("topk",), "topk": 65}, ValueError, r"topk must be in \[1, 64\]"),
    ({"outputs": ("topk",), "topk": True}, TypeError, "topk must be an int"),
    ({"outputs": ("topk",), "topk": 2.0}, TypeError, "topk must be an int"),
    ({"outputs": ("topk",), "topk": 12}, ValueError, "exceeds the vocabulary size V=11"),
    ({"outputs": ("entropy",), "return_entropy": True}, ValueError, "tuple interface"),
    ({"targets": None}, ValueError, "targets=None .* needs outputs"),
    ({"targets": None, "outputs": ()}, ValueError, "computes nothing"),
    ({"targets": None, "outputs": ("is_top1",)}, ValueError, "is_top1' needs one target per row"),
    ({"targets": torch.zeros(4, 2, dtype=torch.long), "outputs": ("is_top1",)}, ValueError, "one target per row"),
])
def test_bad_outputs(kwargs, error, match):
    kwargs = dict(kwargs)
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    targets = kwargs.pop("targets", torch.randint(0, 11, (4,)))
    with pytest.raises(error, match=match):
        gk.token_logprobs(hidden, weight, targets, **kwargs)


def test_meta_tensors_and_compile():
    hidden = torch.empty(2, 5, 8, device="meta")
    weight = torch.empty(11, 8, device="meta")
    stats = gk.token_logprobs(hidden, weight, torch.empty(2, 5, dtype=torch.long, device="meta"), outputs=ALL,
                              topk=4, temperature=torch.empty(2, 1, device="meta"))
    assert stats.logprobs.shape == stats.entropy.shape == stats.is_top1.shape == (2, 5)
    assert stats.topk_logprobs.shape == stats.topk_ids.shape == (2, 5, 4) and stats.topk_ids.dtype == torch.int64
    assert stats.is_top1.dtype == torch.bool and stats.lse.device.type == "meta"
    none = gk.token_logprobs(hidden, weight, None, outputs=("topk", "mean_logits"), topk=2)
    assert none.logprobs is None and none.topk_ids.shape == (2, 5, 2) and none.mean_logits.shape == (2, 5)

    hidden, weight, bias, targets = make_inputs((3, 5), 16, 29, torch.float32, bias=True, masked=2)
    temperature = torch.rand(3, 1) + 0.5

    def loss_fn(hidden, weight, bias, targets, temperature):
        stats = gk.token_logprobs(hidden, weight, targets, bias=bias, outputs=ALL, topk=3, temperature=temperature)
        return stats.logprobs.sum() + 0.1 * stats.entropy.sum() + stats.topk_logprobs.sum() \
            + stats.mean_logits.sum() * 0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(hidden, weight, bias, targets, temperature), (hidden, weight, bias))
    want = torch.autograd.grad(loss_fn(hidden, weight, bias, targets, temperature), (hidden, weight, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_statistics_carry_no_gradient():
    hidden, weight, _, targets = make_inputs((5,), 8, 13, torch.float32)
    stats = gk.token_logprobs(hidden, weight, targets, outputs=ALL, topk=2)
    assert not stats.log_sum_sq_probs.requires_grad and not stats.mean_logits.requires_grad
    assert not stats.is_top1.requires_grad and not stats.topk_ids.requires_grad
    assert stats.topk_logprobs.requires_grad and stats.entropy.requires_grad and stats.lse.requires_grad
