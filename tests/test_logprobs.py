"""token_logprobs against the float64 reference: values, every gradient, odd shapes, bad input.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1 (set by conftest); on a GPU
they run compiled. The chunked PyTorch path is tested on the same cases.
"""

import math

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.ops.logprobs import launch as launch_module
from grpo_kernels.ops.logprobs import torch_path as logprobs_torch_module
from grpo_kernels.reference import token_logprobs_reference

BACKENDS = ["triton", "torch"]
# (relative error bound on log-probs/entropy, on gradients) per input dtype: the contract
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-3, 2e-2)}


def rel_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_inputs(lead_shape, dim, vocab, dtype, device, *, bias=False, masked=0, logit_scale=1.0):
    hidden = torch.randn(*lead_shape, dim, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device) * logit_scale / math.sqrt(dim)).to(dtype).requires_grad_()
    bias_t = (torch.randn(vocab, device=device)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, lead_shape, device=device)
    flat = targets.view(-1)
    if masked:
        flat[torch.randperm(flat.numel(), device=device)[:masked]] = -100
    return hidden, weight, bias_t, targets


def run(fn, hidden, weight, bias, targets, grad_logp, grad_ent, **kwargs):
    """Forward, then backward of <grad_logp, logp> + <grad_ent, entropy>; returns values and grads."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    out = fn(hidden, weight, targets, bias=bias, **kwargs)
    logp, entropy = out if kwargs.get("return_entropy") else (out, None)
    objective = (logp * grad_logp).sum()
    if entropy is not None:
        objective = objective + (entropy * grad_ent).sum()
    objective.backward()
    grads = [t.grad.clone() if t is not None and t.grad is not None else None for t in (hidden, weight, bias)]
    return logp.detach(), (entropy.detach() if entropy is not None else None), grads


def check_against_reference(hidden, weight, bias, targets, *, backend, dtype, **kwargs):
    grad_logp = torch.randn(targets.shape, device=targets.device)
    grad_ent = torch.randn(targets.shape, device=targets.device)
    got = run(gk.token_logprobs, hidden, weight, bias, targets, grad_logp, grad_ent, backend=backend, **kwargs)
    reference_kwargs = {k: v for k, v in kwargs.items()
                        if k not in ("exact", "filter_eps", "backward", "workspace_bytes", "deterministic")}
    want = run(token_logprobs_reference, hidden, weight, bias, targets, grad_logp, grad_ent, **reference_kwargs)
    value_tol, grad_tol = TOLERANCE[dtype]
    assert got[0].dtype == torch.float32 and got[0].shape == targets.shape
    assert rel_err(got[0], want[0]) < value_tol
    if kwargs.get("return_entropy"):
        assert got[1].dtype == torch.float32
        assert rel_err(got[1], want[1]) < value_tol
    for name, g, w, t in zip(("hidden", "weight", "bias"), got[2], want[2], (hidden, weight, bias)):
        if t is None or not t.requires_grad:
            continue
        assert g.dtype == t.dtype, f"grad {name} dtype"
        assert rel_err(g, w) < grad_tol, f"grad {name}"
    return got, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lead_shape,dim,vocab,bias,masked,temperature",
    [
        ((1,), 7, 13, False, 0, 1.0),  # N = 1
        ((37,), 29, 101, True, 5, 0.7),  # D odd, V prime, masked rows, bias, T != 1
        ((3, 11), 33, 67, False, 4, 1.3),  # [B, T, D] input
        ((50,), 64, 257, True, 0, 1.0),  # several tiles in every direction
    ],
)
def test_matches_reference(device, backend, dtype, lead_shape, dim, vocab, bias, masked, temperature):
    hidden, weight, bias_t, targets = make_inputs(lead_shape, dim, vocab, dtype, device, bias=bias, masked=masked)
    (logp, entropy, _), _ = check_against_reference(
        hidden, weight, bias_t, targets, backend=backend, dtype=dtype, temperature=temperature,
        return_entropy=True)
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (logp[~ignored] < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_and_ignored_rows_get_no_gradient(device, backend):
    hidden, weight, _, targets = make_inputs((19,), 21, 53, torch.float32, device, masked=6)
    (_, _, grads), _ = check_against_reference(hidden, weight, None, targets, backend=backend, dtype=torch.float32)
    assert (grads[0][targets == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_do_not_overflow(device, backend):
    # Spread |z| ~ 1e4: a naive exp overflows; the distributions are (nearly) one-hot.
    hidden, weight, _, targets = make_inputs((9,), 16, 41, torch.float32, device, logit_scale=1e4 / 4)
    logp, entropy = gk.token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    ref_logp, ref_entropy = token_logprobs_reference(hidden, weight, targets, return_entropy=True)
    assert (hidden.detach() @ weight.detach().t()).abs().max() > 1e3
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert rel_err(logp, ref_logp) < 1e-5
    # Entropies ~ 0, and float32 logits of size 1e4 carry ~1e-3 absolute rounding: absolute bound.
    assert (entropy - ref_entropy).abs().max() < 1e-3
    # Gradients (onehot - p) hinge on near-ties whose float32 logits are off by ~1e-3: compare
    # them at the precision the inputs carry, not at the 1e-5 of well-scaled logits.
    grad_logp = torch.randn(targets.shape, device=device)
    got = run(gk.token_logprobs, hidden, weight, None, targets, grad_logp, None, backend=backend)
    want = run(token_logprobs_reference, hidden, weight, None, targets, grad_logp, None)
    for g, w in zip(got[2][:2], want[2][:2]):
        assert rel_err(g, w) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_head_entropy_is_log_vocab(device, backend):
    vocab = 97
    hidden = torch.randn(5, 12, device=device)
    weight = torch.zeros(vocab, 12, device=device)
    targets = torch.randint(0, vocab, (5,), device=device)
    logp, entropy = gk.token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(vocab)), rtol=1e-6, atol=0)
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(vocab)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient_and_frozen_head(device, backend):
    hidden, weight, _, targets = make_inputs((13,), 18, 31, torch.float32, device)
    weight.requires_grad_(False)
    _, entropy = gk.token_logprobs(hidden, weight, targets, temperature=0.5, return_entropy=True, backend=backend)
    entropy.sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    _, ref_entropy = token_logprobs_reference(hidden, weight, targets, temperature=0.5, return_entropy=True)
    ref_entropy.sum().backward()
    assert weight.grad is None
    assert rel_err(got, hidden.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_bias(device, backend):
    # A bias that needs no gradient still enters the logits; the kernel must not scatter a
    # d bias into a buffer that is not there (it once wrote V floats into an M-float buffer).
    hidden, weight, bias, targets = make_inputs((40,), 24, 70, torch.float32, device, bias=True)
    bias.requires_grad_(False)
    (_, _, grads), _ = check_against_reference(hidden, weight, bias, targets, backend=backend,
                                               dtype=torch.float32, return_entropy=True)
    assert bias.grad is None


def test_double_backward_is_refused(device):
    hidden, weight, _, targets = make_inputs((5,), 16, 19, torch.float32, device)
    (grad_hidden,) = torch.autograd.grad(gk.token_logprobs(hidden, weight, targets).sum(), hidden,
                                         create_graph=True)
    # The kernels' gradients are not themselves differentiable: a clear error, not a silent 0.
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad_hidden.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(device, backend):
    hidden, weight, bias, _ = make_inputs((6,), 8, 17, torch.float32, device, bias=True)
    targets = torch.full((6,), -100, device=device)
    logp, entropy = gk.token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert (logp == 0).all() and (entropy == 0).all()
    for t in (hidden, weight, bias):
        assert (t.grad == 0).all()


def test_no_grad_runs_forward_only(device):
    hidden, weight, _, targets = make_inputs((7,), 16, 29, torch.float32, device)
    with torch.no_grad():
        logp = gk.token_logprobs(hidden, weight, targets)
    assert logp.grad_fn is None and not logp.requires_grad
    assert rel_err(logp, token_logprobs_reference(hidden, weight, targets)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_paths(device, backend, dtype, monkeypatch):
    # Several row chunks in the torch path; in the atomic Triton backward several row-chunk
    # launches and (bf16, exact) several vocabulary-chunk launches of the d-weight pass.
    monkeypatch.setattr(logprobs_torch_module, "_SLAB_BYTES", 4 * 47 * 5)
    monkeypatch.setattr(launch_module, "ATOMIC_GRAD_CHUNK_BYTES", 4 * 24 * 16)
    hidden, weight, bias, targets = make_inputs((45,), 24, 47, dtype, device, bias=True, masked=3)
    check_against_reference(hidden, weight, bias, targets, backend=backend, dtype=dtype,
                            return_entropy=True, temperature=0.9, backward="atomic")


def test_fast_single_pass_backward(device):
    # exact=False accumulates d weight in bf16 within one pass: within the bf16 tolerance at
    # this size (its error grows with N; exact=True does not - see the benchmark notes).
    hidden, weight, bias, targets = make_inputs((40,), 32, 53, torch.bfloat16, device, bias=True)
    check_against_reference(hidden, weight, bias, targets, backend="triton", dtype=torch.bfloat16,
                            return_entropy=True, exact=False, backward="atomic")


@pytest.mark.parametrize("backward", ["workspace", "atomic"])
def test_gradient_filtering(device, backward):
    hidden, weight, bias, targets = make_inputs((33,), 16, 61, torch.float32, device, bias=True)
    grad_logp = torch.randn(33, device=device)
    # A small eps keeps the gradient within tolerance...
    got = run(gk.token_logprobs, hidden, weight, bias, targets, grad_logp, None, filter_eps=2.0**-20,
              backend="triton", backward=backward)
    want = run(token_logprobs_reference, hidden, weight, bias, targets, grad_logp, None)
    assert all(rel_err(g, w) < 1e-5 for g, w in zip(got[2], want[2]))
    # ...and a huge one filters every tile: the filter really drops them (d bias too).
    skipped = run(gk.token_logprobs, hidden, weight, bias, targets, grad_logp, None, filter_eps=1e9,
                  backend="triton", backward=backward)
    assert all((g == 0).all() for g in skipped[2])


def test_int32_targets_and_noncontiguous_hidden(device):
    base = torch.randn(12, 2 * 20, device=device)
    hidden = base[:, ::2].requires_grad_()  # stride 2 in the last dim
    weight = torch.randn(23, 20, device=device, requires_grad=True)
    targets = torch.randint(0, 23, (12,), device=device, dtype=torch.int32)
    check_against_reference(hidden, weight, None, targets, backend="triton", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear Python error before any kernel launch
# ---------------------------------------------------------------------------------------------


def _ok(device):
    return torch.randn(4, 8, device=device), torch.randn(11, 8, device=device), torch.randint(0, 11, (4,), device=device)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda h, w, t: (h, w, torch.tensor([0, 1, 11, 2])), ValueError, "out-of-range"),
        (lambda h, w, t: (h, w, torch.tensor([0, -1, 3, 2])), ValueError, "out-of-range"),
        (lambda h, w, t: (h, w, t[:3]), ValueError, "targets shape"),
        (lambda h, w, t: (h[:, :7], w, t), ValueError, "last dim"),
        (lambda h, w, t: (h, w.double(), t), TypeError, "dtype"),
        (lambda h, w, t: (h, w.half(), t), TypeError, "weight dtype"),
        (lambda h, w, t: (h, w, t.float()), TypeError, "targets"),
        (lambda h, w, t: (h[:0], w, t[:0]), ValueError, "empty"),
        (lambda h, w, t: (h, w[0], t), ValueError, "2-D"),
        (lambda h, w, t: (h, w.to("meta"), t), ValueError, "is on meta"),
    ],
)
def test_bad_input(device, mutate, error, match):
    hidden, weight, targets = mutate(*_ok(device))
    with pytest.raises(error, match=match):
        gk.token_logprobs(hidden, weight, targets.to(device) if targets.device.type != "meta" else targets)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(device, temperature):
    hidden, weight, targets = _ok(device)
    with pytest.raises(ValueError, match="temperature"):
        gk.token_logprobs(hidden, weight, targets, temperature=temperature)


def test_bad_bias(device):
    hidden, weight, targets = _ok(device)
    with pytest.raises(ValueError, match="bias"):
        gk.token_logprobs(hidden, weight, targets, bias=torch.zeros(10, device=device))


def test_unknown_backend(device):
    with pytest.raises(ValueError, match="backend"):
        gk.token_logprobs(*_ok(device), backend="cuda")


# ---------------------------------------------------------------------------------------------
# Soft-capping, K targets per row, lse (issue 14)
# ---------------------------------------------------------------------------------------------


def run_full(fn, hidden, weight, bias, targets, cotangents, **kwargs):
    """Forward with entropy and lse; backward of <g_logp, logp> + <g_ent, entropy> + <g_lse, lse>."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    outputs = fn(hidden, weight, targets, bias=bias, return_entropy=True, return_lse=True, **kwargs)
    sum(((out * g).sum() for out, g in zip(outputs, cotangents) if g is not None)).backward()
    grads = [t.grad.clone() if t is not None and t.grad is not None else None for t in (hidden, weight, bias)]
    return [out.detach() for out in outputs], grads


