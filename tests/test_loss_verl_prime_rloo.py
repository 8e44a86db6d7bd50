"""The policy losses of verl 0.9 (gpg, dro, REINFORCE), prime-rl (prime_dppo, ipo) and TRL's RLOO trainer
(rloo) in grpo_loss: against the float64 reference on both backends (loss, metrics, d loss / d logp,
d loss / d entropy; odd shapes, a fully masked row, T across two kernel tiles, fractional masks,
log-ratios of +-100), against TRL 1.16's own ``RLOOTrainer._compute_loss`` and against prime-rl's
``default_loss_fn`` / ``ipo_loss_fn`` transcribed from ``src/prime_rl/trainer/rl/loss.py``
(PrimeIntellect-ai/prime-rl, not installable here). verl's own ``compute_policy_loss_gpg`` / ``_dro``
/ ``_reinforce`` are the oracle of the verl adapter's tests (test_integration_verl.py)."""

import collections
import types

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from grpo_kernels.ops.grpo_loss import validate_loss_options
from test_grpo_loss import BACKENDS, assert_close, check, check_fused, make_batch, run_loss


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


def _batch(B=5, T=300, per_token=False, log_ratio_scale=0.5):
    """Two kernel tiles along T, a partial block of rows, a fully masked row; log-probs of
    probabilities (p - p_old is a probability difference), ratios up to e^+-(2 log_ratio_scale)."""
    batch = make_batch(B, T, advantage_per_token=per_token)
    batch["old"] = (batch["logp"] + log_ratio_scale * torch.randn(B, T)).clamp(max=-1e-3)
    return batch


