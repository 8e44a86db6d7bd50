"""Single device, DDP or FSDP2: process group set-up, model wrapping, and the collectives the loop needs.

Everything runs unchanged under ``torchrun`` (one or many nodes): the process group comes from
the environment variables torchrun sets. The policy is wrapped in :class:`PolicyHead`, a module
whose forward returns the backbone's last hidden states and the LM-head weight, not logits, so
that DDP's gradient hooks and FSDP2's unshard/reshard hooks see every use of every parameter.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    mode: str  # single | ddp | fsdp2
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(mode: str = "auto", device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        mode = "ddp" if world_size > 1 else "single"
    if mode == "single" and world_size > 1:
        raise ValueError(f"mode='single' but WORLD_SIZE={world_size}: use mode ddp or fsdp2 under torchrun")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if mode != "single" and not dist.is_initialized():
        # a one-process ddp/fsdp2 run outside torchrun still needs a rendezvous address
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return DistInfo(mode, rank, world_size, torch_device)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft model (LoRA layers stay injected in it), else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_activation_checkpointing(causal_lm: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing of the decoder layers; transformers 5 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``."""
    options = {"use_reentrant": False}
    if hasattr(causal_lm, "activation_checkpointing_enable"):
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


class PolicyHead(nn.Module):
    """A causal LM whose forward returns ``(hidden [B, T, D], lm_head_weight [V, D], lm_head_bias [V] | None)``.

    The hidden states are the backbone's last (final-norm) output; hidden[:, t] predicts token
    t + 1. The LM-head weight is returned from inside forward, where FSDP2 has unsharded it: the
    fused loss gets the full weight (the embedding matrix when tied) and its gradient lands on the
    unsharded parameter, which FSDP2 reduce-scatters back into the shards after backward.

    ``compute_dtype`` (e.g. bfloat16): the backbone and ``generate`` run under autocast to it, and
    hidden states, weight and bias are returned in it (the fused loss needs one dtype for all three;
    ``.to`` is differentiable, so the gradient still reaches float32 parameters). ``None``: the
    model's own dtypes, no autocast.
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype

    def _autocast(self, device: torch.device):
        if self.compute_dtype in (None, torch.float32):
            return nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        causal_lm = unwrap_peft(self.model)
        with self._autocast(input_ids.device):
            output = causal_lm.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        head = causal_lm.get_output_embeddings()
        hidden, weight, bias = output.last_hidden_state, head.weight, head.bias
        if self.compute_dtype is not None:
            # autocast keeps the residual stream (and so the final norm's output) in float32
            hidden, weight = hidden.to(self.compute_dtype), weight.to(self.compute_dtype)
            bias = None if bias is None else bias.to(self.compute_dtype)
        return hidden, weight, bias

    def generate(self, **kwargs):
        with self._autocast(kwargs["input_ids"].device):
            return self.model.generate(**kwargs)


def _shard_lm_head_by_hand(policy: PolicyHead, mesh, world_size: int):
    """FSDP2, untied head without bias: the head weight becomes a row-sharded (vocabulary) DTensor
    that FSDP2 leaves alone, so that nothing ever gathers it: the loss runs the sharded-head layout
    on the local shard (:func:`head_logprobs`). Returns the parameter for ``ignored_params``, or
    None when the head stays with FSDP2 (tied to the input embeddings, whose lookup needs the
    whole matrix anyway, or with a bias)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    causal_lm = unwrap_peft(policy.model)
    head = causal_lm.get_output_embeddings()
    embeddings = causal_lm.get_input_embeddings()
    if head is None or head.bias is not None or (embeddings is not None and embeddings.weight is head.weight):
        return None
    weight = head.weight
    sharded = nn.Parameter(distribute_tensor(weight.detach(), mesh, [Shard(0)]), requires_grad=weight.requires_grad)
    head.weight = sharded
    # generation needs it whole (gathered_for_generation); kept out of the module tree
    policy.__dict__["hand_sharded_head"] = head
    if sharded.requires_grad:
        # the sharded-head layout's d weight is the gradient of sum_r loss_r; FSDP2 averages the
        # other gradients over ranks (its reduce-scatter divides by R): do the same here
        sharded.register_hook(lambda grad: grad / world_size)
    return sharded