def check_full(hidden, weight, bias, targets, *, dtype, cotangents=None, **kwargs):
    if cotangents is None:
        lead = hidden.shape[:-1]
        cotangents = (torch.randn(targets.shape, device=targets.device), torch.randn(lead, device=targets.device),
                      torch.randn(lead, device=targets.device))
    reference_kwargs = {k: v for k, v in kwargs.items()
                        if k not in ("exact", "filter_eps", "backend", "deterministic", "batch_invariant", "backward",
                                     "workspace_bytes")}
    got = run_full(gk.token_logprobs, hidden, weight, bias, targets, cotangents, **kwargs)
    want = run_full(token_logprobs_reference, hidden, weight, bias, targets, cotangents, **reference_kwargs)
    value_tol, grad_tol = TOLERANCE[dtype]
    for name, g, w in zip(("logp", "entropy", "lse"), got[0], want[0]):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert rel_err(g, w) < value_tol, name
    for name, g, w, t in zip(("hidden", "weight", "bias"), got[1], want[1], (hidden, weight, bias)):
        if t is not None and t.requires_grad:
            assert g.dtype == t.dtype, f"grad {name} dtype"
            assert rel_err(g, w) < grad_tol, f"grad {name}"
    return got, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_matches_reference(device, backend, dtype):
    # |y| spreads to ~3x the cap: logits near the cap (tanh saturating, d tanh -> 0) and far below.
    softcap = 4.0
    hidden, weight, bias, targets = make_inputs((23,), 19, 61, dtype, device, bias=True, masked=3,
                                                logit_scale=4.0)
    y = hidden.detach().float() @ weight.detach().float().t() + bias.detach().float()
    assert y.abs().max() > 2.5 * softcap and (y.abs() < 0.5 * softcap).any()
    (logp, _, lse), _ = check_full(hidden, weight, bias, targets, dtype=dtype, softcap=softcap, temperature=0.8,
                                   backend=backend)[0]
    # every capped logit lies in [-cap/T, cap/T]: so does the target's, logp + lse
    assert ((logp + lse).abs() <= softcap / 0.8 + 1e-4)[targets != -100].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_far_beyond_the_cap(device, backend):
    # |y| ~ 1e3 x the cap: tanh saturates to +-1 exactly; values and gradients stay finite.
    # Most gradients are then ~0 (d tanh ~ e^{-2|y|/cap}): compare them on the scale of the largest,
    # at the precision float32 logits of size 1e3 carry near the cap (as in the extreme-logit test).
    hidden, weight, _, targets = make_inputs((9,), 16, 37, torch.float32, device, logit_scale=400.0)
    cotangents = (torch.randn(9, device=device), torch.randn(9, device=device), torch.randn(9, device=device))
    got = run_full(gk.token_logprobs, hidden, weight, None, targets, cotangents, softcap=0.5, backend=backend)
    want = run_full(token_logprobs_reference, hidden, weight, None, targets, cotangents, softcap=0.5)
    for g, w in zip(got[0], want[0]):
        assert rel_err(g, w) < 1e-5
    for g, w in zip(got[1][:2], want[1][:2]):
        assert torch.isfinite(g).all() and (g - w).abs().max() <= 1e-3 * w.abs().max()


