"""fused_divergence against the float64 reference: values (divergence, entropy, top-k masses) and
every student gradient, in every mode, on both paths (the Triton kernels, under the interpreter
on CPU, and the chunked torch path), with odd sizes: N = 1, V prime, D odd and different for
student and teacher, masked rows, absent teacher entries, temperature (float and per row),
soft-caps, logit scales, biases, bf16 and fp32, mixed student/teacher dtypes."""

import math

import pytest
import torch
from divergence_cases import check_against_reference, make_case, value_err

import grpo_kernels as gk

BACKENDS = ["triton", "torch"]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

CASES = {
    # name: (lead shape, V, D_s, D_t, student dtype, teacher dtype, make_case options, op options)
    "full-fkl-N1": ((1,), 13, 7, 5, F32, F32, {}, {"beta": 0.0}),
    "full-rkl-bias-mask-T": ((3, 7), 61, 23, 17, BF16, BF16,
                             {"student_bias": True, "teacher_bias": True, "masked_rows": 4},
                             {"beta": 1.0, "temperature": 0.7}),
    "full-jsd-softcaps-scales-rowT": ((19,), 53, 21, 9, F32, BF16, {"per_row_temperature": True},
                                      {"beta": 0.5, "student_softcap": 2.0, "teacher_softcap": 3.0,
                                       "student_logit_scale": 1.3, "teacher_logit_scale": 0.8}),
    "full-jsd-small-beta-f32-teacher": ((17,), 101, 15, 24, BF16, F32, {"masked_rows": 3, "student_bias": True},
                                        {"beta": 0.1, "temperature": 1.3}),
    "full-fkl-f16": ((11,), 37, 16, 16, F16, F16, {"teacher_bias": True}, {"beta": 0.0, "teacher_softcap": 1.5}),
    "teacher-topk-fkl-bucket": ((2, 9), 67, 19, 0, F32, F32,
                                {"mode": "teacher_topk", "k": 5, "absent_entries": 6, "masked_rows": 2,
                                 "student_bias": True, "per_row_temperature": True},
                                {"beta": 0.0, "student_softcap": 2.5}),
    "teacher-topk-jsd-renormalize": ((13,), 41, 11, 0, BF16, BF16, {"mode": "teacher_topk", "k": 3},
                                     {"beta": 0.3, "topk_tail": "renormalize", "temperature": 0.8}),
    "teacher-topk-rkl-k1": ((1,), 29, 9, 0, F32, F32, {"mode": "teacher_topk", "k": 1}, {"beta": 1.0}),
    "student-topk-rkl-bucket": ((15,), 59, 13, 27, F32, BF16, {"mode": "student_topk", "k": 4, "masked_rows": 2},
                                {"beta": 1.0, "temperature": 0.9, "teacher_softcap": 2.0}),
    "student-topk-jsd-renormalize": ((3, 4), 43, 17, 17, BF16, BF16,
                                     {"mode": "student_topk", "k": 2, "student_bias": True},
                                     {"beta": 0.6, "topk_tail": "renormalize", "student_logit_scale": 1.7}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(device, backend, name):
    lead_shape, vocab, d_s, d_t, s_dtype, t_dtype, case_options, op_options = CASES[name]
    kwargs = make_case(lead_shape, vocab, d_s=d_s, d_t=d_t, s_dtype=s_dtype, t_dtype=t_dtype, device=device,
                       **case_options)
    out, want, grads, _ = check_against_reference({**kwargs, **op_options}, backend=backend)
    assert want[0].abs().max() > 1e-3  # far from 0: the comparison can fail
    if "mask" in kwargs:
        masked = kwargs["mask"] == 0
        assert (out.divergence[masked] == 0).all() and (out.student_entropy[masked] == 0).all()
        assert (grads[0][masked] == 0).all(), "masked rows must get no gradient"
    if kwargs.get("mode") == "student_topk":
        ids = out.topk_ids
        assert ids.dtype == torch.int32 and ids.shape == (*lead_shape, kwargs["topk"])
        assert want[4].shape == ids.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_topk_ids_are_the_float64_topk(device, backend):
    kwargs = make_case((23,), 47, d_s=12, d_t=8, s_dtype=F32, t_dtype=F32, device=device, mode="student_topk", k=5,
                       masked_rows=3)
    out = gk.fused_divergence(**kwargs, beta=1.0, backend=backend)
    from grpo_kernels.reference import divergence_reference

    want_ids = divergence_reference(**kwargs, beta=1.0)[4]
    live = kwargs["mask"] != 0
    assert torch.equal(out.topk_ids[live].long(), want_ids[live])
    assert (out.topk_ids[~live] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_topk_ties_go_to_the_lower_id(device, backend):
    # Rows of hidden 0 with a bias that repeats values: exact ties, broken by the lower id.
    vocab = 31
    kwargs = make_case((4,), vocab, d_s=6, d_t=6, s_dtype=F32, t_dtype=F32, device=device, mode="student_topk", k=3)
    with torch.no_grad():
        kwargs["student_hidden"].zero_()
    bias = torch.zeros(vocab, device=device)
    bias[[3, 7, 12, 20, 25]] = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0], device=device)
    kwargs["student_bias"] = bias.requires_grad_()
    out = gk.fused_divergence(**kwargs, beta=1.0, backend=backend)
    assert out.topk_ids.tolist() == [[7, 12, 25]] * 4


# ---------------------------------------------------------------------------------------------
# Extremes: beta at and near its ends, near-identical and very different distributions, huge
# and tiny temperatures
# ---------------------------------------------------------------------------------------------

# Float32 logits z carry an absolute rounding error of ~1e-7 |z|, which bounds what any float32
# kernel (TRL's included) can resolve: where the two distributions differ by |dz| per logit, the
# gradient's relative error is ~1e-7 |z| / |dz| (near-identical heads: |dz| ~ 1e-3, and a JSD whose
# mixture is within beta = 1e-4 of p_s); a 20x sharper teacher has |z_t| ~ 200 (values good to
# ~1e-5 of their size, summed over the vocabulary); at tiny temperatures |z| ~ 1e3-1e4, so values and
# entropies are good to ~1e-7 |z| absolute, and a near one-hot row's gradient is small (~(1 - p_max)
# |z| / T) but carries the rounding of ~|z| / T numbers: the reverse KL's at the argmax, p_a (d_a -
# KL), is a difference of two ~|z| numbers. Hence a floor of 100 under the gradient norm (a generic
# row's is ~1e4-1e5 there): 1e-4 of it is the float32 rounding of z ~ 1e3, scaled by 1 / T = 100,
# through |w| ~ 3 (1e-3 for the reverse KL, whose d_a is a difference of two such numbers).
EXTREMES = {
    # name: (teacher = f(student), op options, value tolerance, gradient tolerance, gradient floor)
    "near-identical-fkl": ("perturbed", {"beta": 0.0}, 2e-6, 2e-3, 0.0),
    "near-identical-rkl": ("perturbed", {"beta": 1.0}, 2e-6, 2e-3, 0.0),
    "near-identical-jsd": ("perturbed", {"beta": 0.5}, 2e-6, 2e-3, 0.0),
    "very-different-fkl": ("sharp", {"beta": 0.0}, 1e-5, 1e-5, 0.0),
    "very-different-rkl": ("sharp", {"beta": 1.0}, 1e-5, 1e-5, 0.0),
    "very-different-jsd-beta-near-0": ("sharp", {"beta": 1e-4}, 1e-5, 2e-3, 0.0),
    "jsd-beta-near-1": ("independent", {"beta": 1 - 1e-4}, 2e-6, 1e-5, 0.0),
    "huge-temperature": ("independent", {"beta": 0.5, "temperature": 1e3}, 2e-6, 1e-3, 0.0),
    "tiny-temperature-fkl": ("independent", {"beta": 0.0, "temperature": 1e-3}, 1e-3, 1e-4, 100.0),
    "tiny-temperature-rkl-softcap": ("independent", {"beta": 1.0, "temperature": 1e-2, "student_softcap": 30.0},
                                     1e-3, 1e-3, 100.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EXTREMES))
def test_extremes_match_float64(device, backend, name):
    relation, options, value_tol, grad_tol, grad_floor = EXTREMES[name]
    kwargs = make_case((9,), 43, d_s=10, d_t=10, s_dtype=F32, t_dtype=F32, device=device, spread=3.0)
    if relation == "perturbed":  # the same head up to 1e-3 noise: divergence ~1e-6
        kwargs["teacher_hidden"] = kwargs["student_hidden"].detach().clone()
        kwargs["teacher_weight"] = kwargs["student_weight"].detach() + 1e-3 * torch.randn_like(kwargs["teacher_weight"])
    elif relation == "sharp":  # a teacher 20x sharper: KLs ~1-100
        kwargs["teacher_weight"] = kwargs["teacher_weight"] * 20
    out, want, _, _ = check_against_reference({**kwargs, **options}, value_tol=value_tol, grad_tol=grad_tol,
                                              grad_floor=grad_floor, backend=backend)
    assert torch.isfinite(out.divergence).all()
    if relation == "perturbed":
        assert want[0].abs().max() < 1e-4
    if relation == "sharp":  # (the JSD at beta = 1e-4 is at most ~beta log(1 / beta))
        assert want[0].min() > (1e-5 if 0 < options["beta"] < 1 else 0.05)


# Per-row temperature spread over a range in one batch: each row's own. At T_n = 0.05 a row's |z|
# is ~200 (20x a generic row's), and its float32 rounding (~1e-7 |z| per logit, ~2e-5) bounds the
# log-probs' absolute accuracy, so the values' (~3e-5 seen, e.g. the JSD of near one-hot rows) and,
# through near one-hot rows' small gradients, the gradients' (~4e-4 seen for a float32 student), as
# in the tiny-temperature extremes above. A row at a wrong temperature is off by O(1). The top-k
# forms' tail bucket log(1 - sum of k probabilities) (TRL's definition) turns that rounding into
# ~rounding / tail where the student is near one-hot (tail down to TRL's floor of 1e-7): 1/5 to 5.
SPREAD_CASES = {
    # name: (mode, beta, student dtype, teacher dtype, temperature range)
    "full-fkl": ("full", 0.0, F32, F32, (0.05, 20.0)),
    "full-rkl-bf16": ("full", 1.0, BF16, BF16, (0.05, 20.0)),
    "full-jsd": ("full", 0.4, F32, BF16, (0.05, 20.0)),
    "teacher-topk-jsd": ("teacher_topk", 0.5, F32, F32, (0.2, 5.0)),
    "student-topk-rkl": ("student_topk", 1.0, BF16, F32, (0.2, 5.0)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPREAD_CASES))
def test_per_row_temperature_spread_matches_float64(device, backend, name):
    mode, beta, s_dtype, t_dtype, (low, high) = SPREAD_CASES[name]
    kwargs = make_case((2, 9), 47, d_s=11, d_t=7, s_dtype=s_dtype, t_dtype=t_dtype, device=device, mode=mode, k=4,
                       masked_rows=3, student_bias=True)
    kwargs["temperature"] = torch.logspace(math.log10(low), math.log10(high), 18, device=device)[
        torch.randperm(18, device=device)].view(2, 9)
    out, want, _, _ = check_against_reference({**kwargs, "beta": beta}, value_tol=1e-4,
                                              grad_tol=1e-3 if s_dtype == F32 else None, backend=backend)
    live = kwargs["mask"] != 0
    assert want[0][live].abs().min() > 0 and want[0].abs().max() > 1e-2  # the comparison can fail


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["full", "teacher_topk", "student_topk"])
def test_per_row_temperature_is_each_rows_own(device, backend, mode):
    # Row n of a per-row call equals a call with the scalar T_n (powers of two: 1 / T exact either
    # way); on the Triton path a row's values do not depend on the other rows: the same bits (the
    # torch path's matmuls may block differently by the number of rows: float32 rounding of z).
    kwargs = make_case((8,), 37, d_s=9, d_t=6, s_dtype=F32, t_dtype=F32, device=device, mode=mode, k=3)
    temperatures = [0.25, 4.0, 1.0, 0.5, 2.0, 0.125, 8.0, 1.0]
    out = gk.fused_divergence(**kwargs, beta=0.5, temperature=torch.tensor(temperatures, device=device),
                              backend=backend)
    for n, temperature in enumerate(temperatures):
        row = {key: (value[n:n + 1] if key in ("student_hidden", "teacher_hidden", "teacher_topk_ids",
                                                "teacher_topk_logprobs") else value) for key, value in kwargs.items()}
        one = gk.fused_divergence(**row, beta=0.5, temperature=temperature, backend=backend)
        for got, want in ((one.divergence, out.divergence[n:n + 1]), (one.student_entropy,
                                                                       out.student_entropy[n:n + 1])):
            if backend == "triton":
                assert torch.equal(got, want), (n, temperature)
            else:
                # |z| up to ~80 at T = 1/8; a tail bucket's log(1 - top-k mass) amplifies its rounding
                assert value_err(got, want) < 1e-4, (n, temperature)
    # and it matters: the rows at T = 1 differ from the same rows at T = 0.25
    hot = gk.fused_divergence(**kwargs, beta=0.5, temperature=0.25, backend=backend)
    assert (hot.divergence[[2, 7]] - out.divergence[[2, 7]]).abs().min() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_kl_of_identical_heads_is_zero(device, backend):
    kwargs = make_case((6,), 37, d_s=8, d_t=8, s_dtype=F32, t_dtype=F32, device=device)
    kwargs["teacher_hidden"], kwargs["teacher_weight"] = kwargs["student_hidden"].detach(), \
        kwargs["student_weight"].detach()
    for beta in (0.0, 0.5, 1.0):
        out = gk.fused_divergence(**kwargs, beta=beta, backend=backend)
        assert out.divergence.abs().max() < 1e-6
        out.divergence.sum().backward()
        assert kwargs["student_hidden"].grad.abs().max() < 1e-5
        kwargs["student_hidden"].grad = None


