"""verl adapter: verl's fused log-prob/entropy functions and policy losses, our kernels' numbers.

The log-prob functions are checked against the float64 reference; the policy losses and
``patch_verl`` against real verl 0.9.1 (``verl.trainer.ppo.core_algos``) where it is installed
(the CI's separate verl step), else ``patch_verl`` against stand-in ``verl.*`` modules that hold
the originals the way verl does.
"""

import importlib.util
import sys
import types

import pytest
import torch

import grpo_kernels.ops.grpo_loss.api as grpo_loss_api
from grpo_kernels.integrations.verl import (
    VERL_POLICY_LOSSES,
    FusedLinearForPPO,
    linear_cross_entropy,
    patch_verl,
    policy_loss,
)
from grpo_kernels.reference import token_logprobs_reference

HAS_VERL = importlib.util.find_spec("verl") is not None
needs_verl = pytest.mark.skipif(not HAS_VERL, reason="verl is not installed (CI installs verl 0.9.1 separately)")
stand_in_only = pytest.mark.skipif(HAS_VERL, reason="verl is installed: patch_verl is tested against the real one")

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _inputs(lead_shape, dim, vocab, dtype, device):
    hidden = (torch.randn(*lead_shape, dim, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, lead_shape, device=device)
    return hidden, weight, labels


def _check_against_reference(fn, hidden, weight, labels, temperature, ref_temperature_hidden=None):
    logp, entropy = fn(hidden, weight, labels, temperature)
    assert logp.shape == labels.shape and entropy.shape == labels.shape
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    g_logp = torch.randn_like(logp)
    g_ent = torch.randn_like(entropy)
    grads = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), (hidden, weight))

    h_ref = hidden.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    if ref_temperature_hidden is not None:
        # per-token temperature: the reference divides the float64 hidden state by T per row
        scaled = h_ref.double() / ref_temperature_hidden.double().unsqueeze(-1)
        ref_logp, ref_ent = token_logprobs_reference(scaled, w_ref.double(), labels, return_entropy=True)
    else:
        ref_logp, ref_ent = token_logprobs_reference(
            h_ref, w_ref, labels, temperature=float(temperature), return_entropy=True)
    ref_grads = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum(), (h_ref, w_ref))

    tol = TOL[hidden.dtype]
    torch.testing.assert_close(logp, ref_logp, **tol)
    torch.testing.assert_close(entropy, ref_ent, **tol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == hidden.dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead_shape", [(1, 37), (3, 11), (1, 1)])  # remove-padding [1, nnz], padded [B, L]
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_cross_entropy_matches_reference(device, dtype, lead_shape, temperature):
    hidden, weight, labels = _inputs(lead_shape, 24, 131, dtype, device)
    _check_against_reference(
        lambda h, w, y, t: linear_cross_entropy(h, w, y, t, "none"), hidden, weight, labels, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.6, "tensor"])
def test_fused_linear_for_ppo_matches_reference(device, dtype, temperature):
    hidden, weight, labels = _inputs((2, 13), 16, 97, dtype, device)
    module = FusedLinearForPPO(chunk_size=8, impl_backend="torch")
    if temperature == "tensor":
        temperature = torch.tensor(0.8, device=device)
    _check_against_reference(
        lambda h, w, y, t: module(hidden_states=h, vocab_weights=w, input_ids=y, temperature=t),
        hidden, weight, labels, temperature)


def test_fused_linear_for_ppo_per_token_temperature(device):
    hidden, weight, labels = _inputs((1, 19), 16, 61, torch.float32, device)
    per_token = torch.rand(1, 19, device=device) + 0.5
    module = FusedLinearForPPO()
    _check_against_reference(
        lambda h, w, y, t: module(h, w, y, t), hidden, weight, labels, per_token, ref_temperature_hidden=per_token)


def test_no_grad_forward_matches_reference(device):
    # verl computes old and reference log-probs under no_grad through the same entry point
    hidden, weight, labels = _inputs((2, 9), 16, 53, torch.float32, device)
    with torch.no_grad():
        logp, entropy = linear_cross_entropy(hidden, weight, labels, 1.3)
    ref_logp, ref_ent = token_logprobs_reference(hidden, weight, labels, temperature=1.3, return_entropy=True)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, ref_logp, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(entropy, ref_ent, atol=2e-4, rtol=2e-4)


