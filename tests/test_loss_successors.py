"""The second round of GRPO successors in grpo_loss: VESPO, dual-clip PPO, the KL estimators and
verl's aggregation modes, against the float64 reference, TRL 1.16's own code (``get_gamma_weights``,
``_compute_loss``) and verl 0.9.1's own code (``compute_policy_loss_vanilla``, ``kl_penalty``,
``agg_loss``), on both backends; loss, d loss / d logp and metrics."""

import collections
import types

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from test_grpo_loss import assert_close, check, make_batch, run_loss

BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


def long_batch(B=5, T=300):
    """T across two kernel tiles (BLOCK_T = 256), a fully masked row, mixed-sign advantages."""
    return make_batch(B, T)


# ---------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(loss_type="vespo"),
    dict(loss_type="vespo", beta=0.04, vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0,
         vespo_lambda_neg=0.0),
    dict(loss_type="vespo", rollout_is_ratio=(4, 1)),
    dict(loss_type="vespo", rollout_is_ratio=(4, 7), rollout_is_mode="mask", rollout_is_clip_max=1.1),
    dict(loss_type="grpo", clip_ratio_c=1.5),
    dict(loss_type="bnpo", clip_ratio_c=3.0, importance_sampling_level="sequence", beta=0.04),
], ids=["vespo", "vespo-options", "vespo-is-row", "vespo-is-mask", "dual-clip", "dual-clip-gspo"])
def test_new_loss_types_match_reference(backend, case):
    case = dict(case)
    if "rollout_is_ratio" in case:
        case["rollout_is_ratio"] = torch.exp(0.1 * torch.randn(*case["rollout_is_ratio"]))
    batch = make_batch()
    batch["mask"][3, 1], batch["adv"][3] = 1, -1.0
    # small ratios so that VESPO's weights are neither 0 nor saturated, big ones so dual clip bites
    batch["old"] = batch["logp"] + (0.05 if case["loss_type"] == "vespo" else 1.0) * torch.randn_like(batch["logp"])
    if case["loss_type"] != "vespo":
        batch["old"][3, 1] = batch["logp"][3, 1] - 2.0  # a token with A < 0 beyond the dual clip
    got, _ = check(batch, backend, **case)
    if "clip_ratio_c" in case and case.get("importance_sampling_level") != "sequence":
        assert got[1]["pg_clipfrac_lower"] > 0, "the case does not exercise the dual clip"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", [None, "kl", "abs", "mse", "low_var_kl", "k1+", "abs+", "k2+", "k3+"])
def test_kl_estimators_match_reference(backend, estimator):
    batch = make_batch()
    batch["ref"][0, :3] = batch["logp"][0, :3] - 25.0  # beyond verl's clamps
    check(batch, backend, beta=0.1, kl_estimator=estimator, use_bias_correction_kl=estimator == "k3+")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,globals_", [
    ("token-mean", {}), ("token-mean", dict(dp_size=2, batch_num_tokens=50)), ("token-sum", dict(dp_size=4)),
    ("seq-mean-token-sum", {}), ("seq-mean-token-sum", dict(dp_size=2, global_batch_size=9)),
    ("seq-mean-token-mean", {}), ("seq-mean-token-sum-norm", {}),
    ("seq-mean-token-sum-norm", dict(loss_scale_factor=64.0)),
])
def test_loss_agg_modes_match_reference(backend, mode, globals_):
    check(make_batch(), backend, loss_type="grpo", loss_agg_mode=mode, beta=0.04, **globals_)


@pytest.mark.parametrize("backend", BACKENDS)
def test_across_tiles(backend):
    batch = long_batch()
    batch["old"] = batch["logp"] + 0.01 * torch.randn_like(batch["logp"])
    check(batch, backend, loss_type="vespo", beta=0.04, kl_estimator="k3")
    check(long_batch(), backend, loss_type="grpo", clip_ratio_c=2.0, loss_agg_mode="seq-mean-token-mean")


# ---------------------------------------------------------------------------------------------
# Against TRL 1.16's own VESPO
# ---------------------------------------------------------------------------------------------