def test_paths_agree(device):
    # The two paths compute the same float32 quantities by the same formulas.
    kwargs = make_case((14,), 53, d_s=9, d_t=13, s_dtype=F32, t_dtype=F32, device=device, student_bias=True)
    for beta in (0.0, 0.25, 1.0):
        got = {}
        for backend in BACKENDS:
            kwargs["student_hidden"].grad = None
            out = gk.fused_divergence(**kwargs, beta=beta, student_softcap=3.0, temperature=0.6, backend=backend)
            out.divergence.sum().backward()
            got[backend] = (out.divergence.detach(), out.student_entropy, kwargs["student_hidden"].grad.clone())
        for a, b in zip(*got.values()):
            assert value_err(a, b) < 1e-6


@pytest.mark.parametrize("mode", ["full", "teacher_topk", "student_topk"])
def test_gradients_bitwise_run_to_run(device, mode):
    # No floating-point atomics anywhere in the backward: two runs give the same bits.
    kwargs = make_case((2, 8), 61, d_s=16, d_t=12, s_dtype=BF16, t_dtype=BF16, device=device, mode=mode, k=3,
                       student_bias=True)
    runs = []
    for _ in range(2):
        for name in ("student_hidden", "student_weight", "student_bias"):
            kwargs[name].grad = None
        out = gk.fused_divergence(**kwargs, beta=0.5, backend="triton")
        (out.divergence * torch.arange(16, device=device).view(2, 8)).sum().backward()
        runs.append([out.divergence.detach()] + [kwargs[n].grad.clone() for n in ("student_hidden", "student_weight",
                                                                                  "student_bias")])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_batch_invariant_rows(device):
    # A row's outputs do not depend on the other rows (the vocabulary split is fixed by V).
    kwargs = make_case((12,), 97, d_s=16, d_t=8, s_dtype=F32, t_dtype=F32, device=device)
    full = gk.fused_divergence(**kwargs, beta=0.5, backend="triton")
    sub = {k: (v[3:7] if k in ("student_hidden", "teacher_hidden") else v) for k, v in kwargs.items()}
    part = gk.fused_divergence(**sub, beta=0.5, backend="triton")
    assert torch.equal(full.divergence[3:7], part.divergence)
    assert torch.equal(full.student_entropy[3:7], part.student_entropy)


def test_teacher_gets_no_gradient(device):
    kwargs = make_case((5,), 23, d_s=8, d_t=6, s_dtype=F32, t_dtype=F32, device=device, teacher_bias=True)
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        kwargs[name].requires_grad_()
    out = gk.fused_divergence(**kwargs, beta=0.5)
    out.divergence.sum().backward()
    assert all(kwargs[n].grad is None for n in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    assert kwargs["student_weight"].grad is not None


def test_no_grad_and_entropy_only(device):
    kwargs = make_case((4,), 19, d_s=5, d_t=5, s_dtype=F32, t_dtype=F32, device=device)
    with torch.no_grad():
        out = gk.fused_divergence(**kwargs, beta=0.0)
    assert not out.divergence.requires_grad
    # the entropy carries no gradient (TRL's), even when the divergence does
    out = gk.fused_divergence(**kwargs, beta=0.0)
    assert out.divergence.requires_grad
    assert not out.student_entropy.requires_grad
    assert math.isfinite(out.student_entropy.sum().item())
