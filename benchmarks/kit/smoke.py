"""Stage 0: compiled correctness on the GPU, in seconds, before anything is timed.

    python -m benchmarks.kit.smoke --results-dir DIR [--deadline-s 80] [--jobs 8] [--dry-run]

A registry of small check functions. Each returns a dict of measured errors (``rel_*``: relative
errors ``||got - want|| / ||want||``) and raises ``CheckFailed`` when one is over its tolerance; a
check whose feature is absent returns ``skip(why)``. Registered with ``@register(name, cases=...)``,
where ``cases(ctx)`` lists the keyword arguments of each case (one case when omitted). To add a
check for a new feature, add one function::

    @register("my_feature")
    def check_my_feature(ctx):
        if not accepts(grpo_kernels.token_logprobs, "my_keyword"):
            return skip("token_logprobs has no my_keyword")
        ...
        return {"rel_logp": expect(rel_err(got, want), 1e-5, "log-probs")}

What runs:
- ``logprobs_config`` / ``grpo_loss_config`` / ``advantages_config``: one case per configuration
  that the ops modules' ``sm90_compile_specs()`` declare (what the sm_90 compile check compiles),
  each launched through the public API at small odd shapes and compared with the float64
  reference, values and every gradient. A configuration whose constexprs this file does not know
  how to reach is reported ``unmapped`` (add its knob to the table), not silently dropped. On a GPU,
  ``kernel_coverage`` then checks that every declared configuration was compiled and launched.
- ``logprobs_real_shape``: bf16, N=4096, D=4096, V=151936, 10% ignored rows, with and without
  entropy, exact and single-pass backward, against a float32 chunked reference.
- ``loss_types``: every loss type (both importance-sampling levels, the off-policy mask, every
  mask dtype) through the Triton loss kernel against ``grpo_loss_reference``.
- feature checks, run when ``token_logprobs`` accepts them: ``batch_invariant``,
  ``deterministic``, ``softcap``, ``return_lse``, ``k_targets`` (targets ``[N, K]``),
  ``vocab_parallel_group_of_1`` (``process_group``).

On a GPU the cases run in a pool of worker processes (Triton compiles in parallel on the host's
cores); every finished case rewrites ``smoke.json`` and ``smoke.md``. Cases not started when the
deadline comes are recorded as ``not reached``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmarks.kit.common import Deadline, device_info, md_table, rel_err, stage_device, utc_now, write_json, \
    write_text

# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    pass


@dataclass(frozen=True)
class Context:
    device: torch.device
    dry_run: bool

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[..., dict]
    cases: Callable[[Context], list[dict]] | None
    weight: float  # rough relative cost, for longest-first scheduling


CHECKS: dict[str, Check] = {}


def register(name: str, *, cases: Callable[[Context], list[dict]] | None = None, weight: float = 1.0):
    def decorate(fn):
        if name in CHECKS:
            raise ValueError(f"check {name!r} registered twice")
        CHECKS[name] = Check(name, fn, cases, weight)
        return fn
    return decorate


def skip(why: str) -> dict:
    return {"status": f"skipped: {why}"}


def expect(value: float, tolerance: float, what: str) -> float:
    if not (value <= tolerance):  # NaN fails too
        raise CheckFailed(f"{what}: relative error {value:.3g} > {tolerance:.1g}")
    return value


def accepts(fn, keyword: str) -> bool:
    return keyword in inspect.signature(fn).parameters


# Relative-error tolerances (METHOD.md): float32 far under 1e-3, 16-bit operands 1e-3 .. 1e-2.
VALUE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
DTYPE_OF = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _generator(ctx: Context, seed: int) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(seed)


def _small_logprob_shape(ctx: Context):
    """(N, D, V): odd sizes that cross the GPU tiles (BLOCK_D 32-64, BLOCK_V 64-128) and split V."""
    return (7, 19, 37) if ctx.dry_run else (37, 97, 1031)


def _logprob_inputs(ctx, dtype, n, d, v, *, bias, seed, ignored_every=6):
    g = _generator(ctx, seed)
    hidden = torch.randn(n, d, generator=g, device=ctx.device).to(dtype)
    weight = (torch.randn(v, d, generator=g, device=ctx.device) / math.sqrt(d) * 2).to(dtype)
    b = (torch.randn(v, generator=g, device=ctx.device) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g, device=ctx.device)
    targets[::ignored_every] = -100
    return hidden, weight, b, targets


def _grads(outputs, upstream, inputs):
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    total = sum((o.float() * u).sum() for o, u in zip(outputs, upstream))
    grads = torch.autograd.grad(total, leaves)
    return dict(zip([i for i, t in enumerate(inputs) if t is not None and t.requires_grad], grads))


# ---------------------------------------------------------------------------------------------
# Every declared kernel configuration, through the public API
# ---------------------------------------------------------------------------------------------

# Constexprs that choose tiles or code generation, not behaviour: any value is reached by the
# launcher's own table.
STRUCTURAL = {"BLOCK_N", "BLOCK_V", "BLOCK_D", "GROUP_N", "DOT_PRECISION", "INTERPRETER", "BLOCK_B", "BLOCK_T",
              "BLOCK_G", "GROUPS_PER_PROGRAM"}


def _spec_cases(module_name: str):
    def cases(ctx: Context):
        import importlib

        found = [{"label": spec.name, "kernel": spec.kernel.__name__, "signature": dict(spec.signature),
                  "constexprs": dict(spec.constexprs)}
                 for spec in importlib.import_module(module_name).sm90_compile_specs()]
        # The interpreter ignores tiles: a few cases per kernel keep the dry run in seconds.
        return _thin(found) if ctx.dry_run else found
    return cases


def _thin(cases, per_kernel=2):
    kept, count = [], {}
    for case in cases:
        count[case["kernel"]] = count.get(case["kernel"], 0) + 1
        if count[case["kernel"]] <= per_kernel:
            kept.append(case)
    return kept


# How the public call reaches each value of a log-prob kernel's behaviour constexprs: each entry
# sets fields of the call (see _logprob_call). A constexpr missing here makes its configurations
# "unmapped" (reported, not dropped) until a line is added.
LOGPROB_KNOBS = {
    "HAS_BIAS": lambda call, v: call.update(bias=bool(v)),
    "COMPUTE_ENTROPY": lambda call, v: call.update(entropy=bool(v)),
    "ENTROPY_GRAD": lambda call, v: call.update(entropy=bool(v), backward=True),
    "HAS_SOFTCAP": lambda call, v: call.update(softcap=5.0 if v else None),
    # the atomic backward (backward="atomic"): which pass (d hidden only; d hidden + d weight; the
    # exact d-weight pass). The default backward's d-logits kernel has ENTROPY_GRAD etc. only.
    "HIDDEN_GRAD": lambda call, v: call.update(backward=True, hidden_grad=bool(v), backward_path="atomic"),
    "WEIGHT_GRAD": lambda call, v: call.update(backward=True, weight_grad=bool(v), backward_path="atomic"),
    # token_logprobs(outputs=...): the statistics switch on together; TOPK is the list's slot
    # count (8 or 64), reached by any k that rounds up to it
    "LOG_SUM_SQ": lambda call, v: call.update(stats=bool(v)),
    "MEAN_LOGITS": lambda call, v: call.update(stats=bool(v)),
    "TOP1": lambda call, v: call.update(stats=bool(v)),
    "TOPK": lambda call, v: call.update(topk=int(v) // 2 + 1 if v else 0),
    # one temperature per row: a tensor temperature (every kernel reads 1 / T per row then)
    "ROW_TEMP": lambda call, v: call.update(row_temp=bool(v)),
}


def _logprob_call(signature, constexprs) -> dict | str:
    """The public call that launches a declared configuration, or why there is none."""
    if "Hidden" not in signature:
        # e.g. the forward's merge of per-split partial states: no inputs of its own
        return "launched by every forward case of its dtype (kernel_coverage checks it on a GPU)"
    unknown = {k: v for k, v in constexprs.items() if k not in LOGPROB_KNOBS and k not in STRUCTURAL}
    if unknown:
        return f"unmapped: no public call known for {unknown}; add the knob to LOGPROB_KNOBS"
    call = {"dtype": DTYPE_OF[signature["Hidden"].lstrip("*")], "bias": False, "softcap": None, "entropy": False,
            "backward": False, "hidden_grad": True, "weight_grad": False, "bias_grad": None, "deterministic": False,
            "backward_path": None, "stats": False, "topk": 0, "row_temp": False}
    for name, value in constexprs.items():
        if name in LOGPROB_KNOBS:
            LOGPROB_KNOBS[name](call, value)
    accumulator = signature.get("GradWeight", "").lstrip("*")
    call["bias_grad"] = call["bias"] and call["hidden_grad"]
    # Single pass (d hidden + d weight together) in a 16-bit weight's own dtype: exact=False.
    call["exact"] = not (call["hidden_grad"] and call["weight_grad"] and accumulator not in ("", "fp32"))
    return call


def _reference(hidden, weight, targets, *, bias, temperature, entropy, softcap):
    from grpo_kernels.reference import token_logprobs_reference

    kwargs = {"softcap": softcap} if softcap is not None else {}
    if softcap is not None and not accepts(token_logprobs_reference, "softcap"):
        z = (hidden.double() @ weight.double().t() + (bias.double() if bias is not None else 0.0))
        z = softcap * torch.tanh(z / softcap) / (temperature.double()[:, None] if torch.is_tensor(temperature)
                                                 else temperature)
        log_p = z.log_softmax(-1)
        valid = targets != -100
        logp = torch.where(valid, log_p.gather(1, torch.where(valid, targets, 0)[:, None].long())[:, 0], 0.0)
        ent = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
        return (logp, ent) if entropy else logp
    return token_logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                    return_entropy=entropy, **kwargs)


@register("logprobs_config", cases=_spec_cases("grpo_kernels.ops.logprobs"), weight=2.0)
def check_logprobs_config(ctx, label, kernel, signature, constexprs):
    """One declared log-prob kernel configuration: the public call that launches it, against
    float64, values (forward) or every gradient (backward)."""
    import grpo_kernels

    call = _logprob_call(signature, constexprs)
    if isinstance(call, str):
        return {"status": call} if call.startswith("unmapped") else skip(call)
    dtype = call["dtype"]
    n, d, v = _small_logprob_shape(ctx)
    hidden, weight, bias, targets = _logprob_inputs(ctx, dtype, n, d, v, bias=call["bias"],
                                                    seed=zlib.crc32(label.encode()))
    if call["softcap"] is not None:
        hidden = hidden * 4  # logits near and beyond the cap
    temperature = 0.7
    if call["row_temp"]:  # one per row, 0.5 to 1.2
        temperature = torch.linspace(0.5, 1.2, n, device=ctx.device)[torch.randperm(n, generator=_generator(ctx, 3),
                                                                                  device=ctx.device)]
    kwargs = {"bias": bias, "temperature": temperature, "return_entropy": call["entropy"]}
    for name, keyword in (("softcap", "softcap"), ("deterministic", "deterministic"), ("backward_path", "backward")):
        if call[name]:
            if not accepts(grpo_kernels.token_logprobs, keyword):
                return {"status": f"unmapped: token_logprobs has no {keyword} keyword"}
            kwargs[keyword] = call[name]
    if call["stats"] or call["topk"]:
        return _check_token_stats(hidden, weight, bias, targets, call, temperature)
    if not call["backward"]:
        with torch.no_grad():
            got = grpo_kernels.token_logprobs(hidden, weight, targets, **kwargs)
        want = _reference(hidden, weight, targets, bias=bias, temperature=temperature, entropy=call["entropy"],
                          softcap=call["softcap"])
        got, want = (got, want) if call["entropy"] else ((got,), (want,))
        return {f"rel_{name}": expect(rel_err(g, w), VALUE_TOL[dtype], name)
                for name, g, w in zip(("logp", "entropy"), got, want)}

    hidden.requires_grad_(call["hidden_grad"])
    weight.requires_grad_(call["weight_grad"])
    if bias is not None:
        bias.requires_grad_(call["bias_grad"])
    outs = grpo_kernels.token_logprobs(hidden, weight, targets, exact=call["exact"], **kwargs)
    refs = _reference(hidden, weight, targets, bias=bias, temperature=temperature, entropy=call["entropy"],
                      softcap=call["softcap"])
    outs, refs = (outs, refs) if call["entropy"] else ((outs,), (refs,))
    g = _generator(ctx, 7)
    upstream = [torch.randn(targets.shape, generator=g, device=ctx.device) for _ in outs]
    inputs = (hidden, weight, bias)
    got, want = _grads(outs, upstream, inputs), _grads(refs, upstream, inputs)
    result = {"exact": call["exact"], "deterministic": call["deterministic"]}
    for index, name in enumerate(("d_hidden", "d_weight", "d_bias")):
        if index in got:
            result[f"rel_{name}"] = expect(rel_err(got[index], want[index]), GRAD_TOL[dtype], name)
    return result


def _check_token_stats(hidden, weight, bias, targets, call, temperature):
    """The forward with statistics and/or a top-k (``outputs=``) against float64, every output."""
    import grpo_kernels
    from grpo_kernels.reference import token_stats_reference

    if not accepts(grpo_kernels.token_logprobs, "outputs"):
        return {"status": "unmapped: token_logprobs has no outputs keyword"}
    outputs = ("entropy", "lse") + (("log_sum_sq_probs", "mean_logits", "is_top1") if call["stats"] else ()) \
        + (("topk",) if call["topk"] else ())
    topk = call["topk"] or None
    with torch.no_grad():
        got = grpo_kernels.token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                          softcap=call["softcap"], outputs=outputs, topk=topk)._asdict()
    want = token_stats_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                 softcap=call["softcap"], topk=topk)
    tolerance = VALUE_TOL[call["dtype"]]
    result = {}
    for name in ("logprobs", "entropy", "lse", "log_sum_sq_probs", "topk_logprobs"):
        if got[name] is not None:
            result[f"rel_{name}"] = expect(rel_err(got[name], want[name]), tolerance, name)
    if got["is_top1"] is not None and not torch.equal(got["is_top1"], want["is_top1"]):
        raise CheckFailed("is_top1 differs from argmax == target")
    return result


def _loss_cases(ctx: Context):
    """Every loss type x importance-sampling level x off-policy mask x mask dtype the kernel reads."""
    from grpo_kernels.ops import grpo_loss as loss_module

    cases = []
    for loss_type in loss_module.LOSS_TYPES:
        for level in loss_module.IMPORTANCE_SAMPLING_LEVELS:
            for off_policy in (None, 0.05):
                for mask_dtype in ("bool", "int64", "float32", "int32"):
                    cases.append({"label": f"{loss_type},{level},offpolicy={off_policy},mask={mask_dtype}",
                                  "loss_type": loss_type, "level": level, "off_policy": off_policy,
                                  "mask_dtype": mask_dtype})
    return cases[::14] if ctx.dry_run else cases


@register("loss_types", cases=_loss_cases)
def check_loss_types(ctx, label, loss_type, level, off_policy, mask_dtype):
    """``grpo_loss(backend='triton')`` against the float64 TRL-semantics reference: loss, metrics,
    d loss / d logp and d loss / d entropy."""
    import grpo_kernels
    from grpo_kernels.reference import grpo_loss_reference

    B, T = (3, 9) if ctx.dry_run else (5, 301)  # T crosses the kernel's 256-token tile
    g = _generator(ctx, zlib.crc32(label.encode()))
    logp = (-torch.rand(B, T, generator=g, device=ctx.device) * 3).requires_grad_()
    entropy = (torch.rand(B, T, generator=g, device=ctx.device) * 4).requires_grad_()
    lengths = torch.randint(1, T + 1, (B,), generator=g, device=ctx.device)
    mask = (torch.arange(T, device=ctx.device)[None] < lengths[:, None]).to(getattr(torch, mask_dtype))
    options = dict(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_low=0.2,
        epsilon_high=5.0 if loss_type == "cispo" else 0.28, max_completion_length=T, entropy_coef=0.01,
        off_policy_mask_threshold=off_policy,
        old_logprobs=(logp.detach() + 0.3 * torch.randn(B, T, generator=g, device=ctx.device)),
        ref_logprobs=(logp.detach() + 0.2 * torch.randn(B, T, generator=g, device=ctx.device)),
    )
    advantages = torch.randn(B, generator=g, device=ctx.device)

    def draw():  # Clip-Cov draws its tokens at random: the same seed for ours and the reference
        return {"generator": torch.Generator(ctx.device).manual_seed(11)} if loss_type == "clip_cov" else {}

    try:
        loss, metrics = grpo_kernels.grpo_loss(logp, mask, advantages, entropy=entropy, backend="triton",
                                               **options, **draw())
    except ValueError as exc:
        return skip(f"combination refused by grpo_loss ({str(exc).splitlines()[0][:120]})")
    want_loss, want_metrics = grpo_loss_reference(logp, mask, advantages, entropy=entropy, **options, **draw())
    got_grads = torch.autograd.grad(loss, [logp, entropy])
    want_grads = torch.autograd.grad(want_loss, [logp, entropy])
    result = {"rel_loss": expect(rel_err(loss, want_loss), 1e-5, "loss")}
    for name, got, want in zip(("d_logp", "d_entropy"), got_grads, want_grads):
        result[f"rel_{name}"] = expect(rel_err(got, want), 1e-5, name)
    worst = 0.0
    for name, value in metrics.items():
        reference = want_metrics[name]
        if math.isnan(float(reference)):
            if not math.isnan(float(value)):
                raise CheckFailed(f"metric {name}: {float(value)} where the reference is NaN")
            continue
        worst = max(worst, abs(float(value) - float(reference)))
    result["abs_metrics"] = expect(worst, 1e-5, "metrics (absolute)")
    return result


def _advantage_cases(ctx: Context):
    """Per declared BLOCK_G bucket a group size that lands in it, every scale, with/without keep."""
    from grpo_kernels.ops import advantages as adv_module

    sizes = []
    for spec in adv_module.sm90_compile_specs():
        block = spec.constexprs.get("BLOCK_G")
        size = max(1, block - 3) if block else 5
        if size not in sizes:
            sizes.append(size)
    sizes.append(max(sizes) * 2 + 1)  # longer than the largest chunk: the kernel loops
    if ctx.dry_run:
        sizes = [s for s in sizes if s < 100]
    cases = [{"label": f"G={size},scale={scale},keep={keep}", "group_size": size, "scale": scale, "keep": keep}
             for size in sizes for scale in adv_module.SCALES for keep in (False, True)]
    return cases[::4] if ctx.dry_run else cases


@register("advantages_config", cases=_advantage_cases)
def check_advantages(ctx, label, group_size, scale, keep):
    import grpo_kernels
    from grpo_kernels.reference import group_advantages_reference

    groups = 3
    g = _generator(ctx, group_size * 7 + len(scale))
    rewards = torch.randn(groups * group_size, 2, generator=g, device=ctx.device)
    rewards[torch.rand(rewards.shape, generator=g, device=ctx.device) < 0.1] = float("nan")
    keep_mask = (torch.rand(groups * group_size, generator=g, device=ctx.device) < 0.7) if keep else None
    got = grpo_kernels.group_advantages(rewards, group_size, scale=scale, reward_weights=[1.0, 0.5],
                                        keep_mask=keep_mask)
    want, want_mean, want_std, _ = group_advantages_reference(rewards, group_size, scale=scale,
                                                              reward_weights=[1.0, 0.5], keep_mask=keep_mask)
    return {"abs_advantages": expect((got.advantages.double().cpu() - want).abs().max().item(), 1e-4,
                                     "advantages (absolute)")}


# ---------------------------------------------------------------------------------------------
# The log-prob kernel at a real shape against a float32 chunked reference
# ---------------------------------------------------------------------------------------------


def _real_cases(ctx: Context):
    cases = [{"label": "entropy,exact", "entropy": True, "exact": True},
             {"label": "no-entropy,single-pass", "entropy": False, "exact": False},
             {"label": "no-entropy,exact", "entropy": False, "exact": True}]
    return cases[:2] if ctx.dry_run else cases


def float32_chunked_reference(hidden, weight, targets, grad_logp, grad_entropy, *, ignore_index=-100,
                              chunk_rows=512):
    """Forward and backward in float32 (no TF32), ``chunk_rows`` rows of logits at a time.

    hidden ``[N, D]``, weight ``[V, D]``, targets ``[N]``, grad_logp / grad_entropy ``[N]`` (the
    latter may be None). Returns ``(logp [N], entropy [N], d hidden [N, D], d weight [V, D])``,
    float32; ignored rows give 0 and no gradient.
    """
    weight32 = weight.float()
    n = hidden.shape[0]
    logp = torch.zeros(n, device=hidden.device)
    entropy = torch.zeros(n, device=hidden.device)
    grad_hidden = torch.zeros(hidden.shape, device=hidden.device)
    grad_weight = torch.zeros_like(weight32)
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            valid = targets[rows] != ignore_index
            h = hidden[rows].float()
            z = h @ weight32.t()
            log_p = z.log_softmax(-1)
            p = log_p.exp()
            safe = torch.where(valid, targets[rows], 0).long()
            chunk_logp = log_p.gather(1, safe[:, None])[:, 0]
            chunk_entropy = -(p * log_p).sum(-1)
            logp[rows] = torch.where(valid, chunk_logp, 0.0)
            entropy[rows] = torch.where(valid, chunk_entropy, 0.0)
            g = torch.where(valid, grad_logp[rows], 0.0)
            grad_z = -p * g[:, None]
            grad_z.scatter_add_(1, safe[:, None], g[:, None])
            if grad_entropy is not None:
                ge = torch.where(valid, grad_entropy[rows], 0.0)
                mean_z = (p * z).sum(-1, keepdim=True)
                grad_z -= ge[:, None] * p * (z - mean_z)
            grad_hidden[rows] = grad_z @ weight32
            grad_weight.addmm_(grad_z.t(), h)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return logp, entropy, grad_hidden, grad_weight


def real_shape(ctx: Context):
    return (21, 16, 53) if ctx.dry_run else (4096, 4096, 151936)


@register("logprobs_real_shape", cases=_real_cases, weight=20.0)
def check_real_shape(ctx, label, entropy, exact):
    """bf16 N=4096, D=4096, V=151936 (Qwen-size head), 10% ignored rows: values and gradients."""
    import grpo_kernels

    n, d, v = real_shape(ctx)
    g = _generator(ctx, 11 + int(entropy) + 2 * int(exact))
    hidden = torch.randn(n, d, generator=g, device=ctx.device).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, d, generator=g, device=ctx.device) * 0.02).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=ctx.device)
    targets[torch.rand(n, generator=g, device=ctx.device) < 0.1] = -100
    grad_logp = torch.randn(n, generator=g, device=ctx.device)
    grad_entropy = torch.randn(n, generator=g, device=ctx.device) if entropy else None
    out = grpo_kernels.token_logprobs(hidden, weight, targets, return_entropy=entropy, exact=exact)
    outs = out if entropy else (out,)
    upstream = (grad_logp, grad_entropy) if entropy else (grad_logp,)
    got_grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs, upstream)), [hidden, weight])
    want_logp, want_entropy, want_dh, want_dw = float32_chunked_reference(hidden.detach(), weight.detach(), targets,
                                                                         grad_logp, grad_entropy)
    valid = targets != -100
    result = {"shape": [n, d, v], "rel_logp": expect(rel_err(outs[0][valid], want_logp[valid]), 1e-4, "log-probs"),
              "ignored_rows_zero": bool((outs[0][~valid] == 0).all())}
    if not result["ignored_rows_zero"]:
        raise CheckFailed("ignored rows have non-zero log-probs")
    if entropy:
        result["rel_entropy"] = expect(rel_err(outs[1][valid], want_entropy[valid]), 1e-4, "entropy")
    result["rel_d_hidden"] = expect(rel_err(got_grads[0], want_dh), 2e-2, "d hidden")
    result["d_hidden_ignored_zero"] = bool((got_grads[0][~valid] == 0).all())
    if not result["d_hidden_ignored_zero"]:
        raise CheckFailed("ignored rows have a non-zero d hidden")
    # Single pass accumulates d weight in bf16 over N / BLOCK_N partial products: looser.
    result["rel_d_weight"] = expect(rel_err(got_grads[1], want_dw), 2e-2 if exact else 5e-2, "d weight")
    return result


# ---------------------------------------------------------------------------------------------
# Features other developers are adding (run when the public API accepts them)
# ---------------------------------------------------------------------------------------------


def _feature_inputs(ctx, n, dtype=torch.float32, seed=3):
    d, v = (19, 37) if ctx.dry_run else (97, 1031)
    return _logprob_inputs(ctx, dtype, n, d, v, bias=False, seed=seed, ignored_every=5)


@register("batch_invariant")
def check_batch_invariant(ctx):
    """The same rows inside batches of 1, 7 and 300 rows, permuted, ignored rows interleaved:
    bitwise-equal log-probs and entropies (torch.equal)."""
    import grpo_kernels

    if not accepts(grpo_kernels.token_logprobs, "batch_invariant"):
        return skip("token_logprobs has no batch_invariant keyword")
    sizes = (1, 5, 12) if ctx.dry_run else (1, 7, 300)
    hidden, weight, _, targets = _feature_inputs(ctx, max(sizes), dtype=torch.bfloat16 if ctx.on_gpu else torch.float32)
    targets[0] = 0
    with torch.no_grad():
        base_logp, base_ent = grpo_kernels.token_logprobs(hidden, weight, targets, return_entropy=True,
                                                          batch_invariant=True)
        g = _generator(ctx, 5)
        for size in sizes:
            rows = torch.randperm(max(sizes), generator=g, device=ctx.device)[:size]
            if size > 1:
                rows = torch.cat([rows, rows.new_zeros(1)])  # row 0 (a valid target) in every batch
            t = targets[rows].clone()
            t[1::3] = -100 if size > 3 else t[1::3]
            live = t != -100
            logp, ent = grpo_kernels.token_logprobs(hidden[rows], weight, t, return_entropy=True, batch_invariant=True)
            if ctx.on_gpu:
                if not (torch.equal(logp[live], base_logp[rows][live]) and torch.equal(ent[live], base_ent[rows][live])):
                    raise CheckFailed(f"batch of {size} rows: log-probs or entropies differ bitwise")
            else:
                # The interpreter's tl.dot is a numpy matmul, whose rounding depends on a row's
                # position in the tile: bitwise equality is a GPU property; here the plumbing.
                expect(rel_err(logp[live], base_logp[rows][live]), 1e-6, f"batch of {size}: log-probs")
                expect(rel_err(ent[live], base_ent[rows][live]), 1e-6, f"batch of {size}: entropies")
    return {"batch_sizes": list(sizes), "bitwise": ctx.on_gpu}


@register("deterministic")
def check_deterministic(ctx):
    """deterministic=True: two forward+backward runs give bitwise-identical gradients."""
    import grpo_kernels

    if not accepts(grpo_kernels.token_logprobs, "deterministic"):
        return skip("token_logprobs has no deterministic keyword")
    hidden, weight, _, targets = _feature_inputs(ctx, 10 if ctx.dry_run else 1000,
                                                 dtype=torch.bfloat16 if ctx.on_gpu else torch.float32)
    runs = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = grpo_kernels.token_logprobs(h, w, targets, return_entropy=True, deterministic=True)
        runs.append(torch.autograd.grad(logp.sum() + 0.1 * ent.sum(), [h, w]))
    if not all(torch.equal(a, b) for a, b in zip(*runs)):
        raise CheckFailed("gradients differ between two deterministic runs")
    return {"bitwise_equal": True}


def _softcap_reference(hidden, weight, targets, softcap, temperature):
    z = hidden.double() @ weight.double().t()
    z = softcap * torch.tanh(z / softcap) / temperature
    valid = targets != -100
    logp = z.log_softmax(-1).gather(1, torch.where(valid, targets, 0)[:, None].long())[:, 0]
    return torch.where(valid, logp, 0.0)


@register("softcap")
def check_softcap(ctx):
    """softcap: values and gradients against float64, with |z| near and beyond the cap."""
    import grpo_kernels

    if not accepts(grpo_kernels.token_logprobs, "softcap"):
        return skip("token_logprobs has no softcap keyword")
    hidden, weight, _, targets = _feature_inputs(ctx, 9 if ctx.dry_run else 37)
    hidden = (hidden * 6).requires_grad_()  # logits of several times the cap
    weight = weight.requires_grad_()
    softcap, temperature = 5.0, 0.9
    got = grpo_kernels.token_logprobs(hidden, weight, targets, softcap=softcap, temperature=temperature)
    want = _softcap_reference(hidden, weight, targets, softcap, temperature)
    got_g = torch.autograd.grad(got.sum(), [hidden, weight])
    want_g = torch.autograd.grad(want.sum(), [hidden, weight])
    return {"rel_logp": expect(rel_err(got, want), 1e-5, "log-probs"),
            "rel_d_hidden": expect(rel_err(got_g[0], want_g[0]), 1e-4, "d hidden"),
            "rel_d_weight": expect(rel_err(got_g[1], want_g[1]), 1e-4, "d weight")}


@register("return_lse")
def check_return_lse(ctx):
    import grpo_kernels

    if not accepts(grpo_kernels.token_logprobs, "return_lse"):
        return skip("token_logprobs has no return_lse keyword")
    hidden, weight, _, targets = _feature_inputs(ctx, 37)
    targets[targets == -100] = 0  # the lse of every row
    with torch.no_grad():
        out = grpo_kernels.token_logprobs(hidden, weight, targets, return_lse=True)
    lse = out[-1] if isinstance(out, tuple) else out
    want = torch.logsumexp(hidden.double() @ weight.double().t(), -1)
    return {"rel_lse": expect(rel_err(lse, want), 1e-6, "lse")}


@register("k_targets")
def check_k_targets(ctx):
    """targets [N, K] (repeated ids, ignored entries): [N, K] log-probs and gradients."""
    import grpo_kernels

    hidden, weight, _, _ = _feature_inputs(ctx, 9 if ctx.dry_run else 23)
    hidden.requires_grad_()
    weight.requires_grad_()
    v = weight.shape[0]
    g = _generator(ctx, 9)
    targets = torch.randint(0, v, (hidden.shape[0], 4), generator=g, device=ctx.device)
    targets[:, 1] = targets[:, 0]  # repeated ids
    targets[::3, 2] = -100
    try:
        got = grpo_kernels.token_logprobs(hidden, weight, targets)
    except (ValueError, TypeError) as exc:
        return skip(f"token_logprobs refuses targets [N, K] ({str(exc).splitlines()[0][:100]})")
    log_p = (hidden.double() @ weight.double().t()).log_softmax(-1)
    valid = targets != -100
    want = torch.where(valid, log_p.gather(1, torch.where(valid, targets, 0).long()), 0.0)
    upstream = torch.randn(targets.shape, generator=g, device=ctx.device)
    got_g = torch.autograd.grad((got * upstream).sum(), [hidden, weight])
    want_g = torch.autograd.grad((want * upstream).sum(), [hidden, weight])
    return {"rel_logp": expect(rel_err(got, want), 1e-5, "log-probs"),
            "rel_d_hidden": expect(rel_err(got_g[0], want_g[0]), 1e-4, "d hidden"),
            "rel_d_weight": expect(rel_err(got_g[1], want_g[1]), 1e-4, "d weight")}


@register("vocab_parallel_group_of_1")
def check_vocab_parallel(ctx):
    """A process group of one rank (all one GPU can run): the vocabulary-parallel path
    (``token_logprobs(process_group=)`` or ``ops.vocab_parallel.vocab_parallel_logprobs``)
    equals the plain op, values and gradients."""
    import torch.distributed as dist

    import grpo_kernels

    if accepts(grpo_kernels.token_logprobs, "process_group"):
        def parallel(h, w, t, group):
            return grpo_kernels.token_logprobs(h, w, t, return_entropy=True, process_group=group)
    else:
        try:
            from grpo_kernels.ops.vocab_parallel import vocab_parallel_logprobs
        except ImportError:
            return skip("neither token_logprobs(process_group=) nor grpo_kernels.ops.vocab_parallel exists")

        def parallel(h, w, t, group):
            return vocab_parallel_logprobs(h, w, t, group, return_entropy=True)
    created = False
    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="grpo-kit-pg-")
        dist.init_process_group("nccl" if ctx.on_gpu else "gloo", init_method=f"file://{store}", rank=0,
                                world_size=1)
        created = True
    try:
        group = dist.new_group([0])
        hidden, weight, _, targets = _feature_inputs(ctx, 37)
        hidden.requires_grad_()
        weight.requires_grad_()
        got, got_ent = parallel(hidden, weight, targets, group)
        want, want_ent = grpo_kernels.token_logprobs(hidden, weight, targets, return_entropy=True)
        got_g = torch.autograd.grad(got.sum() + got_ent.sum(), [hidden, weight])
        want_g = torch.autograd.grad(want.sum() + want_ent.sum(), [hidden, weight])
        return {"rel_logp": expect(rel_err(got, want), 1e-6, "log-probs"),
                "rel_entropy": expect(rel_err(got_ent, want_ent), 1e-6, "entropy"),
                "rel_d_hidden": expect(rel_err(got_g[0], want_g[0]), 1e-6, "d hidden"),
                "rel_d_weight": expect(rel_err(got_g[1], want_g[1]), 1e-6, "d weight")}
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Coverage: every declared configuration was compiled and launched (GPU only)
# ---------------------------------------------------------------------------------------------

SPEC_MODULES = ("grpo_kernels.ops.logprobs", "grpo_kernels.ops.grpo_loss", "grpo_kernels.ops.advantages")


def compiled_configs() -> list[tuple] | None:
    """(kernel name, pointer types, constexprs, num_warps, num_stages) of every kernel this process
    compiled, read from Triton's per-device caches; None under the interpreter."""
    import importlib

    from grpo_kernels.ops.utils import triton_interpreter_enabled

    if triton_interpreter_enabled():
        return None
    seen = set()
    kernels = {}
    for module_name in SPEC_MODULES:
        for spec in importlib.import_module(module_name).sm90_compile_specs():
            kernels[id(spec.kernel)] = spec.kernel
    for kernel in kernels.values():
        for caches in getattr(kernel, "device_caches", {}).values():
            for compiled in caches[0].values():
                src = compiled.src
                constexprs = tuple(sorted((kernel.arg_names[k[0]], repr(v)) for k, v in src.constants.items()
                                          if len(k) == 1))
                pointers = tuple(sorted((k, v) for k, v in src.signature.items() if str(v).startswith("*")))
                seen.add((kernel.__name__, pointers, constexprs, compiled.metadata.num_warps,
                          compiled.metadata.num_stages))
    return sorted(seen)


