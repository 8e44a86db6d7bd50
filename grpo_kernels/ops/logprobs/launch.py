"""Launch configuration of the log-prob kernels: one table and a few planning functions, shared
by the drivers, the sm_90 compile specs, the GPU kit's block-size sweep and the performance
model, so that what is modelled, compiled and launched cannot drift apart.

Everything here is plain Python on shapes and dtypes (no tensors, no kernels):

- ``GPU_CONFIG[kind][dtype]``: the :class:`LaunchConfig` of each kernel on a GPU. Kinds:
  ``"fwd"`` (forward), ``"fwd_stats"`` (the forward with statistics), ``"fwd_topk"`` (the forward
  with a top-k), ``"merge"`` (the merge of the
  forward's vocabulary splits), ``"dlogits"`` (the default backward's d-logits kernel) and
  ``"bwd_atomic"`` (the atomic backward). The GPU
  kit's sweep overrides entries at run time (a plain 5-tuple is accepted too).
- :func:`forward_splits`: how the forward cuts the vocabulary.
- :func:`backward_plan`: how the default backward chunks rows and vocabulary ids, and what it
  allocates (the driver allocates exactly this).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton


class LaunchConfig(NamedTuple):
    """Tile sizes and launch options of one kernel: ``BLOCK_N`` rows x ``BLOCK_V`` vocabulary ids
    per tile, ``BLOCK_D`` of the hidden dimension per step of the dot loop."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


GPU_CONFIG: dict[str, dict[torch.dtype, LaunchConfig]] = {
    # One program: BLOCK_N rows x one vocabulary split, looping over the split's BLOCK_V tiles.
    # float32: 2 stages (3 spilled 20 B with a per-row temperature and the entropy; the stages
    # change no arithmetic).
    "fwd": {
        torch.bfloat16: LaunchConfig(128, 128, 64, 8, 3),
        torch.float16: LaunchConfig(128, 128, 64, 8, 3),
        torch.float32: LaunchConfig(64, 64, 32, 4, 2),
    },
    # The forward with the statistics (log_sum_sq_probs, mean_logits, is_top1) and no top-k: three
    # more row accumulators. 16-bit: "fwd"'s tiles; float32: 32 rows (at 64, ptxas spilled 20-36 B
    # whatever the stages).
    "fwd_stats": {
        torch.bfloat16: LaunchConfig(128, 128, 64, 8, 3),
        torch.float16: LaunchConfig(128, 128, 64, 8, 3),
        torch.float32: LaunchConfig(32, 64, 32, 4, 3),
    },
    # The forward with a top-k (``topk=k``): besides the tile, an int64 [BLOCK_N, TOPK] list and
    # the tile's int64 keys while they are inserted. Smaller tiles than "fwd": at fwd's, ptxas
    # spilled (bf16 128 x 128: 200-300 bytes; 64 x 128: 8) where these spill nothing (sm90_check;
    # see docs/semantics.md). BLOCK_D as "fwd" (the dot's reduction order). float32: 32 x 128 (at
    # 32 x 64 ptxas held the kernel to 128 or 168 registers and spilled 4-40 B).
    "fwd_topk": {
        torch.bfloat16: LaunchConfig(64, 64, 64, 8, 3),
        torch.float16: LaunchConfig(64, 64, 64, 8, 3),
        torch.float32: LaunchConfig(32, 128, 32, 8, 3),
    },
    # The merge of the forward's split partials: BLOCK_N rows per program (BLOCK_V, BLOCK_D unused).
    "merge": {
        torch.bfloat16: LaunchConfig(128, 1, 1, 4, 1),
        torch.float16: LaunchConfig(128, 1, 1, 4, 1),
        torch.float32: LaunchConfig(128, 1, 1, 4, 1),
    },
    # The default backward: one program recomputes one [BLOCK_N, BLOCK_V] logit tile and stores
    # its d logits (the same main loop as the forward, so the same tiles and stages).
    "dlogits": {
        torch.bfloat16: LaunchConfig(128, 128, 64, 8, 3),
        torch.float16: LaunchConfig(128, 128, 64, 8, 3),
        torch.float32: LaunchConfig(64, 64, 32, 4, 3),
    },
    # The atomic backward (backward="atomic"): one tile, then its products scattered with atomics.
    "bwd_atomic": {
        torch.bfloat16: LaunchConfig(128, 128, 64, 8, 2),
        torch.float16: LaunchConfig(128, 128, 64, 8, 2),
        torch.float32: LaunchConfig(64, 64, 32, 4, 2),
    },
}
# Under the interpreter every kind uses small tiles, so that tests at small shapes still cross
# tile boundaries.
INTERPRETER_CONFIG = LaunchConfig(16, 16, 16, 1, 1)