@pytest.mark.parametrize("backend,backward", [("triton", "workspace"), ("triton", "atomic"), ("torch", "workspace")])
def test_k_targets_per_row(device, backend, backward):
    vocab, k = 53, 4
    hidden, weight, bias, _ = make_inputs((3, 7), 18, vocab, torch.float32, device, bias=True)
    targets = torch.randint(0, vocab, (3, 7, k), device=device)
    targets[0, 1, 2] = targets[0, 1, 0]  # a repeated id: its gradients add up
    targets[1, 2, 3] = targets[1, 2, 1] = targets[1, 2, 0]
    targets[2, 0, 1] = -100  # ignored entries
    targets[2, 3] = -100  # a row with every entry ignored
    (logp, entropy, lse), _ = check_full(hidden, weight, bias, targets, dtype=torch.float32, temperature=1.3,
                                         backend=backend, backward=backward)[0]
    assert logp.shape == (3, 7, k) and entropy.shape == lse.shape == (3, 7)
    assert logp[0, 1, 2] == logp[0, 1, 0] and logp[2, 0, 1] == 0
    assert (logp[2, 3] == 0).all() and entropy[2, 3] == 0 and lse[2, 3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_alone(device, backend):
    # A z-loss: only lse carries a gradient (d lse / d z = p), through the extra-column trick.
    # (Also the adaptive, not batch-invariant, vocabulary split: 3 splits for 17 rows here.)
    hidden, weight, _, targets = make_inputs((17,), 20, 43, torch.float32, device, masked=2)
    lead = targets.shape
    check_full(hidden, weight, None, targets, dtype=torch.float32, backend=backend, temperature=0.6,
               cotangents=(None, None, 2 * torch.randn(lead, device=device)), batch_invariant=False)


# ---------------------------------------------------------------------------------------------
# Batch invariance and deterministic backward (issue 14)
# ---------------------------------------------------------------------------------------------


def test_batch_invariant_forward(device, monkeypatch):
    # The same 5 rows alone (batches of 1), in a batch of 7 and in a batch of 300, at random
    # positions, with ignored rows interleaved: bitwise-equal log-probs, entropies and lse.
    # V = 67: 3 vocabulary splits. 64-row tiles keep the interpreter quick at 300 rows. Raster
    # groups of 2 row blocks: 300 rows are 3 groups, the last one partial.
    monkeypatch.setattr(launch_module, "INTERPRETER_CONFIG", launch_module.LaunchConfig(64, 16, 16, 1, 1))
    monkeypatch.setattr(launch_module, "FORWARD_GROUP_ROWS", 2)
    dim, vocab = 16, 67
    weight = torch.randn(vocab, dim, device=device) / 4
    probe_hidden = torch.randn(5, dim, device=device)
    probe_targets = torch.randint(0, vocab, (5,), device=device)

    def probe_outputs(hidden, targets, position, probes):
        """[len(probes), 3]: (logp, entropy, lse) of probe rows `probes` placed at `position`."""
        hidden, targets = hidden.clone(), targets.clone()
        hidden[position], targets[position] = probe_hidden[probes], probe_targets[probes]
        out = gk.token_logprobs(hidden, weight, targets, return_entropy=True, return_lse=True)
        return torch.stack([o[position] for o in out], dim=1)

    first = torch.tensor([0], device=device)
    alone = torch.cat([probe_outputs(probe_hidden[:1], probe_targets[:1], first, torch.tensor([i], device=device))
                       for i in range(5)])
    assert (alone[:, 0] < 0).all()
    for batch_size in (7, 300):
        hidden = torch.randn(batch_size, dim, device=device)
        targets = torch.randint(0, vocab, (batch_size,), device=device)
        targets[torch.rand(batch_size, device=device) < 0.3] = -100  # interleaved ignored rows
        position = torch.randperm(batch_size, device=device)[:5]
        got = probe_outputs(hidden, targets, position, torch.arange(5, device=device))
        assert torch.equal(got, alone), (batch_size, got - alone)


def test_workspace_backward_is_bitwise_reproducible(device):
    # Run, dirty the allocator with a call of other shapes (a read of a stale or uninitialized
    # buffer would then show), run again: bitwise-equal gradients. deterministic=True is the same
    # path. (No atomics at all: tests/test_compile_sm90.py reads it off the sm_90 PTX.)
    hidden, weight, bias, targets = make_inputs((20,), 16, 37, torch.bfloat16, device, bias=True, masked=4)
    lead = targets.shape
    cotangents = tuple(torch.randn(lead, device=device) for _ in range(3))
    kwargs = {"softcap": 3.0, "backend": "triton", "workspace_bytes": 16 * 32 * 2}
    _, first = check_full(hidden, weight, bias, targets, dtype=torch.bfloat16, cotangents=cotangents, **kwargs)[0]
    other = make_inputs((33,), 16, 53, torch.bfloat16, device, bias=True)
    run_full(gk.token_logprobs, *other, tuple(torch.randn(33, device=device) for _ in range(3)), **kwargs)
    _, second = run_full(gk.token_logprobs, hidden, weight, bias, targets, cotangents, deterministic=True, **kwargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked,frozen_weight", [(0, False), (5, False), (5, True)])
def test_workspace_backward_chunked(device, dtype, masked, frozen_weight):
    # A workspace of a few tiles: 2 vocabulary chunks (V = 47: 32 + 15 ids) x several row chunks,
    # with contiguous rows (d weight reads hidden in place) or scattered ones (gathered per chunk);
    # bias partials, soft-cap, K = 2 targets, entropy and lse gradients, temperature.
    hidden, weight, bias, _ = make_inputs((45,), 24, 47, dtype, device, bias=True)
    targets = torch.randint(0, 47, (45, 2), device=device)
    targets[torch.randperm(45, device=device)[:masked]] = -100
    weight.requires_grad_(not frozen_weight)
    elem = torch.finfo(dtype).bits // 8
    workspace = 16 * 32 * elem + 4 * 32 + 45 * launch_module.ROW_VECTOR_BYTES  # one [16, 32] chunk
    plan = launch_module.backward_plan(45 - masked, 47, 24, dtype, workspace, contiguous_rows=masked == 0,
                                       has_bias=True, weight_grad=not frozen_weight, device_type="cpu")
    assert (plan.ids_per_chunk, plan.rows_per_chunk) == (32, 16)
    check_full(hidden, weight, bias, targets, dtype=dtype, backend="triton", softcap=4.0, temperature=0.8,
               workspace_bytes=workspace)


def test_backward_plan_chunks_and_memory():
    bf16, mib = torch.bfloat16, 2**20
    # The shape: all rows in one chunk, 19 balanced vocabulary chunks, <= 512 MiB above
    # inputs and gradients (d logits + float32 d hidden), also when the rows must be gathered.
    for contiguous in (True, False):
        plan = launch_module.backward_plan(16384 - (not contiguous), 151936, 4096, bf16, contiguous_rows=contiguous)
        total = plan.workspace_bytes + plan.gathered_hidden_bytes + plan.accumulator_bytes
        assert plan.rows_per_chunk == 16384 - (not contiguous) and plan.ids_per_chunk % 128 == 0
        assert plan.workspace_bytes + plan.gathered_hidden_bytes <= launch_module.DEFAULT_WORKSPACE_BYTES
        assert total <= 512 * mib - 16384 * launch_module.ROW_VECTOR_BYTES, total / mib
    assert plan.gathered_hidden_bytes == 16383 * 4096 * 2
    plan = launch_module.backward_plan(16384, 151936, 4096, bf16)
    assert plan.ids_per_chunk == 8064 and plan.accumulator_bytes == 4 * 16384 * 4096  # 1187 tiles = 19 x 63 (.5)
    # A larger workspace: fewer vocabulary chunks; float32 inputs with contiguous rows: no accumulator.
    assert launch_module.backward_plan(16384, 151936, 4096, bf16, 2**30).ids_per_chunk > 8064
    assert launch_module.backward_plan(16384, 151936, 4096, torch.float32).accumulator_bytes == 0
    # Too many rows for MIN_IDS_PER_CHUNK ids: rows are chunked (balanced), d weight gets a float32 buffer.
    plan = launch_module.backward_plan(100_000, 151936, 4096, bf16)
    assert plan.ids_per_chunk == 2048 and plan.rows_per_chunk % 128 == 0 and plan.rows_per_chunk < 100_000
    assert plan.workspace_bytes <= launch_module.DEFAULT_WORKSPACE_BYTES
    assert plan.accumulator_bytes == 4 * 4096 * (100_000 + 2048)
    # A budget below one tile still gets one tile.
    assert launch_module.backward_plan(5, 7, 3, bf16, 1)[:2] == (5, 128)


# ---------------------------------------------------------------------------------------------
# Custom op: torch.compile, meta tensors, opcheck (issue 11 point 7)
# ---------------------------------------------------------------------------------------------


def test_meta_tensors_infer_shapes():
    hidden = torch.empty(2, 5, 8, device="meta")
    weight = torch.empty(11, 8, device="meta")
    logp, entropy, lse = gk.token_logprobs(hidden, weight, torch.empty(2, 5, 3, dtype=torch.long, device="meta"),
                                           return_entropy=True, return_lse=True)
    assert logp.shape == (2, 5, 3) and entropy.shape == lse.shape == (2, 5) and logp.device.type == "meta"
    assert gk.token_logprobs(hidden, weight, torch.empty(2, 5, dtype=torch.long, device="meta")).shape == (2, 5)


def test_compile_fullgraph_traces_through(device):
    hidden, weight, bias, targets = make_inputs((3, 5), 16, 29, torch.float32, device, bias=True, masked=2)

    def loss_fn(hidden, weight, bias, targets):
        logp, entropy = gk.token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, softcap=5.0)
        return (logp.sum() + 0.1 * entropy.sum()) * 2

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got_loss = compiled(hidden, weight, bias, targets)
    got_grads = torch.autograd.grad(got_loss, (hidden, weight, bias))
    want_loss = loss_fn(hidden, weight, bias, targets)
    want_grads = torch.autograd.grad(want_loss, (hidden, weight, bias))
    torch.testing.assert_close(got_loss, want_loss)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(device, backend):
    hidden, weight, bias, targets = make_inputs((6,), 8, 13, torch.float32, device, bias=True, masked=1)
    targets = targets[:, None].repeat(1, 2)
    args = (hidden, weight, bias, targets, 0.9, None, 3.0, -100, True, False, False, False, 0, True, None, True,
            "workspace", None, backend)
    torch.library.opcheck(torch.ops.grpo_kernels.token_logprobs.default, args)
    # every output, per-row temperatures, one target per row
    row_temperature = torch.rand(6, device=device) + 0.5
    args = (hidden, weight, bias, targets[:, :1], 1.0, row_temperature, None, -100, True, True, True, True, 3, True,
            None, True, "workspace", None, backend)
    torch.library.opcheck(torch.ops.grpo_kernels.token_logprobs.default, args)


# ---------------------------------------------------------------------------------------------
# Bad input of the new arguments, and ignore_index outside int32 (issue 10)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [2**32 + 3, -(2**31) - 1, 2**70])
def test_ignore_index_outside_int32_is_refused(device, ignore_index):
    # 2**32 + 3 once narrowed to int32 as 3 and silently ignored token 3; 2**70 a bare OverflowError.
    hidden, weight, _ = _ok(device)
    targets = torch.tensor([3, 1, 3, 2], device=device)
    with pytest.raises(ValueError, match="ignore_index must be an int32"):
        gk.token_logprobs(hidden, weight, targets, ignore_index=ignore_index)


def test_ignore_index_that_is_a_token_id(device):
    # an int32 ignore_index inside [0, V) is honoured: those entries are ignored, the others kept
    hidden, weight, _ = _ok(device)
    targets = torch.tensor([3, 1, 3, 2], device=device)
    logp = gk.token_logprobs(hidden, weight, targets, ignore_index=3)
    assert (logp[targets == 3] == 0).all() and (logp[targets != 3] < 0).all()


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("nan"), float("inf"), "big"])
def test_bad_softcap(device, softcap):
    with pytest.raises((ValueError, TypeError), match="softcap"):
        gk.token_logprobs(*_ok(device), softcap=softcap)


