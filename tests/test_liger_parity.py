"""grpo_kernels.FusedLinearGRPOLoss side by side with Liger-Kernel 0.8.5's LigerFusedLinearGRPOLoss.

Same constructor and forward signature; same loss, metrics tuple and gradients (w.r.t. the hidden
states, the LM head weight and bias) on CPU with ``compiled=False`` for every option both support.
"""

import inspect
import math

import pytest
import torch

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

from grpo_kernels import FusedLinearGRPOLoss  # noqa: E402

LigerFusedLinearGRPOLoss = liger_grpo.LigerFusedLinearGRPOLoss
B, T, D, V = 3, 7, 16, 37


def make_inputs(dtype=torch.float32):
    hidden = torch.randn(B, T, D).to(dtype)
    weight = (torch.randn(V, D) * 2 / math.sqrt(D)).to(dtype)
    bias = (torch.randn(V) * 0.5).to(dtype)
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.3).long()
    mask[0] = 1
    mask[1, :] = 0
    mask[1, 0] = 1
    advantages = torch.randn(B)
    advantages[0] = advantages[0].abs() + 0.1
    with torch.no_grad():
        logits = (hidden.float() @ weight.float().T + bias.float())
        logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T)
    old[0, 0] = logp[0, 0] - 0.6  # a ratio above the upper clip bound with A > 0
    ref = logp + 0.3 * torch.randn(B, T)
    return dict(hidden=hidden, weight=weight, bias=bias, ids=ids, mask=mask, advantages=advantages, old=old, ref=ref)


def run(module_cls, inputs, module_kwargs, forward_kwargs, with_bias=True):
    hidden = inputs["hidden"].clone().requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    bias = inputs["bias"].clone().requires_grad_() if with_bias else None
    module = module_cls(**module_kwargs)
    loss, metrics = module(hidden, weight, inputs["ids"], inputs["mask"], inputs["advantages"], bias=bias,
                           **forward_kwargs)
    loss.backward()
    return loss.detach(), tuple(m.detach() for m in metrics), [hidden.grad, weight.grad,
                                                               bias.grad if with_bias else None]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_parity(module_kwargs, forward_kwargs=None, inputs=None, with_bias=True, value_tol=1e-5, grad_tol=1e-5):
    inputs = inputs or make_inputs()
    forward_kwargs = dict(forward_kwargs or {})
    forward_kwargs = {k: (inputs[v] if isinstance(v, str) else v) for k, v in forward_kwargs.items()}
    ours = run(FusedLinearGRPOLoss, inputs, module_kwargs, forward_kwargs, with_bias)
    theirs = run(LigerFusedLinearGRPOLoss, inputs, {**module_kwargs, "compiled": False}, forward_kwargs, with_bias)
    if not torch.allclose(ours[0], theirs[0], rtol=value_tol, atol=value_tol / 10):
        # Liger's float32 loss can itself be off by more (vespo's sequence weights, seed 1382355837:
        # liger 1.7e-4 from float64, ours 3e-5): then ours must be at least as close to Liger in float64
        upcast = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        exact_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                        for k, v in forward_kwargs.items()}
        exact = run(LigerFusedLinearGRPOLoss, upcast, {**module_kwargs, "compiled": False}, exact_kwargs,
                    with_bias)[0]
        assert (ours[0].double() - exact).abs() <= (theirs[0].double() - exact).abs() + value_tol / 10, \
            f"loss {ours[0]} vs liger {theirs[0]} (float64: {exact})"
    assert len(ours[1]) == len(theirs[1])
    for i, (a, b) in enumerate(zip(ours[1], theirs[1])):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=value_tol, atol=value_tol / 10), \
            f"metric {i}: {a} vs liger {b}"
    for name, a, b in zip(("input", "weight", "bias"), ours[2], theirs[2]):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) < grad_tol, f"grad {name}: rel err {rel_err(a, b):.3g}"
    return ours, theirs


