"""The single-device log-prob operation: PyTorch custom ops (``torch.compile`` traces through
them; meta tensors infer shapes), their autograd, the argument checks, and
:func:`single_device_logprobs`, the call that the public API and the vocab-parallel op's
gather-weight layout share."""

from typing import Optional

import torch

from grpo_kernels.ops.logprobs.drivers import BACKENDS
from grpo_kernels.ops.logprobs.launch import DEFAULT_WORKSPACE_BYTES
from grpo_kernels.ops.utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_positive_finite,
    check_same_device,
    check_tensor,
    resolve_backend,
)

# The backward schemes (token_logprobs' ``backward``): the default first.
BACKWARDS = ("workspace", "atomic")
# ignore_index is compared with int32 ids on the device: it must be an int32 itself.
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _kernel_targets(targets: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """[N, K] int32 ids for the drivers: ignored entries become -1 (an id that matches no logit),
    so that no value of ignore_index can collide with a token once narrowed to int32."""
    return torch.where(live, targets, -1).to(torch.int32).contiguous()


@torch.library.custom_op("grpo_kernels::token_logprobs", mutates_args=())
def _token_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    temperature: float, softcap: Optional[float], ignore_index: int, compute_entropy: bool,
    batch_invariant: bool, filter_eps: Optional[float], exact: bool, backward: str, workspace_bytes: Optional[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D] (row-contiguous), weight [V, D], bias [V] or None, targets [N, K] int32/int64.

    Returns float32 (logp [N, K], entropy [N] (or [0] without compute_entropy), lse [N]); 0 for
    ignored entries, and entropy/lse 0 for rows with no live target. filter_eps, exact, backward and
    workspace_bytes are backward options (the autograd context reads them from here).
    """
    num_rows, num_targets = targets.shape
    # The data-dependent checks live inside the op, where torch.compile does not trace.
    check_index_range("targets", targets, weight.shape[0], ignore_index)
    live = targets != ignore_index
    rows = live.any(dim=1).nonzero().squeeze(1).to(torch.int32)
    logp = hidden.new_zeros((num_rows, num_targets), dtype=torch.float32)
    entropy = hidden.new_zeros(num_rows if compute_entropy else 0, dtype=torch.float32)
    lse = hidden.new_zeros(num_rows, dtype=torch.float32)
    if rows.numel() > 0:
        forward_fn, _ = BACKENDS[backend]
        options = {"softcap": softcap}
        if backend == "triton":
            options["batch_invariant"] = batch_invariant
        logp_rows, lse_rows, entropy_rows = forward_fn(
            hidden, weight, bias, _kernel_targets(targets, live), rows, temperature, compute_entropy, **options)
        idx = rows.long()
        logp[idx] = logp_rows
        lse[idx] = lse_rows
        if compute_entropy:
            entropy[idx] = entropy_rows
        logp.masked_fill_(~live, 0.0)
    return logp, entropy, lse


@_token_logprobs_op.register_fake
def _token_logprobs_fake(hidden, weight, bias, targets, temperature, softcap, ignore_index, compute_entropy,
                         batch_invariant, filter_eps, exact, backward, workspace_bytes, backend):
    num_rows, num_targets = targets.shape
    return (hidden.new_empty((num_rows, num_targets), dtype=torch.float32),
            hidden.new_empty(num_rows if compute_entropy else 0, dtype=torch.float32),
            hidden.new_empty(num_rows, dtype=torch.float32))


@torch.library.custom_op("grpo_kernels::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor], temperature: float,
    softcap: Optional[float], ignore_index: int, filter_eps: Optional[float], exact: bool, backward: str,
    workspace_bytes: Optional[int], backend: str, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d hidden [N, D], d weight [V, D] (or [0]), d bias [V] (or [0])) of
    <grad_logp, logp> + <grad_entropy, entropy> + <grad_lse, lse> (None = no gradient)."""
    num_rows, num_targets = targets.shape
    live = targets != ignore_index
    kernel_targets = _kernel_targets(targets, live)
    if grad_logp is None:
        grad_logp = hidden.new_zeros((num_rows, num_targets), dtype=torch.float32)
    grad_logp = torch.where(live, grad_logp.float(), 0.0)
    # Only rows with a live target and a non-zero incoming gradient take part in the backward.
    active = (grad_logp != 0).any(dim=1)
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float()
        active |= grad_entropy != 0
    if grad_lse is not None:
        grad_lse = grad_lse.float()
        active |= grad_lse != 0
        # d lse / d z = p. An extra target column whose id matches no logit, with gradient
        # -grad_lse, adds exactly +grad_lse * p through the softmax term -p * sum_k g_k.
        kernel_targets = torch.cat([kernel_targets, kernel_targets.new_full((num_rows, 1), -1)], dim=1)
        grad_logp = torch.cat([grad_logp, -grad_lse[:, None]], dim=1)
    rows = (active & live.any(dim=1)).nonzero().squeeze(1).to(torch.int32)

    grad_hidden = torch.zeros_like(hidden)
    grad_weight = torch.zeros_like(weight) if need_weight else None
    # Whenever there is a bias the kernels produce d bias ([V] float32, small), needed or not.
    grad_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if bias is not None else None
    if rows.numel() > 0:
        _, backward_fn = BACKENDS[backend]
        idx = rows.long()
        # E_p[z] = lse - entropy
        mean_logit = (lse - entropy)[idx].contiguous() if grad_entropy is not None else None
        backward_fn(
            hidden, weight, bias, kernel_targets, rows, lse[idx].contiguous(), mean_logit,
            grad_logp[idx].contiguous(), grad_entropy[idx].contiguous() if grad_entropy is not None else None,
            temperature, filter_eps, exact, grad_hidden, grad_weight, grad_bias,
            softcap=softcap, backward=backward, workspace_bytes=workspace_bytes,
        )
    return (grad_hidden,
            grad_weight if need_weight else hidden.new_empty(0),
            grad_bias.to(bias.dtype) if need_bias else hidden.new_empty(0))


@_token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, grad_lse,
                                  temperature, softcap, ignore_index, filter_eps, exact, backward, workspace_bytes,
                                  backend, need_weight, need_bias):
    return (torch.empty_like(hidden),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, softcap, ignore_index, _, _, filter_eps, exact, backward, \
        workspace_bytes, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.options = (temperature, softcap, ignore_index, filter_eps, exact, backward, workspace_bytes, backend)
    # An output nobody used gets None, not a zero tensor that would switch on its backward terms.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    no_grads = (None,) * 14
    if grad_logp is None and grad_entropy is None and grad_lse is None:
        return no_grads
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = torch.ops.grpo_kernels.token_logprobs_backward(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, grad_lse, *ctx.options,
        need_weight, need_bias)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None) + no_grads[3:]


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)