class _OneProcess:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_vespo_loss(batch, logp, is_ratio, *, beta, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """TRL's GRPOTrainer._compute_loss for loss_type='vespo', bound to a one-process stub."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logp.shape
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, accelerator=_OneProcess(), off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type="vespo", epsilon_low=0.2, epsilon_high=0.2,
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=T,
        _entropy_bonus_enabled=False, _metrics={"train": collections.defaultdict(list)},
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1,
                                   vespo_k_pos=k_pos, vespo_lambda_pos=lambda_pos, vespo_k_neg=k_neg,
                                   vespo_lambda_neg=lambda_neg))
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=batch["mask"],
                  advantages=batch["adv"], old_per_token_logps=batch["old"], ref_per_token_logps=batch["ref"],
                  num_items_in_batch=batch["mask"].sum().float())
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_is,beta,params", [
    (False, 0.0, {}), (True, 0.04, {}), (True, 0.0, dict(k_pos=1.0, lambda_pos=0.5, k_neg=4.0, lambda_neg=1e-6)),
])
def test_vespo_matches_trl(backend, with_is, beta, params):
    pytest.importorskip("trl")
    batch = make_batch(4, 9)
    batch["old"] = batch["logp"] + 0.08 * torch.randn_like(batch["logp"])
    is_ratio = torch.exp(0.1 * torch.randn(4, 9)) if with_is else None
    trl_logp = batch["logp"].clone().requires_grad_()
    want_loss, want_metrics = trl_vespo_loss(batch, trl_logp, is_ratio, beta=beta, **params)
    want_loss.backward()
    ours = {f"vespo_{k}": v for k, v in params.items()}
    got = run_loss(gk.grpo_loss, batch, backend=backend, with_entropy=False, with_ref=beta != 0, loss_type="vespo",
                   beta=beta, rollout_is_ratio=is_ratio, num_items_in_batch=batch["mask"].sum(), **ours)
    assert_close(got[0], want_loss.detach(), "loss")
    assert_close(got[2], trl_logp.grad, "d loss / d logprobs")
    assert_close(got[1]["vespo/phi_seq_mean"], torch.tensor(want_metrics["vespo/phi_seq_mean"]), "phi metric")
    assert 0.05 < got[1]["vespo/phi_seq_mean"] < 50, "weights degenerate: the case tests nothing"


def test_vespo_phi_matches_trl_get_gamma_weights():
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    from grpo_kernels.ops.grpo_loss.rows_torch import on_torch
    from grpo_kernels.ops.grpo_loss.terms import vespo_phi

    B, T = 6, 5
    mask = (torch.rand(B, T) > 0.3).float()
    log_ratio = torch.randn(B, T) * torch.tensor([0.01, 0.1, 1.0, 10.0, 30.0, 0.5])[:, None]  # incl. clamps
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 0.3])[:, None]
    want = GRPOTrainer.get_gamma_weights(adv, log_ratio, mask, None)
    log_w = (log_ratio.clamp(-20, 20) * mask).sum(-1, keepdim=True).clamp(-18.420680743952367, 20.0)
    got = on_torch(vespo_phi)(log_w, adv, 2.0, 3.0, 3.0, 2.0)
    assert_close(got, want, "phi")


def test_vespo_refuses_what_it_cannot_weigh():
    batch = make_batch()
    with pytest.raises(ValueError, match="advantages must be"):
        gk.grpo_loss(batch["logp"], batch["mask"], torch.randn(4, 7), loss_type="vespo")
    with pytest.raises(ValueError, match="vespo_k_pos is only used by loss_type vespo"):
        gk.grpo_loss(batch["logp"], batch["mask"], batch["adv"], loss_type="grpo", vespo_k_pos=1.0)


# ---------------------------------------------------------------------------------------------
# Against verl 0.9.1's own code
# ---------------------------------------------------------------------------------------------


class _VerlActorConfig:
    """The fields of verl's ActorConfig that compute_policy_loss_vanilla reads."""

    def __init__(self, clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c, **global_batch_info):
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = clip_ratio, clip_ratio_low, clip_ratio_high
        self.clip_ratio_c = clip_ratio_c
        self.global_batch_info = global_batch_info

    def get(self, name, default=None):
        return getattr(self, name, default)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,globals_,with_is", [
    ("token-mean", {}, False), ("seq-mean-token-mean", {}, True), ("seq-mean-token-sum", dict(dp_size=2,
                                                                                               global_batch_size=7), False),
    ("token-sum", {}, False), ("seq-mean-token-sum-norm", dict(loss_scale_factor=10), True),
    ("token-mean", dict(dp_size=2, batch_num_tokens=33), False),
])
def test_dual_clip_matches_verl_vanilla(backend, mode, globals_, with_is):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    batch = make_batch(5, 9, advantage_per_token=True)
    batch["old"] = batch["logp"] + torch.randn_like(batch["logp"])
    batch["old"][2, 3] = batch["logp"][2, 3] - 30.0  # beyond verl's log-ratio clamp
    batch["mask"][3, 1], batch["adv"][3, 1], batch["old"][3, 1] = 1, -1.0, batch["logp"][3, 1] - 2.0  # dual clip
    is_weights = torch.exp(0.2 * torch.randn(5, 9)) if with_is else None
    verl_logp = batch["logp"].clone().requires_grad_()
    config = _VerlActorConfig(0.2, 0.2, 0.28, 3.0, **globals_)
    want_loss, want_metrics = core_algos.compute_policy_loss_vanilla(
        batch["old"], verl_logp, batch["adv"], batch["mask"].float(), loss_agg_mode=mode, config=config,
        rollout_is_weights=is_weights)
    want_loss.backward()
    got = run_loss(gk.grpo_loss, batch, backend=backend, with_entropy=False, with_ref=False, loss_type="grpo",
                   epsilon_low=0.2, epsilon_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode,
                   rollout_is_ratio=is_weights, **globals_)
    assert_close(got[0], want_loss.detach(), "loss")
    assert_close(got[2], verl_logp.grad, "d loss / d log_prob")
    assert_close(got[1]["clip_ratio/region_mean"], torch.tensor(want_metrics["actor/pg_clipfrac"]), "pg_clipfrac")
    assert_close(got[1]["pg_clipfrac_lower"], torch.tensor(want_metrics["actor/pg_clipfrac_lower"]),
                 "pg_clipfrac_lower")
    assert want_metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "abs+", "k2+",
                                       "mse+", "low_var_kl+", "k3+"])
