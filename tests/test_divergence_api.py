"""fused_divergence's interface: bad input (a ValueError/TypeError naming the argument), the
custom ops under torch.compile(fullgraph=True), meta tensors, opcheck."""

import math

import pytest
import torch
from divergence_cases import make_case

import grpo_kernels as gk

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture
def full_case(device):
    return make_case((2, 5), 31, d_s=8, d_t=6, s_dtype=F32, t_dtype=BF16, device=device)


@pytest.fixture
def topk_case(device):
    return make_case((2, 5), 31, d_s=8, d_t=6, s_dtype=F32, t_dtype=F32, device=device, mode="teacher_topk", k=3)


def _without(kwargs, *names):
    return {k: v for k, v in kwargs.items() if k not in names}


BAD_FULL = [
    # (changes, exception, words the message must hold)
    ({"mode": "topk"}, ValueError, "mode"),
    ({"student_hidden": "x"}, TypeError, "student_hidden"),
    ({"student_weight": torch.zeros(31, 8, dtype=torch.int64)}, TypeError, "student_weight"),
    ({"student_weight": torch.zeros(31, 7)}, ValueError, "student_weight"),
    ({"student_bias": torch.zeros(30)}, ValueError, "student_bias"),
    ({"student_bias": torch.zeros(31, dtype=torch.float64)}, TypeError, "student_bias"),
    ({"teacher_hidden": None}, ValueError, "teacher_hidden"),
    ({"teacher_hidden": torch.zeros(3, 5, 6, dtype=BF16)}, ValueError, "teacher_hidden"),
    ({"teacher_weight": torch.zeros(29, 6, dtype=BF16)}, ValueError, "vocabular"),
    ({"teacher_bias": torch.zeros(31)}, TypeError, "teacher_bias"),
    ({"beta": 1.5}, ValueError, "beta"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"beta": True}, TypeError, "beta"),
    ({"beta": math.nan}, ValueError, "beta"),
    ({"beta": "0.5"}, TypeError, "beta"),
    ({"beta": torch.tensor(0.5)}, TypeError, "beta"),
    ({"temperature": True}, TypeError, "temperature"),
    ({"student_softcap": "30"}, TypeError, "student_softcap"),
    ({"teacher_logit_scale": torch.tensor(1.0)}, TypeError, "teacher_logit_scale"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": "hot"}, TypeError, "temperature"),
    ({"temperature": torch.ones(10)}, ValueError, "temperature"),
    ({"temperature": torch.ones(2, 5, dtype=torch.int64)}, TypeError, "temperature"),
    ({"student_softcap": -1.0}, ValueError, "student_softcap"),
    ({"teacher_softcap": math.inf}, ValueError, "teacher_softcap"),
    ({"student_softcap": 1e300}, ValueError, "student_softcap"),  # inf in float32: was a NaN divergence (torch)
    ({"teacher_softcap": 1e-40}, ValueError, "teacher_softcap"),  # subnormal in float32
    ({"student_logit_scale": 0.0}, ValueError, "student_logit_scale"),
    ({"teacher_logit_scale": math.nan}, ValueError, "teacher_logit_scale"),
    ({"mask": torch.ones(10)}, ValueError, "mask"),
    ({"topk": 3}, ValueError, "topk"),
    ({"topk_tail": "drop"}, ValueError, "topk_tail"),
    ({"workspace_bytes": 0}, ValueError, "workspace_bytes"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"teacher_topk_ids": torch.zeros(2, 5, 3, dtype=torch.int64)}, ValueError, "teacher_topk"),
    ({"mode": "student_topk"}, ValueError, "topk"),
    ({"mode": "student_topk", "topk": 65}, ValueError, "topk"),
    ({"mode": "student_topk", "topk": 32}, ValueError, "topk"),  # > V = 31
]


@pytest.mark.parametrize("changes,error,words", BAD_FULL, ids=[str(i) for i in range(len(BAD_FULL))])
def test_bad_input_full(full_case, changes, error, words):
    with pytest.raises(error, match=words):
        gk.fused_divergence(**{**full_case, **changes})


BAD_TOPK = [
    ({"teacher_topk_ids": None}, ValueError, "teacher_topk_ids"),
    ({"teacher_topk_ids": torch.zeros(2, 5, 3)}, TypeError, "teacher_topk_ids"),
    ({"teacher_topk_logprobs": torch.zeros(2, 5, 4)}, ValueError, "teacher_topk"),
    ({"teacher_topk_logprobs": torch.zeros(2, 5)}, ValueError, "teacher_topk_logprobs"),
    ({"teacher_hidden": torch.zeros(2, 5, 6)}, ValueError, "teacher head"),
    ({"topk": 2}, ValueError, "topk"),
]


@pytest.mark.parametrize("changes,error,words", BAD_TOPK, ids=[str(i) for i in range(len(BAD_TOPK))])
def test_bad_input_topk(topk_case, changes, error, words):
    with pytest.raises(error, match=words):
        gk.fused_divergence(**{**topk_case, **changes})


