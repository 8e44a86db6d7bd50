"""grpo_loss and fused_linear_grpo_loss against the float64 reference of docs/semantics.md.

Loss, every metric, d loss / d logprobs (and d loss / d entropy) for every loss type x token /
sequence level x beta x delta, on both backends (the Triton kernel runs under TRITON_INTERPRET=1 on
CPU); the options one by one; the fused API's gradients w.r.t. hidden, weight and bias; bad input.
"""

import math

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from grpo_kernels.ops import grpo_loss as grpo_loss_module
from grpo_kernels.ops.grpo_loss import op as grpo_loss_op
from grpo_kernels.reference import grpo_loss_reference, token_logprobs_reference


@pytest.fixture(autouse=True)
def _on_test_device():
    # Every tensor these tests create lands on the GPU when there is one, so that the Triton
    # kernels run compiled there (and under the interpreter on CPU).
    with torch.device(DEVICE):
        yield

BACKENDS = ["triton", "torch"]
CLIP_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]
MAX_LEN = 11


def make_batch(B=4, T=7, device=None, *, advantage_per_token=False):
    """Log-probs with ratios that straddle both clip bounds, a fully masked row, a full row, a
    zero advantage and entropies; everything float32."""
    logp = -torch.rand(B, T, device=device) * 3 - 0.05
    mask = (torch.rand(B, T, device=device) > 0.35).long()
    mask[0] = 1
    if B > 1:
        mask[1] = 0
    old = logp + 0.3 * torch.randn(B, T, device=device)
    ref = logp + 0.3 * torch.randn(B, T, device=device)
    adv = torch.randn(B, T if advantage_per_token else 1, device=device).squeeze(-1)
    if not advantage_per_token:
        # row 0: A > 0 with a ratio above any upper clip; last row: A < 0 with one below the lower
        adv[0] = adv[0].abs() + 0.1
        old[0, 0] = logp[0, 0] - 0.6
        if B > 3:
            adv[2], adv[-1] = 0.0, -adv[-1].abs() - 0.1
            mask[-1, 0] = 1
            old[-1, 0] = logp[-1, 0] + 0.6
    entropy = torch.rand(B, T, device=device) * 2
    return dict(logp=logp, mask=mask, old=old, ref=ref, adv=adv, entropy=entropy)


def run_loss(fn, batch, *, with_old=True, with_ref=True, with_entropy=True, grad_scale=1.0, **options):
    logp = batch["logp"].clone().requires_grad_()
    entropy = batch["entropy"].clone().requires_grad_() if with_entropy else None
    loss, metrics = fn(logp, batch["mask"], batch["adv"],
                       old_logprobs=batch["old"] if with_old else None,
                       ref_logprobs=batch["ref"] if with_ref else None,
                       entropy=entropy, **options)
    (loss * grad_scale).backward()
    return loss.detach().double(), {k: v.double() for k, v in metrics.items()}, logp.grad, \
        (entropy.grad if entropy is not None else None)


def assert_close(got, want, what, rtol=2e-5, atol=2e-6):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True), \
        f"{what}: max abs err {(got - want).abs().max().item():.3g}\n got  {got}\n want {want}"


def check(batch, backend, *, ref_options=None, **options):
    """grpo_loss(backend) == grpo_loss_reference on loss, metrics and both gradients."""
    flags = {k: options.pop(k) for k in ("with_old", "with_ref", "with_entropy") if k in options}
    got = run_loss(gk.grpo_loss, batch, backend=backend, **flags, **options)
    want = run_loss(grpo_loss_reference, batch, **flags, **(ref_options or options))
    assert got[0].shape == () and math.isfinite(got[0].item())
    assert_close(got[0], want[0], "loss")
    rollout_correction = options.get("rollout_is") is not None or options.get("rollout_rs") is not None
    assert set(got[1]) == set(want[1]) == set(grpo_loss_module.metric_names(options.get("loss_type", "dapo"),
                                                                            rollout_correction))
    for name in got[1]:
        assert_close(got[1][name], want[1][name], f"metric {name}")
    assert got[2].dtype == batch["logp"].dtype
    assert_close(got[2], want[2], "d loss / d logprobs")
    if want[3] is not None and options.get("entropy_coef", 0.0) != 0:
        assert_close(got[3], want[3], "d loss / d entropy")
    else:
        assert got[3] is None or not got[3].any()
    return got, want


