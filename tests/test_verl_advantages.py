"""verl adapter, advantage estimators: VERL_ADV_ESTIMATORS against verl 0.9.1 itself
(verl/trainer/ppo/core_algos.py: the registry's names and signatures, each function's numbers
when called the way verl/trainer/ppo/ray_trainer.py's compute_advantage calls it) and
patch_verl's registration. The numbers of every estimator and option are tested in
tests/test_advantage_estimators.py; here, what the adapter adds: verl's signatures, uid labels,
what it reads from verl's config and batch."""

import importlib.util
import inspect

import pytest
import torch

from grpo_kernels.integrations.verl import VERL_ADV_ESTIMATORS, adv_estimator, patch_verl
from grpo_kernels.integrations.verl_advantages import group_ids

HAS_VERL = importlib.util.find_spec("verl") is not None
needs_verl = pytest.mark.skipif(not HAS_VERL, reason="verl is not installed (CI installs verl 0.9.1 separately)")

NAMES = ("grpo", "grpo_vectorized", "gdpo", "grpo_passk", "reinforce_plus_plus_baseline", "rloo", "rloo_vectorized",
         "opo", "gpg", "reinforce_plus_plus", "remax", "optimal_token_baseline", "tir_optimal_token_baseline")


def verls_own(function):
    """verl's function behind ours, should another test's patch_verl() have left ours registered."""
    while hasattr(function, "_verl_original"):
        function = function._verl_original
    return function


def test_every_verl_name_but_gae():
    assert tuple(VERL_ADV_ESTIMATORS) == NAMES
    if HAS_VERL:
        from verl.trainer.ppo.core_algos import AdvantageEstimator

        assert set(NAMES) == {e.value for e in AdvantageEstimator} - {"gae"}


@needs_verl
@pytest.mark.parametrize("name", NAMES)
def test_signature_is_verls(name):
    from verl.trainer.ppo import core_algos

    def shape(signature):
        return [(p.name, p.kind, p.default) for p in signature.parameters.values()]

    verl_fn = verls_own(core_algos.ADV_ESTIMATOR_REGISTRY[name])
    assert shape(inspect.signature(adv_estimator(name))) == shape(inspect.signature(verl_fn))