def is_sharded_head(weight) -> bool:
    """True for an LM-head weight sharded by :func:`wrap` (a vocabulary-row DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)


def head_logprobs(hidden, weight, targets, *, bias=None, **options):
    """``token_logprobs`` for the weight :class:`PolicyHead` returned: a plain tensor, or the
    FSDP2 hand-sharded head, which goes through ``sharded_head_logprobs`` (gathers the hidden
    states instead of the weight when that is cheaper; logs the layout)."""
    from grpo_kernels.ops.logprobs import token_logprobs
    from grpo_kernels.ops.vocab_parallel import sharded_head_logprobs

    if not is_sharded_head(weight):
        return token_logprobs(hidden, weight, targets, bias=bias, **options)
    return sharded_head_logprobs(hidden, weight.to_local(), targets, weight.device_mesh.get_group(), bias=bias,
                                 **options)


def head_grpo_loss(hidden, weight, completion_ids, completion_mask, advantages, *, bias=None, temperature=1.0,
                   **options):
    """``fused_linear_grpo_loss`` for the weight :class:`PolicyHead` returned (see :func:`head_logprobs`):
    the hand-sharded head computes the log-probs and entropy with the sharded-head layout and the
    loss from them (the same math as the fused loss: masked tokens are ignored rows, the entropy is
    differentiated only for an entropy bonus)."""
    import grpo_kernels as gk

    if not is_sharded_head(weight):
        return gk.fused_linear_grpo_loss(hidden, weight, completion_ids, completion_mask, advantages, bias=bias,
                                         temperature=temperature, **options)
    targets = completion_ids.masked_fill(completion_mask == 0, -100)
    logprobs, entropy = head_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                      ignore_index=-100, return_entropy=True)
    if options.get("entropy_coef", 0.0) == 0:
        entropy = entropy.detach()
    return gk.grpo_loss(logprobs, completion_mask, advantages, entropy=entropy, **options)


def wrap(policy: PolicyHead, info: DistInfo, *, trainable: bool = True) -> nn.Module:
    """DDP or FSDP2 around ``policy`` (already on ``info.device``); a frozen model is never DDP-wrapped.

    FSDP2 gathers parameters in ``policy.compute_dtype`` and reduces gradients in float32 (its
    mixed-precision policy), so float32 trainable parameters stay the master weights. An untied
    LM head is sharded by vocabulary rows outside FSDP2 and never gathered (see
    :func:`_shard_lm_head_by_hand`)."""
    if info.mode == "ddp" and trainable:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(policy, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        layer_classes = set(getattr(unwrap_peft(policy.model), "_no_split_modules", None) or [])
        layers = [m for m in policy.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError("fsdp2: the model names no decoder layer classes in _no_split_modules")
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mixed_precision = MixedPrecisionPolicy(param_dtype=policy.compute_dtype, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mixed_precision)
        head_weight = _shard_lm_head_by_hand(policy, mesh, info.world_size)
        # The root keeps embeddings, final norm and (a tied) LM head gathered after forward: the
        # weight it returns is read after forward returns (by the loss and its backward). Backward
        # reshards a trained root; a frozen one is resharded by release_gathered after its no-grad passes.
        fully_shard(policy, mesh=mesh, reshard_after_forward=False, mp_policy=mixed_precision,
                    ignored_params=None if head_weight is None else {head_weight})
        register_fsdp_forward_method(policy, "generate")
    return policy


def release_gathered(module: nn.Module) -> None:
    """FSDP2: free the root's gathered parameters (a frozen model runs no backward to do it)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()


def generator_of(module: nn.Module):
    """What to call ``.generate`` on: DDP's inner module (plain replicated weights), else the module."""
    return module.module if hasattr(module, "no_sync") else module


@contextmanager
def gathered_for_generation(module: nn.Module):
    """FSDP2: keep every layer unsharded across the decoding steps (one all-gather per layer, not
    one per generated token), and a hand-sharded LM head gathered, and shard again afterwards."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    layers = [m for m in module.modules() if isinstance(m, FSDPModule) and m is not module]
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    # a hand-sharded LM head (see wrap): the sampler needs whole logits, so gather it for the decode
    head = getattr(module, "hand_sharded_head", None)
    sharded_weight = None if head is None else head.weight
    if head is not None:
        head._parameters["weight"] = nn.Parameter(sharded_weight.detach().full_tensor(), requires_grad=False)
    try:
        yield
    finally:
        if head is not None:
            head._parameters["weight"] = sharded_weight
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
            layer.reshard()


def gradient_sync(module: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: skip the cross-rank gradient reduction unless enabled."""
    if hasattr(module, "no_sync"):  # DDP
        return nullcontext() if enabled else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
    return nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_reduce_min(value: int, device) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape on all ranks) along dim 0, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