def uncovered_specs(compiled: list[tuple]) -> list[str]:
    import importlib

    by_kernel = {}
    for name, pointers, constexprs, warps, stages in compiled:
        by_kernel.setdefault(name, []).append((dict(pointers), dict(constexprs), warps, stages))
    missing = []
    for module_name in SPEC_MODULES:
        for spec in importlib.import_module(module_name).sm90_compile_specs():
            want_c = {k: repr(v) for k, v in spec.constexprs.items()}
            want_p = {k: v for k, v in spec.signature.items() if str(v).startswith("*")}
            hit = any(all(c.get(k) == v for k, v in want_c.items()) and all(p.get(k) == v for k, v in want_p.items())
                      and warps == spec.num_warps and stages == spec.num_stages
                      for p, c, warps, stages in by_kernel.get(spec.kernel.__name__, []))
            if not hit:
                missing.append(spec.name)
    return missing


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------


def plan(ctx: Context) -> list[tuple[str, int, dict]]:
    """(check, case index, case) for every case, the costliest checks first."""
    tasks = []
    for check in sorted(CHECKS.values(), key=lambda c: -c.weight):
        cases = check.cases(ctx) if check.cases else [{"label": ""}]
        tasks += [(check.name, i, case) for i, case in enumerate(cases)]
    return tasks


