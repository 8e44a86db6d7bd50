"""The single-device log-prob operation: PyTorch custom ops (``torch.compile`` traces through
them; meta tensors infer shapes), their autograd, the argument checks, and
:func:`single_device_logprobs`, the call that the public API and the vocab-parallel op's
gather-weight layout share."""

import math
from typing import Optional

import torch

from grpo_kernels.ops.logprobs.drivers import BACKENDS
from grpo_kernels.ops.logprobs.launch import DEFAULT_WORKSPACE_BYTES
from grpo_kernels.ops.logprobs.outputs import DRIVER_STATS, TokenStats, parse_outputs, top1_rule
from grpo_kernels.ops.logprobs.temperature import check_temperature, check_temperature_values
from grpo_kernels.ops.utils import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
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


def _live(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(live entries [N, K], live rows [N]): a row is live when any target is; with no targets
    (K = 0: statistics only) every row is."""
    live = targets != ignore_index
    rows_live = live.any(dim=1) if targets.shape[1] else torch.ones(targets.shape[0], dtype=torch.bool,
                                                                    device=targets.device)
    return live, rows_live


def _driver_temperature(temperature: float, row_temperature: Optional[torch.Tensor]):
    return row_temperature if row_temperature is not None else temperature


@torch.library.custom_op("grpo_kernels::token_logprobs", mutates_args=())
def _token_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    temperature: float, row_temperature: Optional[torch.Tensor], softcap: Optional[float], ignore_index: int,
    compute_entropy: bool, compute_log_sum_sq: bool, compute_mean_logits: bool, compute_is_top1: bool, topk: int,
    batch_invariant: bool, filter_eps: Optional[float], exact: bool, backward: str, workspace_bytes: Optional[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """hidden [N, D] (row-contiguous), weight [V, D], bias [V] or None, targets [N, K] int32/int64
    (K = 0: no targets, statistics only, every row live), row_temperature [N] float or None (then
    ``temperature`` applies to every row).

    Returns float32 (logp [N, K], entropy [N], lse [N], log_sum_sq_probs [N], mean_logits [N]),
    is_top1 [N] bool, topk_logp [N, topk] float32, topk_ids [N, topk] int64; an output not asked
    for is empty ([0]). Ignored entries give 0 (False, id 0), and every per-row output 0 on rows
    with no live target. filter_eps, exact, backward and workspace_bytes are backward options (the
    autograd context reads them from here).
    """
    num_rows, num_targets = targets.shape
    # The data-dependent checks live inside the op, where torch.compile does not trace.
    check_index_range("targets", targets, weight.shape[0], ignore_index)
    if row_temperature is not None:
        check_temperature_values(row_temperature)
    live, rows_live = _live(targets, ignore_index)
    rows = rows_live.nonzero().squeeze(1).to(torch.int32)

    def per_row(needed, dtype=torch.float32):
        return hidden.new_zeros(num_rows if needed else 0, dtype=dtype)

    logp = hidden.new_zeros((num_rows, num_targets), dtype=torch.float32)
    entropy, lse = per_row(compute_entropy), per_row(True)
    log_sum_sq, mean_logits = per_row(compute_log_sum_sq), per_row(compute_mean_logits)
    is_top1 = per_row(compute_is_top1, torch.bool)
    topk_logp = hidden.new_zeros((num_rows, topk), dtype=torch.float32)
    topk_ids = hidden.new_zeros((num_rows, topk), dtype=torch.int64)
    if rows.numel() > 0:
        forward_fn, _ = BACKENDS[backend]
        options = {"softcap": softcap, "topk": topk,
                   "stats": frozenset(name for name, on in zip(DRIVER_STATS, (
                       compute_log_sum_sq, compute_mean_logits, compute_is_top1)) if on)}
        if backend == "triton":
            options["batch_invariant"] = batch_invariant
        out = forward_fn(hidden, weight, bias, _kernel_targets(targets, live), rows,
                         _driver_temperature(temperature, row_temperature), compute_entropy, **options)
        idx = rows.long()
        logp[idx] = out.target_logit - out.lse[:, None]
        lse[idx] = out.lse
        if compute_entropy:
            entropy[idx] = out.entropy
        if compute_log_sum_sq:
            log_sum_sq[idx] = out.log_sum_sq_probs
        if compute_mean_logits:
            mean_logits[idx] = out.mean_logits
        if compute_is_top1:
            is_top1[idx] = top1_rule(out.target_logit[:, 0], out.row_max, out.max_before_target)
        if topk:
            topk_logp[idx] = out.topk_logits - out.lse[:, None]
            topk_ids[idx] = out.topk_ids
        logp.masked_fill_(~live, 0.0)
    return logp, entropy, lse, log_sum_sq, mean_logits, is_top1, topk_logp, topk_ids


@_token_logprobs_op.register_fake
def _token_logprobs_fake(hidden, weight, bias, targets, temperature, row_temperature, softcap, ignore_index,
                         compute_entropy, compute_log_sum_sq, compute_mean_logits, compute_is_top1, topk,
                         batch_invariant, filter_eps, exact, backward, workspace_bytes, backend):
    num_rows, num_targets = targets.shape

    def per_row(needed, dtype=torch.float32):
        return hidden.new_empty(num_rows if needed else 0, dtype=dtype)

    return (hidden.new_empty((num_rows, num_targets), dtype=torch.float32), per_row(compute_entropy), per_row(True),
            per_row(compute_log_sum_sq), per_row(compute_mean_logits), per_row(compute_is_top1, torch.bool),
            hidden.new_empty((num_rows, topk), dtype=torch.float32),
            hidden.new_empty((num_rows, topk), dtype=torch.int64))


@torch.library.custom_op("grpo_kernels::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    row_temperature: Optional[torch.Tensor], lse: torch.Tensor, entropy: torch.Tensor, topk_ids: torch.Tensor,
    grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
    grad_topk: Optional[torch.Tensor], temperature: float, softcap: Optional[float], ignore_index: int,
    filter_eps: Optional[float], exact: bool, backward: str, workspace_bytes: Optional[int], backend: str,
    need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (d hidden [N, D], d weight [V, D] (or [0]), d bias [V] (or [0])) of
    <grad_logp, logp> + <grad_entropy, entropy> + <grad_lse, lse> + <grad_topk, topk_logp>
    (None = no gradient)."""
    num_rows, num_targets = targets.shape
    live, rows_live = _live(targets, ignore_index)
    kernel_targets = _kernel_targets(targets, live)
    if grad_logp is None:
        grad_logp = hidden.new_zeros((num_rows, num_targets), dtype=torch.float32)
    grad_logp = torch.where(live, grad_logp.float(), 0.0)
    # Only live rows with a non-zero incoming gradient take part in the backward.
    active = (grad_logp != 0).any(dim=1)
    if grad_topk is not None and topk_ids.shape[1] > 0:
        # d topk_logp_j / d z = onehot(id_j) - p: the top-k ids are targets like the others (the
        # ids themselves, a selection, carry no gradient)
        grad_topk = grad_topk.float()
        active |= (grad_topk != 0).any(dim=1)
        kernel_targets = torch.cat([kernel_targets, topk_ids.to(torch.int32)], dim=1)
        grad_logp = torch.cat([grad_logp, grad_topk], dim=1)
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
    rows = (active & rows_live).nonzero().squeeze(1).to(torch.int32)

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
            hidden, weight, bias, kernel_targets.contiguous(), rows, lse[idx].contiguous(), mean_logit,
            grad_logp[idx].contiguous(), grad_entropy[idx].contiguous() if grad_entropy is not None else None,
            _driver_temperature(temperature, row_temperature), filter_eps, exact, grad_hidden, grad_weight, grad_bias,
            softcap=softcap, backward=backward, workspace_bytes=workspace_bytes,
        )
    return (grad_hidden,
            grad_weight if need_weight else hidden.new_empty(0),
            grad_bias.to(bias.dtype) if need_bias else hidden.new_empty(0))