def loss_cases():
    for loss_type in CLIP_TYPES:
        for level in ("token", "sequence"):
            for beta in (0.0, 0.04):
                for delta in (None, 1.4):
                    yield loss_type, level, beta, delta
    for loss_type in ("cispo", "sapo"):
        for beta in (0.0, 0.04):
            yield loss_type, "token", beta, None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level,beta,delta", list(loss_cases()))
def test_loss_types(backend, loss_type, level, beta, delta):
    batch = make_batch()
    got, _ = check(batch, backend, loss_type=loss_type, importance_sampling_level=level, beta=beta, delta=delta,
                   epsilon_high=1.1 if loss_type == "cispo" else 0.28, max_completion_length=MAX_LEN)
    # the case exercises what it claims: some ratios clipped, grads non-trivial
    if loss_type in CLIP_TYPES and level == "token":
        assert got[1]["clip_ratio/region_mean"] > 0
    if level == "token" or beta != 0:  # a GSPO row can be clipped as a whole: zero gradient is right
        assert got[2].abs().sum() > 0
    assert not got[2][1].any(), "fully masked row must get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", CLIP_TYPES)
@pytest.mark.parametrize("per_token", [False, True], ids=["row-advantages", "token-advantages"])
def test_sequence_token_level(backend, loss_type, per_token):
    """GSPO-token (verl's gspo): the sequence ratio's value, each token's own gradient; with one
    advantage per row it is GSPO (TRL's 'sequence'), with advantages along a row it is not. The
    clamp of the sequence log-ratio from above zeroes a row's gradient through the ratio."""
    batch = make_batch(5, 9, advantage_per_token=per_token)
    options = dict(loss_type=loss_type, max_completion_length=MAX_LEN, epsilon_high=0.28)
    # (an entropy mask varies the multiplier along a row: then GSPO-token differs from GSPO anyway)
    check(batch, backend, importance_sampling_level="sequence_token", beta=0.04, entropy_coef=0.01,
          top_entropy_quantile=0.8, **options)
    token = check(batch, backend, importance_sampling_level="sequence_token", **options)[0]
    sequence = run_loss(gk.grpo_loss, batch, backend=backend, importance_sampling_level="sequence", **options)
    assert_close(token[0], sequence[0], "the same loss value")
    if per_token:
        assert (token[2] - sequence[2]).abs().max() > 1e-3, "token-level advantages: GSPO-token differs"
    else:
        assert_close(token[2], sequence[2], "one advantage per row: GSPO-token is GSPO")
    # a row whose mean log-ratio exceeds the clamp, A < 0 (unclipped): no gradient through its ratio,
    # which it has without the clamp
    batch["old"][0] = batch["logp"][0] - 12.0
    batch["adv"][0] = -batch["adv"][0].abs() - 0.1
    # row 3 at ratio 1, inside every clip, so that some row keeps its gradient (with random ratios
    # rows 3 and 4 can both sit outside the clip: seed 1088238058)
    batch["old"][3] = batch["logp"][3]
    batch["adv"][3] = batch["adv"][3].sign() * (batch["adv"][3].abs() + 0.1)
    for level in ("sequence", "sequence_token"):
        got, _ = check(batch, backend, importance_sampling_level=level, sequence_log_ratio_max=10.0, **options)
        assert not got[2][0].any() and got[2].any()
        assert run_loss(gk.grpo_loss, batch, backend=backend, importance_sampling_level=level, **options)[2][0].any()


