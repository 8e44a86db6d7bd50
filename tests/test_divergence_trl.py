"""fused_divergence against TRL 1.16's own functions on the same inputs (values and every student
gradient): ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (its CPU torch fallback)
for the full vocabulary, and the sparse-support functions of TRL's server distillation
(``_add_tail_bucket``, ``_jsd_divergence``) for the top-k forms."""

import math
import os
import warnings

import pytest
import torch
from divergence_cases import make_case, rel_err, value_err

import grpo_kernels as gk

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_divergence = pytest.importorskip("trl.kernels.chunked_divergence")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.server_distillation.server_distillation_trainer import _add_tail_bucket, _jsd_divergence

BACKENDS = ["triton", "torch"]
F32, BF16 = torch.float32, torch.bfloat16
STUDENT = ("student_hidden", "student_weight", "student_bias")


def student_grads(kwargs):
    return [kwargs[n].grad.clone() if kwargs.get(n) is not None else None for n in STUDENT]


def zero_grads(kwargs):
    for name in STUDENT:
        if kwargs.get(name) is not None:
            kwargs[name].grad = None


def run_trl_full(kwargs, grad_out, beta, temperature, scales, softcaps):
    zero_grads(kwargs)
    divergence, entropy = trl_divergence.ChunkedDivergenceFunction.apply(
        kwargs["student_hidden"], kwargs["student_weight"], kwargs.get("student_bias"), kwargs["teacher_hidden"],
        kwargs["teacher_weight"], kwargs.get("teacher_bias"), beta, temperature, scales[0], softcaps[0], scales[1],
        softcaps[1])
    (divergence * grad_out).sum().backward()
    return divergence.detach(), entropy.detach(), student_grads(kwargs)


def run_ours(kwargs, grad_out, **options):
    zero_grads(kwargs)
    out = gk.fused_divergence(**kwargs, **options)
    (out.divergence * grad_out).sum().backward()
    return out, student_grads(kwargs)


FULL_CASES = {
    # name: (beta, temperature, (student, teacher) logit scale, (student, teacher) soft-cap, biases)
    "forward-kl": (0.0, 1.0, (1.0, 1.0), (None, None), False),
    "reverse-kl-temperature-bias": (1.0, 0.7, (1.0, 1.0), (None, None), True),
    "jsd-scales": (0.5, 1.0, (1.3, 0.6), (None, None), True),
    "jsd-small-beta-softcaps": (0.1, 1.4, (1.0, 1.0), (8.0, 6.0), False),
    "forward-kl-everything": (0.0, 0.8, (0.9, 1.2), (7.0, 9.0), True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FULL_CASES))
def test_full_vocabulary_matches_trl_float32(device, backend, name):
    beta, temperature, scales, softcaps, bias = FULL_CASES[name]
    kwargs = make_case((19,), 67, d_s=21, d_t=13, s_dtype=F32, t_dtype=F32, device=device, student_bias=bias,
                       teacher_bias=bias)
    grad_out = torch.randn(19, device=device)
    want_div, want_ent, want_grads = run_trl_full(kwargs, grad_out, beta, temperature, scales, softcaps)
    out, grads = run_ours(kwargs, grad_out, beta=beta, temperature=temperature, student_logit_scale=scales[0],
                          teacher_logit_scale=scales[1], student_softcap=softcaps[0], teacher_softcap=softcaps[1],
                          backend=backend)
    assert want_div.abs().max() > 1e-2
    assert rel_err(out.divergence, want_div) < 1e-5
    assert rel_err(out.student_entropy, want_ent) < 1e-5
    for got, expected in zip(grads, want_grads):
        if expected is not None:
            assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_full_vocabulary_matches_trl_bf16(device, beta):
    # Both round d logits to bf16 before float32-accumulated GEMMs: the same scheme, different
    # rounding points; each is within ~1e-2 of float64, so within ~2e-2 of the other.
    kwargs = make_case((2, 7), 53, d_s=16, d_t=24, s_dtype=BF16, t_dtype=BF16, device=device, student_bias=True)
    flat = {k: (v.reshape(14, -1) if k in ("student_hidden", "teacher_hidden") and v is not None else v)
            for k, v in kwargs.items()}
    flat["student_hidden"] = flat["student_hidden"].detach().requires_grad_()
    grad_out = torch.randn(14, device=device)
    want_div, want_ent, want_grads = run_trl_full(flat, grad_out, beta, 0.9, (1.0, 1.0), (None, None))
    out, grads = run_ours(flat, grad_out, beta=beta, temperature=0.9)
    assert rel_err(out.divergence, want_div) < 1e-5  # values: float32 logits on both sides
    assert rel_err(out.student_entropy, want_ent) < 1e-5
    for got, expected in zip(grads, want_grads):
        assert got.dtype == BF16
        assert rel_err(got, expected) < 2e-2