@_token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(hidden, weight, bias, targets, row_temperature, lse, entropy, topk_ids, grad_logp,
                                  grad_entropy, grad_lse, grad_topk, temperature, softcap, ignore_index, filter_eps,
                                  exact, backward, workspace_bytes, backend, need_weight, need_bias):
    return (torch.empty_like(hidden),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


_NUM_OP_INPUTS = 19


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, temperature, row_temperature, softcap, ignore_index, *_, filter_eps, exact,
     backward, workspace_bytes, backend) = inputs
    _, entropy, lse, log_sum_sq, mean_logits, _, _, topk_ids = output
    ctx.save_for_backward(hidden, weight, bias, targets, row_temperature, lse, entropy, topk_ids)
    ctx.options = (temperature, softcap, ignore_index, filter_eps, exact, backward, workspace_bytes, backend)
    # As in TRL: the statistics carry no gradient (is_top1 and the ids are not floats anyway).
    ctx.mark_non_differentiable(log_sum_sq, mean_logits)
    # An output nobody used gets None, not a zero tensor that would switch on its backward terms.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, grad_lse, _grad_log_sum_sq, _grad_mean_logits, _grad_is_top1,
              grad_topk, _grad_topk_ids):
    no_grads = (None,) * _NUM_OP_INPUTS
    if grad_logp is None and grad_entropy is None and grad_lse is None and grad_topk is None:
        return no_grads
    hidden, weight, bias, targets, row_temperature, lse, entropy, topk_ids = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = torch.ops.grpo_kernels.token_logprobs_backward(
        hidden, weight, bias, targets, row_temperature, lse, entropy, topk_ids, grad_logp, grad_entropy, grad_lse,
        grad_topk, *ctx.options, need_weight, need_bias)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None) + no_grads[3:]


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden, weight, targets, bias, temperature, ignore_index, filter_eps, softcap):
    """Shape, dtype and scalar checks (no data-dependent ones: those run inside the op). ``targets``
    may be None (statistics only). Returns (temperature: float or a tensor of hidden's leading
    shape, filter_eps, softcap)."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if targets is not None:
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
    if targets is None:
        pass
    elif targets.dim() == hidden.dim():  # K targets per row
        if tuple(targets.shape[:-1]) != lead_shape or targets.shape[-1] == 0:
            raise ValueError(f"targets shape {tuple(targets.shape)} must be hidden's leading shape {lead_shape} "
                             f"(one target per row) or {lead_shape} + (K,) with K >= 1 (K targets per row)")
    elif tuple(targets.shape) != lead_shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {lead_shape} "
                         f"(or {lead_shape} + (K,) for K targets per row)")
    if math.prod(lead_shape) == 0:
        raise ValueError("empty batch: hidden has no rows")
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias has {bias.shape[0]} entries, weight has V={vocab} rows")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT32_MIN <= ignore_index <= _INT32_MAX:
        raise ValueError(f"ignore_index must be an int32 (in [{_INT32_MIN}, {_INT32_MAX}]), got {ignore_index}")
    temperature = check_temperature(temperature, lead_shape, hidden.device)
    if filter_eps is not None:
        filter_eps = check_positive_finite("filter_eps", filter_eps)
    if softcap is not None:
        softcap = check_positive_finite("softcap", softcap)
    return temperature, filter_eps, softcap


def check_outputs(outputs, topk, targets, hidden, vocab, return_entropy=False, return_lse=False
                  ) -> tuple[frozenset, int]:
    """``outputs``/``topk``/``targets`` together: (names, k); raises TypeError/ValueError naming
    the argument. ``outputs=None`` is the tuple interface (``return_entropy``/``return_lse``)."""
    if outputs is not None and (return_entropy or return_lse):
        raise ValueError("return_entropy/return_lse belong to the tuple interface: with outputs=, name "
                         "'entropy'/'lse' there")
    if outputs is None:
        if targets is None:
            raise ValueError("targets=None (statistics only) needs outputs=(...) naming what to compute")
        if topk is not None:
            raise ValueError("topk= needs outputs=(..., 'topk', ...)")
        return frozenset(), 0
    names, k = parse_outputs(outputs, topk)
    if targets is None and not names:
        raise ValueError("targets=None with outputs=() computes nothing: name the outputs")
    if "is_top1" in names and (targets is None or targets.dim() == hidden.dim()):
        raise ValueError("outputs 'is_top1' needs one target per row (targets of hidden's leading shape)")
    if k > vocab:
        raise ValueError(f"topk={k} exceeds the vocabulary size V={vocab}")
    return names, k


def check_flags(**flags) -> None:
    """Every flag a ``bool`` (``utils.check_bool``): a TypeError naming the first that is not
    (``return_lse="no"`` would otherwise mean True)."""
    for name, value in flags.items():
        check_bool(name, value)


def check_backward_options(backward, workspace_bytes, deterministic) -> None:
    """``backward`` in BACKWARDS, ``workspace_bytes`` an int > 0 or None, ``deterministic`` a bool
    and not True with the atomic backward; raises TypeError/ValueError naming the argument."""
    if not isinstance(backward, str) or backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    check_bool("deterministic", deterministic)
    expected = f"an int > 0 (bytes) or None (the default, {DEFAULT_WORKSPACE_BYTES} = 256 MiB)"
    if workspace_bytes is not None and (not isinstance(workspace_bytes, int) or isinstance(workspace_bytes, bool)):
        raise TypeError(f"workspace_bytes must be {expected}, got {type(workspace_bytes).__name__} {workspace_bytes!r}")
    if workspace_bytes is not None and workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be {expected}, got {workspace_bytes!r}")
    if deterministic and backward == "atomic":
        raise ValueError("deterministic=True needs backward='workspace' (the default): backward='atomic' adds "
                         "with floating-point atomics, whose order varies between runs")


def single_device_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                           return_entropy=False, return_lse=False, softcap=None, filter_eps=None, exact=True,
                           batch_invariant=True, deterministic=False, backward="workspace", workspace_bytes=None,
                           backend="auto", outputs=None, topk=None):
    """:func:`grpo_kernels.token_logprobs` without ``process_group``: same arguments, checks and result."""
    check_flags(return_entropy=return_entropy, return_lse=return_lse, exact=exact, batch_invariant=batch_invariant)
    temperature, filter_eps, softcap = _validate(hidden, weight, targets, bias, temperature, ignore_index,
                                                 filter_eps, softcap)
    names, k = check_outputs(outputs, topk, targets, hidden, weight.shape[0], return_entropy, return_lse)
    check_backward_options(backward, workspace_bytes, deterministic)
    backend = resolve_backend(hidden.device, backend)
    lead_shape = hidden.shape[:-1]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    num_rows = hidden_2d.shape[0]
    if targets is None:
        targets_2d = torch.empty((num_rows, 0), dtype=torch.int32, device=hidden.device)
    else:
        targets_2d = targets.reshape(num_rows, -1)
    weight_c = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias_c = bias.contiguous() if bias is not None else None
    row_temperature = temperature.reshape(num_rows) if isinstance(temperature, torch.Tensor) else None
    scalar_temperature = 1.0 if row_temperature is not None else temperature
    entropy_on = bool(return_entropy) if outputs is None else "entropy" in names
    logp, entropy, lse, log_sum_sq, mean_logits, is_top1, topk_logp, topk_ids = torch.ops.grpo_kernels.token_logprobs(
        hidden_2d, weight_c, bias_c, targets_2d, scalar_temperature, row_temperature, softcap, ignore_index,
        entropy_on, "log_sum_sq_probs" in names, "mean_logits" in names, "is_top1" in names, k,
        bool(batch_invariant), filter_eps, bool(exact), backward, workspace_bytes, backend)
    if outputs is not None:
        def shaped(name, tensor, tail=()):
            return tensor.view(*lead_shape, *tail) if name in names else None

        return TokenStats(
            logprobs=logp.view(targets.shape) if targets is not None else None,
            entropy=shaped("entropy", entropy), lse=shaped("lse", lse),
            log_sum_sq_probs=shaped("log_sum_sq_probs", log_sum_sq), mean_logits=shaped("mean_logits", mean_logits),
            is_top1=shaped("is_top1", is_top1), topk_logprobs=shaped("topk", topk_logp, (k,)),
            topk_ids=shaped("topk", topk_ids, (k,)))
    result = (logp.view(targets.shape),)
    if return_entropy:
        result += (entropy.view(lead_shape),)
    if return_lse:
        result += (lse.view(lead_shape),)
    return result if len(result) > 1 else result[0]