def run_case(name: str, index: int, dry_run: bool) -> dict:
    """Run one case (in a worker process on a GPU); returns its record and this process's
    compiled configurations so far."""
    ctx = Context(stage_device(dry_run), dry_run)
    check = CHECKS[name]
    case = (check.cases(ctx) if check.cases else [{"label": ""}])[index]
    kwargs = {k: v for k, v in case.items()} if check.cases else {}
    torch.manual_seed(1234 + index)
    begin = time.perf_counter()
    try:
        result = check.fn(ctx, **kwargs)
        status = result.pop("status", "ok")
    except CheckFailed as exc:
        result, status = {}, f"FAIL: {exc}"
    except Exception as exc:  # noqa: BLE001 - an error in one check is that check's result
        if "out of memory" in str(exc).lower():
            status = "error: OOM"
        else:
            status = f"error: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        result = {"traceback": traceback.format_exc(limit=4)[-1500:]}
    record = {"check": name, "case": case.get("label", ""), "status": status,
              "seconds": round(time.perf_counter() - begin, 3), **result}
    if ctx.on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return {"record": record, "compiled": compiled_configs()}


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def summarize(records: list[dict]) -> dict:
    counts = {}
    for r in records:
        key = r["status"].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def write_results(out_dir: Path, records, meta, coverage) -> None:
    counts = summarize(records)
    write_json(out_dir / "smoke.json", {"meta": meta, "counts": counts, "coverage": coverage, "records": records})
    lines = [f"# Stage 0: compiled correctness smoke, {meta['device']}", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}. Command: `{meta['command']}`.", "",
             "Relative errors are ||got - want|| / ||want|| against `grpo_kernels.reference` (float64), or a float32 "
             "chunked reference at the real shape; `abs_*` are absolute.", "",
             "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]
    if coverage is not None:
        lines += [f"Kernel coverage: {coverage['status']}", ""]
    rows = []
    for r in records:
        errs = ", ".join(f"{k[4:] if k.startswith('rel_') else k} {v:.1e}" for k, v in r.items()
                         if (k.startswith("rel_") or k.startswith("abs_")) and isinstance(v, float))
        rows.append([r["check"], r["case"], r["status"], errs, r.get("seconds")])
    lines.append(md_table(["check", "case", "status", "errors", "s"], rows))
    write_text(out_dir / "smoke.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=None, help="stop starting cases after this")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (GPU; default min(12, cores))")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--only", nargs="+", help="only these checks")
    args = parser.parse_args(argv)
    deadline = Deadline(args.deadline_s)
    device = stage_device(args.dry_run)
    ctx = Context(device, args.dry_run)
    meta = {**device_info(device), "command": "python -m benchmarks.kit.smoke " + " ".join(argv or sys.argv[1:])}
    write_json(args.results_dir / "device.json", meta)
    tasks = [t for t in plan(ctx) if not args.only or t[0] in args.only]
    records, compiled = [], set()
    jobs = 1 if args.dry_run else (args.jobs or min(12, os.cpu_count() or 1))
    print(f"[smoke] {len(tasks)} cases on {meta['device']} ({jobs} worker(s))", flush=True)

    def collect(name, case, outcome):
        records.append(outcome["record"])
        if outcome["compiled"]:
            compiled.update(outcome["compiled"])
        r = outcome["record"]
        print(f"[smoke] {r['status'][:60]:8s} {name} {case.get('label', '')} ({r['seconds']} s)", flush=True)
        write_results(args.results_dir, records, meta, None)

    if jobs == 1:
        for name, index, case in tasks:
            if deadline.expired():
                records.append({"check": name, "case": case.get("label", ""), "status": "not reached (stage deadline)"})
                continue
            collect(name, case, run_case(name, index, args.dry_run))
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)
        futures = {pool.submit(run_case, name, index, False): (name, case) for name, index, case in tasks}
        pending = set(futures)
        while pending and not deadline.expired():
            done, pending = wait(pending, timeout=min(5.0, max(0.1, deadline.left())), return_when=FIRST_COMPLETED)
            for future in done:
                name, case = futures[future]
                try:
                    collect(name, case, future.result())
                except Exception as exc:  # noqa: BLE001 - a crashed worker (e.g. a GPU fault)
                    records.append({"check": name, "case": case.get("label", ""),
                                    "status": f"error: worker died: {type(exc).__name__}: {exc}"[:300]})
        for future in pending:
            name, case = futures[future]
            records.append({"check": name, "case": case.get("label", ""), "status": "not reached (stage deadline)"})
        pool.shutdown(wait=False, cancel_futures=True)
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()

    coverage = None
    if device.type == "cuda":
        reached_all = all(not r["status"].startswith("not reached") for r in records)
        missing = uncovered_specs(sorted(compiled))
        coverage = {"status": ("every declared configuration compiled and launched" if not missing else
                               f"{len(missing)} declared configuration(s) never launched"
                               + ("" if reached_all else " (some cases not reached)")),
                    "missing": missing}
        records.append({"check": "kernel_coverage", "case": "", "status": "ok" if not missing else
                        f"FAIL: {len(missing)} declared configuration(s) never launched", "missing": missing[:50]})
    else:
        records.append({"check": "kernel_coverage", "case": "", "status": "skipped: the interpreter compiles nothing"})
    write_results(args.results_dir, records, meta, coverage)
    counts = summarize(records)
    print(f"[smoke] done at {utc_now()}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    return 1 if counts.get("FAIL") or counts.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