def test_bad_values_inside_the_op(full_case, topk_case):
    with pytest.raises(ValueError, match="temperature"):
        gk.fused_divergence(**full_case, temperature=torch.tensor([[1.0, -1.0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        gk.fused_divergence(**full_case, temperature=torch.full((2, 5), math.inf))
    ids = topk_case["teacher_topk_ids"].clone()
    ids[1, 2, 0] = 31
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        gk.fused_divergence(**{**topk_case, "teacher_topk_ids": ids})
    # an id out of range is fine where the teacher's entry is absent (-inf) or the row is masked
    logprobs = topk_case["teacher_topk_logprobs"].clone()
    logprobs[1, 2, 0] = -math.inf
    gk.fused_divergence(**{**topk_case, "teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs})
    mask = torch.ones(2, 5)
    mask[1, 2] = 0
    gk.fused_divergence(**{**topk_case, "teacher_topk_ids": ids, "mask": mask})


def test_numpy_scalars_are_numbers(full_case):
    np = pytest.importorskip("numpy")
    want = gk.fused_divergence(**full_case, beta=0.5, temperature=0.75, student_softcap=4.0)
    got = gk.fused_divergence(**full_case, beta=np.float32(0.5), temperature=np.float64(0.75),
                              student_softcap=np.int64(4))
    assert torch.equal(got.divergence, want.divergence)


def test_empty_batch_refused(device):
    kwargs = make_case((0,), 11, d_s=4, d_t=4, s_dtype=F32, t_dtype=F32, device=device)
    with pytest.raises(ValueError, match="empty"):
        gk.fused_divergence(**kwargs)


@pytest.mark.parametrize("mode", ["full", "teacher_topk", "student_topk"])
def test_meta_tensors_give_shapes(mode):
    kwargs = make_case((3, 4), 29, d_s=8, d_t=6, s_dtype=BF16, t_dtype=F32, device="cpu", mode=mode, k=5)
    meta = {k: (v.detach().to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    out = gk.fused_divergence(**meta, beta=0.5, temperature=torch.ones(3, 4, device="meta"))
    assert out.divergence.shape == (3, 4) and out.divergence.dtype == F32 and out.divergence.is_meta
    assert out.student_entropy.shape == (3, 4)
    if mode != "full":
        assert out.student_topk_mass.shape == (3, 4) and out.teacher_topk_mass.shape == (3, 4)
    if mode == "student_topk":
        assert out.topk_ids.shape == (3, 4, 5) and out.topk_ids.dtype == torch.int32


@pytest.mark.parametrize("mode", ["full", "teacher_topk", "student_topk"])
def test_compile_fullgraph_traces_through(device, mode):
    kwargs = make_case((2, 6), 37, d_s=8, d_t=12, s_dtype=F32, t_dtype=F32, device=device, mode=mode, k=3,
                       student_bias=True, masked_rows=2)
    mask = kwargs.pop("mask")

    def loss_fn(student_hidden, student_weight, student_bias, mask):
        out = gk.fused_divergence(**{**kwargs, "student_hidden": student_hidden, "student_weight": student_weight,
                                     "student_bias": student_bias, "mask": mask}, beta=0.3, temperature=0.9)
        return (out.divergence * mask).sum() / mask.sum(), out.student_entropy.mean()

    leaves = [kwargs["student_hidden"], kwargs["student_weight"], kwargs["student_bias"]]
    want_loss, want_entropy = loss_fn(*leaves, mask)
    want_loss.backward()
    want_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got_loss, got_entropy = compiled(*leaves, mask)
    got_loss.backward()
    assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(got_entropy, want_entropy, rtol=1e-6, atol=1e-7)
    for t, want in zip(leaves, want_grads):
        assert torch.allclose(t.grad, want, rtol=1e-5, atol=1e-7)


def test_opcheck(device):
    kwargs = make_case((7,), 23, d_s=6, d_t=5, s_dtype=F32, t_dtype=F32, device=device, student_bias=True)
    inv_temperature = torch.full((7,), 1 / 0.8, device=device)
    row_mask = torch.tensor([True, True, False, True, True, True, True], device=device)
    student = (kwargs["student_hidden"], kwargs["student_weight"], kwargs["student_bias"])
    teacher = (kwargs["teacher_hidden"], kwargs["teacher_weight"], None)
    caps = (1.1, 3.0, 1.0, None)
    for beta in (0.0, 0.4):
        torch.library.opcheck(torch.ops.grpo_kernels.fused_divergence.default,
                              (*student, *teacher, inv_temperature, row_mask, beta, *caps, None, "torch"))
    ids = torch.randint(0, 23, (7, 3), device=device)
    live = torch.ones(7, 3, dtype=torch.bool, device=device)
    torch.library.opcheck(torch.ops.grpo_kernels.divergence_topk_logprobs.default,
                          (*student, *teacher, ids, live, inv_temperature, row_mask, *caps, None, "torch"))
    torch.library.opcheck(torch.ops.grpo_kernels.divergence_student_topk.default,
                          (*student, inv_temperature, row_mask, 4, 1.1, 3.0),
                          test_utils=("test_schema", "test_faketensor"))


def test_cost_model_counts_the_drivers_matmuls():
    from grpo_kernels.ops.divergence.launch import GPU_CONFIG, cost_model
    from grpo_kernels.ops.logprobs.launch import backward_plan

    rows, vocab, d_s, d_t = 8192, 151936, 4096, 2048
    unit = 2 * rows * vocab
    expected = {("full", 0.0): 4 * d_s + 2 * d_t, ("full", 1.0): 4 * d_s + 2 * d_t, ("full", 0.5): 5 * d_s + 3 * d_t,
                ("teacher_topk", 0.0): 4 * d_s, ("student_topk", 1.0): 5 * d_s + d_t}
    for (mode, beta), units in expected.items():
        cost = cost_model(rows, vocab, d_s, d_t, torch.bfloat16, mode=mode, beta=beta)
        assert cost.matmul_flops == unit * units
    plan = backward_plan(rows, vocab, d_s, torch.bfloat16,
                         tiles=GPU_CONFIG["dlogits"][(torch.bfloat16, torch.bfloat16)][:2])
    assert cost.workspace_bytes == plan.workspace_bytes <= 256 * 2**20
    assert cost.accumulator_bytes == 4 * rows * d_s