# Forward raster: programs come in groups of FORWARD_GROUP_ROWS row blocks; inside a group the
# row block varies fastest, then the vocabulary split. The ~132 programs in flight on an H100
# (one per SM at these tiles) then hold 16 row blocks of hidden (16 x 1 MiB at D=4096, bf16: in
# L2) and read each weight tile of their ~8 splits together, so hidden is read from HBM about
# once and the weight about (row blocks / 16) times, instead of all of hidden streaming through
# L2 at every vocabulary step (the launch order before issue 18).
FORWARD_GROUP_ROWS = 16
# Backward kernels (d logits, atomic): the same grouping over (row block, vocabulary tile)
# programs, 8 row blocks per group (8 x 16 tiles in flight: hidden and weight tiles both reused).
BACKWARD_GROUP_ROWS = 8

# The forward's top-k list widths (constexpr TOPK): a list of TOPK slots holds any k <= TOPK
# (k itself is a runtime argument; slots beyond it are never filled). Two widths bound the
# compiled variants: a 64-slot list costs registers and a longer minimum per insertion.
TOPK_SLOTS = (8, 64)


class ForwardSwitches(NamedTuple):
    """The forward kernel's optional work, as the launcher switches it on. ``stats`` switches on
    all three statistics (LOG_SUM_SQ, MEAN_LOGITS, TOP1: a few flops per logit next to the 2 D of
    the dot) whenever any is asked for, and any extra output switches the entropy on too: that
    keeps the compiled variants few (``specs``). Nothing is on in the default call."""

    entropy: bool
    stats: bool
    topk_slots: int  # 0 (no top-k) or one of TOPK_SLOTS


def forward_switches(entropy: bool, stats: bool, topk: int) -> ForwardSwitches:
    """The kernel switches for a call that asks for ``entropy``, any statistic (``stats``) and a
    top-``topk`` (0: none)."""
    if not 0 <= topk <= TOPK_SLOTS[-1]:
        raise ValueError(f"topk must be in [0, {TOPK_SLOTS[-1]}], got {topk}")
    slots = next(width for width in TOPK_SLOTS if width >= topk) if topk else 0
    return ForwardSwitches(bool(entropy or stats or topk), bool(stats), slots)


def forward_kind(switches: ForwardSwitches) -> str:
    """The ``GPU_CONFIG`` kind of the forward with these switches."""
    if switches.topk_slots:
        return "fwd_topk"
    return "fwd_stats" if switches.stats else "fwd"


# Batch-invariant forward: vocabulary ids per split, a multiple of every BLOCK_V above. On the
# GPU, 2048 ids (16 tiles of 128) give V=152k 75 splits: at N >= 4096 (>= 32 row blocks) that is
# >= 2400 programs, so the split count never starves the GPU (see token_logprobs' docstring).
# Interpreter: 2 tiles, so that test vocabularies have several splits.
INVARIANT_SPLIT_VOCAB = {"gpu": 2048, "interpreter": 32}
# The forward's per-split partial states held at once (3 float32 per row and split): rows are
# processed in chunks that fit (a row's result does not depend on its chunk).
FORWARD_PARTIAL_BYTES = 32 * 2**20

# The default backward's workspace budget (``workspace_bytes=None``): see backward_plan.
DEFAULT_WORKSPACE_BYTES = 256 * 2**20
# Fewest vocabulary ids per d-logits chunk when the rows must be chunked too: the d-hidden GEMM
# of a chunk reads its [rows, D] float32 accumulator once per chunk, so its arithmetic intensity
# is about ids * D / (ids + 4 D) FLOP per byte (455 at ids = 2048, D = 4096: above an H100's
# ~300 FLOP/B ridge, so the GEMM stays compute-bound). Interpreter: 2 tiles.
MIN_IDS_PER_CHUNK = {"gpu": 2048, "interpreter": 32}