@pytest.mark.parametrize("targets_shape", [(4, 0), (3, 2), (4, 2, 1)])
def test_bad_k_targets_shape(device, targets_shape):
    hidden, weight, _ = _ok(device)
    with pytest.raises(ValueError, match="targets shape"):
        gk.token_logprobs(hidden, weight, torch.zeros(targets_shape, dtype=torch.long, device=device))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"backward": "fast"}, ValueError, "backward must be one of"),
    ({"backward": True}, ValueError, "backward must be one of"),
    ({"backward": None}, ValueError, "backward must be one of"),
    ({"workspace_bytes": 0}, ValueError, "workspace_bytes must be an int > 0"),
    ({"workspace_bytes": -5}, ValueError, "workspace_bytes must be an int > 0"),
    ({"workspace_bytes": 2.5e8}, TypeError, "workspace_bytes must be an int > 0"),
    ({"workspace_bytes": True}, TypeError, "workspace_bytes must be an int > 0"),
    ({"workspace_bytes": "1024"}, TypeError, "workspace_bytes must be an int > 0"),
    ({"deterministic": True, "backward": "atomic"}, ValueError, "deterministic=True needs backward='workspace'"),
])
def test_bad_backward_options(device, kwargs, error, match):
    with pytest.raises(error, match=match):
        gk.token_logprobs(*_ok(device), **kwargs)