def test_same_signatures():
    for name in ("__init__", "forward"):
        ours = dict(inspect.signature(getattr(FusedLinearGRPOLoss, name)).parameters)
        theirs = inspect.signature(getattr(LigerFusedLinearGRPOLoss, name)).parameters
        # ours adds keyword-only arguments after Liger's: vocab-parallel heads, other options, packing
        if name == "__init__":
            assert ours.pop("process_group").kind is inspect.Parameter.KEYWORD_ONLY
            assert ours.pop("loss_options").kind is inspect.Parameter.KEYWORD_ONLY
        else:  # packed sequences, keyword only after Liger's arguments
            assert ours.pop("cu_seqlens").kind is inspect.Parameter.KEYWORD_ONLY
        assert list(ours) == list(theirs), name
        assert [p.default for p in ours.values()] == [p.default for p in theirs.values()], name


def test_defaults():
    """Liger's defaults: beta 0.04 with a reference model, dapo, epsilon 0.2/0.2."""
    assert_parity({}, {"ref_per_token_logps": "ref", "old_per_token_logps": "old"})


PARITY_CASES = [
    # (loss_type, importance_sampling_level, beta)
    *[(lt, "token", beta) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo")
      for beta in (0.0, 0.04)],
    *[(lt, "sequence", beta) for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.04)],
    # Liger's luspo matches TRL only at sequence level without KL (see FusedLinearGRPOLoss's docstring)
    ("luspo", "sequence", 0.0),
]


@pytest.mark.parametrize("loss_type,level,beta", PARITY_CASES)
def test_loss_types(loss_type, level, beta):
    assert_parity(
        dict(beta=beta, loss_type=loss_type, importance_sampling_level=level, max_completion_length=10,
             epsilon_high=1.1 if loss_type == "cispo" else 0.28, temperature=0.7, use_ref_model=beta != 0),
        {"ref_per_token_logps": "ref", "old_per_token_logps": "old"} if beta else {"old_per_token_logps": "old"},
    )


@pytest.mark.parametrize("module_kwargs,forward_kwargs", [
    (dict(delta=1.5, epsilon_high=0.28, use_ref_model=False, beta=0.0), {"old_per_token_logps": "old"}),
    (dict(use_bias_correction_kl=True), {"ref_per_token_logps": "ref", "old_per_token_logps": "old"}),
    (dict(use_bias_correction_kl=True, importance_sampling_level="sequence", loss_type="bnpo"),
     {"ref_per_token_logps": "ref", "old_per_token_logps": "old"}),
    (dict(use_ref_model=False), {"old_per_token_logps": "old"}),  # beta 0.04 against no reference: KL 0
    (dict(), {"ref_per_token_logps": "ref"}),  # no old log-probs: ratio 1
    (dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
     {"old_per_token_logps": "old", "ref_per_token_logps": "ref"}),
    (dict(loss_type="grpo"), {"ref_per_token_logps": "ref", "old_per_token_logps": "old",
                              "vllm_is_ratio": torch.exp(0.3 * torch.randn(B, T))}),
    (dict(loss_type="dapo"), {"ref_per_token_logps": "ref", "old_per_token_logps": "old",
                              "vllm_is_ratio": torch.exp(0.3 * torch.randn(B, 1))}),
    (dict(loss_type="bnpo"), {"ref_per_token_logps": "ref", "vllm_is_ratio": torch.exp(0.3 * torch.randn(B))}),
    (dict(loss_type="dapo"), {"ref_per_token_logps": "ref", "old_per_token_logps": "old", "num_items_in_batch": 40}),
    (dict(loss_type="cispo", epsilon_high=5.0, beta=0.0, use_ref_model=False),
     {"old_per_token_logps": "old", "num_items_in_batch": torch.tensor(23)}),
    (dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=1.5),
     {"old_per_token_logps": "old", "ref_per_token_logps": "ref"}),
    (dict(loss_type="vespo"), {"old_per_token_logps": "old", "ref_per_token_logps": "ref",
                               "vllm_is_ratio": torch.exp(0.1 * torch.randn(B, T))}),
    (dict(loss_type="vespo", beta=0.0, use_ref_model=False), {"old_per_token_logps": "old",
                                                              "vllm_is_ratio": torch.exp(0.3 * torch.randn(B, 1))}),
], ids=["delta", "bias_kl", "bias_kl_seq", "no_ref_model", "no_old", "sapo_temps", "is_token", "is_row1",
        "is_row", "num_items", "num_items_cispo", "vespo_params", "vespo_is_token", "vespo_is_row"])
def test_options(module_kwargs, forward_kwargs):
    assert_parity(module_kwargs, forward_kwargs)


