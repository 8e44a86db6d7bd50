"""The public entry point :func:`token_logprobs`: the single-device op, or the vocabulary-parallel
head when a process group is given. The top layer of the package: nothing below imports it."""

import torch

from grpo_kernels.ops.logprobs.op import check_backward_options, check_flags, single_device_logprobs
from grpo_kernels.ops.vocab_parallel import check_process_group, vocab_parallel_logprobs


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    outputs: tuple[str, ...] | list[str] | None = None,
    topk: int | None = None,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    softcap: float | None = None,
    filter_eps: float | None = None,
    exact: bool = True,
    batch_invariant: bool = True,
    deterministic: bool = False,
    backward: str = "workspace",
    workspace_bytes: int | None = None,
    backend: str = "auto",
    process_group=None,
):
    """Log-prob of each target token (and per-row statistics, top-k), logits never stored.

    The logits are ``z = (hidden @ weight.T + bias) / temperature``, or with ``softcap``
    ``z = softcap * tanh((hidden @ weight.T + bias) / softcap) / temperature``.

    Two ways to call it. Without ``outputs``: log-probs, or a tuple with the entropy and/or lse
    (``return_entropy``/``return_lse``). With ``outputs`` (a tuple/list of names among
    ``"entropy"``, ``"lse"``, ``"log_sum_sq_probs"``, ``"mean_logits"``, ``"is_top1"``,
    ``"topk"``): a :class:`grpo_kernels.TokenStats` whose unrequested fields are None, every output
    from the same single pass over the vocabulary. Definitions (TRL 1.16's, see
    ``docs/semantics.md``): entropy -sum p log p; lse logsumexp z; log_sum_sq_probs log sum p^2;
    mean_logits sum_v z_v / V; is_top1 whether the target is argmax's pick (z_t >= max z and
    z_t > z_v for every lower id v); topk the k largest log-probs and their ids, descending, ties
    to the lower id.

    Args:
        hidden: ``[..., D]`` last hidden states (bf16, fp16 or fp32).
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        targets: int32/int64 token ids, either ``[...]`` (the leading shape of ``hidden``: one
            target per row) or ``[..., K]`` (``targets.dim() == hidden.dim()``: K targets per
            row, e.g. a teacher's top-K, all scored in the same pass over the vocabulary; ids may
            repeat). Entries equal to ``ignore_index`` give log-prob 0 and no gradient; a row
            whose every entry is ignored also gets 0 for every per-row output (False, id 0).
            ``None`` (only with ``outputs``): statistics and top-k only, every row live, no
            log-probs (``TokenStats.logprobs`` is None): e.g. a student's top-k in distillation.
        outputs: names of the per-row outputs to compute (above); ``None``: the tuple interface.
            ``"is_top1"`` needs one target per row. Unknown names are refused.
        topk: with ``"topk"`` in ``outputs`` (and only then): k, an int in [1, 64] (<= V). The
            ``[..., k]`` log-probs are differentiable (as log-probs of the k ids, which are held
            fixed); ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` are not (as in TRL).
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it before the softmax: a float, or a float tensor of
            hidden's leading shape (one temperature per row, e.g. per sampled sequence; any shape
            that broadcasts to the leading shape, such as ``[B, 1]``). In
            ``[2**-64, 2**64]`` (``z`` is float32; see ``logprobs.temperature``). Not
            differentiated.
        ignore_index: an int32.
        return_entropy: also return the entropy of ``softmax(z)`` per row. Every flag
            (``return_entropy``, ``return_lse``, ``exact``, ``batch_invariant``, ``deterministic``)
            must be a ``bool``: anything else (``"no"``, 0, a tensor) is a ``TypeError``.
        return_lse: also return ``logsumexp(z)`` per row (differentiable: a z-loss, or a caller's
            own normalization).
        softcap: logit soft-capping (Gemma 2/3's ``final_logit_softcapping``), finite > 0, or None.
        filter_eps: backward only: skip ``[BLOCK_N, BLOCK_V]`` tiles whose every ``|d logit|`` is
            below this (Cut Cross-Entropy's gradient filtering, e.g. ``2**-12`` for bf16). ``None``
            (default) is exact.
        exact: ``backward="atomic"`` only, 16-bit weights only (the workspace backward always
            accumulates in float32). ``True`` (default): every gradient is accumulated in float32;
            d weight takes a second pass that recomputes the logits (5 matmuls in all instead of
            4). ``False``: d weight is accumulated in the weight's dtype within the single pass
            (Cut Cross-Entropy's scheme): faster, but its 16-bit rounding error grows with the
            number of rows.
        batch_invariant: Triton kernels: a row's outputs are bitwise identical whatever else is in
            the batch (batch size, other rows, ignored rows, position), because the vocabulary
            split, and so the reduction order, is fixed by V and the dtype. Default ``True``: at
            N >= 4096 rows the fixed split launches at least as many programs as the adaptive one
            (so its cost is nil by count; the GPU kit measures it). ``False`` splits the
            vocabulary further for small N (a few hundred rows) to fill the GPU: faster there,
            but a row's last bits then depend on N. The chunked torch path makes no such promise
            (its matmul blocking is the BLAS library's choice).
        deterministic: backward only: ask for bitwise-identical gradients run to run (same GPU,
            shapes and library versions). The default ``backward="workspace"`` is that already (no
            floating-point atomics); ``deterministic=True`` with ``backward="atomic"`` is a
            ``ValueError``, since atomics add in whatever order the programs run.
        backward: backward scheme of the Triton path. ``"workspace"`` (default): a kernel
            recomputes the logit tiles and writes d logits into a bounded buffer, then GEMMs
            (cuBLAS) form d hidden (float32 accumulator) and d weight (float32 accumulation inside
            the GEMM, each row written once while all rows fit one chunk): 4 matmuls in all, no
            atomics, deterministic. ``"atomic"``: each tile's products are scattered into the
            gradients with float32 atomics (Cut Cross-Entropy's scheme; ``exact`` applies), kept
            until a GPU run has compared the two. The torch path ignores it.
        workspace_bytes: ``backward="workspace"``: the scratch memory the backward may allocate
            besides its float32 accumulators (d logits, gathered hidden rows, d-bias partials):
            an int > 0 or ``None`` (256 MiB). Larger means fewer, bigger chunks: less
            accumulator traffic, more memory. The accumulators come on top: float32 d hidden
            ``4 M D`` bytes for M active rows (none for float32 inputs whose active rows are
            contiguous). At N = 16384, D = 4096, V = 151936, bf16: 252 + 256 MiB. See
            :func:`grpo_kernels.ops.logprobs.launch.backward_plan`.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else chunked torch),
            ``"triton"`` or ``"torch"``.
        process_group: vocabulary-parallel head (tensor parallelism): ``weight``/``bias`` are this
            rank's ``[V_r, D]``/``[V_r]`` shard (rank order), ``targets`` hold global ids, ``hidden``
            is the same on every rank; see :func:`grpo_kernels.ops.vocab_parallel.vocab_parallel_logprobs`.
            A ``torch.distributed.ProcessGroup`` (e.g. ``dist.group.WORLD``) or None (one device);
            anything else is a ``TypeError``.

    Returns:
        With ``outputs``: a :class:`~grpo_kernels.TokenStats`. Otherwise float32 log-probs of the
        shape of ``targets``; with ``return_entropy`` and/or ``return_lse`` a tuple
        ``(logprobs, entropy, lse)`` of those asked for, entropy and lse shaped like hidden's
        leading shape. Differentiable w.r.t. hidden, weight and bias through
        all of them; gradients come back in the inputs' dtype. Under ``torch.no_grad()`` only the
        forward runs. ``torch.compile(fullgraph=True)`` traces through it (a custom op,
        ``torch.ops.grpo_kernels.token_logprobs``), and meta tensors give the output shapes.
    """
    check_flags(return_entropy=return_entropy, return_lse=return_lse, exact=exact, batch_invariant=batch_invariant)
    check_backward_options(backward, workspace_bytes, deterministic)
    if process_group is not None:
        multi_target = isinstance(targets, torch.Tensor) and targets.dim() == hidden.dim()
        unsupported = [name for name, on in (('softcap', softcap is not None),
                       ('deterministic', deterministic), ('K targets per row', multi_target),
                       ("backward='atomic'", backward == "atomic"), ('workspace_bytes', workspace_bytes is not None))
                       if on]
        if unsupported:
            raise ValueError(f"process_group (vocabulary-parallel head) does not support {', '.join(unsupported)} yet")
        check_process_group(process_group)
        return vocab_parallel_logprobs(
            hidden, weight, targets, process_group, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, return_lse=return_lse, filter_eps=filter_eps, exact=exact, backend=backend,
            outputs=outputs, topk=topk)
    return single_device_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, return_lse=return_lse, softcap=softcap, filter_eps=filter_eps, exact=exact,
        batch_invariant=batch_invariant, deterministic=deterministic, backward=backward,
        workspace_bytes=workspace_bytes, backend=backend, outputs=outputs, topk=topk)
