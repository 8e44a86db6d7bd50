"""Rollout correction in grpo_loss (``rollout_is``, ``rollout_rs``, ``rollout_is_batch_normalize``,
``bypass_mode``): every rejection criterion against the float64 reference on both backends, the
decoupled mode against verl 0.9.1's own ``rollout_corr_helper.compute_rollout_correction_and_rejection_mask``
followed by ``compute_policy_loss_vanilla``, and AReaL's KPop against ``ppo_actor_loss_fn`` with
``apply_rejection_sampling(metric="binary_kl")`` transcribed from ``areal/utils/functional/functional.py``
(areal-project/AReaL, not installable here). verl's bypass mode is tested through the adapter
(test_integration_verl.py)."""

import importlib.util
import math

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from grpo_kernels.ops.grpo_loss import REJECTION_SAMPLING, rollout_correction, validate_loss_options
from grpo_kernels.reference import binary_kl_reference, rejection_statistic_reference
from test_grpo_loss import BACKENDS, assert_close, check, check_fused, make_batch, run_loss

needs_verl = pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed")


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


def _batch(B=5, T=37):
    """Old (training) and sampling (rollout) log-probs of probabilities whose log-ratio has a per-row
    offset (so row statistics spread) and per-token noise, log-ratios of +-100 on two tokens, a fully
    masked row."""
    batch = make_batch(B, T)
    batch["old"] = (batch["logp"] + 0.2 * torch.randn(B, T)).clamp(max=-1e-3)
    offset = torch.linspace(-0.6, 0.6, B)[:, None]
    batch["sampling"] = (batch["old"] + offset + 0.3 * torch.randn(B, T)).clamp(max=-1e-3)
    batch["sampling"][0, 1] = batch["old"][0, 1] - 100.0  # old - sampling = +100
    batch["sampling"][-1, 0] = -1e-3  # old - sampling = -100, the policy, old and ref agreeing there
    batch["old"][-1, 0] = -100.0
    batch["logp"][-1, 0] = batch["ref"][-1, 0] = -100.2
    return batch


def _threshold_between(stat, mask, quantile):
    """A threshold between two consecutive values of the statistic near ``quantile`` of the masked
    tokens / rows, so that float32 and float64 agree on which side every value falls."""
    values = stat[(mask != 0).any(-1)] if stat.shape[-1] == 1 else stat[mask != 0]
    values = values.flatten().unique().sort().values
    i = min(max(int(quantile * (len(values) - 1)), 0), len(values) - 2)
    gaps = values[1:] - values[:-1]
    j = i + int(torch.argmax(gaps[i:i + 3]))  # the widest of the nearby gaps
    return float((values[j] + values[j + 1]) / 2)


def _options_for(name, batch, bypass, quantile=0.6):
    train, rollout = (batch["logp"], batch["old"]) if bypass else (batch["old"], batch["sampling"])
    stat = rejection_statistic_reference(train, rollout, batch["mask"].double(), name)
    threshold = _threshold_between(stat, batch["mask"], quantile)
    if REJECTION_SAMPLING[name].ratio_bounds:  # a log-ratio: two ratio bounds (per row: all rows above the lower)
        lower = (_threshold_between(stat, batch["mask"], 0.15) if stat.shape[-1] != 1
                 else float(stat[(batch["mask"] != 0).any(-1)].min()) - 1.0)
        return dict(rollout_rs=name, rollout_rs_threshold=math.exp(threshold),
                    rollout_rs_threshold_lower=math.exp(lower))
    return dict(rollout_rs=name, rollout_rs_threshold=threshold)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(REJECTION_SAMPLING))
def test_rejection_criteria_match_reference(backend, name):
    batch = _batch()
    bypass = name.startswith("seq")  # decoupled for token criteria, bypass for sequence ones
    options = dict(_options_for(name, batch, bypass), bypass_mode=bypass, loss_type="grpo", beta=0.04)
    if not bypass:
        options["sampling_logprobs"] = batch["sampling"]
    got, _ = check(batch, backend, **options)
    assert 0 < got[1]["rollout_rs/masked_fraction"] < 1  # some tokens rejected, not all
    assert torch.isfinite(got[2]).all()


