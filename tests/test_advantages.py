"""group_advantages / gfpo_keep_mask against the float64 reference, TRL's code path and the contract."""

import math

import pytest
import torch

import grpo_kernels.ops.advantages.group as advantages_module
from grpo_kernels import GroupAdvantages, gfpo_keep_mask, group_advantages
from grpo_kernels.reference import group_advantages_reference

NAN = float("nan")
SCALES = ("group", "batch", "none")


@pytest.fixture(params=["dispatch", "torch"])
def backend(request, monkeypatch):
    """Run each test through the default dispatch (Triton: GPU or interpreter) and through the
    plain-PyTorch path that CPU tensors take without the interpreter."""
    if request.param == "torch":
        monkeypatch.setattr(advantages_module, "resolve_backend", lambda device, backend="auto": "torch")
    return request.param


def random_rewards(batch, num_functions, device, *, nan_fraction=0.0, discrete=False):
    shape = (batch,) if num_functions is None else (batch, num_functions)
    if discrete:  # pass/fail rewards: many groups of equal rewards
        rewards = torch.randint(0, 2, shape, device=device).float()
    else:
        rewards = torch.randn(shape, device=device) * 2.0 + 0.5
    if nan_fraction:
        rewards = torch.where(torch.rand(shape, device=device) < nan_fraction, NAN, rewards)
    return rewards


