"""estimate_advantages: each of verl 0.9.1's estimators against verl's own function
(verl/trainer/ppo/core_algos.py, installed in CI) and against the float64 reference written from
its source (grpo_kernels.reference.advantage_estimator_reference), on both CPU paths; uneven,
non-contiguous and one-row groups through verl's index; masks with empty rows and holes."""

import os

import pytest
import torch

import grpo_kernels.ops.advantages.group as group_module
from grpo_kernels.ops.advantages import ESTIMATORS, TokenAdvantages, estimate_advantages, validate_estimator_options
from grpo_kernels.ops.advantages.estimators import docs_in_sync
from grpo_kernels.reference import advantage_estimator_reference

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "semantics.md")
UNGROUPED = ("reinforce_plus_plus", "remax")
TOKEN_BASELINE = ("optimal_token_baseline", "tir_optimal_token_baseline")


@pytest.fixture(params=["dispatch", "torch"])
def backend(request, monkeypatch):
    """The default dispatch (Triton: GPU or interpreter) and the plain-PyTorch path."""
    if request.param == "torch":
        monkeypatch.setattr(group_module, "resolve_backend", lambda device, backend="auto": "torch")
    return request.param


# 15 rows: groups 4 (x4), 1 (x3), 9 (x2, one of them empty), 6 (x1), 2 (x1), 0 (x4), interleaved.
INDEX = [4, 1, 4, 9, 1, 6, 0, 4, 9, 2, 0, 1, 0, 4, 0]
# grpo_passk needs groups of at least two rows
PASSK_INDEX = [4, 1, 4, 9, 1, 9, 0, 4, 9, 1, 0, 1, 0, 4, 0]


def make_batch(device, dtype=torch.float32, T=13, index=INDEX):
    """verl-shaped inputs: an outcome reward on each row's last response token plus small
    token-level rewards (KL-in-reward style), a response mask with one empty row, rows of several
    lengths (one group with a unique longest row, one with a tie), and a tool-output hole."""
    B = len(index)
    lengths = torch.tensor([13, 7, 9, 0, 5, 11, 8, 13, 6, 3, 8, 7, 12, 4, 2])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    mask[2, 3:5] = 0.0  # tool output inside a response
    mask[12, 6:9] = 0.0
    rewards = torch.randn(B, T) * 0.05 * mask
    outcome = torch.randint(0, 3, (B,)).float() + torch.randn(B) * 0.3
    rewards[torch.arange(B), (lengths - 1).clamp(min=0)] += outcome * (lengths > 0)
    old = torch.rand(B, T).clamp(0.05, 0.95).log()
    sum_pi_squared = old.exp() ** 2 + torch.rand(B, T) * 0.3
    tensors = dict(rewards=rewards, mask=mask, index=torch.tensor(index), old_logprobs=old,
                   sum_pi_squared=sum_pi_squared, rollout_is_ratio=torch.rand(B, T) + 0.5,
                   reward_baselines=torch.randn(B), reward_components=torch.randn(B, 3))
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in tensors.items()}


def our_call(name, data, options):
    """estimate_advantages' arguments for estimator ``name`` on ``make_batch``'s data."""
    spec = ESTIMATORS[name]
    kwargs = dict(options)
    if spec.grouped:
        kwargs["index"] = data["index"]
    for input_name in spec.inputs + spec.optional_inputs:
        if input_name == "reward_weights":
            kwargs[input_name] = [1.0, -0.5, 2.0]
        elif input_name != "rollout_is_ratio" or options.pop("with_is", True):
            kwargs[input_name] = data[input_name]
    kwargs.pop("with_is", None)
    return kwargs