IS_CASES = {
    "token-tis": dict(rollout_is="token", rollout_is_mode="truncate", rollout_is_clip_max=2.0),
    "token-icepop-bn": dict(rollout_is="token", rollout_is_mode="mask", rollout_is_clip_min=0.5,
                            rollout_is_clip_max=2.0, rollout_is_batch_normalize=True),
    "sequence-tis-bn": dict(rollout_is="sequence", rollout_is_mode="truncate", rollout_is_clip_max=2.0,
                            rollout_is_batch_normalize=True),
    "sequence-raw-gspo": dict(rollout_is="sequence", importance_sampling_level="sequence", loss_type="bnpo"),
    "token-bypass-reinforce": dict(rollout_is="token", bypass_mode=True, loss_type="reinforce",
                                   rollout_is_mode="truncate", rollout_is_clip_max=1.5, entropy_coef=0.01),
    "rloo-token-k3": dict(loss_type="rloo", rollout_is="sequence", rollout_rs="token_k3"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(IS_CASES))
def test_importance_weights_match_reference(backend, case):
    batch = _batch(B=5, T=300)  # two kernel tiles
    options = dict(IS_CASES[case])
    if options.get("loss_type") == "rloo":  # small token log-ratios: RLOO's product of ratios stays unclipped
        batch["old"] = (batch["logp"] + 0.005 * torch.randn_like(batch["logp"])).clamp(max=-1e-3)
    if options.get("rollout_rs"):
        options.update(_options_for(options["rollout_rs"], batch, options.get("bypass_mode", False)))
    if case == "token-icepop-bn":  # a fractional mask: token weights
        batch["mask"] = batch["mask"] * torch.rand(batch["mask"].shape).round(decimals=1)
    if not options.get("bypass_mode"):
        options["sampling_logprobs"] = batch["sampling"]
    options.setdefault("loss_type", "dapo")
    got, _ = check(batch, backend, **options)
    assert got[2].abs().sum() > 0


def test_fused_bypass_mode():
    """From hidden states: the bypass-mode weight follows the log-probs the fused API computes."""
    check_fused("triton", torch.float32, 0.7, loss_type="reinforce", rollout_is="token", bypass_mode=True,
                rollout_is_mode="truncate", rollout_is_clip_max=1.5, beta=0.04)


def test_rollout_correction_helper_matches_the_loss():
    """``rollout_correction`` gives the mask and weights the loss applies: gpg's gradient is
    -A w m' / n exactly."""
    batch = _batch()
    options = dict(rollout_is="token", rollout_is_mode="truncate", rollout_is_clip_max=2.0,
                   rollout_is_batch_normalize=True, **_options_for("token_k1", batch, bypass=False))
    kept, weight = rollout_correction(batch["logp"], batch["mask"], old_logprobs=batch["old"],
                                      sampling_logprobs=batch["sampling"], **options)
    got = run_loss(gk.grpo_loss, batch, loss_type="gpg", sampling_logprobs=batch["sampling"], with_entropy=False,
                   with_ref=False, **options)
    adv = batch["adv"][:, None].expand_as(kept)
    want = torch.where(kept, -adv * weight, 0.0) / kept.sum()
    assert_close(got[2], want, "d loss / d logprobs")


# ---------------------------------------------------------------------------------------------
# Against verl's own rollout correction (decoupled mode: computed from old vs rollout log-probs)
# ---------------------------------------------------------------------------------------------


VERL_CASES = [
    dict(rollout_is="token", rollout_is_threshold=2.0),
    dict(rollout_is="sequence", rollout_is_threshold=3.0, rollout_rs="seq_sum_k1", rollout_rs_threshold="1e-4_1e4"),
    dict(rollout_is="token", rollout_is_threshold="0.6_1.8", rollout_is_batch_normalize=True, rollout_rs="token_k3",
         rollout_rs_threshold=0.1),
    dict(rollout_is=None, rollout_rs="seq_max_k2", rollout_rs_threshold=0.5),
    dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True, rollout_rs="seq_mean_k3",
         rollout_rs_threshold=0.1),
]


def _ours_from_verl(case):
    """grpo_loss's options for one of verl's rollout-correction configurations."""
    options = {}
    if case.get("rollout_is") is not None:
        spec = str(case["rollout_is_threshold"])
        lower, upper = (float(v) for v in spec.split("_")) if "_" in spec else (None, float(spec))
        options.update(rollout_is=case["rollout_is"], rollout_is_mode="truncate" if lower is None else "mask",
                       rollout_is_clip_min=lower, rollout_is_clip_max=upper,
                       rollout_is_batch_normalize=case.get("rollout_is_batch_normalize", False))
    if case.get("rollout_rs") is not None:
        spec = str(case["rollout_rs_threshold"])
        lower, upper = (float(v) for v in spec.split("_")) if "_" in spec else (None, float(spec))
        options.update(rollout_rs=case["rollout_rs"], rollout_rs_threshold=upper, rollout_rs_threshold_lower=lower)
    return options