# Extremes and odd shapes against TRL on the same inputs, with masked rows (TRL has no mask: it
# computes every row, and its incoming gradient is 0 on the rows we skip). Both sides are float32:
# their distance is the float32 rounding of each, which grows where a formula cancels, so the
# tolerances follow it (about 5x the largest distance seen over seeds):
# - a tiny temperature (|z| ~ 100 at T = 0.1): values and entropies ~1e-7 |z| absolute; the
#   reverse KL's d logits at a near one-hot row's argmax, p_a (log p_a - log t_a - KL), is a
#   difference of ~|z| numbers (1e-3 seen in the gradient's norm);
# - a JSD at beta = 1e-3: its d logits hold log p_s - log m with m within beta of p_s (7e-5 seen).
TRL_EXTREMES = {
    # name: (lead shape, V, beta, temperature, (student, teacher) soft-cap, teacher dtype,
    #        (value, entropy, gradient) tolerance)
    "N1-V-prime": ((1,), 97, 0.5, 1.0, (None, None), F32, (2e-6, 5e-6, 1e-4)),
    "small-temperature-rkl": ((13,), 61, 1.0, 0.1, (None, None), F32, (1e-5, 5e-5, 5e-3)),
    "small-temperature-fkl-softcap": ((13,), 61, 0.0, 0.1, (30.0, None), F32, (5e-6, 5e-5, 5e-5)),
    "huge-temperature-jsd": ((13,), 61, 0.5, 100.0, (None, None), F32, (2e-6, 5e-6, 1e-4)),
    "tight-softcaps-fkl": ((13,), 61, 0.0, 1.0, (1.0, 0.5), F32, (2e-6, 5e-6, 1e-5)),
    "jsd-beta-1e-3": ((13,), 61, 1e-3, 1.0, (None, None), F32, (2e-6, 5e-6, 5e-4)),
    "jsd-beta-1-minus-1e-3": ((13,), 61, 1 - 1e-3, 1.0, (None, None), F32, (2e-6, 5e-6, 5e-5)),
    "jsd-bf16-teacher": ((13,), 61, 0.5, 0.8, (None, None), BF16, (2e-6, 5e-6, 1e-4)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TRL_EXTREMES))
def test_full_vocabulary_extremes_match_trl(device, backend, name):
    lead_shape, vocab, beta, temperature, softcaps, teacher_dtype, (value_tol, entropy_tol, grad_tol) = \
        TRL_EXTREMES[name]
    kwargs = make_case(lead_shape, vocab, d_s=19, d_t=9, s_dtype=F32, t_dtype=teacher_dtype, device=device,
                       student_bias=True, teacher_bias=True, masked_rows=3 if lead_shape[0] > 1 else 0, spread=3.0)
    mask = kwargs.pop("mask", torch.ones(lead_shape, device=device))
    live = mask != 0
    grad_out = torch.randn(lead_shape, device=device)
    want_div, want_ent, want_grads = run_trl_full(kwargs, grad_out * mask, beta, temperature, (1.0, 1.0), softcaps)
    out, grads = run_ours({**kwargs, "mask": mask}, grad_out, beta=beta, temperature=temperature,
                          student_softcap=softcaps[0], teacher_softcap=softcaps[1], backend=backend)
    assert want_div[live].abs().max() > 1e-4  # (the huge temperature's JSD is ~3e-4)
    assert value_err(out.divergence[live], want_div[live]) < value_tol
    assert value_err(out.student_entropy[live], want_ent[live]) < entropy_tol
    assert (out.divergence[~live] == 0).all() and (out.student_entropy[~live] == 0).all()
    for got, expected in zip(grads, want_grads):
        assert rel_err(got, expected) < grad_tol


# ---------------------------------------------------------------------------------------------
# Top-k forms: TRL's sparse-support functions on the same support
# ---------------------------------------------------------------------------------------------