CASES = [(name, {}) for name in ESTIMATORS] + [
    ("grpo", {"norm_adv_by_std_in_grpo": False, "epsilon": 1e-3}),
    ("grpo_passk", {"norm_adv_by_std_in_grpo": False}),
    ("gdpo", {"norm_adv_by_std_in_grpo": False}),
    ("gpg", {"f_norm": 2.5}),
    ("reinforce_plus_plus", {"gamma": 0.9}),
    ("optimal_token_baseline", {"handle_zero_tail": False, "with_is": False}),
    ("tir_optimal_token_baseline", {"handle_zero_tail": False, "epsilon": 1e-3}),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_matches_float64_reference(backend, device, name, options):
    data = make_batch(device, torch.float64, index=PASSK_INDEX if name == "grpo_passk" else INDEX)
    kwargs = our_call(name, data, dict(options))
    out = estimate_advantages(name, data["rewards"], data["mask"], **kwargs)
    assert isinstance(out, TokenAdvantages) and out.advantages.dtype == torch.float64
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "index"}
    want = advantage_estimator_reference(name, data["rewards"], data["mask"],
                                         None if name in UNGROUPED else kwargs["index"], **reference_kwargs)
    torch.testing.assert_close(out.advantages.cpu(), want[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.returns.cpu(), want[1], rtol=1e-9, atol=1e-10)
    assert out.advantages.abs().sum() > 0  # the case carries a signal


def verl_call(name, data, options):
    """verl's function and its keyword arguments, as verl's compute_advantage passes them (index:
    verl's uid array, a numpy array of strings)."""
    np = pytest.importorskip("numpy")
    from omegaconf import OmegaConf

    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    options = dict(options)
    config = OmegaConf.create({"gamma": options.pop("gamma", 1.0),
                               "norm_adv_by_std_in_grpo": options.get("norm_adv_by_std_in_grpo", True)})
    kwargs = {"token_level_rewards": data["rewards"].cpu().clone(), "response_mask": data["mask"].cpu(), "config": config}
    if name not in UNGROUPED:
        kwargs["index"] = np.array([f"uid-{i}" for i in data["index"].tolist()], dtype=object)
    if name == "remax":
        kwargs["reward_baselines"] = data["reward_baselines"].cpu()
    if name in TOKEN_BASELINE:
        kwargs.update(old_log_probs=data["old_logprobs"].cpu(), sum_pi_squared=data["sum_pi_squared"].cpu(),
                      rollout_is_weights=data["rollout_is_ratio"].cpu() if options.pop("with_is", True) else None)
        kwargs.pop("config")
    if name == "grpo_passk":
        options.pop("norm_adv_by_std_in_grpo", None)  # verl reads it from the config
    if name == "gdpo":  # verl reads the components from non_tensor_batch, the keys from the config
        B = data["rewards"].shape[0]
        config.gdpo_reward_keys = ["a", "b", "c"]
        config.gdpo_reward_weights = [1.0, -0.5, 2.0]
        kwargs["non_tensor_batch"] = {k: data["reward_components"][:, j].cpu().numpy() for j, k in enumerate("abc")}
        kwargs["batch"] = {"prompts": torch.zeros(B, 2), "attention_mask": torch.cat(
            [torch.ones(B, 2), torch.ones_like(data["mask"].cpu())], dim=1).long()}
    kwargs.update(options)
    verl_fn = core_algos.get_adv_estimator_fn(name)
    while hasattr(verl_fn, "_verl_original"):  # another test's patch_verl() left ours registered
        verl_fn = verl_fn._verl_original
    return verl_fn, kwargs


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_matches_verl(backend, device, name, options):
    data = make_batch(device, index=PASSK_INDEX if name == "grpo_passk" else INDEX)
    verl_fn, verl_kwargs = verl_call(name, data, options)
    want_advantages, want_returns = verl_fn(**verl_kwargs)
    out = estimate_advantages(name, data["rewards"], data["mask"], **our_call(name, data, dict(options)))
    assert out.advantages.dtype == torch.float32 and out.advantages.shape == data["rewards"].shape
    # verl works in float32: (x - mean) / std of a group whose values nearly agree loses
    # ~eps32 * |x| / std to cancellation (ours is float64 inside), so the tolerance grows with it.
    atol = 2e-6 + 2.0**-22 * _std_conditioning(name, data)
    torch.testing.assert_close(out.advantages.cpu(), want_advantages.float(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(out.returns.cpu(), want_returns.float(), rtol=1e-5, atol=atol)


def _std_conditioning(name, data):
    """max |x| / std over the groups of at least 2 rows, for each quantity x an estimator divides
    by its group std (0 for the estimators that divide by none)."""
    if name not in ("grpo", "grpo_vectorized", "grpo_passk", "gdpo"):
        return 0.0
    index = torch.tensor(PASSK_INDEX if name == "grpo_passk" else INDEX)
    columns = data["reward_components"] if name == "gdpo" else data["rewards"].sum(dim=1, keepdim=True)
    columns = columns.double().cpu()
    worst = 0.0
    for group in index.unique():
        rows = columns[index == group]
        if rows.shape[0] > 1:
            worst = max(worst, float((rows.abs().amax(dim=0) / rows.std(dim=0).clamp(min=1e-12)).max()))
    return worst


def test_group_size_is_contiguous_index(backend, device):
    data = make_batch(device, torch.float64)
    index = torch.arange(15, device=device) // 5
    for name in ("grpo", "rloo", "opo", "optimal_token_baseline"):
        kwargs = our_call(name, data, {})
        kwargs.pop("index")
        by_size = estimate_advantages(name, data["rewards"], data["mask"], group_size=5, **kwargs)
        by_index = estimate_advantages(name, data["rewards"], data["mask"], index=index, **kwargs)
        assert torch.equal(by_size.advantages, by_index.advantages), name


def test_verl_conventions_for_a_group_of_one(backend, device):
    # a lone row: grpo s / (1 + eps), rloo s, rloo_vectorized 0, opo s, and no token baseline
    rewards = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0]], device=device)
    mask = torch.ones(3, 2, device=device)
    index = torch.tensor([0, 1, 1], device=device)
    first = {name: estimate_advantages(name, rewards, mask, index=index).advantages[0, 0].item()
             for name in ("grpo", "rloo", "rloo_vectorized", "opo")}
    assert first == pytest.approx({"grpo": 2.0 / (1 + 1e-6), "rloo": 2.0, "rloo_vectorized": 0.0, "opo": 2.0})
    otb = estimate_advantages("optimal_token_baseline", rewards, mask, index=index,
                              old_logprobs=torch.full_like(rewards, -1.0), sum_pi_squared=torch.full_like(rewards, 0.3))
    torch.testing.assert_close(otb.advantages[0], otb.returns[0])