@needs_verl
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(VERL_CASES)))
def test_decoupled_mode_matches_verl(backend, case):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask
    from verl.workers.config import ActorConfig, PolicyLossConfig

    batch = _batch(B=6, T=40)
    batch["mask"] = batch["mask"].bool()
    mask, old, rollout = batch["mask"].cpu(), batch["old"].cpu(), batch["sampling"].cpu()
    advantages = batch["adv"].cpu()[:, None].expand(6, 40) * mask
    verl_case = dict(VERL_CASES[case])
    weights, verl_mask, verl_metrics = compute_rollout_correction_and_rejection_mask(
        old, rollout, mask, rollout_is=verl_case.get("rollout_is"),
        rollout_is_threshold=verl_case.get("rollout_is_threshold", 2.0),
        rollout_is_batch_normalize=verl_case.get("rollout_is_batch_normalize", False),
        rollout_rs=verl_case.get("rollout_rs"), rollout_rs_threshold=verl_case.get("rollout_rs_threshold"))
    weights = None if weights is None else weights.batch["rollout_is_weights"]
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                         policy_loss=PolicyLossConfig(loss_mode="vanilla"))
    verl_logp = batch["logp"].cpu().clone().requires_grad_()
    want_loss, _ = compute_policy_loss_vanilla(old, verl_logp, advantages, verl_mask, "token-mean", config, weights)
    want_grad, = torch.autograd.grad(want_loss, verl_logp)

    options = _ours_from_verl(verl_case)
    kept, ours_weights = rollout_correction(batch["logp"], batch["mask"], old_logprobs=batch["old"],
                                            sampling_logprobs=batch["sampling"], **options)
    assert torch.equal(kept.cpu(), verl_mask.bool())
    if weights is not None:
        torch.testing.assert_close((ours_weights * kept).cpu(), (weights * verl_mask).float(), rtol=1e-5, atol=1e-6)
    got = run_loss(gk.grpo_loss, {**batch, "adv": advantages.to(DEVICE)}, backend=backend, loss_type="dapo",
                   clip_ratio_c=3.0, epsilon_high=0.28, loss_agg_mode="token-mean",
                   sampling_logprobs=batch["sampling"], with_ref=False, with_entropy=False, **options)
    assert_close(got[0], want_loss.detach(), "loss")
    assert_close(got[2].cpu(), want_grad, "d loss / d logprobs")
    if options.get("rollout_rs"):
        assert 0 < verl_metrics["rollout_corr/rollout_rs_masked_fraction"] < 1
        assert got[1]["rollout_rs/masked_fraction"].item() == pytest.approx(
            verl_metrics["rollout_corr/rollout_rs_masked_fraction"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# AReaL's KPop (areal/utils/functional/functional.py, ppo_actor_loss_fn with rejection_sampling =
# RejectionSamplingConfig(level="token", action="mask", metric="binary_kl", upper=phi), decoupled:
# proximal = the recomputed old log-probs, behave = the inference engine's)
# ---------------------------------------------------------------------------------------------


def areal_kpop_loss(logprobs, proximal, behave, advantages, loss_mask, eps_clip, eps_clip_higher, phi):
    loss_mask_count = loss_mask.count_nonzero() or 1  # before rejection sampling
    kl_fwd = binary_kl_reference(proximal, behave).float()  # compute_binary_kl_divergence(eps=1e-8)
    kl_rev = binary_kl_reference(behave, proximal).float()
    metric = torch.maximum(kl_fwd, kl_rev)
    in_bounds = metric <= phi
    loss_mask = loss_mask & in_bounds
    behave_imp_weight = torch.where(loss_mask, torch.exp(proximal - behave), 0.0)
    ratio = torch.where(loss_mask, torch.exp(logprobs - proximal), 0)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip_higher)
    pg_loss = torch.max(-advantages * ratio, -advantages * clipped_ratio) * behave_imp_weight
    return torch.where(loss_mask, pg_loss, 0).sum() / loss_mask_count


@pytest.mark.parametrize("backend", BACKENDS)
def test_kpop_matches_areal(backend):
    batch = _batch(B=4, T=33)
    mask = batch["mask"].bool()
    phi = _threshold_between(rejection_statistic_reference(batch["old"], batch["sampling"], mask.double(),
                                                           "token_kpop"), mask, 0.5)
    advantages = batch["adv"][:, None].expand(4, 33)
    logp = batch["logp"].clone().requires_grad_()
    want = areal_kpop_loss(logp, batch["old"], batch["sampling"], advantages, mask, 0.2, 0.28, phi)
    want.backward()
    got = run_loss(gk.grpo_loss, batch, backend=backend, loss_type="dapo", epsilon_high=0.28,
                   loss_agg_mode="token-mean", batch_num_tokens=int(mask.sum()), rollout_rs="token_kpop",
                   rollout_rs_threshold=phi, rollout_is="token", sampling_logprobs=batch["sampling"],
                   with_ref=False, with_entropy=False)
    assert 0 < got[1]["rollout_rs/masked_fraction"] < 1
    assert_close(got[0], want.detach(), "loss")
    assert_close(got[2], logp.grad, "d loss / d logprobs")


def test_kpop_statistic_is_exact_near_probability_one():
    """The kernel's binary KL in float32 works in log space (the complements as -expm1): at
    probabilities within 1e-7 of 1, where 1 - p cancels in float32, it still matches float64."""
    from grpo_kernels.ops.grpo_loss.rows_torch import on_torch
    from grpo_kernels.ops.grpo_loss.terms import rs_kpop

    train = torch.tensor([-1e-7, -3e-5, -1e-3, -0.02, -0.5, -4.0, -30.0, 0.0])
    rollout = torch.tensor([-2e-7, -1e-6, -0.05, -0.01, -0.7, -3.0, -1.0, -1e-9])
    got = on_torch(rs_kpop)(train, rollout)
    want = torch.maximum(binary_kl_reference(train.double(), rollout.double()),
                         binary_kl_reference(rollout.double(), train.double()))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Options and inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,error,match", [
    (dict(rollout_rs="token_k1"), ValueError, "needs rollout_rs_threshold"),
    (dict(rollout_rs="token_k3", rollout_rs_threshold=0.1, rollout_rs_threshold_lower=0.05), ValueError,
     "only an upper bound"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold=2.0, rollout_rs_threshold_lower=3.0), ValueError, "> rollout_rs"),
    (dict(rollout_rs_threshold=2.0), ValueError, "needs rollout_rs"),
    (dict(rollout_rs="token_k4", rollout_rs_threshold=2.0), ValueError, "rollout_rs must be one of"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0"), TypeError, "rollout_rs_threshold must be a number"),
    (dict(rollout_is="tokens"), ValueError, "rollout_is must be one of"),
    (dict(rollout_is_batch_normalize=True), ValueError, "set rollout_is"),
    (dict(rollout_is_batch_normalize=1, rollout_is="token"), TypeError, "must be a bool"),
    (dict(bypass_mode=True), ValueError, "set one of them"),
    (dict(loss_type="vespo", rollout_is="token"), ValueError, "rollout_is is not supported with loss_type='vespo'"),
    (dict(loss_type="geo_mean", rollout_rs="token_k2", rollout_rs_threshold=1.0), ValueError, "not supported"),
    (dict(loss_type="kl_cov", rollout_rs="token_k2", rollout_rs_threshold=1.0), ValueError, "not supported"),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        validate_loss_options(**options)


def test_bad_inputs():
    b = make_batch()
    logp, mask, adv = b["logp"], b["mask"], b["adv"]
    with pytest.raises(ValueError, match="pass sampling_logprobs"):
        gk.grpo_loss(logp, mask, adv, old_logprobs=b["old"], rollout_is="token")
    with pytest.raises(ValueError, match="need old_logprobs"):
        gk.grpo_loss(logp, mask, adv, rollout_is="token", bypass_mode=True)
    with pytest.raises(ValueError, match="do not pass rollout_is_ratio"):
        gk.grpo_loss(logp, mask, adv, old_logprobs=b["old"], rollout_is="token", bypass_mode=True,
                     rollout_is_ratio=torch.ones_like(logp))
    with pytest.raises(ValueError, match="sampling_logprobs is read by"):
        gk.grpo_loss(logp, mask, adv, old_logprobs=b["old"], sampling_logprobs=b["old"], rollout_is="token",
                     bypass_mode=True)