# Reserved in the workspace budget per active row for the op's own row vectors (row ids, lse,
# incoming gradients: ~42 bytes a row with one target), so that the budget bounds them too.
ROW_VECTOR_BYTES = 64

# The atomic backward's float32 chunk buffers (d hidden per row chunk; the exact d weight per
# vocabulary chunk), each at most this size.
ATOMIC_GRAD_CHUNK_BYTES = 32 * 2**20


def launch_config(kind: str, dtype: torch.dtype, device_type: str = "cuda") -> LaunchConfig:
    """The configuration the launcher uses for ``kind`` (a ``GPU_CONFIG`` key) and ``dtype`` on a
    ``device_type`` device (``"cuda"``; anything else runs under the Triton interpreter)."""
    if device_type != "cuda":
        return INTERPRETER_CONFIG
    return LaunchConfig(*GPU_CONFIG[kind][dtype])


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not silently go through tf32 (3e-4 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_key(device_type: str) -> str:
    return "gpu" if device_type == "cuda" else "interpreter"


def forward_splits(num_rows: int, vocab: int, dtype: torch.dtype, device_type: str = "cuda",
                   batch_invariant: bool = True, num_sms: int = 132, kind: str = "fwd") -> tuple[int, int]:
    """``(vocab_per_split, splits)`` of the forward: each program covers ``vocab_per_split`` ids
    (a multiple of the forward's BLOCK_V) of one row block; ``splits = ceil(vocab / vocab_per_split)``.

    Batch-invariant: a constant (``INVARIANT_SPLIT_VOCAB``), whatever ``num_rows``. Otherwise the
    vocabulary is split further when there are too few row blocks to give ``4 * num_sms``
    programs (the split count, and so a row's reduction order, then depends on ``num_rows``).
    ``kind``: the forward's ``GPU_CONFIG`` kind (``forward_kind``: ``"fwd"``, ``"fwd_stats"`` or ``"fwd_topk"``).
    """
    block_n, block_v = launch_config(kind, dtype, device_type)[:2]
    if batch_invariant:
        vocab_per_split = INVARIANT_SPLIT_VOCAB[_device_key(device_type)]
    else:
        # the interpreter: 3 programs, to exercise the split paths at test sizes
        programs = 4 * num_sms if device_type == "cuda" else 3
        row_blocks = triton.cdiv(num_rows, block_n)
        splits = max(1, min(triton.cdiv(programs, row_blocks), triton.cdiv(vocab, block_v)))
        vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    return vocab_per_split, triton.cdiv(vocab, vocab_per_split)


class BackwardPlan(NamedTuple):
    """How the default (workspace) backward chunks its work, and what it allocates, in bytes."""

    rows_per_chunk: int  # compacted rows per d-logits chunk: all of them when they fit
    ids_per_chunk: int  # vocabulary ids per chunk: a multiple of the d-logits kernel's BLOCK_V
    workspace_bytes: int  # the d-logits buffer: [rows, ids] of one chunk in the input dtype
    accumulator_bytes: int  # float32: d hidden [M, D], d weight [ids, D], d-bias partials
    gathered_hidden_bytes: int  # hidden's rows gathered for the d-weight GEMM (0 when none)


def padded_ids(ids: int) -> int:
    """The row length of a d-logits buffer holding ``ids`` vocabulary ids: rounded up to 16, so
    that the kernel's stores and cuBLAS's leading dimension stay 16-element aligned."""
    return triton.cdiv(ids, 16) * 16


def _balanced(count: int, cap: int) -> int:
    """Per-chunk size, at most ``cap`` (>= 1), that cuts ``count`` into the fewest chunks of
    (nearly) equal size, so that the last chunk is not a sliver."""
    return triton.cdiv(count, triton.cdiv(count, max(1, cap)))


def backward_plan(num_rows: int, vocab: int, dim: int, dtype: torch.dtype, workspace_bytes: int | None = None, *,
                  contiguous_rows: bool = True, has_bias: bool = False, weight_grad: bool = True,
                  grad_hidden_dtype: torch.dtype | None = None, device_type: str = "cuda",
                  tiles: tuple[int, int] | None = None) -> BackwardPlan:
    """The chunking and memory of the default backward for ``num_rows`` active (compacted) rows.

    ``workspace_bytes`` (default ``DEFAULT_WORKSPACE_BYTES``) bounds the scratch the backward
    allocates besides its float32 accumulators: the d-logits buffer, the gathered hidden rows
    (only when the active rows are not one contiguous range and d weight is needed), the d-bias
    partial sums (with a bias) and ``ROW_VECTOR_BYTES`` per row for the op's row vectors. Never
    less than one ``[BLOCK_N, BLOCK_V]`` tile.

    - All rows in one chunk whenever the budget holds their d logits for at least
      ``MIN_IDS_PER_CHUNK`` ids: then ``ids_per_chunk`` is as large as the budget allows, every
      row of d weight is written exactly once, and the only read-modify-write traffic is the
      float32 d-hidden accumulator's, ``8 D M V / ids_per_chunk`` bytes.
    - Otherwise rows are chunked too, with ``MIN_IDS_PER_CHUNK`` ids per chunk and as many rows as
      fit: d weight then needs a float32 ``[ids, D]`` accumulator per vocabulary chunk (16-bit
      weights), and the accumulators move about ``8 D M V (1 / rows_per_chunk + 1 / ids_per_chunk)``
      bytes; a gathered ``[rows, D]`` block is re-gathered for every chunk.

    Both sizes are balanced: equal chunks (within one tile) instead of a sliver at the end.
    ``accumulator_bytes``: d hidden ``4 M D`` (0 when it accumulates in place: a float32 d hidden
    buffer, ``grad_hidden_dtype``, and contiguous rows), plus d weight ``4 ids D`` when rows are
    chunked (16-bit weights), plus the d-bias partials ``4 ids ceil(rows / BLOCK_N)``.
    ``device_type`` other than ``"cuda"``: the interpreter's tiles. ``tiles``: ``(BLOCK_N, BLOCK_V)``
    of the d-logits kernel that fills the buffer, when it is not this package's (the divergence
    package's kernel, which holds two heads' tiles, uses smaller ones).
    """
    for name, value in (("num_rows", num_rows), ("vocab", vocab), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    budget = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"workspace_bytes must be an int > 0 (bytes) or None, got {workspace_bytes!r}")
    block_n, block_v = tiles or launch_config("dlogits", dtype, device_type)[:2]
    elem = torch.empty(0, dtype=dtype).element_size()
    vocab_tiles = triton.cdiv(vocab, block_v)
    row_blocks = triton.cdiv(num_rows, block_n)
    gathered_row = dim * elem if weight_grad and not contiguous_rows else 0
    bias_part = 4 if has_bias else 0  # float32 per (row block, id)

    def ids_fitting(rows: int) -> int:
        """Vocabulary ids (whole tiles) whose chunk of ``rows`` rows fits the budget."""
        per_id = rows * elem + bias_part * triton.cdiv(rows, block_n)
        return max(0, budget - rows * (gathered_row + ROW_VECTOR_BYTES)) // per_id // block_v * block_v

    min_ids = min(MIN_IDS_PER_CHUNK[_device_key(device_type)], vocab_tiles * block_v)
    if ids_fitting(num_rows) >= min_ids:
        rows, ids = num_rows, ids_fitting(num_rows)
    else:
        ids = max(block_v, min(min_ids, ids_fitting(block_n)))
        per_row_block = block_n * (ids * elem + gathered_row) + bias_part * ids
        budget -= num_rows * ROW_VECTOR_BYTES
        rows = max(1, budget // per_row_block) * block_n
    ids = _balanced(vocab_tiles, ids // block_v) * block_v
    if rows < num_rows:
        rows = _balanced(row_blocks, rows // block_n) * block_n
    rows = min(rows, num_rows)
    chunked_rows = rows < num_rows
    ids_alloc = padded_ids(min(ids, vocab))

    in_place = (grad_hidden_dtype or dtype) == torch.float32 and contiguous_rows
    accumulators = 0 if in_place else 4 * num_rows * dim
    if weight_grad and chunked_rows and dtype != torch.float32:
        accumulators += 4 * ids_alloc * dim
    accumulators += bias_part * ids_alloc * triton.cdiv(rows, block_n)
    return BackwardPlan(rows_per_chunk=rows, ids_per_chunk=ids, workspace_bytes=rows * ids_alloc * elem,
                        accumulator_bytes=accumulators, gathered_hidden_bytes=rows * gathered_row)

