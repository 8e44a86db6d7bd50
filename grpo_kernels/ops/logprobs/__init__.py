"""Per-token log-probs and entropy straight from hidden states and the LM head.

For every row ``n`` with hidden state ``h_n`` and target tokens ``t_{n,1..K}`` (K = 1 usually)::

    y_n       = h_n @ weight.T + bias                       # [V], never stored whole
    z_n       = y_n / T_n                                   # or, with a soft-cap c:
    z_n       = c * tanh(y_n / c) / T_n                     #   (Gemma's final_logit_softcapping)
    lse_n     = logsumexp(z_n)
    logp_nk   = z_n[t_nk] - lse_n
    entropy_n = lse_n - sum_v softmax(z_n)_v * z_n[v]

T_n is one temperature for every row, or each row's own (the kernels read 1 / T_n per row). On
request the same pass also gives log sum_v p^2, the mean of z, TRL's is_top1 and a top-k (see
``outputs``).

The forward streams the vocabulary through on-chip tiles (``tl.dot`` of ``[BLOCK_N, BLOCK_D]``
hidden by ``[BLOCK_D, BLOCK_V]`` weight tiles), keeps an online logsumexp and an online
``sum p (z - max)`` for the entropy, copies each target's logit out of the tile that holds it,
and stores O(N) state only. The vocabulary is split across programs; a small merge kernel
combines the per-split partial states in a fixed order (split 0, 1, 2, ...). Programs are
rastered in groups of row blocks (``launch.FORWARD_GROUP_ROWS``) so that those running together
share hidden rows and weight tiles in L2.

Batch invariance (``batch_invariant=True``, the default): the split size is a constant of the
launch configuration (``launch.INVARIANT_SPLIT_VOCAB`` ids), never a function of the number of
rows, and every tile configuration depends on the dtype only. A row's reduction order is then
fixed by V and the dtype alone, so its log-prob, entropy and lse are bitwise identical whatever
else is in the batch (its size, the other rows, ignored rows, the row's position). With
``batch_invariant=False`` the split count grows when there are few row blocks, to fill the GPU
(faster for a few hundred rows, but a row's bits then depend on N).

The backward recomputes each ``[BLOCK_N, BLOCK_V]`` logit tile and forms, on chip, ::

    d z_v = sum_k g_k [v == t_k] - p_v * sum_k g_k - g_ent * p_v * (z_v - E_p[z])
    d y_v = d z_v / temperature * (1 - tanh^2(y_v / c))       # the last factor under a soft-cap

Default scheme (``backward="workspace"``, module ``workspace``): the tile's ``d y`` is stored in
a bounded buffer (a chunk of rows x vocabulary ids, in the input dtype), and cuBLAS GEMMs turn
it into ``d hidden`` (a float32 accumulator across vocabulary chunks) and ``d weight`` (float32
accumulation inside the GEMM). 4 matmuls in all with the forward, no floating-point atomics, so
the gradients are bitwise identical run to run (``deterministic=True`` is this path).

Atomic scheme (``backward="atomic"``, Cut Cross-Entropy's): ``d y @ W`` goes into ``d hidden``
and ``d y^T @ h`` into ``d weight`` with atomic adds, so no ``[N, V]`` buffer of any size exists.
``d hidden`` is accumulated in float32 over row chunks of bounded size; ``d weight`` in a float32
vocabulary-chunk buffer (``exact=True``: a second pass, 5 matmuls) or in the weight's dtype
(``exact=False``: 4 matmuls). Kept until a GPU run has compared the two schemes.

Either way, rows that are ignored or whose incoming gradient is zero are compacted away before
the launch and cost nothing.

On CPU tensors the same Triton kernels run under ``TRITON_INTERPRET=1``; otherwise the chunked
PyTorch path of ``torch_path`` computes the same thing.

Modules, lowest layer first (each imports only those above it in this list):

- ``outputs``: the names and definitions of the outputs, ``TokenStats``, the drivers' ``RowStats``.
- ``temperature``: a float or per-row temperature, its range and checks.
- ``topk``: the top-k's packed (logit, id) keys and their exact merge.
- ``kernels``: the Triton jit kernels.
- ``launch``: their launch configuration (tiles, warps, stages per dtype; vocabulary splits).
- ``torch_path``: the chunked PyTorch drivers (CPU without the interpreter).
- ``workspace``: the default backward's driver (the d-logits kernel and the GEMMs).
- ``drivers``: the Triton drivers; ``BACKENDS`` maps a backend name to its (forward, backward).
- ``op``: the custom ops, their autograd, the argument checks, ``single_device_logprobs``.
- ``specs``: every kernel configuration the launcher can pick, for the sm_90 compile check.
- ``api``: :func:`token_logprobs`, which dispatches to ``op`` or to the vocabulary-parallel head
  (``grpo_kernels.ops.vocab_parallel``, which itself uses ``drivers`` and ``op`` only).
"""

from grpo_kernels.ops.logprobs.launch import (
    DEFAULT_WORKSPACE_BYTES,
    GPU_CONFIG,
    BackwardPlan,
    LaunchConfig,
    backward_plan,
    forward_splits,
)
from grpo_kernels.ops.logprobs.outputs import OUTPUT_NAMES, TokenStats
from grpo_kernels.ops.logprobs.specs import sm90_compile_specs
from grpo_kernels.ops.logprobs.temperature import TEMPERATURE_RANGE

__all__ = ["token_logprobs", "TokenStats", "OUTPUT_NAMES", "TEMPERATURE_RANGE", "sm90_compile_specs", "GPU_CONFIG",
           "LaunchConfig", "BackwardPlan", "backward_plan", "forward_splits", "DEFAULT_WORKSPACE_BYTES"]


def __getattr__(name):
    # The API is imported on first use, not here: it imports the vocabulary-parallel head, which
    # imports this package's lower modules, and an eager import would close that circle.
    if name == "token_logprobs":
        from grpo_kernels.ops.logprobs.api import token_logprobs

        return token_logprobs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