OPTION_CASES = {
    "bias_corrected_kl": dict(beta=0.1, use_bias_correction_kl=True),
    "bias_corrected_kl_seq": dict(beta=0.1, use_bias_correction_kl=True, importance_sampling_level="sequence",
                                  loss_type="grpo"),
    "no_old_logprobs": dict(with_old=False, beta=0.04),
    "no_old_logprobs_seq": dict(with_old=False, importance_sampling_level="sequence", loss_type="bnpo"),
    "ref_only_for_metric": dict(beta=0.0),
    "no_ref_no_entropy": dict(with_ref=False, with_entropy=False),
    "entropy_bonus": dict(entropy_coef=0.05, loss_type="grpo"),
    "entropy_mask": dict(top_entropy_quantile=0.6, loss_type="dapo"),
    "entropy_bonus_and_mask_seq": dict(entropy_coef=0.02, top_entropy_quantile=0.3, beta=0.04,
                                       importance_sampling_level="sequence"),
    "entropy_mask_keep_none": dict(top_entropy_quantile=0.0, entropy_coef=0.1, loss_type="bnpo"),
    "off_policy_mask": dict(off_policy_mask_threshold=0.02, loss_type="grpo"),
    "off_policy_mask_seq": dict(off_policy_mask_threshold=0.0, importance_sampling_level="sequence", beta=0.04),
    "num_items_int": dict(num_items_in_batch=57),
    "num_items_tensor_cispo": dict(num_items_in_batch=torch.tensor(40.0), loss_type="cispo", epsilon_high=5.0),
    "sapo_temperatures": dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=2.0),
    "delta_below_clip": dict(delta=1.1, epsilon_high=0.28, loss_type="bnpo"),
    "wide_clip_low": dict(epsilon_low=0.05, epsilon_high=0.05, loss_type="dr_grpo", max_completion_length=7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options(backend, case):
    options = dict(OPTION_CASES[case])
    check(make_batch(), backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["token", "row", "row1"])
@pytest.mark.parametrize("mode", [None, "truncate", "mask"])
def test_rollout_is_ratio(backend, shape, mode):
    batch = make_batch()
    B, T = batch["logp"].shape
    full = torch.exp(0.5 * torch.randn(B, T))
    full[0, 0], full[-1, 0] = 2.5, 0.4  # outside [0.7, 1.6] in every shape
    ratio = {"token": full, "row": full[:, 0], "row1": full[:, :1]}[shape]
    # (the bounds are options of rollout_is_mode: without a mode, setting them is refused)
    bounds = dict(rollout_is_clip_min=0.7, rollout_is_clip_max=1.6) if mode is not None else {}
    options = dict(rollout_is_ratio=ratio, rollout_is_mode=mode, beta=0.04, loss_type="grpo", **bounds)
    check(batch, backend, **options)
    if mode is not None:  # the bounds matter on these inputs
        plain = run_loss(gk.grpo_loss, batch, backend=backend, rollout_is_ratio=ratio, beta=0.04, loss_type="grpo")
        moded = run_loss(gk.grpo_loss, batch, backend=backend, **options)
        assert not torch.allclose(plain[0], moded[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_advantages_and_grad_scale(backend):
    batch = make_batch(advantage_per_token=True)
    check(batch, backend, loss_type="luspo", importance_sampling_level="sequence", beta=0.04, grad_scale=1.0)
    single = run_loss(gk.grpo_loss, batch, backend=backend, loss_type="sapo", entropy_coef=0.1)
    scaled = run_loss(gk.grpo_loss, batch, backend=backend, loss_type="sapo", entropy_coef=0.1, grad_scale=-2.5)
    assert_close(scaled[2], -2.5 * single[2], "grad scales with grad_output")
    assert_close(scaled[3], -2.5 * single[3], "entropy grad scales with grad_output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (5, 300), (9, 3)])
def test_shapes(backend, B, T):
    """B = 1, T = 1, rows longer than one tile and more rows than one program holds."""
    batch = make_batch(B, T)
    for level, loss_type in (("token", "grpo"), ("sequence", "dapo")):
        check(batch, backend, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
              entropy_coef=0.01, top_entropy_quantile=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float32, torch.bfloat16,
                                        torch.uint8])
def test_mask_dtypes(backend, mask_dtype):
    batch = make_batch()
    want = run_loss(gk.grpo_loss, batch, backend=backend, loss_type="grpo", beta=0.04)
    batch["mask"] = batch["mask"].to(mask_dtype)
    got = run_loss(gk.grpo_loss, batch, backend=backend, loss_type="grpo", beta=0.04)
    assert_close(got[0], want[0], "loss", rtol=0, atol=0)
    assert_close(got[2], want[2], "grad", rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fractional_mask_and_bf16_logprobs(backend):
    batch = make_batch()
    batch["mask"] = batch["mask"] * torch.rand(batch["mask"].shape).round(decimals=1)
    check(batch, backend, loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
          off_policy_mask_threshold=0.01)
    batch = make_batch()
    batch["logp"] = batch["logp"].bfloat16()
    got = run_loss(gk.grpo_loss, batch, backend=backend, loss_type="dapo", beta=0.04)
    want = run_loss(grpo_loss_reference, batch, loss_type="dapo", beta=0.04)
    assert got[2].dtype == torch.bfloat16
    assert_close(got[0], want[0], "loss", rtol=1e-5)
    assert_close(got[2], want[2], "grad", rtol=1e-2, atol=1e-4)


def test_metrics_are_detached_and_nan_when_not_computable():
    batch = make_batch()
    loss, metrics = gk.grpo_loss(batch["logp"].requires_grad_(), batch["mask"], batch["adv"])
    assert loss.requires_grad
    assert all(not v.requires_grad and v.dtype == torch.float32 and v.shape == () for v in metrics.values())
    assert math.isnan(metrics["kl"]) and math.isnan(metrics["entropy"])
    _, metrics = gk.grpo_loss(batch["logp"], batch["mask"], batch["adv"], loss_type="sapo",
                              old_logprobs=batch["old"])
    assert metrics["clip_ratio/region_mean"] == 0


def test_backends_agree_on_a_larger_batch():
    """The two backends agree on a batch large enough that a per-row bug would show."""
    batch = make_batch(33, 50)
    a = run_loss(gk.grpo_loss, batch, backend="torch", loss_type="grpo", importance_sampling_level="sequence")
    b = run_loss(gk.grpo_loss, batch, backend="triton", loss_type="grpo", importance_sampling_level="sequence")
    assert_close(a[0], b[0], "loss")
    assert_close(a[2], b[2], "grad")


# ---------------------------------------------------------------------------------------------
# Fused: hidden states -> loss
# ---------------------------------------------------------------------------------------------


def make_fused(B=3, T=7, D=16, V=37, dtype=torch.float32, bias=True):
    batch = make_batch(B, T)
    hidden = torch.randn(B, T, D).to(dtype)
    weight = (torch.randn(V, D) / math.sqrt(D) * 2).to(dtype)
    bias_t = (torch.randn(V) * 0.5).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T))
    ids[batch["mask"] == 0] = V + 7  # padding ids may be anything: they are never read
    return batch, hidden, weight, bias_t, ids


def run_fused(fn, batch, hidden, weight, bias, ids, temperature, **options):
    params = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    if fn is None:  # reference chain, float64
        safe_ids = ids.masked_fill(batch["mask"] == 0, -100)
        logp, entropy = token_logprobs_reference(params[0], params[1], safe_ids, bias=params[2],
                                                 temperature=temperature, return_entropy=True)
        loss, metrics = grpo_loss_reference(logp, batch["mask"], batch["adv"], old_logprobs=batch["old"],
                                            ref_logprobs=batch["ref"], entropy=entropy, **options)
    else:
        loss, metrics = fn(params[0], params[1], ids, batch["mask"], batch["adv"], bias=params[2],
                           old_logprobs=batch["old"], ref_logprobs=batch["ref"], temperature=temperature,
                           **options)
    loss.backward()
    return loss.detach(), metrics, [p.grad if p is not None else None for p in params]


def check_fused(backend, dtype, temperature, **options):
    batch, hidden, weight, bias, ids = make_fused(dtype=dtype)
    got = run_fused(gk.fused_linear_grpo_loss, batch, hidden, weight, bias, ids, temperature, backend=backend,
                    **options)
    want = run_fused(None, batch, hidden, weight, bias, ids, temperature, **options)
    rtol, atol = (2e-5, 2e-6) if dtype == torch.float32 else (2e-2, 2e-3)
    assert_close(got[0], want[0], "loss", rtol=rtol, atol=atol)
    for name in grpo_loss_module.metric_names(options.get("loss_type", "dapo")):
        assert_close(got[1][name].double(), want[1][name], name, rtol=rtol, atol=atol)
    for name, g, w in zip(("hidden", "weight", "bias"), got[2], want[2]):
        assert g.dtype == dtype, name
        err = ((g.double() - w.double()).norm() / w.double().norm()).item()
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"grad {name}: rel err {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("loss_type,level,beta,delta", list(loss_cases()))
def test_fused_against_reference(loss_type, level, beta, delta, temperature, dtype):
    """The issue's matrix on the Triton path: gradients w.r.t. hidden, weight and bias."""
    check_fused("triton", dtype, temperature, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                delta=delta, max_completion_length=MAX_LEN, epsilon_high=1.1 if loss_type == "cispo" else 0.28,
                entropy_coef=0.01 if beta else 0.0)


@pytest.mark.parametrize("loss_type,level,beta,delta", list(loss_cases()))
def test_fused_against_reference_torch_backend(loss_type, level, beta, delta):
    check_fused("torch", torch.float32, 0.7, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                delta=delta, max_completion_length=MAX_LEN, epsilon_high=1.1 if loss_type == "cispo" else 0.28,
                entropy_coef=0.01, top_entropy_quantile=0.7 if beta else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_stores_nothing_vocab_sized(backend):
    batch, hidden, weight, bias, ids = make_fused(B=3, T=7, D=4, V=101)
    hidden.requires_grad_()
    weight.requires_grad_()
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = gk.fused_linear_grpo_loss(hidden, weight, ids, batch["mask"], batch["adv"],
                                            backend=backend, entropy_coef=0.1)
    loss.backward()
    assert sizes and max(sizes) < 3 * 7 * 101, f"a saved tensor holds {max(sizes)} elements"


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any launch
# ---------------------------------------------------------------------------------------------


BAD_OPTIONS = [
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(loss_type="cispo", importance_sampling_level="sequence"), ValueError, "sequence"),
    (dict(loss_type="sapo", importance_sampling_level="sequence"), ValueError, "sequence"),
    (dict(importance_sampling_level="segment"), ValueError, "importance_sampling_level"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length"),
    (dict(beta=0.04), ValueError, "ref_logprobs"),
    (dict(entropy_coef=0.1), ValueError, "entropy"),
    (dict(top_entropy_quantile=0.5), ValueError, "entropy"),
    (dict(top_entropy_quantile=1.5, entropy=True), ValueError, "top_entropy_quantile"),
    (dict(delta=0.0), ValueError, "delta"),
    (dict(sapo_temperature_neg=0.0, loss_type="sapo"), ValueError, "sapo_temperature_neg"),
    (dict(epsilon_low=float("nan")), ValueError, "epsilon_low"),
    (dict(rollout_is_mode="clip"), ValueError, "rollout_is_mode"),
    (dict(sampling_logprobs=True), ValueError, "off_policy_mask_threshold"),
    (dict(epsilon=0.2), TypeError, "unknown grpo_loss option"),
    (dict(num_items_in_batch="many"), TypeError, "num_items_in_batch"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("options,error,match", BAD_OPTIONS, ids=[m for _, _, m in BAD_OPTIONS])
def test_bad_options(options, error, match, monkeypatch):
    monkeypatch.setattr(grpo_loss_op, "ROW_PASS", None)  # any launch would crash differently
    batch = make_batch()
    options = dict(options)
    if options.pop("entropy", False):
        options["entropy"] = batch["entropy"]
    if options.get("sampling_logprobs") is True:
        options["sampling_logprobs"] = batch["old"]
    with pytest.raises(error, match=match):
        gk.grpo_loss(batch["logp"], batch["mask"], batch["adv"], **options)


def test_bad_shapes(monkeypatch):
    monkeypatch.setattr(grpo_loss_op, "ROW_PASS", None)
    b = make_batch(4, 7)
    logp, mask, adv = b["logp"], b["mask"], b["adv"]
    cases = [
        (lambda: gk.grpo_loss(logp[0], mask[0], adv), ValueError, "logprobs must be 2-D"),
        (lambda: gk.grpo_loss(logp, mask[:, :5], adv), ValueError, "completion_mask"),
        (lambda: gk.grpo_loss(logp, mask, adv[:3]), ValueError, "advantages"),
        (lambda: gk.grpo_loss(logp, mask, torch.randn(4, 6)), ValueError, "advantages"),
        (lambda: gk.grpo_loss(logp, mask, adv, old_logprobs=logp[:, :6]), ValueError, "old_logprobs"),
        (lambda: gk.grpo_loss(logp, mask, adv, ref_logprobs=logp.T, beta=0.1), ValueError, "ref_logprobs"),
        (lambda: gk.grpo_loss(logp, mask, adv, entropy=logp[:3]), ValueError, "entropy"),
        (lambda: gk.grpo_loss(logp, mask, adv, rollout_is_ratio=torch.ones(5)), ValueError, "rollout_is_ratio"),
        (lambda: gk.grpo_loss(logp.long(), mask, adv), TypeError, "logprobs"),
        (lambda: gk.grpo_loss(logp, mask, adv.long()), TypeError, "advantages"),
        (lambda: gk.grpo_loss(logp[:, :0], mask[:, :0], adv), ValueError, "non-empty"),
        (lambda: gk.grpo_loss(logp, mask, adv, old_logprobs=logp.to("meta")), ValueError, "meta"),
    ]
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()


def test_fused_bad_input(monkeypatch):
    batch, hidden, weight, bias, ids = make_fused()
    mask, adv = batch["mask"], batch["adv"]
    from grpo_kernels.ops import fused_linear_grpo as fused_module

    def no_launch(*args, **kwargs):
        raise AssertionError("token_logprobs ran before the options were checked")

    monkeypatch.setattr(fused_module, "token_logprobs", no_launch)
    cases = [
        (lambda: gk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv[:2]), ValueError, "advantages"),
        (lambda: gk.fused_linear_grpo_loss(hidden, weight, ids[:, :3], mask, adv), ValueError, "completion_ids"),
        (lambda: gk.fused_linear_grpo_loss(hidden[0], weight, ids, mask, adv), ValueError, "hidden"),
        (lambda: gk.fused_linear_grpo_loss(hidden, weight, ids.float(), mask, adv), TypeError, "completion_ids"),
        (lambda: gk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, loss_type="dr_grpo"), ValueError,
         "max_completion_length"),
        (lambda: gk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, beta=0.1), ValueError, "ref_logprobs"),
        (lambda: gk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, lr=0.1), TypeError, "unknown"),
        (lambda: gk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, entropy=mask.float()), TypeError,
         "entropy"),
    ]
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()