def _validate(hidden, weight, targets, bias, temperature, ignore_index, filter_eps, softcap):
    """Shape, dtype and scalar checks (no data-dependent ones: those run inside the op)."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("targets", targets, dtypes=INDEX_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}: cast one "
                        f"(e.g. weight.to(hidden.dtype); the gradient flows back to the original)")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    vocab, dim = weight.shape
    if vocab == 0 or dim == 0:
        raise ValueError(f"weight must be [V, D] with V, D > 0, got {tuple(weight.shape)}")
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden last dim {hidden.shape[-1]} != weight dim {dim} (weight is [V, D])")
    lead_shape = tuple(hidden.shape[:-1])
    if targets.dim() == hidden.dim():  # K targets per row
        if tuple(targets.shape[:-1]) != lead_shape or targets.shape[-1] == 0:
            raise ValueError(f"targets shape {tuple(targets.shape)} must be hidden's leading shape {lead_shape} "
                             f"(one target per row) or {lead_shape} + (K,) with K >= 1 (K targets per row)")
    elif tuple(targets.shape) != lead_shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {lead_shape} "
                         f"(or {lead_shape} + (K,) for K targets per row)")
    if targets.numel() == 0:
        raise ValueError("empty batch: hidden has no rows")
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias has {bias.shape[0]} entries, weight has V={vocab} rows")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT32_MIN <= ignore_index <= _INT32_MAX:
        raise ValueError(f"ignore_index must be an int32 (in [{_INT32_MIN}, {_INT32_MAX}]), got {ignore_index}")
    temperature = check_positive_finite("temperature", temperature)
    if filter_eps is not None:
        filter_eps = check_positive_finite("filter_eps", filter_eps)
    if softcap is not None:
        softcap = check_positive_finite("softcap", softcap)
    return temperature, filter_eps, softcap


def check_backward_options(backward, workspace_bytes, deterministic) -> None:
    """``backward`` in BACKWARDS, ``workspace_bytes`` an int > 0 or None, and not deterministic
    with the atomic backward; raises ValueError naming the argument."""
    if not isinstance(backward, str) or backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if workspace_bytes is not None and (not isinstance(workspace_bytes, int) or isinstance(workspace_bytes, bool)
                                        or workspace_bytes <= 0):
        raise ValueError(f"workspace_bytes must be an int > 0 (bytes) or None (the default, "
                         f"{DEFAULT_WORKSPACE_BYTES} = 256 MiB), got {workspace_bytes!r}")
    if deterministic and backward == "atomic":
        raise ValueError("deterministic=True needs backward='workspace' (the default): backward='atomic' adds "
                         "with floating-point atomics, whose order varies between runs")


def single_device_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                           return_entropy=False, return_lse=False, softcap=None, filter_eps=None, exact=True,
                           batch_invariant=True, deterministic=False, backward="workspace", workspace_bytes=None,
                           backend="auto"):
    """:func:`grpo_kernels.token_logprobs` without ``process_group``: same arguments, checks and result."""
    temperature, filter_eps, softcap = _validate(hidden, weight, targets, bias, temperature, ignore_index,
                                                 filter_eps, softcap)
    check_backward_options(backward, workspace_bytes, deterministic)
    backend = resolve_backend(hidden.device, backend)
    lead_shape = hidden.shape[:-1]
    num_targets = targets.shape[-1] if targets.dim() == hidden.dim() else 1
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    weight_c = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias_c = bias.contiguous() if bias is not None else None
    logp, entropy, lse = torch.ops.grpo_kernels.token_logprobs(
        hidden_2d, weight_c, bias_c, targets.reshape(-1, num_targets), temperature, softcap, ignore_index,
        bool(return_entropy), bool(batch_invariant), filter_eps, bool(exact), backward, workspace_bytes, backend)
    outputs = (logp.view(targets.shape),)
    if return_entropy:
        outputs += (entropy.view(lead_shape),)
    if return_lse:
        outputs += (lse.view(lead_shape),)
    return outputs if len(outputs) > 1 else outputs[0]


