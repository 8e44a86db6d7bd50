"""Packed sequences (``cu_seqlens``) in the loss: a packed batch gives the loss, metrics and
gradients of its padded ``[S, T]`` layout (<= 1e-6 in float32, relative to the value's scale) and
of the float64 reference, for every loss type and every sequence-level option, on both CPU paths.

The packs: an empty sequence, sequences of one token, masked tokens inside sequences, more
sequences than one kernel program holds (BLOCK_B = 4) and, in ``LONG``, sequences across the
kernel's BLOCK_T = 256 tile boundary. The padded layout puts garbage (finite) under mask 0, and
rollout IS ratio 1 (TRL's padding value, which VESPO's sum over every position reads).
"""

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from grpo_kernels.ops.grpo_loss import LOSS_TYPES, metric_names, rollout_correction
from grpo_kernels.ops.grpo_loss.kernel import BLOCK_B, BLOCK_T
from grpo_kernels.reference import grpo_loss_reference
from test_grpo_loss import BACKENDS, assert_close

LENGTHS = (5, 1, 0, 9, 3, 7)  # 6 sequences: two kernel programs; an empty one; one of a single token
LONG = (BLOCK_T + 44, 2, 0, BLOCK_T + 4, 1)  # across the tile boundary along the tokens
assert len(LENGTHS) > BLOCK_B and max(LONG) > BLOCK_T
PACKED_TOL = 1e-6  # packed vs padded, float32: |got - want| <= 1e-6 * max(1, |want|)


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


