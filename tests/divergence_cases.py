"""Inputs and checks shared by the fused_divergence tests (imported by test_divergence*.py)."""

from __future__ import annotations

import math

import torch

import grpo_kernels as gk
from grpo_kernels.reference import divergence_reference

# (absolute + relative bound on values, norm-relative bound on gradients) per student dtype.
# Values are float32 from float32 logits either way; 16-bit students store d logits in their
# dtype before the GEMMs, hence the looser gradient bound (as for token_logprobs).
TOLERANCE = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (2e-6, 2e-2), torch.float16: (2e-6, 1e-2)}
STUDENT_TENSORS = ("student_hidden", "student_weight", "student_bias")


def rel_err(actual, expected, floor=1e-30):
    """||actual - expected|| / max(||expected||, floor)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


def value_err(actual, expected):
    """max |actual - expected| / (1 + max |expected|): absolute for small values, relative for large."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).abs().max() / (1 + expected.abs().max())).item()


def make_head(lead_shape, dim, vocab, dtype, device, *, bias=False, spread=1.0, requires_grad=False):
    hidden = torch.randn(*lead_shape, dim, device=device).to(dtype)
    weight = (torch.randn(vocab, dim, device=device) * spread / math.sqrt(dim)).to(dtype)
    bias_t = torch.randn(vocab, device=device).to(dtype) if bias else None
    tensors = [hidden, weight, bias_t]
    if requires_grad:
        tensors = [t.requires_grad_() if t is not None else None for t in tensors]
    return tensors


def make_case(lead_shape, vocab, *, d_s, d_t, s_dtype, t_dtype, device, mode="full", k=4, student_bias=False,
              teacher_bias=False, spread=2.0, masked_rows=0, absent_entries=0, per_row_temperature=False):
    """fused_divergence keyword arguments (student tensors require grad)."""
    student = make_head(lead_shape, d_s, vocab, s_dtype, device, bias=student_bias, spread=spread, requires_grad=True)
    kwargs = dict(zip(STUDENT_TENSORS, student), mode=mode)
    if mode == "teacher_topk":
        teacher_logits = torch.randn(*lead_shape, vocab, device=device, dtype=torch.float64) * spread
        logp = torch.log_softmax(teacher_logits, dim=-1)
        values, ids = logp.topk(k, dim=-1)
        values = values.float()
        flat = values.view(-1)
        if absent_entries:
            flat[torch.randperm(flat.numel(), device=device)[:absent_entries]] = -math.inf
            ids.view(-1)[torch.isinf(flat)] = 0  # TRL's fill for a missing entry
        kwargs.update(teacher_topk_ids=ids, teacher_topk_logprobs=values)
    else:
        teacher = make_head(lead_shape, d_t, vocab, t_dtype, device, bias=teacher_bias, spread=spread)
        kwargs.update(teacher_hidden=teacher[0], teacher_weight=teacher[1], teacher_bias=teacher[2])
        if mode == "student_topk":
            kwargs["topk"] = k
    if masked_rows:
        mask = torch.ones(lead_shape, device=device)
        mask.view(-1)[torch.randperm(mask.numel(), device=device)[:masked_rows]] = 0
        kwargs["mask"] = mask
    if per_row_temperature:
        kwargs["temperature"] = torch.rand(lead_shape, device=device) + 0.5
    return kwargs


def run_op(kwargs, grad_out, **options):
    """(output, [d student hidden, weight, bias]) of <grad_out, divergence>."""
    for name in STUDENT_TENSORS:
        if kwargs.get(name) is not None:
            kwargs[name].grad = None
    out = gk.fused_divergence(**kwargs, **options)
    (out.divergence * grad_out).sum().backward()
    grads = [kwargs[name].grad.clone() if kwargs.get(name) is not None else None for name in STUDENT_TENSORS]
    return out, grads


def run_reference(kwargs, grad_out, topk_ids=None):
    """float64 (reference outputs, student gradients) with float64 leaves for the student."""
    leaves = {name: kwargs[name].detach().double().requires_grad_() if kwargs.get(name) is not None else None
              for name in STUDENT_TENSORS}
    ref_kwargs = {**kwargs, **leaves}
    want = divergence_reference(**ref_kwargs, topk_ids=topk_ids)
    (want[0] * grad_out.double()).sum().backward()
    return want, [leaves[name].grad if leaves[name] is not None else None for name in STUDENT_TENSORS]


def check_against_reference(kwargs, *, value_tol=None, grad_tol=None, grad_floor=1e-30, **options):
    """Runs the op and the float64 reference on the same inputs; asserts values and every
    student gradient (norm-relative, against at least ``grad_floor``); returns (output,
    reference, op grads, reference grads)."""
    dtype = kwargs["student_hidden"].dtype
    default_value_tol, default_grad_tol = TOLERANCE[dtype]
    value_tol, grad_tol = value_tol or default_value_tol, grad_tol or default_grad_tol
    grad_out = torch.randn(kwargs["student_hidden"].shape[:-1], device=kwargs["student_hidden"].device)
    out, grads = run_op(kwargs, grad_out, **options)
    topk_ids = out.topk_ids if kwargs.get("mode") == "student_topk" else None
    want, want_grads = run_reference(kwargs, grad_out, topk_ids)
    lead_shape = kwargs["student_hidden"].shape[:-1]
    assert out.divergence.shape == lead_shape and out.divergence.dtype == torch.float32
    assert out.student_entropy.shape == lead_shape and not out.student_entropy.requires_grad
    checked = [("divergence", out.divergence, want[0]), ("entropy", out.student_entropy, want[1])]
    if kwargs.get("mode", "full") != "full":
        checked += [("student mass", out.student_topk_mass, want[2]), ("teacher mass", out.teacher_topk_mass, want[3])]
    for name, got, expected in checked:
        assert value_err(got, expected) < value_tol, f"{name}: {value_err(got, expected)}"
    for name, got, expected in zip(STUDENT_TENSORS, grads, want_grads):
        if expected is None:
            continue
        assert got.dtype == kwargs[name].dtype, f"grad {name} dtype"
        assert rel_err(got, expected, grad_floor) < grad_tol, f"grad {name}: {rel_err(got, expected, grad_floor)}"
    return out, want, grads, want_grads