LOGPROB_FLAGS = ("return_entropy", "return_lse", "exact", "batch_invariant", "deterministic")


@pytest.mark.parametrize("flag", LOGPROB_FLAGS)
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, torch.tensor(True)])
def test_flags_must_be_bools(device, flag, value):
    # bool("no") is True: a flag given as text (a config file, a CLI) meant its opposite
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        gk.token_logprobs(*_ok(device), **{flag: value})
    if flag != "deterministic":  # the single-device entry point the vocab-parallel head shares
        from grpo_kernels.ops.logprobs.op import single_device_logprobs

        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            single_device_logprobs(*_ok(device), **{flag: value})


def test_numpy_bool_flags_are_bools(device):
    np = pytest.importorskip("numpy")
    logp, entropy = gk.token_logprobs(*_ok(device), return_entropy=np.bool_(True))
    assert logp.shape == entropy.shape == (4,)


@pytest.mark.parametrize("name,value", [
    ("temperature", "0.5"), ("temperature", True), ("temperature", b"1"), ("temperature", [1.0]),
    ("softcap", "30"), ("softcap", True), ("softcap", torch.tensor(30.0)),
    ("filter_eps", "1e-3"), ("filter_eps", True),
])
def test_numbers_must_be_numbers(device, name, value):
    with pytest.raises(TypeError, match=f"{name} must be a number"):
        gk.token_logprobs(*_ok(device), **{name: value})


