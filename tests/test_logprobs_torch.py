"""The chunked PyTorch log-prob drivers (``grpo_kernels.ops.logprobs.torch_path``) against float64.

Driver level (the interface every caller of ``drivers.BACKENDS["torch"]`` uses): K targets per row with
repeated and ignored ids, soft-capping near and beyond the cap, the returned lse, compacted rows,
several row and vocabulary tiles, fp32 and bf16. Then entropy precision at |z| ~ 1e4 through the
public API, and the memory contract (allocator bytes, not RSS: exact and machine-independent).
"""

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import grpo_kernels as gk
from grpo_kernels.ops.logprobs import torch_path as logprobs_torch
from grpo_kernels.ops.logprobs.torch_path import torch_backward, torch_forward
from grpo_kernels.reference import token_logprobs_reference

# (relative error bound on values, on gradients) per input dtype, as in test_logprobs.py
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-3, 2e-2)}


def rel_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def reference_driver(hidden, weight, bias, targets, rows, temperature, softcap):
    """float64 (logp [M, K], lse [M], entropy [M]) and the float64 leaves they depend on."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    hidden64, weight64, bias64 = leaves
    y = hidden64[rows.long()] @ weight64.t()
    if bias64 is not None:
        y = y + bias64
    z = (softcap * torch.tanh(y / softcap) if softcap is not None else y) / temperature
    lse = torch.logsumexp(z, dim=-1)
    row_targets = targets[rows.long()].long()
    inside = (row_targets >= 0) & (row_targets < weight.shape[0])
    target_logit = torch.where(inside, z.gather(1, row_targets.clamp(0, weight.shape[0] - 1)), 0.0)
    log_p = z - lse[:, None]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return target_logit - lse[:, None], lse, entropy, leaves


def make_case(num_rows, dim, vocab, num_targets, dtype, *, bias, logit_scale=1.0, ignored_rows=0):
    hidden = torch.randn(num_rows, dim).to(dtype)
    weight = (torch.randn(vocab, dim) * logit_scale / math.sqrt(dim)).to(dtype)
    bias_t = torch.randn(vocab).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (num_rows, num_targets), dtype=torch.int32)
    if num_targets > 1:
        targets[:, 1] = targets[:, 0]  # a repeated id: its gradient counts twice
        targets[0, -1] = -100  # ignore_index ...
        targets[-1, -1] = -1  # ... and "not in this vocabulary shard": both match no logit
    # compacted rows: every row but `ignored_rows` of them, not in order of position
    rows = torch.randperm(num_rows)[: num_rows - ignored_rows].sort().values.to(torch.int32)
    return hidden, weight, bias_t, targets, rows


def run_drivers(hidden, weight, bias, targets, rows, temperature, softcap, grad_logp, grad_ent):
    out = torch_forward(hidden, weight, bias, targets, rows, temperature, grad_ent is not None, softcap=softcap)
    logp, lse, entropy = out.target_logit - out.lse[:, None], out.lse, out.entropy
    grad_hidden = torch.zeros_like(hidden)
    grad_weight = torch.zeros_like(weight)
    grad_bias = torch.zeros(weight.shape[0]) if bias is not None else None
    mean_logit = lse - entropy if grad_ent is not None else None
    torch_backward(hidden, weight, bias, targets, rows, lse, mean_logit, grad_logp, grad_ent, temperature,
                   None, True, grad_hidden, grad_weight, grad_bias, softcap=softcap)
    return logp, lse, entropy, (grad_hidden, grad_weight, grad_bias)


def check_case(hidden, weight, bias, targets, rows, *, temperature=1.0, softcap=None, entropy=True):
    dtype = hidden.dtype
    num_targets = targets.shape[1]
    grad_logp = torch.randn(rows.numel(), num_targets)
    inside = (targets[rows.long()] >= 0) & (targets[rows.long()] < weight.shape[0])
    grad_logp[~inside & (targets[rows.long()] == -100)] = 0.0  # the Function sends 0 for ignored entries
    grad_ent = torch.randn(rows.numel()) if entropy else None

    logp, lse, ent, grads = run_drivers(hidden, weight, bias, targets, rows, temperature, softcap, grad_logp,
                                        grad_ent)
    want_logp, want_lse, want_ent, leaves = reference_driver(hidden, weight, bias, targets, rows, temperature,
                                                             softcap)
    objective = (want_logp * grad_logp.double()).sum()
    if entropy:
        objective = objective + (want_ent * grad_ent.double()).sum()
    objective.backward()

    value_tol, grad_tol = TOLERANCE[dtype]
    assert logp.shape == (rows.numel(), num_targets) and logp.dtype == torch.float32
    assert rel_err(logp, want_logp) < value_tol
    assert rel_err(lse, want_lse) < value_tol
    if entropy:
        assert rel_err(ent, want_ent) < value_tol
    else:
        assert ent is None
    for name, got, leaf in zip(("hidden", "weight", "bias"), grads, leaves):
        if leaf is None:
            continue
        assert got.dtype == (torch.float32 if name == "bias" else dtype), name
        assert rel_err(got, leaf.grad) < grad_tol, f"grad {name}"
    skipped = torch.ones(hidden.shape[0], dtype=torch.bool)
    skipped[rows.long()] = False
    assert (grads[0][skipped] == 0).all(), "rows outside `rows` must get no gradient"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 5 rows x 7 vocabulary ids, elementwise blocks of 2 rows: every case crosses row,
    vocabulary and block borders."""
    monkeypatch.setattr(logprobs_torch, "_SLAB_BYTES", 4 * 5 * 7)
    monkeypatch.setattr(logprobs_torch, "_MIN_SLAB_ROWS", 5)
    monkeypatch.setattr(logprobs_torch, "_BLOCK_BYTES", 4 * 2 * 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_rows,dim,vocab,num_targets,bias,ignored_rows,temperature,softcap",
    [
        (1, 7, 13, 1, False, 0, 1.0, None),  # N = 1
        (23, 29, 101, 3, True, 4, 0.7, None),  # D odd, V prime, K = 3, ignored rows, bias, T != 1
        (17, 16, 61, 2, True, 2, 1.3, 2.0),  # soft-cap, logits near and beyond the cap
        (41, 9, 17, 2, False, 0, 1.0, None),  # more rows than ids: 16-bit d weight rows-outer
    ],
)
def test_drivers_match_float64(small_tiles, dtype, num_rows, dim, vocab, num_targets, bias, ignored_rows,
                               temperature, softcap):
    logit_scale = 4.0 if softcap is not None else 1.0  # |y| up to ~4x the cap
    hidden, weight, bias_t, targets, rows = make_case(num_rows, dim, vocab, num_targets, dtype, bias=bias,
                                                      logit_scale=logit_scale, ignored_rows=ignored_rows)
    if softcap is not None:
        y = hidden.float() @ weight.float().t()
        assert (y.abs() > 2 * softcap).any() and (y.abs() < softcap).any()
    check_case(hidden, weight, bias_t, targets, rows, temperature=temperature, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_tiles_logprobs_only(dtype):
    # The production tile sizes (one tile here), no entropy gradient, 16-bit weight accumulator.
    hidden, weight, bias, targets, rows = make_case(9, 24, 50, 2, dtype, bias=True, ignored_rows=1)
    check_case(hidden, weight, bias, targets, rows, entropy=False, temperature=0.9)


def test_single_target_callers_keep_working(small_tiles):
    # Callers of the [N] interface get [M] log-probs, equal to the K = 1 column of [N, 1].
    hidden, weight, bias, targets, rows = make_case(12, 10, 31, 1, torch.float32, bias=True, ignored_rows=3)
    logp_1d, lse_1d, ent_1d = torch_forward(hidden, weight, bias, targets[:, 0], rows, 1.1, True)[:3]
    logp_2d, lse_2d, ent_2d = torch_forward(hidden, weight, bias, targets, rows, 1.1, True)[:3]
    assert logp_1d.shape == (rows.numel(),)  # (target logits: the log-probs plus lse)
    assert torch.equal(logp_1d, logp_2d[:, 0]) and torch.equal(lse_1d, lse_2d) and torch.equal(ent_1d, ent_2d)
    grad = torch.randn(rows.numel())
    grads = []
    for tgt, g in ((targets[:, 0], grad), (targets, grad[:, None])):
        gh, gw, gb = torch.zeros_like(hidden), torch.zeros_like(weight), torch.zeros(31)
        torch_backward(hidden, weight, bias, tgt, rows, lse_1d, None, g, None, 1.1, None, True, gh, gw, gb)
        grads.append((gh, gw, gb))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_tiling_does_not_change_results(monkeypatch):
    # Same numbers (to float32 rounding of the merge and of the sums' order) with one tile and
    # with many.
    hidden, weight, bias, targets, rows = make_case(30, 12, 47, 2, torch.float32, bias=True)
    grad_logp, grad_ent = torch.randn(30, 2), torch.randn(30)
    one = run_drivers(hidden, weight, bias, targets, rows, 1.0, None, grad_logp, grad_ent)
    monkeypatch.setattr(logprobs_torch, "_SLAB_BYTES", 4 * 4 * 6)
    monkeypatch.setattr(logprobs_torch, "_MIN_SLAB_ROWS", 4)
    assert logprobs_torch._tile_sizes(30, 47) == (4, 6)
    many = run_drivers(hidden, weight, bias, targets, rows, 1.0, None, grad_logp, grad_ent)
    for a, b in zip(one[:3] + one[3], many[:3] + many[3]):
        assert rel_err(b, a) < 1e-6


@pytest.mark.parametrize("offset", [1e4, -1e5])
def test_entropy_precision_at_large_logits(offset):
    # z = offset + small integers, exact in float32, so that only the entropy's form can err:
    # -sum p log p with log p = z - lse cancels to ~1e-3 absolute at |z| ~ 1e4 (the former
    # chunked path: 7e-4 at 1e4, 6e-3 at 1e5); the shift-invariant form keeps ~2e-7.
    hidden = torch.cat([torch.ones(64, 1), torch.randint(-3, 4, (64, 2)).float()], dim=1)
    weight = torch.cat([torch.full((37, 1), offset), torch.randint(-2, 3, (37, 2)).float()], dim=1)
    targets = torch.randint(0, 37, (64,))
    _, entropy = gk.token_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
    _, ref_entropy = token_logprobs_reference(hidden, weight, targets, return_entropy=True)
    assert ref_entropy.max() > 0.5  # far from one-hot: the form matters
    assert (entropy - ref_entropy).abs().max() < 2e-6


# ---------------------------------------------------------------------------------------------
# Memory: bytes through the CPU allocator, peak over the call (profiler memory events)
# ---------------------------------------------------------------------------------------------


def allocator_peak_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) through the allocator while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_memory_is_flat_in_rows_and_vocabulary(monkeypatch):
    # Above its inputs and gradients, a forward or backward holds one logits slab, two scratch
    # blocks and O(rows) vectors: no [rows, V] logits, no [V, D] temporary, the same for 4x the
    # rows and 4x the vocabulary. (The former path allocated a [V, D] product per row chunk and
    # several [chunk, V] slabs at once.)
    slab_rows, slab_vocab, dim = 32, 128, 96
    slab_bytes = 4 * slab_rows * slab_vocab
    monkeypatch.setattr(logprobs_torch, "_SLAB_BYTES", slab_bytes)
    monkeypatch.setattr(logprobs_torch, "_MIN_SLAB_ROWS", slab_rows)
    monkeypatch.setattr(logprobs_torch, "_BLOCK_BYTES", slab_bytes // 4)

    def peak(num_rows, vocab):
        hidden, weight, bias, targets, rows = make_case(num_rows, dim, vocab, 2, torch.float32, bias=True)
        grad_logp, grad_ent = torch.randn(num_rows, 2), torch.randn(num_rows)
        lse = torch.zeros(num_rows)
        grads = torch.zeros_like(hidden), torch.zeros_like(weight), torch.zeros(vocab)
        forward_peak = allocator_peak_bytes(
            lambda: torch_forward(hidden, weight, bias, targets, rows, 0.8, True, softcap=30.0))
        backward_peak = allocator_peak_bytes(
            lambda: torch_backward(hidden, weight, bias, targets, rows, lse, lse, grad_logp, grad_ent, 0.8, None,
                                   True, *grads, softcap=30.0))
        # per-row state and [vocab chunk] / [row chunk, D] pieces, none of them a slab's size
        small = 16 * num_rows * 4 + 8 * slab_rows * dim * 4 + 8 * slab_vocab * 4
        assert forward_peak <= 1.25 * slab_bytes + small, forward_peak
        assert backward_peak <= 1.5 * slab_bytes + small, backward_peak
        # and below one [V, D] gradient
        assert backward_peak < vocab * dim * 4
        return forward_peak, backward_peak, small

    base = peak(64, 256)
    for num_rows, vocab in ((256, 256), (64, 1024)):
        grown = peak(num_rows, vocab)
        for before, after in zip(base[:2], grown[:2]):
            assert after - before <= grown[2] - base[2], (before, after)


def test_every_output_stays_within_the_memory_bound(monkeypatch):
    # The forward with every statistic and a top-64 holds no [rows, V] buffer either: within the
    # op's bound above (the backward's 1.5 slabs), flat in rows and vocabulary.
    slab_rows, slab_vocab, dim = 32, 128, 96
    slab_bytes = 4 * slab_rows * slab_vocab
    monkeypatch.setattr(logprobs_torch, "_SLAB_BYTES", slab_bytes)
    monkeypatch.setattr(logprobs_torch, "_MIN_SLAB_ROWS", slab_rows)
    monkeypatch.setattr(logprobs_torch, "_BLOCK_BYTES", slab_bytes // 4)
    stats = frozenset(("log_sum_sq_probs", "mean_logits", "is_top1"))

    def peak(num_rows, vocab):
        hidden, weight, bias, targets, rows = make_case(num_rows, dim, vocab, 1, torch.float32, bias=True)
        temperature = torch.rand(num_rows) + 0.5
        forward_peak = allocator_peak_bytes(lambda: torch_forward(
            hidden, weight, bias, targets, rows, temperature, True, softcap=30.0, stats=stats, topk=64))
        # per-row state, the [rows, 64] top-k keys, their unpacking and the outputs (~36 bytes an
        # entry at the peak: O(rows k), never O(rows V)), and [vocab chunk] / [row chunk, D] pieces
        small = 16 * num_rows * 4 + 48 * 64 * num_rows + 8 * slab_rows * dim * 4 + 8 * slab_vocab * 4
        assert forward_peak <= 1.5 * slab_bytes + small, (forward_peak, slab_bytes, small)
        return forward_peak, small

    base = peak(64, 256)
    for num_rows, vocab in ((256, 256), (64, 1024)):
        grown = peak(num_rows, vocab)
        assert grown[0] - base[0] <= grown[1] - base[1], (base, grown)