def test_passk_rewards_only_the_best(backend, device):
    rewards = torch.zeros(6, 3, device=device)
    rewards[:, -1] = torch.tensor([0.0, 1.0, 0.5, 2.0, 2.0, 1.0], device=device)
    out = estimate_advantages("grpo_passk", rewards, torch.ones_like(rewards), index=torch.tensor([0, 0, 0, 1, 1, 1]).to(device),
                              norm_adv_by_std_in_grpo=False)
    assert out.advantages[:, 0].tolist() == [0.0, 0.5, 0.0, 0.0, 0.0, 0.0]  # group 1: a tie, no signal


def test_zero_tail_and_multi_turn_packing_change_the_result(backend, device):
    # the cases above would pass with the zero tail or the packing left out only if they did nothing
    data = make_batch(device, torch.float64)
    for name in TOKEN_BASELINE:
        kwargs = our_call(name, data, {})
        on = estimate_advantages(name, data["rewards"], data["mask"], **kwargs).advantages
        off = estimate_advantages(name, data["rewards"], data["mask"], handle_zero_tail=False, **kwargs).advantages
        assert not torch.allclose(on, off)
    kwargs = our_call("optimal_token_baseline", data, {})
    plain = estimate_advantages("optimal_token_baseline", data["rewards"], data["mask"], **kwargs).advantages
    packed = estimate_advantages("tir_optimal_token_baseline", data["rewards"], data["mask"], **kwargs).advantages
    assert not torch.allclose(plain, packed)