def trl_sparse(student_logp, teacher_logp, valid, beta, add_tail):
    """TRL's server-distillation divergence on a support (as _compute_server_forward_kl_loss
    prepares it, without the batchmean): -inf outside ``valid``, then the tail bucket or the
    renormalization, then _jsd_divergence."""
    neg_inf = torch.tensor(-math.inf, dtype=student_logp.dtype)
    student_logp = torch.where(valid, student_logp, neg_inf)
    teacher_logp = torch.where(valid, teacher_logp, neg_inf)
    if add_tail:
        student_sparse, support = _add_tail_bucket(student_logp, valid)
        teacher_sparse, _ = _add_tail_bucket(teacher_logp, valid)
    else:
        support = valid
        student_sparse = student_logp - torch.logsumexp(student_logp, dim=-1, keepdim=True)
        teacher_sparse = teacher_logp - torch.logsumexp(teacher_logp, dim=-1, keepdim=True)
    return _jsd_divergence(student_sparse, teacher_sparse, beta, support_mask=support).sum(-1)


def materialized_logp(hidden, weight, bias, temperature, softcap=None):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits / temperature, dim=-1)


TOPK_CASES = {
    # name: (mode, beta, tail, k, absent teacher entries)
    "teacher-fkl-bucket": ("teacher_topk", 0.0, "bucket", 5, 4),
    "teacher-fkl-renormalize": ("teacher_topk", 0.0, "renormalize", 4, 3),
    "teacher-jsd-bucket-k1": ("teacher_topk", 0.5, "bucket", 1, 0),
    "teacher-rkl-bucket": ("teacher_topk", 1.0, "bucket", 3, 0),
    "student-rkl-bucket": ("student_topk", 1.0, "bucket", 4, 0),
    "student-rkl-renormalize": ("student_topk", 1.0, "renormalize", 3, 0),
    "student-jsd-bucket": ("student_topk", 0.3, "bucket", 2, 0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TOPK_CASES))
def test_topk_forms_match_trl_sparse_functions(device, backend, name):
    mode, beta, tail, k, absent = TOPK_CASES[name]
    temperature, softcap = 0.8, 6.0
    kwargs = make_case((17,), 61, d_s=14, d_t=10, s_dtype=F32, t_dtype=F32, device=device, mode=mode, k=k,
                       student_bias=True, absent_entries=absent)
    grad_out = torch.randn(17, device=device)
    out, grads = run_ours(kwargs, grad_out, beta=beta, topk_tail=tail, temperature=temperature,
                          student_softcap=softcap, backend=backend)

    zero_grads(kwargs)
    student_logp = materialized_logp(kwargs["student_hidden"], kwargs["student_weight"], kwargs["student_bias"],
                                     temperature, softcap)
    if mode == "teacher_topk":
        ids, teacher_logp = kwargs["teacher_topk_ids"], kwargs["teacher_topk_logprobs"]
        valid = teacher_logp > -math.inf
    else:
        ids = out.topk_ids.long()
        assert torch.equal(ids, student_logp.topk(k, dim=-1).indices)
        teacher_logp = materialized_logp(kwargs["teacher_hidden"], kwargs["teacher_weight"], None,
                                         temperature).gather(-1, ids)
        valid = torch.ones_like(ids, dtype=torch.bool)
    want = trl_sparse(student_logp.gather(-1, ids), teacher_logp, valid, beta, tail == "bucket")
    (want * grad_out).sum().backward()
    want_grads = student_grads(kwargs)

    assert want.abs().max() > 1e-3
    assert rel_err(out.divergence, want.detach()) < 1e-5
    for got, expected in zip(grads, want_grads):
        assert rel_err(got, expected) < 1e-5


def test_teacher_topk_forward_kl_is_verl_truncated_sum_plus_tail(device):
    # verl 0.9.1's forward_kl_topk is the truncated sum sum_{i in top-k} p_i log(p_i / q_i) (then
    # clamped at 0); the tail bucket adds exactly (1 - P) log((1 - P) / (1 - Q)).
    kwargs = make_case((11,), 47, d_s=12, d_t=0, s_dtype=F32, t_dtype=F32, device=device, mode="teacher_topk", k=4)
    out = gk.fused_divergence(**kwargs, beta=0.0)
    student_logp = materialized_logp(kwargs["student_hidden"], kwargs["student_weight"], None, 1.0).detach()
    q = student_logp.gather(-1, kwargs["teacher_topk_ids"])
    p = kwargs["teacher_topk_logprobs"]
    truncated = (p.exp() * (p - q)).sum(-1)
    big_p, big_q = p.exp().sum(-1), q.exp().sum(-1)
    tail = (1 - big_p) * torch.log((1 - big_p) / (1 - big_q))
    assert rel_err(out.divergence, truncated + tail) < 1e-5
    assert rel_err(out.student_topk_mass, big_q) < 1e-6 and rel_err(out.teacher_topk_mass, big_p) < 1e-6