def test_reference_from_ref_input():
    inputs = make_inputs()
    ref_hidden = inputs["hidden"] + 0.3 * torch.randn(B, T, D)
    ref_weight = inputs["weight"] + 0.05 * torch.randn(V, D)
    ref_bias = inputs["bias"] + 0.05 * torch.randn(V)
    ours, _ = assert_parity(dict(temperature=0.7, use_bias_correction_kl=True),
                            {"ref_input": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias,
                             "old_per_token_logps": "old"}, inputs=inputs)
    assert ours[1][0] > 0  # the KL metric is not trivially zero


def test_without_bias_and_bf16():
    assert_parity(dict(loss_type="grpo"), {"ref_per_token_logps": "ref", "old_per_token_logps": "old"},
                  with_bias=False)
    # bf16 inputs: ours computes the logits in float32 from the bf16 values, Liger rounds its logits
    # to bf16 before the softmax, and exp(ref - logp) in the KL amplifies that rounding by a
    # seed-dependent amount. So the exact oracle is Liger on float32 copies of the same bf16 values
    # (ours must then agree to float32 rounding, gradients to bf16 rounding of the results), and
    # Liger's own bf16 run only checks dtypes and the rough value. No old log-probs (ratio 1), so no
    # token sits near a clip boundary.
    inputs = make_inputs(torch.bfloat16)
    module_kwargs, forward_kwargs = dict(loss_type="dapo", temperature=0.7), {"ref_per_token_logps": inputs["ref"]}
    ours = run(FusedLinearGRPOLoss, inputs, module_kwargs, forward_kwargs, with_bias=False)
    upcast = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    exact = run(LigerFusedLinearGRPOLoss, upcast, {**module_kwargs, "compiled": False}, forward_kwargs, with_bias=False)
    assert torch.allclose(ours[0], exact[0], rtol=1e-5, atol=1e-6), f"loss {ours[0]} vs liger(fp32) {exact[0]}"
    for a, b in zip(ours[1], exact[1]):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("input", "weight"), ours[2], exact[2]):
        assert a.dtype == torch.bfloat16, name
        assert rel_err(a, b) < 1e-2, f"grad {name}: rel err {rel_err(a, b):.3g}"
    theirs = run(LigerFusedLinearGRPOLoss, inputs, {**module_kwargs, "compiled": False}, forward_kwargs,
                 with_bias=False)
    assert [g.dtype for g in theirs[2][:2]] == [g.dtype for g in ours[2][:2]]
    # rough: Liger's bf16 error follows the per-token terms (|A| ~ 1, bf16 logits ~ 2**-8 relative),
    # not their mean, which the random advantages can bring near 0 (seed 1644924957: -0.0045 vs -0.0027)
    scale = float(inputs["advantages"].abs().mean())
    assert torch.allclose(ours[0], theirs[0], rtol=0.2, atol=0.01 * scale), \
        f"loss {ours[0]} vs liger(bf16) {theirs[0]}"


def test_flat_input_and_errors():
    inputs = make_inputs()
    module = FusedLinearGRPOLoss(loss_type="grpo")
    args = (inputs["weight"], inputs["ids"], inputs["mask"], inputs["advantages"])
    kw = dict(ref_per_token_logps=inputs["ref"], old_per_token_logps=inputs["old"])
    loss_3d, _ = module(inputs["hidden"], *args, **kw)
    loss_2d, _ = module(inputs["hidden"].reshape(B * T, D), *args, **kw)
    assert torch.equal(loss_3d, loss_2d)
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input"):
        module(inputs["hidden"], *args)
    with pytest.raises(ValueError, match="ref_weight"):
        module(inputs["hidden"], *args, ref_input=inputs["hidden"])
    with pytest.raises(ValueError, match="_input"):
        module(inputs["hidden"][:, :5], *args, **kw)
    with pytest.raises(ValueError, match="Sequence-level importance sampling is not supported"):
        FusedLinearGRPOLoss(loss_type="vespo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="delta"):
        FusedLinearGRPOLoss(delta=0.0)
    with pytest.raises(ValueError, match="Sequence-level importance sampling is not supported"):
        FusedLinearGRPOLoss(loss_type="cispo", importance_sampling_level="sequence")(inputs["hidden"], *args, **kw)
    with pytest.raises(ValueError, match="max_completion_length"):
        FusedLinearGRPOLoss(loss_type="dr_grpo")(inputs["hidden"], *args, **kw)
