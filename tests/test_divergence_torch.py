"""The chunked PyTorch path of fused_divergence (``grpo_kernels.ops.divergence.torch_path``) with
tiles small enough that every case crosses row, vocabulary and block borders; its memory
contract (allocator bytes: no [N, V] buffer, flat in N and V); the student top-k selection
across vocabulary chunks."""

import pytest
import torch
from divergence_cases import check_against_reference, make_case
from test_logprobs_torch import allocator_peak_bytes

from grpo_kernels.ops.divergence import head as head_module
from grpo_kernels.ops.divergence import torch_path
from grpo_kernels.ops.divergence.head import Head
from grpo_kernels.ops.divergence.kernels import FORWARD_KL, JSD, REVERSE_KL, TARGETS
from grpo_kernels.ops.divergence.topk import select_student_topk

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 5 rows x 7 ids, elementwise blocks of 2 rows."""
    monkeypatch.setattr(torch_path, "_SLAB_BYTES", 4 * 5 * 7)
    monkeypatch.setattr(torch_path, "_MIN_SLAB_ROWS", 5)
    monkeypatch.setattr(torch_path, "_BLOCK_BYTES", 4 * 2 * 7)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mode,beta,options", [
    ("full", 0.0, {"student_softcap": 2.0, "temperature": 0.7}),
    ("full", 1.0, {"teacher_softcap": 2.0, "student_logit_scale": 1.5}),
    ("full", 0.35, {}),
    ("teacher_topk", 0.0, {"student_softcap": 3.0}),
    ("student_topk", 1.0, {"topk_tail": "renormalize"}),
])
def test_small_tiles_match_float64(small_tiles, device, dtype, mode, beta, options):
    kwargs = make_case((23,), 31, d_s=9, d_t=14, s_dtype=dtype, t_dtype=F32, device=device, mode=mode, k=3,
                       student_bias=True, teacher_bias=True, masked_rows=4, per_row_temperature=True)
    check_against_reference({**kwargs, "beta": beta, **options}, backend="torch")


def _heads(num_rows, vocab, dim, device):
    student = Head(torch.randn(num_rows, dim, device=device), torch.randn(vocab, dim, device=device) / 4,
                   torch.randn(vocab, device=device), 1.2, 20.0)
    teacher = Head(torch.randn(num_rows, dim + 3, device=device), torch.randn(vocab, dim + 3, device=device) / 4,
                   None, 1.0, None)
    return student, teacher


def test_memory_is_flat_in_rows_and_vocabulary(monkeypatch):
    # Above inputs and gradients: two logits slabs (forward), three in the backward (with dz/dy),
    # cache-sized blocks, the weight rows gathered for the logits at the ids (half a slab), O(rows)
    # vectors, the [M, D] float32 d-hidden accumulator and one [vocabulary chunk, D] d-weight
    # accumulator. No [rows, V] buffer; the same at 4x N and 4x V.
    slab_rows, slab_vocab, dim = 16, 64, 24
    slab_bytes = 4 * slab_rows * slab_vocab
    monkeypatch.setattr(torch_path, "_SLAB_BYTES", slab_bytes)
    monkeypatch.setattr(torch_path, "_MIN_SLAB_ROWS", slab_rows)
    monkeypatch.setattr(torch_path, "_BLOCK_BYTES", slab_bytes // 2)
    monkeypatch.setattr(head_module, "_GATHER_BYTES", slab_bytes // 2)  # the weight rows at the 4 ids

    def peaks(num_rows, vocab):
        student, teacher = _heads(num_rows, vocab, dim, "cpu")
        rows = torch.arange(num_rows, dtype=torch.int32)
        inv_temp = torch.full((num_rows,), 1.25)
        ids = torch.randint(0, vocab, (num_rows, 4), dtype=torch.int32)
        stats = torch_path.torch_forward(student, teacher, rows, inv_temp, ids, 0.5)
        grads = (torch.zeros_like(student.hidden), torch.zeros_like(student.weight), torch.zeros(vocab))
        grad_row = torch.randn(num_rows)
        result = {
            "forward": allocator_peak_bytes(lambda: torch_path.torch_forward(student, teacher, rows, inv_temp, ids,
                                                                             0.5)),
            "backward": allocator_peak_bytes(lambda: torch_path.torch_backward(
                student, teacher, rows, inv_temp, JSD, 0.5, stats.student_lse, stats.teacher_lse,
                stats.kl_student_mixture, grad_row, None, None, *grads)),
            "backward_targets": allocator_peak_bytes(lambda: torch_path.torch_backward(
                student, None, rows, inv_temp, TARGETS, 0.0, stats.student_lse, None, None, grad_row, ids,
                torch.randn(num_rows, 4), *grads)),
        }
        # O(rows) vectors, the d-hidden accumulator and [chunk, D] pieces: none of them a slab's size
        small = 40 * num_rows * 4 + num_rows * dim * 4 + 6 * slab_vocab * (dim + 3) * 4 + 8 * slab_rows * dim * 4
        assert result["forward"] <= 3 * slab_bytes + small, result
        assert result["backward"] <= 3.5 * slab_bytes + small, result
        assert result["backward_targets"] <= 2.5 * slab_bytes + small, result
        return result, small

    base, base_small = peaks(32, 128)
    for num_rows, vocab in ((128, 128), (32, 512)):
        grown, small = peaks(num_rows, vocab)
        assert max(grown.values()) < num_rows * vocab * 4  # below one [N, V] float32 buffer
        for key in base:
            assert grown[key] - base[key] <= small - base_small, (key, base[key], grown[key])


@pytest.mark.parametrize("kind", [FORWARD_KL, REVERSE_KL])
def test_rows_subset_gets_gradients_only_on_its_rows(small_tiles, kind):
    student, teacher = _heads(11, 19, 6, "cpu")
    rows = torch.tensor([1, 4, 5, 9], dtype=torch.int32)
    inv_temp = torch.ones(11)
    stats = torch_path.torch_forward(student, teacher, rows, inv_temp, None, 0.0)
    grad_hidden = torch.zeros_like(student.hidden)
    aux = stats.reverse_kl if kind == REVERSE_KL else None
    torch_path.torch_backward(student, teacher, rows, inv_temp, kind, 0.0, stats.student_lse, stats.teacher_lse, aux,
                              torch.ones(4), None, None, grad_hidden, None, None)
    others = torch.ones(11, dtype=torch.bool)
    others[rows.long()] = False
    assert (grad_hidden[others] == 0).all() and (grad_hidden[~others] != 0).any()


@pytest.mark.parametrize("slab_bytes", [4 * 3 * 5, 4 * 64 * 64])
def test_student_topk_selection_across_chunks(slab_bytes):
    # Ties across vocabulary chunks go to the lower id; the result does not depend on the chunks.
    vocab, k = 23, 4
    hidden = torch.zeros(3, 5)
    bias = torch.zeros(vocab)
    bias[[2, 6, 11, 17, 21]] = torch.tensor([3.0, 5.0, 5.0, 5.0, 3.0])
    bias[[0, 1]] = torch.tensor([-1.0, 4.0])
    student = Head(hidden, torch.randn(vocab, 5), bias, 1.0, None)
    ids = select_student_topk(student, torch.tensor([0, 2], dtype=torch.int32), torch.ones(3), k,
                              slab_bytes=slab_bytes)
    assert ids.tolist() == [[6, 11, 17, 1], [-1] * k, [6, 11, 17, 1]]
    # a tie across the k-th place: ids 6, 11 and 17 share the top value, k = 2 keeps 6 and 11
    ids = select_student_topk(student, torch.tensor([1], dtype=torch.int32), torch.ones(3), 2, slab_bytes=slab_bytes)
    assert ids.tolist() == [[-1, -1], [6, 11], [-1, -1]]
    student = Head(torch.randn(9, 5), torch.randn(vocab, 5), None, 0.7, 2.0)
    ids = select_student_topk(student, torch.arange(9, dtype=torch.int32), torch.full((9,), 2.0), k,
                              slab_bytes=slab_bytes)
    logits = 2.0 * torch.tanh(0.7 * student.hidden @ student.weight.t() / 2.0) * 2.0
    assert torch.equal(ids.long(), torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k])