def assert_matches_reference(out, rewards, group_size, **kwargs):
    assert isinstance(out, GroupAdvantages)
    expected = group_advantages_reference(rewards, group_size, **kwargs)
    num_groups = rewards.shape[0] // group_size
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert out.advantages.dtype == out_dtype and out.advantages.shape == (rewards.shape[0],)
    for name, value, ref in zip(("group_mean", "group_std"), out[1:3], expected[1:3]):
        assert value.dtype == out_dtype and value.shape == (num_groups,), name
        torch.testing.assert_close(value.cpu().double(), ref, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(out.advantages.cpu().double(), expected[0], rtol=1e-4, atol=1e-5)
    assert out.zero_std.dtype == torch.bool
    assert torch.equal(out.zero_std.cpu(), expected[3])
    for tensor in out[:3]:
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(
    "batch, group_size, num_functions",
    [(24, 8, None), (21, 7, 3), (40, 20, 2), (5, 1, 2), (1, 1, None), (68, 68, 1)],
)
def test_matches_reference(backend, device, scale, batch, group_size, num_functions):
    rewards = random_rewards(batch, num_functions, device, nan_fraction=0.2)
    weights = None if num_functions is None else torch.rand(num_functions).add(0.25).tolist()
    out = group_advantages(rewards, group_size, scale=scale, reward_weights=weights)
    assert_matches_reference(out, rewards, group_size, scale=scale, reward_weights=weights)


@pytest.mark.parametrize("scale", SCALES)
def test_pass_fail_rewards_with_equal_groups(backend, device, scale):
    rewards = random_rewards(64, None, device, discrete=True)
    rewards[:8] = 1.0  # one group all right,
    rewards[8:16] = 0.0  # one all wrong,
    rewards[16:24] = torch.tensor([0.3] * 7 + [NAN])  # one equal but for an unscorable completion
    out = group_advantages(rewards, 8, scale=scale)
    assert_matches_reference(out, rewards, 8, scale=scale)
    assert out.zero_std[:3].all()
    # Equal rewards: exactly zero std and exactly zero advantages (the kernel shifts by a member).
    assert torch.equal(out.group_std[:3].cpu(), torch.zeros(3))
    assert torch.equal(out.advantages[:24].cpu(), torch.zeros(24))
    assert torch.equal(out.group_mean[:3].cpu(), torch.tensor([1.0, 0.0, 0.3]))


def test_weighted_components_and_nan(backend, device):
    rewards = torch.tensor(
        [[1.0, NAN, 2.0], [NAN, NAN, NAN], [0.5, 1.0, NAN], [0.0, 0.0, 1.0],
         [NAN, 3.0, NAN], [2.0, 2.0, 2.0], [NAN, NAN, NAN], [NAN, NAN, NAN]],
        device=device,
    )
    weights = [1.0, -0.5, 2.0]
    out = group_advantages(rewards, 4, scale="none", reward_weights=torch.tensor(weights))
    # Group 0: r = 5.0, excluded, 0.0, 2.0 -> mean 7/3 over three completions.
    mean0 = (5.0 + 0.0 + 2.0) / 3
    expected = torch.tensor([5.0 - mean0, 0.0, 0.0 - mean0, 2.0 - mean0, 0.0, 0.0, 0.0, 0.0])
    # Group 1: r = -1.5, 5.0 (two scorable), excluded, excluded.
    expected[4], expected[5] = -1.5 - 1.75, 5.0 - 1.75
    torch.testing.assert_close(out.advantages.cpu(), expected)
    torch.testing.assert_close(out.group_mean.cpu(), torch.tensor([mean0, 1.75]))
    expected_std = [torch.tensor([5.0, 0.0, 2.0]).std().item(), torch.tensor([-1.5, 5.0]).std().item()]
    torch.testing.assert_close(out.group_std.cpu(), torch.tensor(expected_std))
    assert_matches_reference(out, rewards, 4, scale="none", reward_weights=weights)


@pytest.mark.parametrize("scale", SCALES)
def test_group_size_one_and_lonely_completions(backend, device, scale):
    rewards = random_rewards(9, 2, device)
    out = group_advantages(rewards, 1, scale=scale)
    assert torch.equal(out.advantages.cpu(), torch.zeros(9))
    assert torch.equal(out.group_std.cpu(), torch.zeros(9))
    assert out.zero_std.all()
    torch.testing.assert_close(out.group_mean.cpu().double(), rewards.double().sum(1).cpu())

    # Groups left with one scorable completion, or none at all.
    rewards = torch.tensor([NAN, 2.0, NAN, NAN, NAN, NAN, NAN, NAN], device=device)
    out = group_advantages(rewards, 4, scale=scale)
    assert torch.equal(out.advantages.cpu(), torch.zeros(8))
    torch.testing.assert_close(out.group_mean.cpu(), torch.tensor([2.0, 0.0]))
    assert torch.equal(out.group_std.cpu(), torch.zeros(2))
    assert out.zero_std.all()
    all_nan = group_advantages(torch.full((6,), NAN, device=device), 3, scale=scale)
    for tensor in all_nan[:3]:
        assert torch.equal(tensor.cpu(), torch.zeros_like(tensor.cpu()))
    assert all_nan.zero_std.all()


def test_batch_scale_uses_whole_batch_std(backend, device):
    rewards = random_rewards(30, None, device, nan_fraction=0.2)
    rewards[0] = 3.0
    keep = torch.rand(30, device=device) < 0.7
    keep[0] = True
    out = group_advantages(rewards, 6, scale="batch", keep_mask=keep)
    included = keep & ~torch.isnan(rewards)
    batch_std = rewards[included].double().std().item()
    group_mean = rewards[:6][included[:6]].double().mean().item()
    torch.testing.assert_close(out.advantages[0].item(), (3.0 - group_mean) / (batch_std + 1e-4), rtol=1e-5, atol=1e-6)
    assert_matches_reference(out, rewards, 6, scale="batch", keep_mask=keep)
    # group_std stays the group's own std; it differs from the batch std used to scale.
    assert not torch.allclose(out.group_std.cpu().double(), torch.full((5,), batch_std, dtype=torch.float64))


@pytest.mark.parametrize("scale", SCALES)
def test_long_groups_span_several_chunks(backend, device, scale):
    # 1030 > 1024: the kernel loops over chunks and merges their statistics (Chan et al.).
    group_size = 1030
    rewards = random_rewards(2 * group_size, None, device, nan_fraction=0.1) + 100.0
    rewards[group_size:] = 7.25
    rewards[group_size + 3] = NAN
    out = group_advantages(rewards, group_size, scale=scale)
    assert_matches_reference(out, rewards, group_size, scale=scale)
    assert out.group_std[1].item() == 0.0 and out.zero_std.tolist() == [False, True]
    assert torch.equal(out.advantages[group_size:].cpu(), torch.zeros(group_size))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_reward_dtypes_and_strided_rewards(backend, device, dtype):
    rewards = random_rewards(16, 3, device, nan_fraction=0.2).to(dtype)
    out = group_advantages(rewards, 4, scale="group")
    assert_matches_reference(out, rewards, 4, scale="group")
    strided = random_rewards(3, 16, device, nan_fraction=0.2).t()  # [16, 3], stride (1, 16)
    assert not strided.is_contiguous()
    assert_matches_reference(group_advantages(strided, 8), strided, 8)


def test_empty_batch(backend, device):
    out = group_advantages(torch.zeros(0, device=device), 4)
    assert all(t.shape == (0,) for t in out) and out.zero_std.dtype == torch.bool


# ----------------------------------------------------------------------------------------------
# Side by side with TRL 1.16's GRPOTrainer._generate_and_score_completions
# ----------------------------------------------------------------------------------------------


def trl_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards):
    """The lines of trl/trainer/grpo_trainer.py (1.16.0, multi_objective_aggregation=
    "sum_then_normalize") that turn rewards_per_func into advantages, with TRL's own nanstd."""
    from trl.trainer.utils import nanstd

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("group_size", [1, 4, 8])
def test_matches_trl(backend, device, scale, group_size):
    rewards = torch.cat([random_rewards(32, 2, device, discrete=True),
                         random_rewards(32, 2, device, nan_fraction=0.3)])
    rewards[-group_size:] = NAN  # a fully unscorable group
    weights = torch.tensor([1.0, 0.5], device=device)
    out = group_advantages(rewards, group_size, scale=scale, reward_weights=weights)
    expected, trl_zero_std = trl_advantages(rewards.clone(), weights, group_size, scale)
    torch.testing.assert_close(out.advantages, expected, rtol=1e-4, atol=1e-5)
    if scale != "batch":  # TRL's flag is batch-level there; ours stays per group
        # TRL's NaN std (fewer than two scorable completions) reads "not zero"; we say zero.
        scorable = (~torch.isnan(rewards).all(dim=1)).view(-1, group_size).sum(dim=1)
        trl_per_group = trl_zero_std.view(-1, group_size)[:, 0]
        expected_zero = trl_per_group | (scorable < 2)
        assert torch.equal(out.zero_std, expected_zero)


