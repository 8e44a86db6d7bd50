"""Launch configuration of the log-prob kernels: one table, shared by the drivers, the sm_90
compile specs and the GPU kit's block-size sweep."""

import torch
import triton

# float32 gradient accumulator per backward launch (rows, or vocabulary ids, in chunks that fit).
_GRAD_CHUNK_BYTES = 32 * 2**20
# per-split partial states held at once by the forward (3 float32 per row and split).
_FWD_PART_BYTES = 32 * 2**20

_GPU_CONFIG = {
    # kind -> dtype -> (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)
    "fwd": {
        torch.bfloat16: (128, 128, 64, 8, 3),
        torch.float16: (128, 128, 64, 8, 3),
        torch.float32: (64, 64, 32, 4, 3),
    },
    # the merge of the forward's split partials: BLOCK_N rows per program (BLOCK_V, BLOCK_D unused)
    "merge": {
        torch.bfloat16: (128, 1, 1, 4, 1),
        torch.float16: (128, 1, 1, 4, 1),
        torch.float32: (128, 1, 1, 4, 1),
    },
    "bwd": {
        torch.bfloat16: (128, 128, 64, 8, 2),
        torch.float16: (128, 128, 64, 8, 2),
        torch.float32: (64, 64, 32, 4, 2),
    },
    # deterministic backward (both passes)
    "bwd_det": {
        torch.bfloat16: (128, 128, 64, 8, 2),
        torch.float16: (128, 128, 64, 8, 2),
        torch.float32: (64, 64, 32, 4, 2),
    },
}
# Interpreter: small tiles so that tests at small shapes still cross tile boundaries.
_INTERPRETER_CONFIG = (16, 16, 16, 1, 1)
_GROUP_N = 8
# Batch-invariant forward: vocabulary ids per split, a multiple of every BLOCK_V above. On the
# GPU, 2048 ids (16 tiles of 128) give V=152k 75 splits: at N >= 4096 (>= 32 row blocks) that is
# >= 2400 programs, so the split count never starves the GPU (see token_logprobs' docstring).
# Interpreter: 2 tiles, so that test vocabularies have several splits.
_INVARIANT_SPLIT_VOCAB = {"gpu": 2048, "interpreter": 32}


def _config(kind: str, dtype: torch.dtype, device: torch.device):
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    return _GPU_CONFIG[kind][dtype]


def _interpreted(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cuda"


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not silently go through tf32 (3e-4 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _programs_to_fill(device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # the interpreter: exercise the split paths at test sizes


def _forward_vocab_per_split(num_rows, vocab, block_n, block_v, device, batch_invariant) -> int:
    """Vocabulary ids per forward program, a multiple of block_v.

    Batch-invariant: a constant. Otherwise the vocabulary is split further when there are too few
    row blocks to fill the GPU (the split count, and so a row's reduction order, then depends on N).
    """
    if batch_invariant:
        return _INVARIANT_SPLIT_VOCAB["gpu" if device.type == "cuda" else "interpreter"]
    row_blocks = triton.cdiv(num_rows, block_n)
    splits = max(1, min(triton.cdiv(_programs_to_fill(device), row_blocks), triton.cdiv(vocab, block_v)))
    return triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v


