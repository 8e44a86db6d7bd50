"""The LM-head operations of issue 19 and their implementations, on ``benchmarks.impls``' inputs.

Operations (TRL 1.16's trainers run each of them):

- ``stats_fwd``: every per-token statistic TRL's head computes (log-prob, entropy, log sum p^2,
  mean logit, is_top1; what DPO asks for), no gradient;
- ``stats_fwd_bwd``: log-probs and entropies, forward + backward of ``masked mean(log p) + 0.01
  masked mean(entropy)`` (GRPO with an entropy bonus);
- ``divergence_fwd_bwd`` / ``divergence_fwd``: the distillation loss, generalized JSD (beta 0.5,
  the costliest form: two passes over the vocabulary) between the student (the inputs' head) and a
  teacher (:func:`teacher_of`: the same hidden states through a perturbed, sharper head), masked
  mean over the completion tokens; forward + backward (the student's gradients), or forward only.

Implementations:

- ``ours``: :func:`grpo_kernels.token_logprobs` with ``outputs=`` / :func:`grpo_kernels.ops.divergence.fused_divergence`;
- ``trl_fused``: TRL 1.16's own: ``ChunkedLogProbFunction`` on the unmasked rows (what
  ``add_fused_lm_head`` runs) and ``distillation_trainer._chunked_divergence_loss`` (its
  ``ChunkedDivergenceFunction``); on CUDA their Triton folds, elsewhere TRL's torch folds;
- ``torch``: materialized ``[N, V]`` logits in float32.

Every implementation gets the same :class:`benchmarks.impls.Inputs`; the float32 references
(:func:`value_check`) give each result's error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

HEAD_OPS = {  # op -> (bf16 [N, D] x [D, V] matmuls in the floor, needs grad)
    "stats_fwd_bwd": (4, True),
    "divergence_fwd_bwd": (4, True),  # student + teacher forward, then d hidden and d weight
    "stats_fwd": (1, False),
    "divergence_fwd": (2, False),
}
HEAD_IMPLS = ("ours", "trl_fused", "torch")
STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
DIVERGENCE_BETA = 0.5
ENTROPY_COEF = 0.01


@dataclass
class HeadImpl:
    name: str
    description: str
    stats: Callable | None = None  # (inp, names) -> (log_probs, entropy, log_sum_sq, mean_logits, is_top1), [B, T]
    divergence: Callable | None = None  # (inp) -> masked mean divergence, 0-d
    skip_reason: str | None = None
    version: str = ""


_TEACHERS: dict = {}


def teacher_of(inp):
    """(teacher hidden [B, T, D], teacher weight [V, D]): the student's hidden states through its
    head scaled by 1.25 plus noise of a third of its spread, so the two distributions differ like
    a teacher's and a student's. Cached per input set (built once, not timed)."""
    key = _teacher_key(inp)
    if key not in _TEACHERS:
        weight = inp.lm_head_weight.detach()
        generator = torch.Generator(device=weight.device).manual_seed(7)
        noise = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
        teacher = (1.25 * weight.float() + noise * (weight.float().std() / 3)).to(weight.dtype)
        _TEACHERS[key] = (inp.hidden.detach(), teacher)
    return _TEACHERS[key]


def _teacher_key(inp):
    # a view of the first rows shares its data pointer with the whole tensor: the shape tells them apart
    return inp.hidden.data_ptr(), tuple(inp.hidden.shape), inp.hidden.dtype, inp.lm_head_weight.data_ptr()


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def stats_loss(outputs, mask):
    log_probs, entropy = outputs[0], outputs[1]
    return masked_mean(log_probs, mask) + ENTROPY_COEF * masked_mean(entropy, mask)


def _ours(device, temperature) -> HeadImpl:
    import grpo_kernels as gk
    from grpo_kernels.ops.divergence import fused_divergence

    backend = "auto" if device.type == "cuda" else "torch"  # as benchmarks.impls: no interpreter on CPU

    def stats(inp, names):
        out = gk.token_logprobs(inp.hidden, inp.lm_head_weight, inp.targets, outputs=names, temperature=temperature,
                                backend=backend)
        return out.logprobs, out.entropy, out.log_sum_sq_probs, out.mean_logits, out.is_top1

    def divergence(inp):
        teacher_hidden, teacher_weight = teacher_of(inp)
        out = fused_divergence(inp.hidden, inp.lm_head_weight, teacher_hidden=teacher_hidden,
                               teacher_weight=teacher_weight, beta=DIVERGENCE_BETA, temperature=temperature,
                               mask=inp.completion_mask, backend=backend)
        return masked_mean(out.divergence, inp.completion_mask)

    return HeadImpl("ours", "grpo_kernels.token_logprobs(outputs=...), grpo_kernels fused_divergence"
                    + (" (PyTorch backend on CPU)" if backend == "torch" else ""), stats, divergence,
                    version=gk.__version__)


def _trl_fused(temperature) -> HeadImpl:
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        from benchmarks.impls import _trl_chunk_size, _version

        chunk_size = _trl_chunk_size()
    except (ImportError, LookupError) as exc:
        return HeadImpl("trl_fused", "", skip_reason=f"trl >= 1.16 with trl.kernels is not installed ({exc})")

    def stats(inp, names):
        mask = inp.completion_mask.bool()
        per_token = ChunkedLogProbFunction.apply(inp.hidden[mask], inp.lm_head_weight, None, inp.completion_ids[mask],
                                                 temperature, chunk_size, None, 1.0, ("log_probs",) + tuple(names))
        return tuple(None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)

    def divergence(inp):
        teacher_hidden, teacher_weight = teacher_of(inp)
        loss, _, _ = _chunked_divergence_loss(inp.hidden, teacher_hidden, inp.lm_head_weight, teacher_weight,
                                              inp.completion_mask, DIVERGENCE_BETA, temperature=temperature)
        return loss

    return HeadImpl("trl_fused", "TRL 1.16: ChunkedLogProbFunction (add_fused_lm_head's) and "
                    "DistillationTrainer's _chunked_divergence_loss (ChunkedDivergenceFunction); Triton folds on "
                    "CUDA", stats, divergence, version=_version("trl"))


def _torch(temperature) -> HeadImpl:
    def logits_of(hidden, weight):
        return (hidden @ weight.t()).float() / temperature

    def stats(inp, names):
        z = logits_of(inp.hidden, inp.lm_head_weight)
        log_p = z.log_softmax(-1)
        log_probs = log_p.gather(-1, inp.completion_ids[..., None])[..., 0]
        entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in names else None
        log_sum_sq = torch.logsumexp(2 * log_p, -1) if "log_sum_sq_probs" in names else None
        mean_logits = z.mean(-1) if "mean_logits" in names else None
        is_top1 = z.argmax(-1) == inp.completion_ids if "is_top1" in names else None
        mask = inp.completion_mask.bool()
        return tuple(None if x is None else x.masked_fill(~mask, 0)
                     for x in (log_probs, entropy, log_sum_sq, mean_logits, is_top1))

    def divergence(inp):
        teacher_hidden, teacher_weight = teacher_of(inp)
        log_s = logits_of(inp.hidden, inp.lm_head_weight).log_softmax(-1)
        log_t = logits_of(teacher_hidden, teacher_weight).log_softmax(-1)
        return masked_mean(jsd(log_s, log_t, DIVERGENCE_BETA), inp.completion_mask)

    return HeadImpl("torch", "materialized [N, V] logits in float32", stats, divergence, version=torch.__version__)


def jsd(log_s, log_t, beta):
    """Per-row generalized JSD of TRL (beta 0: KL(t || s), 1: KL(s || t)) from log-probs [..., V]."""
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return (beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1))


def build_head_impls(device: torch.device, names=HEAD_IMPLS, temperature: float = 1.0) -> list[HeadImpl]:
    builders = {"ours": lambda: _ours(device, temperature), "trl_fused": lambda: _trl_fused(temperature),
                "torch": lambda: _torch(temperature)}
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"unknown head implementation(s) {unknown}; choose from {list(builders)}")
    return [builders[name]() for name in names]


def head_step(impl: HeadImpl, op: str, inputs) -> Callable[[int], object]:
    """step(i): one timed run of ``op`` on input set i (``torch.autograd.grad`` of the loss w.r.t.
    hidden and the LM head for the forward + backward ops)."""
    if op.startswith("stats"):
        names = ("entropy",) if op == "stats_fwd_bwd" else STATS

        def run(inp):
            return stats_loss(impl.stats(inp, names), inp.completion_mask) if op == "stats_fwd_bwd" else \
                impl.stats(inp, names)
    else:
        run = impl.divergence
    if HEAD_OPS[op][1]:
        def step(i):
            inp = inputs[i]
            return torch.autograd.grad(run(inp), [inp.hidden, inp.lm_head_weight])
    else:
        nograd = [inp.for_nograd_pass() for inp in inputs]

        def step(i):
            with torch.no_grad():
                return run(nograd[i])
    return step


@torch.no_grad()
def value_check(impl: HeadImpl, op: str, inp, max_rows: int = 256) -> float:
    """Max |error| against float32 references on the first ``max_rows`` rows: over the log-prob,
    entropy, log sum p^2 and mean logit of the completion tokens (``stats``), or of the divergence
    loss (``divergence``)."""
    rows = max(1, min(inp.hidden.shape[1], max_rows // max(1, inp.hidden.shape[0])))
    sub = type(inp)(inp.hidden.detach()[:, :rows], inp.lm_head_weight.detach(), inp.completion_ids[:, :rows],
                    inp.completion_mask[:, :rows], inp.advantages, inp.old_logprobs[:, :rows],
                    inp.ref_logprobs[:, :rows], inp.reference_logprobs[:, :rows])
    reference = _torch(1.0)
    mask = sub.completion_mask.bool()
    if op.startswith("stats"):
        got, want = impl.stats(sub, STATS), reference.stats(_float32(sub), STATS)
        errors = [(g.float() - w)[mask].abs().max() for g, w in zip(got[:4], want[:4])]
        return float(torch.stack(errors).max())
    teacher_hidden, teacher_weight = teacher_of(sub)
    want_inp = _float32(sub)  # the same teacher, upcast
    _TEACHERS[_teacher_key(want_inp)] = (teacher_hidden.float(), teacher_weight.float())
    return float((impl.divergence(sub).float() - reference.divergence(want_inp)).abs())


def _float32(inp):
    return type(inp)(inp.hidden.float(), inp.lm_head_weight.float(), *[getattr(inp, f) for f in (
        "completion_ids", "completion_mask", "advantages", "old_logprobs", "ref_logprobs", "reference_logprobs")])