# ----------------------------------------------------------------------------------------------
# GFPO
# ----------------------------------------------------------------------------------------------


def test_gfpo_keep_mask_top_k_with_ties_and_nan(device):
    scores = torch.tensor([1.0, 3.0, 3.0, NAN, 2.0, -1.0,
                           5.0, 5.0, 5.0, 5.0, NAN, 0.0], device=device)
    keep = gfpo_keep_mask(scores, 6, 3)
    assert keep.dtype == torch.bool and keep.shape == (12,)
    assert keep.cpu().tolist() == [False, True, True, False, True, False,
                                   True, True, True, False, False, False]
    assert gfpo_keep_mask(-torch.tensor([7, 3, 9, 3], device=device), 2, 1).cpu().tolist() == [False, True, False, True]


@pytest.mark.parametrize("group_size, k", [(8, 3), (5, 5), (6, 1)])
def test_gfpo_keep_mask_random(device, group_size, k):
    scores = torch.randint(0, 4, (4 * group_size,), device=device).float()  # many ties
    keep = gfpo_keep_mask(scores, group_size, k).cpu().view(-1, group_size)
    for group_scores, group_keep in zip(scores.cpu().view(-1, group_size).tolist(), keep):
        ranked = sorted(range(group_size), key=lambda j: (-group_scores[j], j))
        assert group_keep.nonzero().flatten().tolist() == sorted(ranked[:k])