def _verl_inputs(B=10, T=7, seed=0, singleton=True):
    """A verl-like batch: uid strings for 4 groups (sizes 4, 3, 2, 1, interleaved; without the
    group of one: 4, 3, 3), outcome rewards on the last response token, a response mask with a hole."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(seed)
    uids = np.array(["b", "a", "b", "c", "a", "b", "d" if singleton else "c", "a", "c", "b"], dtype=object)[:B]
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    mask[1, 0] = 0
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=g).float() + torch.rand(B, generator=g)
    old = torch.rand(B, T, generator=g).clamp(0.05, 0.95).log()
    return {"uids": uids, "rewards": rewards, "mask": mask, "old": old,
            "sum_pi_squared": old.exp() ** 2 + 0.2 * torch.rand(B, T, generator=g),
            "baselines": torch.rand(B, generator=g), "is_weights": torch.rand(B, T, generator=g) + 0.5}


def _compute_advantage_kwargs(name, data, config):
    """The keyword arguments verl 0.9.1's compute_advantage (ray_trainer.py) passes: the grpo
    branch calls compute_grpo_outcome_advantage with index and norm_adv_by_std_in_grpo; the
    others get token_level_rewards, response_mask, config, index (uid), reward_baselines when the
    batch has them, GDPO non_tensor_batch and batch, OTB sum_pi_squared, old_log_probs and
    rollout_is_weights."""
    kwargs = {"token_level_rewards": data["rewards"].clone(), "response_mask": data["mask"], "index": data["uids"]}
    if name == "grpo":
        return {**kwargs, "norm_adv_by_std_in_grpo": config.norm_adv_by_std_in_grpo}
    kwargs["config"] = config
    if name == "remax":
        kwargs["reward_baselines"] = data["baselines"]
    if name == "gdpo":
        np = pytest.importorskip("numpy")
        B = data["rewards"].shape[0]
        kwargs["non_tensor_batch"] = {"uid": data["uids"], "acc": np.linspace(0, 1, B), "fmt": np.arange(B) % 2 * 0.5}
        kwargs["batch"] = {"prompts": torch.zeros(B, 3), "attention_mask": torch.cat(
            [torch.ones(B, 3, dtype=torch.long), data["mask"]], dim=1)}
    if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        kwargs.update(sum_pi_squared=data["sum_pi_squared"], old_log_probs=data["old"],
                      rollout_is_weights=data["is_weights"])
    return kwargs


@needs_verl
@pytest.mark.parametrize("name", NAMES)
def test_matches_verl_called_as_verl_calls_it(device, name):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos

    data = _verl_inputs(singleton=name != "grpo_passk")
    config = AlgoConfig(gamma=0.9, adv_estimator=name, norm_adv_by_std_in_grpo=name != "grpo_passk",
                        gdpo_reward_keys=["acc", "fmt"], gdpo_reward_weights=[1.0, 0.5])
    kwargs = _compute_advantage_kwargs(name, data, config)
    want = verls_own(core_algos.ADV_ESTIMATOR_REGISTRY[name])(**kwargs)
    ours_kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    got = adv_estimator(name)(**ours_kwargs)
    for value, expected in zip(got, want):
        assert value.device == data["rewards"].to(device).device
        torch.testing.assert_close(value.cpu(), expected.float(), rtol=1e-5, atol=2e-6)


@needs_verl
def test_positional_calls_and_config_fields():
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos

    data = _verl_inputs()
    # remax's positional order (token_level_rewards, reward_baselines, response_mask)
    ours = adv_estimator("remax")(data["rewards"], data["baselines"], data["mask"])
    want = core_algos.compute_remax_outcome_advantage(data["rewards"], data["baselines"], data["mask"])
    torch.testing.assert_close(ours[0], want[0])
    # a DictConfig works as verl's AlgoConfig does; grpo_passk reads norm_adv_by_std_in_grpo from it
    config = OmegaConf.create({"gamma": 0.5, "norm_adv_by_std_in_grpo": False})
    data = _verl_inputs(singleton=False)
    for name in ("reinforce_plus_plus", "grpo_passk"):
        ours = adv_estimator(name)(data["rewards"], data["mask"], config=config, index=data["uids"])
        want = verls_own(core_algos.get_adv_estimator_fn(name))(data["rewards"].clone(), data["mask"],
                                                                config=config, index=data["uids"])
        torch.testing.assert_close(ours[0], want[0], rtol=1e-5, atol=2e-6)


def test_bad_calls():
    rewards, mask = torch.randn(4, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="unknown verl advantage estimator 'gae'"):
        adv_estimator("gae")
    with pytest.raises(ValueError, match="needs the algorithm config"):
        adv_estimator("reinforce_plus_plus")(rewards, mask)
    with pytest.raises(ValueError, match="needs index"):
        adv_estimator("rloo")(rewards, mask, None)
    with pytest.raises(TypeError, match="missing a required argument: 'reward_baselines'"):
        adv_estimator("remax")(rewards, response_mask=mask)
    with pytest.raises(ValueError, match="gdpo_reward_keys"):
        adv_estimator("gdpo")(rewards, mask, torch.arange(4), config={"gdpo_reward_keys": None},
                              non_tensor_batch={}, batch={})
    with pytest.raises(TypeError, match="integer group ids or labels"):
        group_ids(torch.rand(4), "cpu")


def test_group_ids_from_labels():
    np = pytest.importorskip("numpy")
    ids = group_ids(np.array(["x", "y", "x", "z"], dtype=object), "cpu")
    assert ids.tolist()[0] == ids.tolist()[2] and len(set(ids.tolist())) == 3
    assert group_ids(np.array([5, 3, 5]), "cpu").tolist() == [5, 3, 5]
    mixed = group_ids(np.array([1, "1", 2.5], dtype=object), "cpu")  # labels of mixed types: as text
    assert mixed.tolist()[0] == mixed.tolist()[1] != mixed.tolist()[2]


@needs_verl
def test_patch_verl_registers_every_estimator(monkeypatch, device):
    from verl.trainer.ppo import core_algos

    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    for name in list(registry):  # verl's own, restored after the test
        monkeypatch.setitem(registry, name, verls_own(registry[name]))
    monkeypatch.setattr(core_algos, "compute_grpo_outcome_advantage", registry["grpo"])
    originals = dict(registry)

    done = patch_verl(policy_losses=False)
    registered = [d for d in done if "ADV_ESTIMATOR_REGISTRY" in d]
    assert registered == [f"verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY[{n!r}]" for n in NAMES]
    # verl's trainer calls compute_grpo_outcome_advantage itself for grpo (not through the registry)
    assert "verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage" in done
    assert core_algos.compute_grpo_outcome_advantage._grpo_kernels_adv_estimator == "grpo"
    assert core_algos.get_adv_estimator_fn("rloo")._verl_original is originals["rloo"]
    assert core_algos.get_adv_estimator_fn("gae") is originals["gae"]
    for name in NAMES:
        assert core_algos.get_adv_estimator_fn(name)._grpo_kernels_adv_estimator == name
    assert [d for d in patch_verl(policy_losses=False) if "ADV" in d or "advantage" in d] == []  # idempotent

    # what verl's compute_advantage then runs for adv_estimator="rloo"
    data = _verl_inputs()
    ours = core_algos.get_adv_estimator_fn("rloo")(data["rewards"].to(device), data["mask"].to(device),
                                                   index=data["uids"], config=None)
    want = originals["rloo"](data["rewards"].clone(), data["mask"], index=data["uids"], config=None)
    torch.testing.assert_close(ours[0].cpu(), want[0], rtol=1e-5, atol=2e-6)


@needs_verl
def test_patch_verl_selected_estimators(monkeypatch):
    from verl.trainer.ppo import core_algos

    registry = core_algos.ADV_ESTIMATOR_REGISTRY
    for name in list(registry):
        monkeypatch.setitem(registry, name, verls_own(registry[name]))
    monkeypatch.setattr(core_algos, "compute_grpo_outcome_advantage", registry["grpo"])
    grpo_before = core_algos.compute_grpo_outcome_advantage
    done = patch_verl(policy_losses=False, adv_estimators=["opo"])
    assert [d for d in done if "ADV" in d] == ["verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY['opo']"]
    assert core_algos.compute_grpo_outcome_advantage is grpo_before
    assert not hasattr(core_algos.get_adv_estimator_fn("rloo"), "_grpo_kernels_adv_estimator")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        patch_verl(policy_losses=False, adv_estimators=["gae"])
    assert not any("ADV" in d for d in patch_verl(policy_losses=False, adv_estimators=False))
    assert not hasattr(core_algos.get_adv_estimator_fn("rloo"), "_grpo_kernels_adv_estimator")