# ---------------------------------------------------------------------------------------------
# Against TRL's own GRPOTrainer._compute_loss (bound to a stub trainer, one process)
# ---------------------------------------------------------------------------------------------


def trl_compute_loss(batch, logp, entropy, *, loss_type, level, beta, epsilon_high, delta, use_bias_correction_kl,
                     entropy_coef, top_entropy_quantile, off_policy_mask_threshold, rollout_is_ratio,
                     num_items_in_batch=None):
    import collections
    import types

    from trl.trainer.grpo_trainer import GRPOTrainer

    class OneProcess:
        num_processes = 1
        sync_gradients = True

        def pad_across_processes(self, x, dim=0, pad_index=0):
            return x

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    B, T = logp.shape
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None),
        aux_loss_enabled=False, top_entropy_quantile=top_entropy_quantile, accelerator=OneProcess(),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, off_policy_mask_threshold=off_policy_mask_threshold,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=0.2,
        epsilon_high=epsilon_high, use_vllm=rollout_is_ratio is not None,
        vllm_importance_sampling_correction=rollout_is_ratio is not None, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN,
        _entropy_bonus_enabled=entropy_coef != 0, use_adaptive_entropy=False, entropy_coef=entropy_coef,
        _metrics={"train": collections.defaultdict(list)},
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        args=types.SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                                   sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, steps_per_generation=1,
                                   vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0))
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=batch["mask"],
                  advantages=batch["adv"], old_per_token_logps=batch["old"], ref_per_token_logps=batch["ref"],
                  importance_sampling_ratio=rollout_is_ratio,
                  num_items_in_batch=batch["mask"].sum().float() if num_items_in_batch is None else num_items_in_batch)
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def trl_cases():
    for i, loss_type in enumerate(["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]):
        for j in range(4):
            yield dict(loss_type=loss_type,
                       level="sequence" if j % 2 and loss_type not in ("cispo", "sapo") else "token",
                       beta=0.04 if (i + j) % 2 else 0.0,
                       delta=1.3 if j == 2 and loss_type in CLIP_TYPES else None,
                       use_bias_correction_kl=j == 3, entropy_coef=0.03 if j >= 2 else 0.0,
                       top_entropy_quantile=0.6 if j in (1, 2) else 1.0,
                       off_policy_mask_threshold=0.01 if j in (0, 3) else None,
                       rollout_is_ratio=[None, (4, 7), (4, 1), None][j],
                       epsilon_high=1.1 if loss_type == "cispo" else 0.28)


@pytest.mark.parametrize("case", list(trl_cases()), ids=lambda c: f"{c['loss_type']}-{c['level']}")
def test_matches_trl_compute_loss(case):
    pytest.importorskip("trl")
    batch = make_batch()
    case = dict(case)
    if case["rollout_is_ratio"] is not None:
        case["rollout_is_ratio"] = torch.exp(0.3 * torch.randn(*case["rollout_is_ratio"]))
    trl_logp = batch["logp"].clone().requires_grad_()
    trl_entropy = batch["entropy"].clone().requires_grad_()
    want_loss, want_metrics = trl_compute_loss(batch, trl_logp, trl_entropy, **case)
    want_loss.backward()
    level = case.pop("level")
    got = run_loss(gk.grpo_loss, batch, backend="triton", importance_sampling_level=level,
                   max_completion_length=MAX_LEN, with_ref=case["beta"] != 0, **case)
    assert_close(got[0], want_loss.detach(), "loss")
    assert_close(got[2], trl_logp.grad, "d loss / d logprobs")
    if case["entropy_coef"]:
        assert_close(got[3], trl_entropy.grad, "d loss / d entropy")
    names = ["entropy"] + ["kl"] * (case["beta"] != 0)
    if level == "token" and case["loss_type"] not in ("cispo", "sapo"):  # TRL logs GSPO clips per sequence
        names += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    for name in names:
        assert_close(got[1][name], torch.tensor(want_metrics[name]), name)
    if case["loss_type"] == "cispo":
        assert_close(got[1]["clip_ratio/high_mean"], torch.tensor(want_metrics["cispo_clip_ratio"]), "cispo clip")