CASES = {
    "gpg": dict(loss_type="gpg", beta=0.04, entropy_coef=0.02),
    "gpg-is-ratio": dict(loss_type="gpg", rollout_is_ratio=True, rollout_is_mode="truncate", rollout_is_clip_max=1.5),
    "reinforce": dict(loss_type="reinforce", beta=0.04, kl_estimator="low_var_kl"),
    "reinforce-token-mean": dict(loss_type="reinforce", loss_agg_mode="token-mean", rollout_is_ratio=True),
    "dro": dict(loss_type="dro", dro_beta=0.5, beta=0.04),
    "rloo": dict(loss_type="rloo", epsilon_high=0.28),
    "rloo-kl": dict(loss_type="rloo", beta=0.1, use_bias_correction_kl=True, entropy_coef=0.01),
    "prime_dppo": dict(loss_type="prime_dppo"),
    "prime_dppo-options": dict(loss_type="prime_dppo", epsilon_low=0.05, epsilon_high=0.1, adv_tau=0.5, kl_tau=0.1,
                               beta=0.04),
    "ipo": dict(loss_type="ipo", ipo_threshold=0.05, kl_tau=0.01),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    options = dict(CASES[case])
    per_token = case.startswith("reinforce") or case == "dro"
    # RLOO's ratio is the product of a row's token ratios: small token log-ratios keep some rows unclipped
    batch = _batch(per_token=per_token, log_ratio_scale=0.015 if case.startswith("rloo") else 0.5)
    if case.startswith("rloo"):  # the first row (A > 0) clipped high, the last (A < 0) clipped low, row 3 not
        batch["old"][0] = batch["logp"][0] - 1.0 / 300
        batch["old"][-1] = batch["logp"][-1] + 1.5 / batch["mask"][-1].sum()
        batch["old"][3] = batch["logp"][3] + 1e-4 * torch.randn(300)
    if options.pop("rollout_is_ratio", False):
        options["rollout_is_ratio"] = torch.exp(0.4 * torch.randn(5, 300))
    if case == "gpg-is-ratio":  # fractional mask: token weights
        batch["mask"] = batch["mask"] * torch.rand(batch["mask"].shape).round(decimals=1)
    got, _ = check(batch, backend, max_completion_length=300, **options)
    assert got[2].abs().sum() > 0 and not got[2][1].any()
    if options["loss_type"] in ("prime_dppo", "ipo"):  # the trust region masks some tokens, not all
        assert 0 < got[1]["clip_ratio/region_mean"] < 0.9
    if options["loss_type"] == "rloo":
        assert got[1]["clip_ratio/region_mean"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["gpg", "reinforce", "dro", "rloo", "prime_dppo", "ipo", "cispo", "vespo",
                                       "dppo_tv"])
def test_extreme_log_ratios(backend, loss_type):
    """Log-ratios of +-100 (finite losses: +100 where A > 0 or the trust region drops the token,
    -100 elsewhere), B = 1 and an odd T. A term that does not depend on the ratio gets no NaN from
    its overflowing derivative (cispo, vespo and dppo_tv did before)."""
    batch = make_batch(3, 9)
    batch["adv"] = torch.tensor([1.5, -0.7, 0.3])
    batch["mask"][1, :] = 1
    batch["logp"][0, 0], batch["old"][0, 0] = -0.5, -100.5  # p - p_old ~ 0.6: outside prime's region
    batch["logp"][1, 1], batch["old"][1, 1] = -100.0, -0.5
    batch["logp"][2, 2], batch["old"][2, 2] = -101.0, -1.0
    batch["ref"] = batch["logp"] + 0.1 * torch.randn(3, 9)  # (TRL's k3 of a log-ratio of 100 overflows)
    options = dict(loss_type=loss_type, dro_beta=0.1 if loss_type == "dro" else None, beta=0.04)
    got, _ = check(batch, backend, **options)
    assert torch.isfinite(got[2]).all()
    one = {k: v[:1] for k, v in batch.items()}
    check(one, backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logprobs(backend):
    batch = _batch()
    batch["logp"] = batch["logp"].bfloat16()
    got = run_loss(gk.grpo_loss, batch, backend=backend, loss_type="prime_dppo", beta=0.04)
    from grpo_kernels.reference import grpo_loss_reference

    want = run_loss(grpo_loss_reference, batch, loss_type="prime_dppo", beta=0.04)
    assert got[2].dtype == torch.bfloat16
    assert_close(got[0], want[0], "loss", rtol=1e-5)
    assert_close(got[2], want[2], "grad", rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["rloo", "prime_dppo", "dro"])
def test_fused(loss_type):
    check_fused("triton", torch.float32, 0.7, loss_type=loss_type, beta=0.04,
                **({"dro_beta": 0.2} if loss_type == "dro" else {}))


# ---------------------------------------------------------------------------------------------
# Against TRL 1.16's RLOOTrainer._compute_loss (bound to a stub trainer, one process)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_rloo_matches_trl(backend):
    trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")

    class OneProcess:
        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    batch = _batch(B=4, T=9)
    batch["old"] = batch["logp"] + 0.15 * torch.randn(4, 9)  # sequence ratios on both sides of the clip
    logp = batch["logp"].clone().requires_grad_()
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, batch["entropy"], None), aux_loss_enabled=False,
        epsilon_low=0.2, epsilon_high=0.28, model=types.SimpleNamespace(training=True), accelerator=OneProcess(),
        _metrics={"train": collections.defaultdict(list)})
    mask = batch["mask"]
    inputs = dict(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.long),
                  completion_ids=torch.zeros(4, 9, dtype=torch.long), completion_mask=mask,
                  old_logps=(batch["old"] * mask).sum(1), advantages=batch["adv"])
    want = trl_rloo.RLOOTrainer._compute_loss(trainer, None, inputs)
    want.backward()
    # TRL's mean runs over all B completions, the empty one included (loss -A_i, no gradient)
    want = want - (-batch["adv"][1]) / 4
    got = run_loss(gk.grpo_loss, batch, backend=backend, loss_type="rloo", epsilon_high=0.28)
    assert_close(got[0], want.detach(), "loss")
    assert_close(got[2], logp.grad, "d loss / d logprobs")
    assert_close(got[1]["entropy"], torch.tensor(trainer._metrics["train"]["entropy"][0]), "entropy")


# ---------------------------------------------------------------------------------------------
# Against prime-rl's loss functions (src/prime_rl/trainer/rl/loss.py, transcribed: a per-sample loop,
# the sum of the per-token losses over each sample, divided by the global token count rl_scale)
# ---------------------------------------------------------------------------------------------


