"""Fused distillation divergences from hidden states: :func:`fused_divergence`.

Per row ``n`` both heads' logits (see ``head``), ``p_s = softmax(z_s)``, ``p_t = softmax(z_t)``::

    beta = 0       KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)                 forward KL
    beta = 1       KL(p_s || p_t)                                                 reverse KL
    0 < beta < 1   beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = (1 - beta) p_s + beta p_t
    entropy        H(p_s) (no gradient)

over the whole vocabulary (TRL's ``ChunkedDivergenceFunction``), or over a top-k support's
``k + 1`` categories (``topk``; docs/semantics.md, "Distillation divergences").

Forward (``kernels._divergence_fwd_kernel``): one program holds BLOCK_N rows of one vocabulary
split and, per ``[BLOCK_N, BLOCK_V]`` tile, computes both heads' logits on chip (two tile GEMMs:
``h_s W_s^T`` over D_s, ``h_t W_t^T`` over D_t) and folds them into an online state per row:
each head's running max and sum of ``e^x`` (``x = z - max``), the student's ``sum e^x x`` (entropy)
and the two gaps ``sum e^{x_t} (x_t - x_s)`` and ``sum e^{x_s} (x_s - x_t)``, each kept relative to
the running maxima (shift-invariant: no cancellation at ``|z| ~ 1e4``), so that both KLs come out
of one pass: ``KL(p_t || p_s) = gap_t / sum_t - log sum_t + log sum_s``. A merge kernel combines
the splits in index order (the split size is fixed, so a row's bits do not depend on the batch).
The JSD needs both final normalizers for its mixture: a second pass (``_divergence_jsd_kernel``)
recomputes both tiles and sums ``beta p_t log(p_t / m) + (1 - beta) p_s log(p_s / m)`` and
``KL(p_s || m)`` (its backward's row term). The top-k forms run the same forward (without a teacher
tile for the teacher's given top-k) and take ``z`` at their ``k`` ids as ``k`` dot products per row
(``head.logits_at_ids``: O(N k D) beside the vocabulary's O(N V D)); their backward writes
``sum_i g_i [v = id_i] - p_s sum_i g_i`` for the student alone.

Backward: the log-prob package's workspace scheme (``logprobs.workspace.dlogits_gemm_backward``)
with this package's d-logits kernel, which recomputes both tiles and writes the student's
``d loss / d y`` (``kernels``' KIND formulas) into a bounded buffer in the student's dtype; cuBLAS
GEMMs form d hidden (float32 accumulator) and d weight (float32 accumulation in the GEMM). No
floating-point atomics: gradients are bitwise identical run to run. The teacher gets no gradient.

Modelled cost (``launch.cost_model``) at N = 8192 rows, D_s = D_t = 4096, V = 151936, bf16, the
default 256 MiB workspace: full-vocabulary KL 6 matmuls of ``2 N V D`` (61 TFLOP: 2 forward,
2 recompute, d hidden, d weight; TRL's ``ChunkedDivergenceFunction`` does the same 6), the JSD 8
(a second forward pass; TRL's too), ``teacher_topk`` 4 (the log-prob op's), ``student_topk`` 6 (with
its top-k selection pass). Memory above inputs and gradients: 16 MiB of forward split states,
238 MiB of d logits (10 vocabulary chunks of 15232 ids) + a 128 MiB float32 d-hidden accumulator.
HBM traffic beyond the GEMM operands: d logits written once and read by both GEMMs (7.0 GiB),
the accumulator's read-modify-write (2.5 GiB); the GEMMs stay compute-bound. No ``[N, V]`` buffer.

On CPU tensors the Triton kernels run under ``TRITON_INTERPRET=1``; otherwise ``torch_path``
computes the same quantities over bounded slabs.

Modules, lowest layer first (each imports only those above it, and ``grpo_kernels.ops.logprobs``'s
``kernels``, ``launch``, ``workspace``):

- ``kernels``: the Triton jit kernels.
- ``launch``: their tiles per (student, teacher) dtype pair, and the cost model.
- ``head``: the drivers' interface (a head, the forward's statistics, a head's tile in torch, its
  logits at given ids).
- ``torch_path``: the chunked PyTorch drivers.
- ``topk``: the top-k forms (the divergence on a support; the student's top-k ids).
- ``drivers``: the Triton drivers; ``BACKENDS``.
- ``op``: the custom ops and their autograd.
- ``specs``: every kernel configuration, for the sm_90 compile check.
- ``api``: :func:`fused_divergence`, :class:`DivergenceOutput`, the argument checks.
"""

from grpo_kernels.ops.divergence.api import MODES, DivergenceOutput, fused_divergence
from grpo_kernels.ops.divergence.specs import sm90_compile_specs

__all__ = ["fused_divergence", "DivergenceOutput", "MODES", "sm90_compile_specs"]