@pytest.mark.parametrize("scale", SCALES)
def test_gfpo_advantages(backend, device, scale):
    group_size, k = 8, 4
    rewards = random_rewards(32, 2, device, nan_fraction=0.15)
    lengths = torch.randint(5, 50, (32,), device=device)
    keep = gfpo_keep_mask(-lengths.float(), group_size, k)
    out = group_advantages(rewards, group_size, scale=scale, keep_mask=keep)
    assert_matches_reference(out, rewards, group_size, scale=scale, keep_mask=keep)
    assert torch.equal(out.advantages[~keep].cpu(), torch.zeros(int((~keep).sum())))
    # The statistics are those of the kept completions alone.
    for g in range(4):
        members = slice(g * group_size, (g + 1) * group_size)
        kept_rewards = rewards[members][keep[members]]
        kept_rewards = kept_rewards[~torch.isnan(kept_rewards).all(dim=1)]
        if kept_rewards.shape[0]:
            expected_mean = torch.nansum(kept_rewards.double(), dim=1).mean()
            torch.testing.assert_close(out.group_mean[g].double().cpu(), expected_mean.cpu(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors before any launch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda r: group_advantages(r, 5), ValueError, "multiple of group_size"),
        (lambda r: group_advantages(r, 0), ValueError, "group_size must be >= 1"),
        (lambda r: group_advantages(r, 2.0), TypeError, "group_size must be an int"),
        (lambda r: group_advantages(r, True), TypeError, "group_size must be an int"),
        (lambda r: group_advantages(r, 4, scale="std"), ValueError, "scale must be one of"),
        (lambda r: group_advantages(r, 4, eps=0.0), ValueError, "eps must be finite and > 0"),
        (lambda r: group_advantages(r, 4, eps="1e-4"), TypeError, "eps must be a number"),
        (lambda r: group_advantages(r.long(), 4), TypeError, "rewards must have dtype"),
        (lambda r: group_advantages(r.tolist(), 4), TypeError, "rewards must be a torch.Tensor"),
        (lambda r: group_advantages(r[:, None, None], 4), ValueError, r"rewards must be \[B\] or \[B, K\]"),
        (lambda r: group_advantages(r[:, :0] if r.dim() == 2 else r[:, None][:, :0], 4), ValueError, "K >= 1"),
        (lambda r: group_advantages(r, 4, reward_weights=[1.0, 2.0]), ValueError, "reward_weights has 2"),
        (lambda r: group_advantages(r, 4, reward_weights=torch.ones(1, 1)), ValueError, "reward_weights must be 1-D"),
        (lambda r: group_advantages(r, 4, reward_weights=["a"]), TypeError, "reward_weights must be a sequence"),
        (lambda r: group_advantages(r, 4, reward_weights=[math.inf]), ValueError, "reward_weights must be finite"),
        (lambda r: group_advantages(r, 4, keep_mask=torch.ones(8, dtype=torch.bool, device=r.device)), ValueError, r"keep_mask must have shape \[B\]"),
        (lambda r: group_advantages(r, 4, keep_mask=torch.ones(12, device=r.device)), TypeError, "keep_mask must have dtype"),
        (lambda r: group_advantages(torch.where(r > 0, math.inf, r), 4), ValueError, "finite or NaN"),
        (lambda r: gfpo_keep_mask(r, 4, 5), ValueError, r"k must be in \[1, group_size=4\]"),
        (lambda r: gfpo_keep_mask(r, 4, 0), ValueError, r"k must be in \[1, group_size=4\]"),
        (lambda r: gfpo_keep_mask(r, 4, 1.5), TypeError, "k must be an int"),
        (lambda r: gfpo_keep_mask(r, 5, 1), ValueError, "multiple of group_size"),
        (lambda r: gfpo_keep_mask(r[:, None], 4, 1), ValueError, "scores must be 1-D"),
    ],
)
def test_bad_input(device, call, error, match):
    rewards = torch.randn(12, device=device).abs()
    with pytest.raises(error, match=match):
        call(rewards)


# ----------------------------------------------------------------------------------------------
# GDPO: multi_objective_aggregation="normalize_then_sum"
# ----------------------------------------------------------------------------------------------

GDPO = dict(multi_objective_aggregation="normalize_then_sum")


@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize(
    "batch, group_size, num_functions", [(24, 8, 3), (15, 5, 1), (6, 1, 2), (2 * 1030, 1030, 2)])
def test_gdpo_matches_reference(backend, device, scale, batch, group_size, num_functions):
    rewards = random_rewards(batch, num_functions, device, nan_fraction=0.2)
    weights = torch.rand(num_functions).add(0.25).tolist()
    keep = torch.rand(batch, device=device) < 0.8
    out = group_advantages(rewards, group_size, scale=scale, reward_weights=weights, keep_mask=keep, **GDPO)
    assert_matches_reference(out, rewards, group_size, scale=scale, reward_weights=weights, keep_mask=keep, **GDPO)
    assert torch.equal(out.advantages[~keep].cpu(), torch.zeros(int((~keep).sum())))