def prime_rl_loss(loss_type, logp, inference_logp, advantages, mask, *, mask_low=0.2, mask_high=0.2,
                  ipo_threshold=0.1, adv_tau=1.0, kl_tau=1e-3, rl_scale):
    total = logp.sum() * 0.0
    for trainer_lp, inference_lp, adv, loss_mask in zip(logp, inference_logp, advantages, mask.bool()):
        log_importance_ratio = trainer_lp - inference_lp
        importance_ratio = torch.exp(log_importance_ratio)
        if loss_type == "prime_dppo":  # default_loss_fn
            probs_diff = torch.exp(trainer_lp) - torch.exp(inference_lp)
            is_masked = torch.where(adv > 0, probs_diff > mask_high, probs_diff < -mask_low)
        else:  # ipo_loss_fn
            is_masked = torch.abs(torch.exp(trainer_lp) - torch.exp(inference_lp)) > ipo_threshold
        keep_mask = loss_mask & ~is_masked
        pg_loss = keep_mask * (adv_tau * adv) * importance_ratio
        kl_loss = loss_mask * log_importance_ratio ** 2
        total = total + (-pg_loss + kl_tau * kl_loss).sum()
    return total / rl_scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,options", [
    ("prime_dppo", {}), ("prime_dppo", dict(mask_low=0.05, mask_high=0.3, adv_tau=2.0, kl_tau=0.05)),
    ("ipo", {}), ("ipo", dict(ipo_threshold=0.02, kl_tau=0.01)),
])
def test_prime_rl_matches_its_source(backend, loss_type, options):
    batch = _batch(B=4, T=33, per_token=True)
    mask = batch["mask"].bool()
    rl_scale = int(mask.sum()) + 17  # the global count of a larger batch
    logp = batch["logp"].clone().requires_grad_()
    want = prime_rl_loss(loss_type, logp, batch["old"], batch["adv"], mask, rl_scale=rl_scale, **options)
    want.backward()
    ours = {"epsilon_low": options.get("mask_low", 0.2), "epsilon_high": options.get("mask_high", 0.2),
            **{k: v for k, v in options.items() if k not in ("mask_low", "mask_high")}}
    got = run_loss(gk.grpo_loss, batch, backend=backend, loss_type=loss_type, loss_agg_mode="token-mean",
                   batch_num_tokens=rl_scale, **ours)
    assert_close(got[0], want.detach(), "loss")
    assert_close(got[2], logp.grad, "d loss / d logprobs")


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,error,match", [
    (dict(loss_type="dro"), ValueError, "needs dro_beta"),
    (dict(loss_type="dro", dro_beta=0.0), ValueError, "dro_beta must be > 0"),
    (dict(loss_type="dro", dro_beta="0.1"), TypeError, "dro_beta must be a number"),
    (dict(loss_type="dapo", kl_tau=0.1), ValueError, "kl_tau is only used by loss_type ipo, prime_dppo"),
    (dict(loss_type="gpg", dro_beta=0.1), ValueError, "only used by loss_type dro"),
    (dict(loss_type="ipo", ipo_threshold=-0.1), ValueError, "ipo_threshold must be >= 0"),
    (dict(loss_type="prime_dppo", adv_tau=True), TypeError, "adv_tau must be a number"),
    (dict(loss_type="rloo", importance_sampling_level="sequence"), ValueError, "Sequence-level"),
    (dict(loss_type="rloo", delta=1.5), ValueError, "delta is only used by"),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        validate_loss_options(**options)


def test_liger_module_takes_the_new_options():
    from grpo_kernels import FusedLinearGRPOLoss

    batch = make_batch(3, 7)
    hidden, weight = torch.randn(3, 7, 16), torch.randn(37, 16) * 0.3
    ids = torch.randint(0, 37, (3, 7))
    module = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="prime_dppo",
                                 loss_options={"kl_tau": 0.05, "adv_tau": 2.0})
    loss, (clip_ratio,) = module(hidden, weight, ids, batch["mask"], batch["adv"], old_per_token_logps=batch["old"])
    want, _ = gk.fused_linear_grpo_loss(hidden, weight, ids, batch["mask"], batch["adv"], old_logprobs=batch["old"],
                                        loss_type="prime_dppo", kl_tau=0.05, adv_tau=2.0)
    assert_close(loss, want, "loss")
    with pytest.raises(TypeError, match="unknown grpo_loss option"):
        FusedLinearGRPOLoss(loss_options={"kl_ta": 0.3})
    with pytest.raises(TypeError, match="constructor's"):
        FusedLinearGRPOLoss(loss_options={"beta": 0.3})