def test_unsupported_arguments_raise(device):
    hidden, weight, labels = _inputs((1, 4), 8, 17, torch.float32, device)
    with pytest.raises(ValueError, match="reduction='none' only"):
        linear_cross_entropy(hidden, weight, labels, 1.0, "mean")
    with pytest.raises(ValueError, match="per-token temperature"):
        FusedLinearForPPO()(hidden, weight, labels, torch.ones(3, device=device))
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(hidden, weight.detach().bfloat16(), labels)


@pytest.fixture
def fake_verl(monkeypatch):
    if HAS_VERL:
        pytest.skip("verl is installed: patch_verl is tested against the real one")
    """Stand-ins for the verl modules that define and import the fused functions."""

    def original_lce(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        raise AssertionError("verl's original linear_cross_entropy was called")

    class OriginalFusedLinearForPPO(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("verl's original FusedLinearForPPO was called")

    modules = {
        "verl": types.ModuleType("verl"),
        "verl.utils": types.ModuleType("verl.utils"),
        "verl.utils.kernel": types.ModuleType("verl.utils.kernel"),
        "verl.utils.kernel.linear_cross_entropy": types.ModuleType("verl.utils.kernel.linear_cross_entropy"),
        "verl.utils.experimental": types.ModuleType("verl.utils.experimental"),
        "verl.utils.experimental.torch_functional": types.ModuleType("verl.utils.experimental.torch_functional"),
        # a model module that imported the function at module level, as older verl releases did
        "verl.models.transformers.qwen2": types.ModuleType("verl.models.transformers.qwen2"),
    }
    modules["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy = original_lce
    modules["verl.utils.experimental.torch_functional"].FusedLinearForPPO = OriginalFusedLinearForPPO
    modules["verl.models.transformers.qwen2"].linear_cross_entropy = original_lce
    modules["verl.models.transformers.qwen2"].unrelated = original_lce  # other names are left alone
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def test_patch_verl_swaps_in_the_adapter(fake_verl, device):
    replaced = patch_verl()  # the stand-ins have no policy-loss registry: only the log-prob path
    assert replaced == [
        "verl.models.transformers.qwen2.linear_cross_entropy",
        "verl.utils.experimental.torch_functional.FusedLinearForPPO",
        "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy",
    ]
    assert fake_verl["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy is linear_cross_entropy
    assert fake_verl["verl.utils.experimental.torch_functional"].FusedLinearForPPO is FusedLinearForPPO
    assert fake_verl["verl.models.transformers.qwen2"].unrelated is not linear_cross_entropy
    # what verl's forward then calls (lazily imported, as verl's fused_lm_head does)
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy as lce

    hidden, weight, labels = _inputs((1, 7), 8, 29, torch.float32, device)
    logp, _ = lce(hidden, weight, labels, 1.0, "none")
    torch.testing.assert_close(logp, token_logprobs_reference(hidden, weight, labels), atol=2e-4, rtol=2e-4)
    assert patch_verl() == []  # idempotent


def test_autopatch_module_patches_on_import(fake_verl, monkeypatch):
    # what verl's external_lib hook does in each worker: import the module by name
    import importlib

    monkeypatch.delitem(sys.modules, "grpo_kernels.integrations.verl_autopatch", raising=False)
    module = importlib.import_module("grpo_kernels.integrations.verl_autopatch")
    assert "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy" in module.PATCHED
    assert fake_verl["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy is linear_cross_entropy


def test_patch_verl_without_verl_raises(monkeypatch):
    for name in list(sys.modules):
        if name == "verl" or name.startswith("verl."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "verl", None)  # makes `import verl...` fail
    with pytest.raises(ImportError, match="is verl installed"):
        patch_verl()


# ----------------------------------------------------------------------------------------------
# Policy losses against real verl 0.9.1
# ----------------------------------------------------------------------------------------------

VERL_LOSS_NAMES = ("vanilla", "gspo", "sapo", "cispo", "geo_mean", "dppo_tv", "dppo_kl", "kl_cov", "clip_cov", "gpg",
                   "dro")  # and bypass_mode (test_bypass_mode_matches_verl)


@pytest.fixture(params=["dispatch", "torch"])
def loss_backend(request, monkeypatch):
    """The default dispatch (Triton: GPU or interpreter) and the plain-PyTorch path."""
    if request.param == "torch":
        monkeypatch.setattr(grpo_loss_api, "resolve_backend", lambda device, backend="auto": "torch")
    return request.param


def _verl_config(name, global_batch_info=None, rollout_correction=None):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    extra = {} if rollout_correction is None else {"rollout_correction": rollout_correction}
    config = ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, clip_ratio_low=0.2,
        clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.0, tau_neg=1.05,
        policy_loss=PolicyLossConfig(loss_mode=name, kl_cov_ratio=0.02, ppo_kl_coef=0.1, clip_cov_ratio=0.02,
                                     clip_cov_lb=0.05, clip_cov_ub=5.0, dro_beta=0.3, **extra))
    config.global_batch_info.update(global_batch_info or {})
    return config


def _verl_batch(device, B=6, T=300):
    """verl-shaped inputs: probabilities' logs, per-token advantages (a row's scalar times the
    mask), a bool response mask with one empty row and rows shorter than T (T spans two tiles)."""
    logp = torch.rand(B, T, device=device).clamp(0.02, 0.98).log()
    old = (logp + torch.randn(B, T, device=device) * 0.4).clamp(max=-1e-3)
    old[0, :5] = logp[0, :5] - 1.5  # ratios above clip_ratio_c = 3: dual clip / DPPO truncation
    lengths = torch.randint(1, T + 1, (B,), device=device)
    lengths[1] = 0
    lengths[2] = T
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    advantages = torch.randn(B, 1, device=device).expand(B, T) * mask
    return logp, old, advantages, mask


@needs_verl
@pytest.mark.parametrize("name", VERL_LOSS_NAMES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm-global"])
def test_policy_loss_matches_verl(loss_backend, device, name, agg):
    from verl.trainer.ppo import core_algos

    if agg == "token-mean":
        loss_agg_mode, info = "token-mean", {}
    elif loss_backend == "torch":
        pytest.skip("the batch-wide normalizers are shared by both backends: tested once, on the kernel")
    else:  # verl's global normalizers of a data-parallel run
        loss_agg_mode, info = "seq-mean-token-sum-norm", {"dp_size": 2, "global_batch_size": 11,
                                                           "loss_scale_factor": 64}
    logp, old, advantages, mask = _verl_batch(device)
    rollout_is_weights = None
    if agg == "token-mean" and name != "sapo":
        rollout_is_weights = torch.rand_like(logp) + 0.5
        if name == "gspo":  # sequence-level weights (see test_gspo_refuses_token_level_is_weights)
            rollout_is_weights = rollout_is_weights[:, :1].expand_as(logp).contiguous()
    config = _verl_config(name, info)
    seed = int(torch.randint(0, 2**31, ()).item())

    verl_logp = logp.detach().cpu().clone().requires_grad_()
    torch.manual_seed(seed)  # clip_cov draws on torch's global generator
    want_loss, want_metrics = core_algos.get_policy_loss_fn(name)(
        old.cpu(), verl_logp, advantages.cpu(), mask.cpu(), loss_agg_mode, config,
        None if rollout_is_weights is None else rollout_is_weights.cpu())
    want_grad, = torch.autograd.grad(want_loss, verl_logp)

    ours_logp = logp.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    loss, metrics = policy_loss(name)(old, ours_logp, advantages, mask, loss_agg_mode, config, rollout_is_weights)
    grad, = torch.autograd.grad(loss, ours_logp)

    torch.testing.assert_close(loss.detach().cpu(), want_loss.detach().float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu(), want_grad, atol=1e-7, rtol=1e-4)
    assert set(metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key


@needs_verl
def test_clip_cov_generator_makes_the_draw_reproducible(device):
    logp, old, advantages, mask = _verl_batch(device)
    config = _verl_config("clip_cov")
    losses = [policy_loss("clip_cov", generator=torch.Generator().manual_seed(7))(
        old, logp, advantages, mask, "token-mean", config)[0] for _ in range(2)]
    assert losses[0].item() == losses[1].item()


@needs_verl
def test_gspo_refuses_token_level_is_weights(device):
    logp, old, advantages, mask = _verl_batch(device)
    with pytest.raises(ValueError, match="sequence-level rollout_is_weights"):
        policy_loss("gspo")(old, logp, advantages, mask, "token-mean", _verl_config("gspo"), torch.rand_like(logp))


def test_policy_loss_bad_input():
    with pytest.raises(ValueError, match="unknown verl policy loss 'ppo'"):
        policy_loss("ppo")
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs the actor config"):
        policy_loss("vanilla")(logp, logp, logp, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="clip_ratio_c"):  # verl asserts clip_ratio_c > 1 for dual clip
        policy_loss("vanilla")(logp, logp, logp, torch.ones(2, 3, dtype=torch.bool), "token-mean",
                               {"clip_ratio": 0.2, "clip_ratio_c": 0.5})
    assert set(VERL_POLICY_LOSSES) == set(VERL_LOSS_NAMES) | {"bypass_mode"}
    with pytest.raises(ValueError, match="dro_beta must be a positive value"):
        policy_loss("dro")(logp, logp, logp, torch.ones(2, 3, dtype=torch.bool), "token-mean",
                           {"policy_loss": {"dro_beta": None}})


def test_policy_loss_reads_a_plain_dict_config():
    # an OmegaConf DictConfig or a dict works as well as verl's ActorConfig
    logp = torch.rand(3, 7).clamp(0.05, 0.95).log().requires_grad_()
    old = logp.detach() + 0.1
    mask = torch.ones(3, 7, dtype=torch.bool)
    config = {"clip_ratio": 0.2, "clip_ratio_high": 0.3, "clip_ratio_c": 3.0, "global_batch_info": {}}
    loss, metrics = policy_loss("vanilla")(old, logp, torch.ones(3, 7), mask, "token-mean", config)
    assert loss.requires_grad and set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}


@needs_verl
def test_patch_verl_registers_policy_losses_and_log_prob_functions(monkeypatch, device):
    import verl.utils.experimental.torch_functional  # noqa: F401
    import verl.utils.kernel.linear_cross_entropy  # noqa: F401
    from verl.trainer.ppo import core_algos

    registry = core_algos.POLICY_LOSS_REGISTRY
    originals = dict(registry)
    for name in list(registry):  # restored after the test
        monkeypatch.setitem(registry, name, registry[name])
    for module_name, module in list(sys.modules.items()):
        if module is not None and (module_name == "verl" or module_name.startswith("verl.")):
            for attr in ("linear_cross_entropy", "FusedLinearForPPO"):
                if attr in vars(module):
                    monkeypatch.setattr(module, attr, getattr(module, attr))

    replaced = patch_verl()
    assert "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy" in replaced
    assert "verl.utils.experimental.torch_functional.FusedLinearForPPO" in replaced
    for name in VERL_LOSS_NAMES + ("bypass_mode",):
        assert f"verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY[{name!r}]" in replaced
        assert core_algos.get_policy_loss_fn(name)._grpo_kernels_loss == name
    # every policy loss verl 0.9.1 registers is ours now
    assert all(getattr(function, "_grpo_kernels_loss", None) == name for name, function in registry.items())
    assert sys.modules["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy is linear_cross_entropy
    assert patch_verl() == []  # idempotent

    # what verl's actor then runs for loss_mode="vanilla"
    logp, old, advantages, mask = _verl_batch(device, B=3, T=17)
    config = _verl_config("vanilla")
    ours, _ = core_algos.get_policy_loss_fn("vanilla")(old, logp, advantages, mask, "token-mean", config)
    want, _ = originals["vanilla"](old.cpu(), logp.cpu(), advantages.cpu(), mask.cpu(), "token-mean", config)
    torch.testing.assert_close(ours.cpu(), want, atol=1e-5, rtol=1e-5)


@needs_verl
def test_patch_verl_selected_policy_losses(monkeypatch):
    from verl.trainer.ppo import core_algos

    registry = core_algos.POLICY_LOSS_REGISTRY
    for name in list(registry):
        monkeypatch.setitem(registry, name, registry[name])
    for module_name, module in list(sys.modules.items()):
        if module is not None and (module_name == "verl" or module_name.startswith("verl.")):
            for attr in ("linear_cross_entropy", "FusedLinearForPPO"):
                if attr in vars(module):
                    monkeypatch.setattr(module, attr, getattr(module, attr))
    replaced = patch_verl(policy_losses=["dppo_tv"])
    assert [r for r in replaced if "POLICY_LOSS_REGISTRY" in r] == [
        "verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY['dppo_tv']"]
    assert not hasattr(core_algos.get_policy_loss_fn("vanilla"), "_grpo_kernels_loss")
    with pytest.raises(ValueError, match="unknown policy loss"):
        patch_verl(policy_losses=["nope"])


# ---------------------------------------------------------------------------------------------
# bypass_mode: rollout correction computed in the loss (verl's compute_policy_loss_bypass_mode)
# ---------------------------------------------------------------------------------------------


def _rollout_correction(**fields):
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    return RolloutCorrectionConfig(bypass_mode=True, **fields)


BYPASS_CASES = {
    # verl's presets (RolloutCorrectionConfig.bypass_*) and their variants
    "pg_seq_tis": dict(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold=2.0),
    "pg_token_icepop": dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold="0.5_2.0"),
    "pg_geo_rs_token_tis_bn": dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5,
                                   rollout_is_batch_normalize=True, rollout_rs="seq_mean_k1",
                                   rollout_rs_threshold="0.75_1.25"),
    "pg_seq_sum_k1": dict(loss_type="reinforce", rollout_is=None, rollout_rs="seq_sum_k1", rollout_rs_threshold=3.0),
    "ppo_clip": dict(loss_type="ppo_clip", rollout_is=None),
    "ppo_clip_k3_rs": dict(loss_type="ppo_clip", rollout_is="sequence", rollout_rs="seq_mean_k3",
                           rollout_rs_threshold=0.05),
    "ppo_clip_token_k2": dict(loss_type="ppo_clip", rollout_is=None, rollout_rs="token_k2", rollout_rs_threshold=0.02),
}


def _bypass_batch(device):
    """Rows of 40, 0, 40, 25, 33, 17 tokens whose log-ratios to the rollout sit near a per-row offset
    (-0.4 .. 0.5), so that each case's row statistics fall on both sides of its thresholds; three
    tokens of the first row far below the rollout (IcePop's lower bound)."""
    B, T = 6, 40
    logp = torch.rand(B, T, device=device).clamp(0.05, 0.95).log()
    offset = torch.tensor([0.4, 0.0, 0.0, -0.05, -0.2, -0.5], device=device)[:, None]
    lengths = torch.tensor([40, 0, 40, 25, 33, 17], device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    noise = 0.1 * torch.randn(B, T, device=device) * mask
    # each row's mean log-ratio is its offset whatever the seed (up to the clamp): the row statistics
    # stay on their side of every case's thresholds
    noise -= (noise.sum(dim=1, keepdim=True) / lengths.clamp(min=1)[:, None]) * mask
    old = (logp + offset + noise).clamp(max=-1e-3)
    old[0, :3] = (logp[0, :3] + 1.5).clamp(max=-1e-3)
    advantages = torch.randn(B, 1, device=device).expand(B, T) * mask
    return logp, old, advantages, mask


@needs_verl
@pytest.mark.parametrize("case", list(BYPASS_CASES))
def test_bypass_mode_matches_verl(loss_backend, device, case):
    from verl.trainer.ppo import core_algos

    logp, old, advantages, mask = _bypass_batch(device)  # old: the rollout's log-probs in bypass mode
    config = _verl_config("bypass_mode", {"dp_size": 2, "batch_num_tokens": int(mask.sum()) + 9},
                          _rollout_correction(**BYPASS_CASES[case]))
    verl_logp = logp.detach().cpu().clone().requires_grad_()
    want_loss, want_metrics = core_algos.get_policy_loss_fn("bypass_mode")(
        old.cpu(), verl_logp, advantages.cpu(), mask.cpu(), "token-mean", config, None)
    want_grad, = torch.autograd.grad(want_loss, verl_logp)
    ours_logp = logp.detach().clone().requires_grad_()
    loss, metrics = policy_loss("bypass_mode")(old, ours_logp, advantages, mask, "token-mean", config, None)
    grad, = torch.autograd.grad(loss, ours_logp)
    torch.testing.assert_close(loss.detach().cpu(), want_loss.detach().float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu(), want_grad, atol=1e-7, rtol=1e-4)
    assert set(metrics) <= set(want_metrics) and "actor/ppo_kl" in metrics
    if BYPASS_CASES[case].get("rollout_rs"):
        assert 0 < metrics["rollout_corr/rollout_rs_masked_fraction"] < 1  # the case rejects some tokens, not all
    for key, value in metrics.items():
        assert value == pytest.approx(want_metrics[key], abs=1e-5), key


@needs_verl
def test_bypass_mode_refuses_what_it_does_not_reproduce(device):
    logp, old, advantages, mask = _verl_batch(device, B=3, T=5)
    chained = _verl_config("bypass_mode", rollout_correction=_rollout_correction(
        loss_type="reinforce", rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="1.5,0.1"))
    with pytest.raises(ValueError, match="one rejection criterion"):
        policy_loss("bypass_mode")(old, logp, advantages, mask, "token-mean", chained)
    no_threshold = _verl_config("bypass_mode", rollout_correction=_rollout_correction(
        loss_type="reinforce", rollout_rs="token_k1"))
    with pytest.raises(ValueError, match="rollout_rs_threshold must be provided"):
        policy_loss("bypass_mode")(old, logp, advantages, mask, "token-mean", no_threshold)