def test_gdpo_differs_from_sum_then_normalize(backend, device):
    # A reward on a large scale drowns the other in the sum; GDPO normalizes each first.
    rewards = torch.stack([torch.randn(16, device=device) * 100.0, torch.randn(16, device=device)], dim=1)
    summed = group_advantages(rewards, 4).advantages
    decoupled = group_advantages(rewards, 4, **GDPO).advantages
    assert not torch.allclose(summed, decoupled, atol=1e-2)
    assert abs(decoupled.double().mean().item()) < 1e-6  # batch-normalized
    torch.testing.assert_close(decoupled.double().std().item(), 1.0, atol=1e-3, rtol=0)


def test_gdpo_equal_groups_are_exactly_zero(backend, device):
    rewards = random_rewards(16, 2, device)
    rewards[4:8] = torch.tensor([1.0, 0.25], device=device)  # one group of equal completions
    out = group_advantages(rewards, 4, **GDPO)
    assert out.group_std[1].item() == 0.0 and out.zero_std.tolist() == [False, True, False, False]
    assert out.group_mean[1].item() == 0.0
    # its r is exactly 0, so its advantage is -batch_mean / (batch_std + eps), the same for all four
    assert len(set(out.advantages[4:8].tolist())) == 1


def trl_gdpo_advantages(rewards_per_func, reward_weights, num_generations):
    """trl/trainer/grpo_trainer.py (1.16.0), multi_objective_aggregation="normalize_then_sum",
    with TRL's own nanstd."""
    from trl.trainer.utils import nanstd

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    num_funcs = rewards_per_func.shape[1]
    grouped = rewards_per_func.view(-1, num_generations, num_funcs)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    reward_k = (grouped - mean_k) / (std_k + 1e-4)
    reward_k = reward_k.view(-1, num_funcs)
    rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("group_size", [1, 4, 8])
def test_gdpo_matches_trl(backend, device, group_size):
    rewards = torch.cat([random_rewards(32, 3, device, discrete=True),
                         random_rewards(32, 3, device, nan_fraction=0.3)])
    rewards[-group_size:] = NAN  # a fully unscorable group
    rewards[:group_size, 1] = NAN  # a function that scored nothing in a group
    weights = torch.tensor([1.0, 0.5, 2.0], device=device)
    out = group_advantages(rewards, group_size, reward_weights=weights, **GDPO)
    expected = trl_gdpo_advantages(rewards.clone(), weights, group_size)
    torch.testing.assert_close(out.advantages, expected, rtol=1e-4, atol=1e-5)