def test_meta_tensors_give_shapes():
    rewards = torch.empty(6, 5, device="meta")
    out = estimate_advantages("rloo", rewards, torch.empty(6, 5, dtype=torch.bool, device="meta"), group_size=3)
    assert out.advantages.shape == (6, 5) and out.returns.device.type == "meta"
    out = estimate_advantages("remax", rewards.double(), torch.empty(6, 5, device="meta"),
                              reward_baselines=torch.empty(6, dtype=torch.float64, device="meta"))
    assert out.advantages.dtype == torch.float64


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda r, m, i: estimate_advantages("ppo", r, m, index=i), ValueError, "unknown advantage estimator 'ppo'"),
        (lambda r, m, i: estimate_advantages("grpo", r, m, index=i, gamma=0.9), ValueError,
         "gamma: not read by estimator 'grpo'"),
        (lambda r, m, i: estimate_advantages("grpo", r, m, index=i, eps=0.1), TypeError, "unknown estimate_advantages option"),
        (lambda r, m, i: estimate_advantages("grpo", r, m, index=i, epsilon="1e-6"), TypeError, "epsilon must be a number"),
        (lambda r, m, i: estimate_advantages("grpo", r, m, index=i, epsilon=True), TypeError, "epsilon must be a number"),
        (lambda r, m, i: estimate_advantages("grpo", r, m, index=i, epsilon=0.0), ValueError, "epsilon must be finite and > 0"),
        (lambda r, m, i: estimate_advantages("grpo", r, m, index=i, norm_adv_by_std_in_grpo=1), TypeError,
         "norm_adv_by_std_in_grpo must be a bool"),
        (lambda r, m, i: estimate_advantages("reinforce_plus_plus", r, m, gamma=1.5), ValueError, r"gamma must be in \[0, 1\]"),
        (lambda r, m, i: estimate_advantages("reinforce_plus_plus", r, m, index=i), ValueError, "has no groups"),
        (lambda r, m, i: estimate_advantages("grpo", r, m), ValueError, "exactly one of group_size"),
        (lambda r, m, i: estimate_advantages("grpo", r, m, group_size=4), ValueError, "multiple of group_size"),
        (lambda r, m, i: estimate_advantages("remax", r, m), ValueError, "needs reward_baselines"),
        (lambda r, m, i: estimate_advantages("rloo", r, m, index=i, reward_baselines=r[:, 0]), ValueError,
         "reward_baselines: not read by estimator 'rloo'"),
        (lambda r, m, i: estimate_advantages("remax", r, m, reward_baselines=r), ValueError,
         r"reward_baselines must have shape \[6\]"),
        (lambda r, m, i: estimate_advantages("optimal_token_baseline", r, m, index=i, old_logprobs=r,
                                             sum_pi_squared=r[:, :2]), ValueError, r"sum_pi_squared must have shape \[6, 5\]"),
        (lambda r, m, i: estimate_advantages("grpo", r.long(), m, index=i), TypeError, "token_level_rewards must have dtype"),
        (lambda r, m, i: estimate_advantages("grpo", r[:, 0], m, index=i), ValueError, "token_level_rewards must be 2-D"),
        (lambda r, m, i: estimate_advantages("grpo", r, m[:, :3], index=i), ValueError, "response_mask must have the shape"),
        (lambda r, m, i: estimate_advantages("grpo", r, m, index=i.float()), TypeError, "index must have dtype"),
        (lambda r, m, i: estimate_advantages("grpo", r.masked_fill(m.bool(), float("nan")), m, index=i), ValueError,
         "token_level_rewards must be finite"),
        (lambda r, m, i: estimate_advantages("grpo", r, -m, index=i), ValueError, "response_mask must be finite and >= 0"),
        (lambda r, m, i: estimate_advantages("grpo_passk", r, m, index=i), ValueError, "at least 2 completions per group"),
        (lambda r, m, i: estimate_advantages("gdpo", r, m, index=i, reward_components=r, reward_weights=[1.0]),
         ValueError, "reward_weights has 1 entries"),
        (lambda r, m, i: estimate_advantages("reinforce_plus_plus", r, m * 0), ValueError, "more than one response token"),
    ],
)
def test_bad_input(device, call, error, match):
    rewards = torch.randn(6, 5, device=device)
    mask = torch.ones(6, 5, device=device)
    with pytest.raises(error, match=match):
        call(rewards, mask, torch.tensor([0, 0, 1, 1, 2, 3], device=device))


def test_validate_estimator_options_without_tensors():
    assert validate_estimator_options("optimal_token_baseline") == {"handle_zero_tail": True, "epsilon": 1e-8}
    assert validate_estimator_options("grpo", epsilon=1e-4) == {"epsilon": 1e-4, "norm_adv_by_std_in_grpo": True}
    with pytest.raises(ValueError, match="f_norm: not read by estimator 'rloo'"):
        validate_estimator_options("rloo", f_norm=2.0)


def test_docs_table_in_sync():
    assert docs_in_sync(DOC), "docs/semantics.md is out of date: run `python -m grpo_kernels.ops.advantages --write-docs`"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rewards(device, dtype):
    # read exactly (every half value is a float64), computed in float64, returned as float32
    data = make_batch(device)
    rewards = data["rewards"].to(dtype)
    out = estimate_advantages("rloo", rewards, data["mask"], index=data["index"])
    want = estimate_advantages("rloo", rewards.double(), data["mask"], index=data["index"])
    assert out.advantages.dtype == torch.float32
    torch.testing.assert_close(out.advantages, want.advantages.float())