@pytest.mark.parametrize("group", ["world", object(), 1, 0.5, torch.zeros(1)])
def test_process_group_must_be_a_group(device, group):
    # "world" once failed deep inside with AttributeError: 'str' object has no attribute 'size'
    from grpo_kernels.ops.vocab_parallel import sharded_head_logprobs, vocab_parallel_logprobs

    hidden, weight, targets = _ok(device)
    for call in (lambda: gk.token_logprobs(hidden, weight, targets, process_group=group),
                 lambda: vocab_parallel_logprobs(hidden, weight, targets, group),
                 lambda: sharded_head_logprobs(hidden, weight, targets, group),
                 lambda: gk.fused_linear_grpo_loss(hidden[None], weight, targets[None], torch.ones(1, 4, device=device),
                                                   torch.ones(1, device=device), process_group=group),
                 lambda: gk.FusedLinearGRPOLoss(process_group=group)):
        with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup .* got "):
            call()


@pytest.mark.parametrize("flag", ["compiled", "use_ref_model", "use_bias_correction_kl"])
def test_module_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        gk.FusedLinearGRPOLoss(**{flag: "no"})


@pytest.mark.parametrize("kwargs", [{"backward": "atomic"}, {"workspace_bytes": 2**20}])
def test_vocab_parallel_refuses_backward_options(device, kwargs):
    with pytest.raises(ValueError, match="process_group .* does not support"):
        gk.token_logprobs(*_ok(device), process_group=object(), **kwargs)