@pytest.mark.parametrize("scale", ["group", "none"])
def test_gdpo_matches_verl(backend, device, scale, monkeypatch):
    """verl 0.9.1's compute_gdpo_outcome_advantage with one response token per completion: its
    token-weighted batch whitening then weighs completions equally, as ours does; eps = verl's 1e-6
    (verl's rsqrt(var + 1e-8) vs our 1 / (std + 1e-6) differ by ~1e-6 relative)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    grpo = core_algos.compute_grpo_outcome_advantage  # verl's gdpo calls it: verl's own, not a patched one
    monkeypatch.setattr(core_algos, "compute_grpo_outcome_advantage", getattr(grpo, "_verl_original", grpo))
    import numpy as np
    from omegaconf import OmegaConf

    group_size, num_groups = 4, 5
    rewards = random_rewards(group_size * num_groups, 2, device).cpu()
    weights = [1.0, 0.3]
    index = np.repeat(np.arange(num_groups), group_size)
    response_mask = torch.ones(group_size * num_groups, 1)
    config = OmegaConf.create({"gdpo_reward_keys": ["a", "b"], "gdpo_reward_weights": weights})
    batch = {"prompts": torch.zeros(group_size * num_groups, 3),
             "attention_mask": torch.ones(group_size * num_groups, 4, dtype=torch.long)}
    non_tensor_batch = {"a": rewards[:, 0].numpy(), "b": rewards[:, 1].numpy()}
    expected, _ = core_algos.compute_gdpo_outcome_advantage(
        token_level_rewards=torch.zeros(group_size * num_groups, 1), response_mask=response_mask, index=index,
        epsilon=1e-6, norm_adv_by_std_in_grpo=scale == "group", config=config,
        non_tensor_batch=non_tensor_batch, batch=batch)
    out = group_advantages(rewards.to(device), group_size, scale=scale, eps=1e-6, reward_weights=weights, **GDPO)
    torch.testing.assert_close(out.advantages.cpu(), expected[:, 0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Precision: statistics in float64 (issue #10, class 3)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_float64_rewards_beyond_float32_range(backend, device, aggregation):
    # 1e39 is finite in float64 but inf in float32: the old code returned NaN advantages.
    rewards = torch.tensor([1e39, 2e39, 3e39, 4e39, 1.0, 2.0, 3.0, 5.0], dtype=torch.float64, device=device)
    out = group_advantages(rewards, 4, multi_objective_aggregation=aggregation)
    assert out.advantages.dtype == torch.float64
    assert_matches_reference(out, rewards, 4, multi_objective_aggregation=aggregation)
    if aggregation == "sum_then_normalize":
        assert out.group_mean[0].item() == pytest.approx(2.5e39, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_spread_keeps_its_advantages(backend, device, dtype):
    # Squared deviations of 1e20 overflow float32: the old code returned all-zero advantages.
    rewards = torch.tensor([1e20, -1e20, 3e20, 0.0], dtype=dtype, device=device)
    out = group_advantages(rewards, 4)
    assert_matches_reference(out, rewards, 4)
    assert (out.advantages.abs() > 0.1).sum() >= 3
    out = group_advantages(rewards, 4, scale="none")
    assert out.advantages[0].item() == pytest.approx(1e20 - 0.75e20, rel=1e-6)


def test_rewards_beyond_float64_squares_are_rejected(device):
    rewards = torch.tensor([1e160, 0.0, 1.0, 2.0], dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="rescale the rewards"):
        group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="rescale the rewards"):
        group_advantages(torch.tensor([[1e100, 1.0]] * 4, dtype=torch.float64, device=device), 4,
                         reward_weights=[1e60, 1.0])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(multi_objective_aggregation="sum"), ValueError, "multi_objective_aggregation must be one of"),
        (dict(multi_objective_aggregation=None), ValueError, "multi_objective_aggregation must be one of"),
        (dict(multi_objective_aggregation="normalize_then_sum", scale="batch"), ValueError, "scale='batch' does not"),
    ],
)
def test_gdpo_bad_input(device, kwargs, error, match):
    with pytest.raises(error, match=match):
        group_advantages(torch.randn(12, 2, device=device), 4, **kwargs)


# ----------------------------------------------------------------------------------------------
# verl's index: groups of any size, in any row order (issue #20)
# ----------------------------------------------------------------------------------------------


def uneven_index(device):
    """17 rows: groups of 5, 4, 3, 2, 1, 1 and 1 rows, interleaved, with ids that are neither
    sorted nor consecutive (a negative one too)."""
    ids = [7, 2, 7, -3, 2, 40, 7, 2, 11, 7, 11, 2, -3, 7, 11, 5, 9]
    return torch.tensor(ids, device=device)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("num_functions", [None, 3])
def test_index_matches_reference(backend, device, scale, num_functions):
    index = uneven_index(device)
    rewards = random_rewards(index.shape[0], num_functions, device, nan_fraction=0.15)
    keep = torch.rand(index.shape[0], device=device) < 0.85
    weights = None if num_functions is None else [1.0, -0.5, 2.0]
    out = group_advantages(rewards, index=index, scale=scale, reward_weights=weights, keep_mask=keep)
    expected = group_advantages_reference(rewards, index=index, scale=scale, reward_weights=weights, keep_mask=keep)
    assert out.group_mean.shape == (7,)
    torch.testing.assert_close(out.advantages.cpu().double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.group_mean.cpu().double(), expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.group_std.cpu().double(), expected[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(out.zero_std.cpu(), expected[3])


@pytest.mark.parametrize("scale", ["group", "none"])
def test_index_gdpo_matches_reference(backend, device, scale):
    index = uneven_index(device)
    rewards = random_rewards(index.shape[0], 2, device, nan_fraction=0.15)
    out = group_advantages(rewards, index=index, scale=scale, reward_weights=[1.0, 0.5], **GDPO)
    expected = group_advantages_reference(rewards, index=index, scale=scale, reward_weights=[1.0, 0.5], **GDPO)
    torch.testing.assert_close(out.advantages.cpu().double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.group_std.cpu().double(), expected[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", SCALES)
def test_index_of_contiguous_groups_is_group_size(backend, device, scale):
    # The same groups as group_size=4 give bitwise the same numbers; shuffling the rows shuffles
    # the advantages and leaves the group statistics as they are.
    rewards = random_rewards(24, 2, device, nan_fraction=0.1)
    index = torch.arange(24, device=device) // 4
    by_size = group_advantages(rewards, 4, scale=scale)
    by_index = group_advantages(rewards, index=index, scale=scale)
    for got, want in zip(by_index, by_size):
        assert torch.equal(got, want)
    perm = torch.randperm(24, device=device)
    shuffled = group_advantages(rewards[perm], index=index[perm] * 3 + 100, scale=scale)
    torch.testing.assert_close(shuffled.advantages, by_size.advantages[perm], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(shuffled.group_mean, by_size.group_mean, rtol=1e-6, atol=1e-7)


def test_index_long_and_short_groups(backend, device):
    # one group longer than the kernel's 1024-member chunk beside groups of 1 and 3
    index = torch.cat([torch.zeros(1030, dtype=torch.long), torch.tensor([1, 2, 2, 2])]).to(device)
    index = index[torch.randperm(index.shape[0], device=device)]
    rewards = random_rewards(index.shape[0], None, device, nan_fraction=0.05) + 50.0
    out = group_advantages(rewards, index=index, scale="group")
    assert_close = torch.testing.assert_close
    expected = group_advantages_reference(rewards, index=index, scale="group")
    assert_close(out.advantages.cpu().double(), expected[0], rtol=1e-5, atol=1e-6)
    assert_close(out.group_std.cpu().double(), expected[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda r, i: group_advantages(r, index=i.float()), TypeError, "index must have dtype"),
        (lambda r, i: group_advantages(r, index=i[:-1]), ValueError, r"index must have shape \[B\]=\[12\]"),
        (lambda r, i: group_advantages(r, index=i[:, None]), ValueError, "index must be 1-D"),
        (lambda r, i: group_advantages(r, 4, index=i), ValueError, "exactly one of group_size"),
        (lambda r, i: group_advantages(r), ValueError, "exactly one of group_size"),
        (lambda r, i: group_advantages(r, index=i.tolist()), TypeError, "index must be a torch.Tensor"),
        (lambda r, i: group_advantages(r, index=i.to("meta")), ValueError, "index is on meta"),
        (lambda r, i: group_advantages(r, 4, reward_weights=[True]), TypeError, "reward_weights must be a sequence"),
        (lambda r, i: group_advantages(r, 4, reward_weights=["1.0"]), TypeError, "reward_weights must be a sequence"),
        (lambda r, i: group_advantages(r, 4, backend="cuda"), ValueError, "backend must be"),
    ],
)
def test_index_bad_input(device, call, error, match):
    rewards = torch.randn(12, device=device)
    with pytest.raises(error, match=match):
        call(rewards, torch.arange(12, device=device) % 5)


def test_meta_tensors_give_shapes():
    # issue #21: no .item() error; group_size gives every shape, index cannot (its values count the groups)
    out = group_advantages(torch.empty(12, 3, device="meta"), 4, reward_weights=[1.0, 2.0, 0.5])
    assert [t.shape for t in out] == [(12,), (3,), (3,), (3,)]
    assert all(t.device.type == "meta" for t in out) and out.zero_std.dtype == torch.bool
    assert group_advantages(torch.empty(8, dtype=torch.float64, device="meta"), 2).advantages.dtype == torch.float64
    with pytest.raises(ValueError, match="meta device: the number of groups depends on its values"):
        group_advantages(torch.empty(12, device="meta"), index=torch.empty(12, dtype=torch.long, device="meta"))
