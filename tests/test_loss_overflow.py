"""Extreme log-ratios (issue #21): every loss type x token / sequence level x log-ratio in
{-100, -88.8, 88.8, 100} (beyond float32's exp at +-88.7) x the advantage's sign, on both backends,
against the float64 reference: no NaN in d loss / d logp where the reference is finite, no NaN
loss where the reference fits float32, and the reference's numbers wherever they fit float32 with
room to spare (beyond, a term that depends on exp(log-ratio) may be +-inf, as in TRL's float32).

One batch per case holds every combination as rows: the extreme log-ratio on one token of a row
(token ratios) or on all of it (sequence ratios), the entropy mask and a rollout IS ratio of 0
dropping some of those tokens, a KL term to a reference near the policy. A second batch has its
extreme log-ratios on dropped tokens only: its loss is ordinary (a dropped token whose term
overflowed used to add 0 x inf = NaN).
"""

import math

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from grpo_kernels.ops.grpo_loss import LOSS_TYPES_TABLE
from grpo_kernels.reference import grpo_loss_reference

BACKENDS = ["triton", "torch"]
LOG_RATIOS = (-100.0, -88.8, 88.8, 100.0)
TYPE_OPTIONS = {"dr_grpo": dict(max_completion_length=5), "dro": dict(dro_beta=0.1), "cispo": dict(epsilon_high=5.0),
                "kl_cov": dict(kl_cov_ratio=0.1), "clip_cov": dict(clip_cov_ratio=0.1, clip_cov_lb=-10.0)}
CASES = [(name, level) for name, spec in LOSS_TYPES_TABLE.items()
         for level in (("token", "sequence") if spec.sequence_level else ("token",))]
HUGE = 1e30  # beyond this (float64) the float32 result may overflow to +-inf: only NaN is checked there


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


def extreme_batch(T=5, extremes=("one-kept", "one-dropped", "all")):
    """Rows: for each log-ratio and advantage sign, one token extreme (kept), one token extreme (dropped
    by the entropy mask and by a zero IS ratio), the whole row extreme; then an ordinary row."""
    rows = [(log_ratio, sign, extreme) for log_ratio in LOG_RATIOS for sign in (1.0, -1.0) for extreme in extremes]
    B = len(rows) + 1
    logp = -torch.rand(B, T) - 0.1
    old = logp - 0.1 * torch.randn(B, T)
    entropy = torch.rand(B, T) + 0.5
    is_ratio = torch.rand(B, T) + 0.5
    adv = torch.randn(B).abs() + 0.1
    for i, (log_ratio, sign, extreme) in enumerate(rows):
        adv[i] *= sign
        cols = slice(None) if extreme == "all" else slice(1, 2)
        old[i, cols] = logp[i, cols] - log_ratio
        if extreme == "one-dropped":
            entropy[i, 1], is_ratio[i, 1] = 0.0, 0.0
    mask = torch.ones(B, T)
    mask[-1, -2:] = 0
    ref = logp + 0.1 * torch.randn(B, T)
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, entropy=entropy, is_ratio=is_ratio)


def compare(batch, backend, loss_type, level):
    """Our loss and gradient next to the float64 reference's: (loss, reference loss, grad, reference grad)."""
    options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, entropy_coef=0.01,
                   top_entropy_quantile=0.8, **TYPE_OPTIONS.get(loss_type, {}))
    inputs = dict(old_logprobs=batch["old"], ref_logprobs=batch["ref"], rollout_is_ratio=batch["is_ratio"])

    draw = (lambda: dict(generator=torch.Generator(DEVICE).manual_seed(0))) if loss_type == "clip_cov" else dict
    want_logp = batch["logp"].double().requires_grad_()
    want_loss, _ = grpo_loss_reference(want_logp, batch["mask"], batch["adv"], entropy=batch["entropy"], **inputs,
                                       **options, **draw())
    want_loss.backward()
    got_logp = batch["logp"].clone().requires_grad_()
    loss, _ = gk.grpo_loss(got_logp, batch["mask"], batch["adv"], entropy=batch["entropy"], backend=backend,
                           **inputs, **options, **draw())
    loss.backward()
    return loss.item(), want_loss.item(), got_logp.grad.double(), want_logp.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level", CASES, ids=[f"{t}-{lv}" for t, lv in CASES])
def test_no_nan_where_the_reference_is_finite(backend, loss_type, level):
    got, want, grad, want_grad = compare(extreme_batch(), backend, loss_type, level)
    assert math.isfinite(want)
    if abs(want) < 3e38:  # (beyond float32, +inf and -inf rows may meet: the sum is NaN, the true value overflows)
        assert not math.isnan(got), f"loss NaN, float64 reference {want:.4g}"
    if abs(want) < HUGE:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    finite = torch.isfinite(want_grad)
    assert not (torch.isnan(grad) & finite).any(), f"NaN gradient at {(torch.isnan(grad) & finite).nonzero().tolist()}"
    moderate = finite & (want_grad.abs() < HUGE)
    torch.testing.assert_close(grad[moderate], want_grad[moderate], rtol=1e-4, atol=1e-6)


# (rloo's ratio is the product of the row's token ratios: a dropped token's ratio still enters it)
DROPPED_CASES = [(name, level) for name, level in CASES if name != "rloo"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level", DROPPED_CASES, ids=[f"{t}-{lv}" for t, lv in DROPPED_CASES])
def test_dropped_tokens_add_nothing(backend, loss_type, level):
    got, want, grad, want_grad = compare(extreme_batch(extremes=("one-dropped",)), backend, loss_type, level)
    assert abs(want) < HUGE
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["vespo", "cispo", "grpo"])
def test_old_logprobs_minus_inf(backend, loss_type):
    """old_logprobs = -inf (an infinite log-ratio) where the float64 loss stays finite: VESPO clamps
    the log-ratio, CISPO caps its detached weight, the PPO clip with A > 0 takes the clipped branch."""
    batch = extreme_batch(extremes=("one-kept",))
    batch["adv"] = batch["adv"].abs()
    batch["old"][0] = -math.inf
    batch["old"][1, 2] = -math.inf
    got, want, grad, want_grad = compare(batch, backend, loss_type, "token")
    assert math.isfinite(want) and abs(want) < HUGE
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert torch.isfinite(grad).all()  # (the float64 autograd's clipped branch is exp(inf) x 0 = NaN: ours 0)
    finite = torch.isfinite(want_grad)
    torch.testing.assert_close(grad[finite], want_grad[finite], rtol=1e-4, atol=1e-6)