def test_kl_estimators_match_verl_kl_penalty(backend, estimator):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    batch = make_batch(4, 9)
    batch["ref"][0, :3] = batch["logp"][0, :3] - 25.0  # beyond verl's clamps
    batch["adv"] = torch.zeros_like(batch["adv"])  # the KL term alone
    verl_logp = batch["logp"].clone().requires_grad_()
    kld = core_algos.kl_penalty(verl_logp, batch["ref"], estimator)
    want = core_algos.agg_loss(kld, batch["mask"].float(), "token-mean") * 0.3
    want.backward()
    got = run_loss(gk.grpo_loss, batch, backend=backend, with_entropy=False, loss_type="grpo", beta=0.3,
                   kl_estimator=estimator, loss_agg_mode="token-mean")
    assert_close(got[0], want.detach(), "loss")
    assert_close(got[2], verl_logp.grad, "d loss / d log_prob")
    assert_close(got[1]["kl"], core_algos.agg_loss(kld.detach(), batch["mask"].float(), "token-mean"), "kl")


def test_aggregation_options_validated():
    for options, match in [
        (dict(loss_agg_mode="mean"), "loss_agg_mode"),
        (dict(dp_size=2), "needs loss_agg_mode"),
        (dict(loss_agg_mode="token-mean", dp_size=2), "batch_num_tokens"),
        (dict(loss_agg_mode="seq-mean-token-mean", dp_size=2), "global_batch_size"),
        (dict(loss_agg_mode="token-mean", dp_size=0), "dp_size"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(clip_ratio_c=1.0), "clip_ratio_c"),
        (dict(loss_type="cispo", clip_ratio_c=3.0), "clip_ratio_c is only used"),
    ]:
        with pytest.raises(ValueError, match=match):
            gk.validate_loss_options(**options)