def make_packed(lengths=LENGTHS, *, cu_dtype=torch.int64, per_token_advantages=False):
    """A packed batch: token tensors [N], per-sequence tensors [S], cu_seqlens [S + 1]."""
    S, N = len(lengths), sum(lengths)
    cu = torch.zeros(S + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    logp = -torch.rand(N) * 3 - 0.05
    mask = (torch.rand(N) > 0.25).long()
    mask[cu[:-1][torch.tensor(lengths) > 0]] = 1  # every non-empty sequence has a token
    old = logp + 0.3 * torch.randn(N)
    adv = torch.randn(N if per_token_advantages else S)
    return dict(
        lengths=tuple(lengths), cu=cu.to(cu_dtype), logp=logp, mask=mask, old=old,
        ref=logp + 0.3 * torch.randn(N), sampling=old + 0.3 * torch.randn(N), entropy=torch.rand(N) * 2, adv=adv,
        is_token=torch.exp(0.4 * torch.randn(N)), is_seq=torch.exp(0.4 * torch.randn(S)))


def pad(batch, T=None):
    """The padded [S, T] layout of a packed batch (T: the longest sequence + 2)."""
    lengths, cu = batch["lengths"], batch["cu"].long()
    S, T = len(lengths), T or max(lengths) + 2
    rows = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    cols = torch.arange(sum(lengths)) - cu[rows]

    def padded(values, fill):
        out = torch.randn(S, T) * 0.3 - 1.0 if fill is None else torch.full((S, T), fill, dtype=values.dtype)
        out = out.to(values.dtype)
        out[rows, cols] = values
        return out

    out = {name: padded(batch[name], None) for name in ("logp", "old", "ref", "sampling", "entropy")}
    out["mask"] = padded(batch["mask"], 0)
    out["is_token"] = padded(batch["is_token"], 1.0)
    out["adv"] = batch["adv"] if batch["adv"].shape[0] == S else padded(batch["adv"], None)  # [S]: per sequence
    out["is_seq"] = batch["is_seq"]
    out["unpad"] = lambda grad: grad[rows, cols]
    return out


def run(fn, batch, inputs, *, packed, one_row=False, **options):
    """(loss, metrics, d loss / d logp, d loss / d entropy) of ``fn`` on ``inputs`` (names of the
    batch's tensors: old, ref, sampling, entropy, is_token, is_seq), packed or padded."""
    def given(name):
        value = batch[name]
        return value[None] if one_row and packed and value.shape == batch["logp"].shape else value

    logp = given("logp").clone().requires_grad_()
    entropy = given("entropy").clone().requires_grad_() if "entropy" in inputs else None
    kwargs = {f"{name}_logprobs": given(name) for name in ("old", "ref", "sampling") if name in inputs}
    for name in ("is_token", "is_seq"):
        if name in inputs:
            kwargs["rollout_is_ratio"] = given(name)
    if packed:
        kwargs["cu_seqlens"] = batch["cu"]
    if "generator" in options:  # Clip-Cov's draw: the same seed for every run
        options = dict(options, generator=torch.Generator().manual_seed(options["generator"]))
    loss, metrics = fn(logp, given("mask"), given("adv"), entropy=entropy, **kwargs, **options)
    loss.backward()
    grads = [logp.grad, entropy.grad if entropy is not None else None]
    return loss.detach().double(), {k: v.double() for k, v in metrics.items()}, grads


def max_err(got, want) -> float:
    """max |got - want| / max(1, |want|), NaNs where both are NaN agreeing."""
    got, want = got.double(), want.double()
    both_nan = torch.isnan(got) & torch.isnan(want)
    err = ((got - want).abs() / want.abs().clamp(min=1.0)).masked_fill(both_nan, 0.0)
    return float(err.max()) if err.numel() else 0.0


def check_packed(backend, lengths=LENGTHS, inputs=("old", "ref", "entropy"), *, batch=None, one_row=False,
                 tol=PACKED_TOL, **options):
    """Packed == padded (same backend) within ``tol``, and both == the float64 reference."""
    batch = batch or make_packed(lengths)
    padded = pad(batch)
    got = run(gk.grpo_loss, batch, inputs, packed=True, one_row=one_row, backend=backend, **options)
    want = run(gk.grpo_loss, padded, inputs, packed=False, backend=backend, **options)
    oracle = run(grpo_loss_reference, padded, inputs, packed=False, **options)
    assert set(got[1]) == set(want[1]) == set(metric_names(options.get("loss_type", "dapo"),
                                                          options.get("rollout_is") is not None
                                                          or options.get("rollout_rs") is not None))
    errors = {"loss": max_err(got[0], want[0])}
    errors.update({f"metric {name}": max_err(got[1][name], want[1][name]) for name in got[1]})
    got_grad = got[2][0].reshape(-1)
    errors["d logp"] = max_err(got_grad, padded["unpad"](want[2][0]))
    assert not want[2][0][padded["mask"] == 0].any(), "padding must get no gradient"
    if got[2][1] is not None:
        errors["d entropy"] = max_err(got[2][1].reshape(-1), padded["unpad"](want[2][1]))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"packed vs padded: {worst} off by {errors[worst]:.3g} ({errors})"
    assert_close(got[0], oracle[0], "loss vs reference")
    for name in got[1]:
        assert_close(got[1][name], oracle[1][name], f"metric {name} vs reference")
    assert_close(got_grad, padded["unpad"](oracle[2][0]), "d logp vs reference")
    return got, errors


TYPE_OPTIONS = {
    "dr_grpo": dict(max_completion_length=11), "cispo": dict(epsilon_high=1.1), "dro": dict(dro_beta=0.5),
    "kl_cov": dict(kl_cov_ratio=0.2), "clip_cov": dict(clip_cov_ratio=0.2, clip_cov_lb=-1.0, generator=7),
    "rloo": dict(epsilon_high=0.28), "geo_mean": dict(epsilon_low=0.1, epsilon_high=0.1),
}
SEQUENCE_LEVEL = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def loss_type_cases():
    for loss_type in LOSS_TYPES:
        yield loss_type, "token"
        if loss_type in SEQUENCE_LEVEL:
            yield loss_type, "sequence"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level", list(loss_type_cases()))
def test_every_loss_type(backend, loss_type, level):
    got, _ = check_packed(backend, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                          entropy_coef=0.01, **TYPE_OPTIONS.get(loss_type, {}))
    assert got[2][0].abs().sum() > 0


# Every sequence-level option (and the per-sequence inputs), on a loss type that allows it.
SEQUENCE_OPTIONS = {
    "off_policy_mask": (("old", "sampling"), dict(loss_type="grpo", off_policy_mask_threshold=0.0)),
    "off_policy_mask_gspo": (("old", "sampling", "ref"), dict(loss_type="dapo", importance_sampling_level="sequence",
                                                              off_policy_mask_threshold=0.05, beta=0.04)),
    "rollout_is_sequence": (("old", "sampling"), dict(loss_type="grpo", rollout_is="sequence",
                                                      rollout_is_mode="truncate", rollout_is_clip_max=1.5)),
    "rollout_is_sequence_normalized": (("old", "sampling"), dict(loss_type="gpg", rollout_is="sequence",
                                                                 rollout_is_batch_normalize=True)),
    "rollout_is_token_normalized_bypass": (("old",), dict(loss_type="reinforce", rollout_is="token", bypass_mode=True,
                                                          rollout_is_mode="mask", rollout_is_clip_min=0.8,
                                                          rollout_is_clip_max=1.25, rollout_is_batch_normalize=True)),
    "rs_seq_sum_k1": (("old", "sampling"), dict(loss_type="dapo", rollout_rs="seq_sum_k1", rollout_rs_threshold=1.5)),
    "rs_seq_mean_k3": (("old", "sampling"), dict(loss_type="grpo", importance_sampling_level="sequence",
                                                 rollout_rs="seq_mean_k3", rollout_rs_threshold=0.04)),
    "rs_seq_max_k2_bypass": (("old",), dict(loss_type="bnpo", rollout_rs="seq_max_k2", rollout_rs_threshold=0.1,
                                            bypass_mode=True, rollout_is="sequence")),
    "rs_seq_max_kpop": (("old", "sampling"), dict(loss_type="rloo", rollout_rs="seq_max_kpop",
                                                  rollout_rs_threshold=0.02)),
    "rs_token_k1": (("old", "sampling"), dict(loss_type="grpo", importance_sampling_level="sequence",
                                              rollout_rs="token_k1", rollout_rs_threshold=1.4)),
    "agg_token_mean": (("old",), dict(loss_type="grpo", loss_agg_mode="token-mean")),
    "agg_token_sum": (("old",), dict(loss_type="grpo", loss_agg_mode="token-sum")),
    "agg_seq_mean_token_sum": (("old",), dict(loss_type="grpo", loss_agg_mode="seq-mean-token-sum")),
    "agg_seq_mean_token_mean": (("old",), dict(loss_type="dapo", loss_agg_mode="seq-mean-token-mean",
                                               importance_sampling_level="sequence")),
    "agg_seq_mean_token_sum_norm": (("old",), dict(loss_type="reinforce", loss_agg_mode="seq-mean-token-sum-norm",
                                                   loss_scale_factor=13.0)),
    "agg_global_batch_size": (("old",), dict(loss_type="gpg", loss_agg_mode="seq-mean-token-mean",
                                             global_batch_size=20, dp_size=2)),
    "is_ratio_per_sequence": (("old", "is_seq"), dict(loss_type="grpo", rollout_is_mode="mask",
                                                      rollout_is_clip_min=0.7, rollout_is_clip_max=1.6)),
    "is_ratio_per_token": (("old", "is_token"), dict(loss_type="luspo", importance_sampling_level="sequence")),
    "vespo_is_ratio_per_sequence": (("old", "is_seq"), dict(loss_type="vespo")),
    "vespo_is_ratio_per_token": (("old", "is_token", "ref"), dict(loss_type="vespo", beta=0.04)),
    "entropy_mask_and_bonus_gspo": (("old", "entropy"), dict(loss_type="grpo", importance_sampling_level="sequence",
                                                             top_entropy_quantile=0.5, entropy_coef=0.05)),
    "bias_corrected_kl_gspo": (("old", "ref"), dict(loss_type="bnpo", importance_sampling_level="sequence",
                                                    beta=0.1, use_bias_correction_kl=True)),
    "no_old_logprobs_gspo": (("ref",), dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.04)),
    "dual_clip_gspo": (("old",), dict(loss_type="dr_grpo", importance_sampling_level="sequence", clip_ratio_c=3.0,
                                      max_completion_length=11, delta=1.5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SEQUENCE_OPTIONS))
def test_sequence_level_options(backend, case):
    inputs, options = SEQUENCE_OPTIONS[case]
    check_packed(backend, inputs=inputs, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_advantages_one_row_layout_and_int32(backend):
    """Per-token advantages [N]; [1, N] token tensors (verl's remove-padding layout); int32 cu_seqlens."""
    batch = make_packed(cu_dtype=torch.int32, per_token_advantages=True)
    check_packed(backend, batch=batch, one_row=True, loss_type="geo_mean", beta=0.04)
    check_packed(backend, batch=batch, loss_type="luspo", importance_sampling_level="sequence",
                 off_policy_mask_threshold=0.0, inputs=("old", "sampling"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [LONG, (1,), (4,), (0, 0, 3), (1, 1, 1, 1, 1)], ids=str)
def test_odd_packs(backend, lengths):
    """Sequences across the tile boundary, one sequence, empty sequences, all of length one
    (S = N: a 1-D [S] advantages is per sequence, which is the same)."""
    for level, loss_type in (("sequence", "grpo"), ("token", "vespo")):
        check_packed(backend, lengths, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                     inputs=("old", "ref", "entropy", "is_seq"), entropy_coef=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_and_fractional_mask(backend):
    batch = make_packed()
    batch["mask"] = batch["mask"] * torch.rand(batch["mask"].shape).round(decimals=1)
    check_packed(backend, batch=batch, loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                 off_policy_mask_threshold=0.01, inputs=("old", "ref", "sampling"))
    batch = make_packed()
    batch["logp"] = batch["logp"].bfloat16()
    padded = pad(batch)
    got = run(gk.grpo_loss, batch, ("old", "ref"), packed=True, backend=backend, loss_type="grpo", beta=0.04,
              importance_sampling_level="sequence")
    want = run(gk.grpo_loss, padded, ("old", "ref"), packed=False, backend=backend, loss_type="grpo", beta=0.04,
               importance_sampling_level="sequence")
    assert got[2][0].dtype == torch.bfloat16
    assert max_err(got[0], want[0]) <= PACKED_TOL
    # the float32 gradients agree to 1e-6: their bf16 roundings within one bf16 ulp
    assert_close(got[2][0], padded["unpad"](want[2][0]), "bf16 d logp", rtol=2**-8, atol=1e-6)


def test_backends_agree_on_a_long_pack():
    batch = make_packed(LONG)
    options = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, cu_seqlens=batch["cu"])
    results = []
    for backend in BACKENDS:
        logp = batch["logp"].clone().requires_grad_()
        loss, _ = gk.grpo_loss(logp, batch["mask"], batch["adv"], old_logprobs=batch["old"],
                               ref_logprobs=batch["ref"], backend=backend, **options)
        loss.backward()
        results.append((loss.detach(), logp.grad))
    assert_close(results[0][0], results[1][0], "loss")
    assert_close(results[0][1], results[1][1], "grad")


def test_sequence_level_terms_see_their_own_sequence():
    """A packed sequence's GSPO ratio is its own: changing one sequence's log-probs changes the
    gradient of that sequence's tokens only (under a per-sequence mean aggregation)."""
    batch = make_packed()
    cu = batch["cu"]
    base = run(gk.grpo_loss, batch, ("old",), packed=True, loss_type="grpo", importance_sampling_level="sequence",
               backend="torch")
    batch["old"] = batch["old"].clone()
    batch["old"][cu[3]:cu[4]] -= 0.5  # sequence 3
    moved = run(gk.grpo_loss, batch, ("old",), packed=True, loss_type="grpo", importance_sampling_level="sequence",
                backend="torch")
    changed = (base[2][0] != moved[2][0]).nonzero().squeeze(1)
    assert len(changed) > 0 and bool(((changed >= cu[3]) & (changed < cu[4])).all())


# ---------------------------------------------------------------------------------------------
# rollout_correction() and bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(rollout_is="sequence", rollout_rs="seq_mean_k1", rollout_rs_threshold=1.3, rollout_is_batch_normalize=True),
    dict(rollout_is="token", rollout_rs="seq_max_kpop", rollout_rs_threshold=0.02, rollout_is_mode="truncate",
         rollout_is_clip_max=1.3),
], ids=["sequence", "token"])
def test_rollout_correction_packed(options):
    batch = make_packed()
    cu = batch["cu"]
    batch["sampling"][cu[0]:cu[1]] = batch["old"][cu[0]:cu[1]]  # sequence 0 kept, sequence 3 rejected
    batch["sampling"][cu[3]:cu[4]] = batch["old"][cu[3]:cu[4]] - 1.0
    padded = pad(batch)
    kept, weight = rollout_correction(batch["logp"][None], batch["mask"][None], old_logprobs=batch["old"],
                                         sampling_logprobs=batch["sampling"], cu_seqlens=batch["cu"], **options)
    want_kept, want_weight = rollout_correction(padded["logp"], padded["mask"], old_logprobs=padded["old"],
                                                   sampling_logprobs=padded["sampling"], **options)
    assert kept.shape == weight.shape == (1, sum(batch["lengths"]))
    assert torch.equal(kept[0], padded["unpad"](want_kept))
    assert 0 < kept.sum() < (batch["mask"] != 0).sum()  # the criterion rejects some sequences, not all
    assert max_err(weight[0], padded["unpad"](want_weight)) <= PACKED_TOL


def _bad(**changes):
    batch = make_packed()
    args = dict(logprobs=batch["logp"], completion_mask=batch["mask"], advantages=batch["adv"],
                cu_seqlens=batch["cu"], old_logprobs=batch["old"])
    args.update(changes)
    return args


BAD_PACKED = [
    (dict(cu_seqlens=torch.tensor([0.0, 5.0])), TypeError, "cu_seqlens must have dtype"),
    (dict(cu_seqlens=torch.tensor([[0, 25]])), ValueError, "cu_seqlens must be 1-D"),
    (dict(cu_seqlens=torch.tensor([0])), ValueError, r"cu_seqlens must be \[S \+ 1\]"),
    (dict(cu_seqlens=torch.tensor([1, 5, 6, 6, 15, 18, 25])), ValueError, r"cu_seqlens\[0\] must be 0"),
    (dict(cu_seqlens=torch.tensor([0, 6, 5, 6, 15, 18, 25])), ValueError, "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 5, 6, 6, 15, 18, 24])), ValueError, r"cu_seqlens\[-1\] must equal the number"),
    (dict(logprobs=torch.zeros(5, 5)), ValueError, r"logprobs must be \[N\] or \[1, N\]"),
    (dict(completion_mask=torch.ones(24)), ValueError, "completion_mask must have N = 25"),
    (dict(advantages=torch.zeros(4)), ValueError, r"advantages must be \[S\] or \[S, 1\]"),
    (dict(old_logprobs=torch.zeros(2, 25)), ValueError, r"old_logprobs must be \[N\] or \[1, N\]"),
    (dict(loss_agg_mode="seq-mean-token-sum-norm"), ValueError, "needs loss_scale_factor"),
    (dict(loss_type="vespo", advantages=torch.zeros(25)), ValueError, "vespo' weighs whole sequences"),
]


@pytest.mark.parametrize("changes,error,match", BAD_PACKED, ids=[m for _, _, m in BAD_PACKED])
def test_bad_packed_input(changes, error, match):
    assert sum(LENGTHS) == 25
    args = _bad(**changes)
    with pytest.raises(error, match=match):
        gk.grpo_loss(args.pop("logprobs"), args.pop("completion_mask"), args.pop("advantages"), **args)


# ---------------------------------------------------------------------------------------------
# From hidden states: fused_linear_grpo_loss and FusedLinearGRPOLoss
# ---------------------------------------------------------------------------------------------


def make_fused_packed(lengths=LENGTHS, D=16, V=37, dtype=torch.float32):
    batch = make_packed(lengths)
    N = sum(lengths)
    batch["hidden"] = torch.randn(N, D).to(dtype)
    batch["weight"] = (torch.randn(V, D) / D**0.5 * 2).to(dtype)
    batch["bias"] = (torch.randn(V) * 0.5).to(dtype)
    batch["ids"] = torch.randint(0, V, (N,)).masked_fill(batch["mask"] == 0, V + 7)  # never read under mask 0
    padded = pad(batch)
    S, T = padded["mask"].shape
    rows = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    cols = torch.arange(N) - batch["cu"].long()[rows]
    padded["hidden"] = torch.randn(S, T, D).to(dtype)
    padded["hidden"][rows, cols] = batch["hidden"]
    padded["ids"] = torch.full((S, T), V + 3)
    padded["ids"][rows, cols] = batch["ids"]
    padded["weight"], padded["bias"] = batch["weight"], batch["bias"]
    return batch, padded


def run_fused_loss(batch, *, packed, hidden_shape=None, **options):
    hidden = batch["hidden"] if hidden_shape is None else batch["hidden"].reshape(hidden_shape)
    params = [t.clone().requires_grad_() for t in (hidden, batch["weight"], batch["bias"])]
    extra = dict(cu_seqlens=batch["cu"]) if packed else {}
    loss, metrics = gk.fused_linear_grpo_loss(params[0], params[1], batch["ids"], batch["mask"], batch["adv"],
                                              bias=params[2], old_logprobs=batch["old"], ref_logprobs=batch["ref"],
                                              temperature=0.7, **extra, **options)
    loss.backward()
    return loss.detach(), metrics, [p.grad for p in params]


def rel_err(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level", [("grpo", "sequence"), ("vespo", "token"), ("geo_mean", "token"),
                                             ("dr_grpo", "sequence")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_packed_equals_padded(backend, loss_type, level, dtype):
    batch, padded = make_fused_packed(dtype=dtype)
    options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, entropy_coef=0.01,
                   backend=backend, **TYPE_OPTIONS.get(loss_type, {}))
    got = run_fused_loss(batch, packed=True, hidden_shape=(1, *batch["hidden"].shape), **options)
    want = run_fused_loss(padded, packed=False, **options)
    assert max_err(got[0], want[0]) <= PACKED_TOL
    for name in got[1]:
        assert max_err(got[1][name], want[1][name]) <= PACKED_TOL, name
    grad_tol = PACKED_TOL if dtype == torch.float32 else 2**-8  # bf16 gradients: one rounding apart
    assert got[2][0].shape == (1, *batch["hidden"].shape) and got[2][0].dtype == dtype
    assert rel_err(got[2][0][0], padded["unpad"](want[2][0])) <= grad_tol, "d hidden"
    for name, g, w in zip(("weight", "bias"), got[2][1:], want[2][1:]):
        assert rel_err(g, w) <= grad_tol, f"d {name}"


def test_fused_module_packed_equals_padded():
    """FusedLinearGRPOLoss(...)(..., cu_seqlens=): Liger's forward on a packed batch ([1, N] tokens,
    [N, H] hidden states), reference log-probs from ref_input, as on the padded layout."""
    batch, padded = make_fused_packed()
    module = gk.FusedLinearGRPOLoss(beta=0.04, loss_type="grpo", importance_sampling_level="sequence",
                                    temperature=0.7)
    results = []
    for data, extra in ((batch, dict(cu_seqlens=batch["cu"])), (padded, {})):
        hidden = data["hidden"].clone().requires_grad_()
        weight = data["weight"].clone().requires_grad_()
        one_row = (lambda x: x[None]) if extra else (lambda x: x)
        loss, metrics = module(hidden, weight, one_row(data["ids"]), one_row(data["mask"]), data["adv"],
                               old_per_token_logps=one_row(data["old"]), ref_input=data["hidden"] * 0.9,
                               ref_weight=data["weight"], **extra)
        loss.backward()
        results.append((loss.detach(), metrics, hidden.grad, weight.grad))
    (loss, metrics, d_hidden, d_weight), (want_loss, want_metrics, want_hidden, want_weight) = results
    assert max_err(loss, want_loss) <= PACKED_TOL
    assert all(max_err(a, b) <= PACKED_TOL for a, b in zip(metrics, want_metrics))
    assert rel_err(d_hidden, padded["unpad"](want_hidden)) <= PACKED_TOL
    assert rel_err(d_weight, want_weight) <= PACKED_TOL


def test_fused_packed_bad_input():
    batch, _ = make_fused_packed()
    args = (batch["weight"], batch["ids"], batch["mask"], batch["adv"])
    with pytest.raises(ValueError, match=r"hidden must be \[N, D\] or \[1, N, D\]"):
        gk.fused_linear_grpo_loss(batch["hidden"][None, None], *args, cu_seqlens=batch["cu"])
    with pytest.raises(ValueError, match="completion_ids shape"):
        gk.fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["ids"][:-1], batch["mask"], batch["adv"],
                                  cu_seqlens=batch["cu"])
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
        gk.fused_linear_grpo_loss(batch["hidden"], *args, cu_seqlens=batch["cu"] - torch.tensor([0] * 6 + [1]))
