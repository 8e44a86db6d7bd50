"""verl 0.9.1's loss types in grpo_loss (geo_mean, dppo_tv, dppo_kl, kl_cov, clip_cov, CISPO's lower
bound) against the float64 reference: loss, metrics and d loss / d logprobs on both backends, a
fully masked row, T across two kernel tiles, a partial block of rows. Their agreement with verl's
own code is tested through the adapter in test_integration_verl.py."""

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from grpo_kernels.ops.grpo_loss import validate_loss_options
from grpo_kernels.reference import covariance_selection_reference
from test_grpo_loss import BACKENDS, check, make_batch

VERL_TYPES = ["geo_mean", "dppo_tv", "dppo_kl", "kl_cov", "clip_cov"]
TYPE_OPTIONS = {"kl_cov": dict(kl_cov_ratio=0.05, ppo_kl_coef=0.5), "clip_cov": dict(clip_cov_ratio=0.05, clip_cov_lb=-1.0)}


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


def _batch(per_token=False):
    batch = make_batch(B=5, T=300, advantage_per_token=per_token)  # two 256-token tiles, a partial row block
    batch["old"] = batch["old"].clamp(max=-0.05)  # probabilities (DPPO compares p and p_old), 1 - p_old >= 0.05
    # ratios above DPPO's cap clip_ratio_c, in row 0 (A > 0) and in the last row (A < 0), where
    # p >= p_old keeps them inside DPPO's trust region whatever the draw, so the truncation is exercised
    batch["old"][0, :4] = batch["logp"][0, :4] - 3.5
    batch["old"][-1, :4] = batch["logp"][-1, :4] - 3.5
    batch["mask"][-1, :4] = 1
    return batch


def _options(loss_type, seed=0, **extra):
    """The options twice (ours, the reference's): Clip-Cov's draw on equally seeded generators."""
    options = dict(loss_type=loss_type, epsilon_high=0.28, **TYPE_OPTIONS.get(loss_type, {}), **extra)
    ours, ref = dict(options), dict(options)
    if loss_type == "clip_cov":
        ours["generator"] = torch.Generator(DEVICE).manual_seed(seed)
        ref["generator"] = torch.Generator(DEVICE).manual_seed(seed)
    return ours, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", VERL_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_verl_loss_types(backend, loss_type, beta):
    ours, ref = _options(loss_type, beta=beta, kl_estimator="low_var_kl")
    got, _ = check(_batch(), backend, ref_options=ref, **ours)
    if loss_type in ("dppo_tv", "dppo_kl"):
        assert got[1]["pg_clipfrac_lower"] > 0  # the truncation is exercised
    if loss_type in ("kl_cov", "clip_cov"):
        assert got[1]["cov/selected_mean"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", VERL_TYPES)
def test_verl_loss_types_per_token_advantages_and_rollout_ratio(backend, loss_type):
    batch = _batch(per_token=True)
    is_ratio = torch.rand(5, 300) + 0.5
    ours, ref = _options(loss_type, seed=3, loss_agg_mode="seq-mean-token-mean")
    check(batch, backend, ref_options=dict(ref, rollout_is_ratio=is_ratio), rollout_is_ratio=is_ratio, **ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dppo_cap_and_cispo_lower_bound(backend):
    check(_batch(), backend, loss_type="dppo_tv", clip_ratio_c=3.0, epsilon_low=0.05)
    check(_batch(), backend, loss_type="cispo", epsilon_high=1.28, cispo_ratio_min=0.8)


def test_covariance_selection_counts(device):
    batch = _batch()
    mask = batch["mask"]
    n = int((mask != 0).sum())
    selected = covariance_selection_reference("kl_cov", batch["logp"], batch["adv"], mask, ratio=0.05)
    assert int(selected.sum()) == max(1, int(n * 0.05)) and not (selected & (mask == 0)).any()
    got = gk.grpo_loss(batch["logp"], mask, batch["adv"], old_logprobs=batch["old"], loss_type="kl_cov",
                       kl_cov_ratio=1e-9)[1]["cov/selected_mean"]
    assert got.item() == pytest.approx(1 / n)  # at least one token


def test_clip_cov_draw_follows_the_generator():
    batch = _batch()

    def selected(seed):
        return gk.grpo_loss(batch["logp"], batch["mask"], batch["adv"], old_logprobs=batch["old"],
                            loss_type="clip_cov", clip_cov_ratio=0.02, clip_cov_lb=-1.0,
                            generator=torch.Generator(DEVICE).manual_seed(seed))[0].item()

    assert selected(1) == selected(1)
    assert len({selected(seed) for seed in range(4)}) > 1


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(loss_type="geo_mean", importance_sampling_level="sequence"), ValueError, "Sequence-level"),
        (dict(loss_type="kl_cov", kl_cov_ratio=0.0), ValueError, r"kl_cov_ratio must be in \(0, 1\]"),
        (dict(loss_type="clip_cov", generator=3), TypeError, "generator must be a torch.Generator"),
        (dict(loss_type="dapo", clip_cov_ratio=0.1), ValueError, "only used by loss_type clip_cov"),
        (dict(loss_type="dppo_kl", clip_ratio_c=1.0), ValueError, "clip_ratio_c"),
        (dict(loss_type="cispo", cispo_ratio_min=-0.1), ValueError, "cispo_ratio_min must be >= 0"),
        (dict(loss_type="geo_mean", off_policy_mask_threshold=0.5), ValueError, "not supported with loss_type='geo_mean'"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        validate_loss_options(**options)
