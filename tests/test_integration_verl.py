"""verl adapter: the signatures of verl's fused log-prob/entropy functions, our kernel's numbers.

verl is not installed here; the adapter is checked against the float64 reference, and
``patch_verl`` against stand-in ``verl.*`` modules that hold the originals the way verl does.
"""

import sys
import types

import pytest
import torch

from grpo_kernels.integrations.verl import FusedLinearForPPO, linear_cross_entropy, patch_verl
from grpo_kernels.reference import token_logprobs_reference

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
    replaced = patch_verl()
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
