"""The implementations under comparison, each on the same inputs.

Every implementation provides up to three operations:

- ``loss``: hidden states + LM head -> GRPO loss, differentiable (the suite times forward +
  backward: ``torch.autograd.grad(loss, [hidden, lm_head_weight])``);
- ``logprobs``: the no-grad per-token log-prob pass (old / reference log-probs);
- ``logprobs_loss`` (ours only): ``token_logprobs`` forward + backward with a plain masked mean,
  the yardstick of issue 3's "at most 5% over the log-prob kernel alone".

The loss configuration is Liger-Kernel's ``LigerFusedLinearGRPOLoss`` defaults (the comparison
issue 4 asks for): loss_type "dapo", beta 0.04 with reference log-probs, epsilon 0.2 on both
sides, temperature 1, old log-probs given.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

LOSS_OPTIONS = {"loss_type": "dapo", "beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.2, "temperature": 1.0}
IGNORE_INDEX = -100


@dataclass
class Inputs:
    hidden: torch.Tensor  # [B, T, D] model dtype, requires grad
    lm_head_weight: torch.Tensor  # [V, D] model dtype, requires grad
    completion_ids: torch.Tensor  # [B, T] int64
    completion_mask: torch.Tensor  # [B, T] int64 (TRL's convention), right padding
    advantages: torch.Tensor  # [B] float32
    old_logprobs: torch.Tensor  # [B, T] float32
    ref_logprobs: torch.Tensor  # [B, T] float32
    reference_logprobs: torch.Tensor  # [B, T] float32: the current policy's, in float32 (value checks)

    def for_nograd_pass(self) -> "Inputs":
        """The inputs of an old / reference log-prob pass: hidden states from a no-grad forward
        do not require grad (the LM head, a parameter, still does). Liger's kernel, e.g., skips
        its in-forward gradient work only then."""
        return replace(self, hidden=self.hidden.detach())

    @property
    def targets(self) -> torch.Tensor:
        """completion_ids with padding replaced by ignore_index, for the log-prob-only APIs."""
        return torch.where(self.completion_mask.bool(), self.completion_ids, IGNORE_INDEX)


@torch.no_grad()
def reference_logprobs(hidden, weight, ids, max_chunk_bytes=1 << 30):
    """float32 log-probs computed in float32, in row chunks (never the whole [N, V] logits)."""
    flat_hidden, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    weight32 = weight.float()
    rows = max(1, max_chunk_bytes // (4 * weight.shape[0]))
    out = torch.empty(flat_ids.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_ids.numel(), rows):
        logits = flat_hidden[start:start + rows].float() @ weight32.t()
        out[start:start + rows] = logits.log_softmax(-1).gather(-1, flat_ids[start:start + rows, None])[:, 0]
    return out.view(ids.shape)


def make_inputs(shape, device, *, seed: int = 0, rotations: int = 1, share_weight: bool = True,
                logits: str = "random", full_length: bool = False) -> list[Inputs]:
    """``rotations`` independent input sets for ``shape`` (so timed runs can cycle through them and
    no run finds the previous one's data in cache); all sets share one LM head when
    ``share_weight`` (a multi-GB weight cannot be cached anyway).

    ``logits``: ``"random"`` (weight N(0, 0.02^2), hidden N(0, 1), uniform token ids: a nearly
    flat softmax) or ``"realistic"`` (``benchmarks.logits``: a trained LM's distributions, ids
    sampled from the model's own softmax). ``full_length``: every completion is T tokens long
    (else right-padded, lengths T/2 .. T)."""
    from benchmarks import logits as logit_modes

    if logits not in logit_modes.MODES:
        raise ValueError(f"logits must be one of {logit_modes.MODES}, got {logits!r}")
    generator = torch.Generator(device=device).manual_seed(seed)  # on the device: GB of randn in ms

    sets = []
    weight = None
    for _ in range(rotations):
        if weight is None or not share_weight:
            make_head = logit_modes.realistic_head if logits == "realistic" else logit_modes.random_head
            weight = make_head(shape.V, shape.D, dtype=shape.dtype, device=device, generator=generator)
            weight.requires_grad_()
        if logits == "realistic":
            flat = logit_modes.realistic_hidden(weight.detach(), shape.B * shape.T, generator=generator)
            ids = logit_modes.sample_targets(flat, weight.detach(), generator=generator).view(shape.B, shape.T)
            hidden = flat.view(shape.B, shape.T, shape.D).requires_grad_()
        else:
            hidden = torch.randn(shape.B, shape.T, shape.D, generator=generator, device=device).to(shape.dtype)
            hidden.requires_grad_()
            ids = torch.randint(0, shape.V, (shape.B, shape.T), generator=generator, device=device)
        if full_length:
            mask = torch.ones(shape.B, shape.T, dtype=torch.long, device=device)
        else:  # right-padded completions of T/2 .. T tokens
            lengths = torch.randint(max(1, shape.T // 2), shape.T + 1, (shape.B,), generator=generator, device=device)
            mask = (torch.arange(shape.T, device=device)[None, :] < lengths[:, None]).long()
        advantages = torch.randn(shape.B, generator=generator, device=device)
        current = reference_logprobs(hidden.detach(), weight.detach(), ids)
        old = current + 0.05 * torch.randn(shape.B, shape.T, generator=generator, device=device)
        ref = current + 0.1 * torch.randn(shape.B, shape.T, generator=generator, device=device)
        sets.append(Inputs(hidden, weight, ids, mask, advantages, old, ref, current))
    return sets


# ---------------------------------------------------------------------------------------------
# TRL's loss math, shared by the eager baselines
# ---------------------------------------------------------------------------------------------


def eager_grpo_loss(per_token_logps, completion_mask, advantages, old_logprobs, ref_logprobs, *,
                    entropies=None, loss_type, beta, epsilon_low, epsilon_high, temperature=1.0):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` after the log-probs, for the clipped loss types on a
    single process without gradient accumulation (so dapo's normalizer is the micro-batch's token
    count). Metrics stay tensors (TRL calls ``.item()`` on each, a host sync not charged here)."""
    del temperature  # already applied to the logits
    mask = completion_mask.to(per_token_logps.dtype)
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_logprobs)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_logprobs - per_token_logps) - (ref_logprobs - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        raise ValueError(f"the eager baselines implement grpo, bnpo and dapo, not {loss_type!r}")

    def masked_mean(x):
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    with torch.no_grad():
        is_low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        is_high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        metrics = {
            "clip_ratio/low_mean": masked_mean(is_low.float()),
            "clip_ratio/high_mean": masked_mean(is_high.float()),
            "clip_ratio/region_mean": masked_mean((is_low | is_high).float()),
        }
        if beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl)
        if entropies is not None:
            metrics["entropy"] = masked_mean(entropies)
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# The implementations
# ---------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """``logprobs_diff(inp)``: differentiable per-token log-probs ``[B, T]`` (padding ignored);
    the no-grad pass and the log-prob forward + backward op are derived from it."""

    name: str
    description: str
    loss: Callable[[Inputs], torch.Tensor] | None = None
    logprobs_diff: Callable[[Inputs], torch.Tensor] | None = None
    skip_reason: str | None = None  # set when the implementation cannot run here
    version: str = ""
    skip_ops: dict = field(default_factory=dict)  # "loss" -> why this implementation cannot run it here

    def logprobs(self, inp: Inputs) -> torch.Tensor:
        """The no-grad log-prob pass (old / reference log-probs)."""
        with torch.no_grad():
            return self.logprobs_diff(inp)

    def logprobs_loss(self, inp: Inputs) -> torch.Tensor:
        """Masked mean of the log-probs: the log-prob op's forward + backward without the loss."""
        per_token_logps = self.logprobs_diff(inp)
        mask = inp.completion_mask.float()
        return (per_token_logps.float() * mask).sum() / mask.sum().clamp(min=1.0)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _scaled(hidden, temperature):
    # logits / T == (hidden / T) @ W.T for the peers whose log-prob API has no temperature.
    return hidden if temperature == 1.0 else hidden / temperature


def _torch_impl(options) -> Impl:
    def logprobs_of(inp):
        logits = inp.hidden @ inp.lm_head_weight.t()
        logits = logits.float() / options["temperature"]
        return logits.log_softmax(-1).gather(-1, inp.completion_ids.unsqueeze(-1)).squeeze(-1)

    def loss(inp):
        return eager_grpo_loss(logprobs_of(inp), inp.completion_mask, inp.advantages, inp.old_logprobs,
                               inp.ref_logprobs, **options)[0]

    return Impl("torch", "eager PyTorch: [N, V] logits, fp32 log_softmax + gather, TRL's loss math",
                loss, logprobs_of, version=torch.__version__)


def _trl_impl(options) -> Impl:
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except ImportError as exc:
        return Impl("trl", "", skip_reason=f"trl is not installed ({exc})")

    def logits_of(inp):
        # TRL <= 1.15's _get_per_token_logps_and_entropies: logits in the model dtype, / temperature.
        return (inp.hidden @ inp.lm_head_weight.t()) / options["temperature"]

    def loss(inp):
        logits = logits_of(inp)
        per_token_logps = selective_log_softmax(logits, inp.completion_ids)
        with torch.no_grad():
            entropies = entropy_from_logits(logits)
        return eager_grpo_loss(per_token_logps, inp.completion_mask, inp.advantages, inp.old_logprobs,
                               inp.ref_logprobs, entropies=entropies, **options)[0]

    def logprobs(inp):
        return selective_log_softmax(logits_of(inp), inp.completion_ids)

    return Impl("trl", "TRL's selective_log_softmax (on CUDA its Triton kernel) on [N, V] model-dtype logits "
                "+ entropy_from_logits, TRL's loss math",
                loss, logprobs, version=_version("trl"))


def _trl_chunk_size() -> int:
    """TRL's ``_CHUNKED_LOGPROB_CHUNK_SIZE`` (what its trainer passes). ``trl.trainer.utils``
    imports ``datasets``; where that cannot import (e.g. a GPU image whose pyarrow is too old for
    the carried datasets wheel), the constant is read from TRL's own source instead."""
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError:
        import ast
        import importlib.util

        origin = importlib.util.find_spec("trl.trainer.utils").origin
        for node in ast.parse(open(origin, encoding="utf-8").read()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_CHUNKED_LOGPROB_CHUNK_SIZE"
                                                    for t in node.targets):
                return ast.literal_eval(node.value)
        raise LookupError(f"no _CHUNKED_LOGPROB_CHUNK_SIZE in {origin}")


def _trl_fused_impl(options) -> Impl:
    """TRL 1.16's own GRPOTrainer path: ``add_fused_lm_head`` runs ChunkedLogProbFunction on the
    unmasked tokens only (log-probs and entropy), then the loss math. Not in issue 4's list of
    five: issue 4 describes TRL's previous, materializing path (``trl``); this is what TRL 1.16
    actually runs."""
    try:
        from trl.kernels import ChunkedLogProbFunction

        chunk_size = _trl_chunk_size()
    except (ImportError, LookupError) as exc:
        return Impl("trl_fused", "", skip_reason=f"trl >= 1.16 with trl.kernels is not installed ({exc})")

    def per_token(inp, outputs):
        mask = inp.completion_mask.bool()
        log_probs, entropy, *_ = ChunkedLogProbFunction.apply(
            inp.hidden[mask], inp.lm_head_weight, None, inp.completion_ids[mask], options["temperature"],
            chunk_size, None, 1.0, outputs,
        )
        scatter = lambda x: None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)  # noqa: E731
        return scatter(log_probs), scatter(entropy)

    def loss(inp):
        per_token_logps, entropies = per_token(inp, ("log_probs", "entropy"))
        return eager_grpo_loss(per_token_logps, inp.completion_mask, inp.advantages, inp.old_logprobs,
                               inp.ref_logprobs, entropies=entropies, **options)[0]

    def logprobs(inp):
        return per_token(inp, ("log_probs",))[0]

    return Impl("trl_fused", "TRL 1.16 GRPOTrainer: ChunkedLogProbFunction (fused LM head) + TRL's loss math",
                loss, logprobs, version=_version("trl"))


def _liger_impl(options, device) -> Impl:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        return Impl("liger", "", skip_reason=f"liger-kernel is not installed ({exc})")
    # torch.compile on CPU would take minutes per shape: the CPU smoke runs Liger eagerly.
    compiled = device.type == "cuda"
    module = LigerFusedLinearGRPOLoss(
        beta=options["beta"], compiled=compiled, use_ref_model=True, loss_type=options["loss_type"],
        epsilon_low=options["epsilon_low"], epsilon_high=options["epsilon_high"],
        temperature=options["temperature"],
    )

    def loss(inp):
        return module(inp.hidden, inp.lm_head_weight, inp.completion_ids, inp.completion_mask, inp.advantages,
                      ref_per_token_logps=inp.ref_logprobs, old_per_token_logps=inp.old_logprobs)[0]

    def logprobs(inp):
        # Liger's fused linear cross-entropy, per token: -log p.
        hidden = _scaled(inp.hidden, options["temperature"]).reshape(-1, inp.hidden.shape[-1])
        nll = liger_fused_linear_cross_entropy(hidden, inp.lm_head_weight, inp.targets.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="none")
        return -nll.view(inp.completion_ids.shape)

    description = (f"Liger-Kernel LigerFusedLinearGRPOLoss({'compiled' if compiled else 'compiled=False'}, "
                   "chunk_size=1); log-probs: liger_fused_linear_cross_entropy(reduction='none')")
    return Impl("liger", description, loss, logprobs, version=_version("liger-kernel"))


def _cce_impl(options, device) -> Impl:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        return Impl("cce", "", skip_reason=f"cut-cross-entropy is not installed ({exc})")
    if device.type != "cuda":
        return Impl("cce", "", skip_reason="Cut Cross-Entropy's Triton kernels need a CUDA GPU "
                    "(they fail under TRITON_INTERPRET)")
    import grpo_kernels as gk

    def logprobs_of(inp):
        hidden = _scaled(inp.hidden, options["temperature"])
        return -linear_cross_entropy(hidden, inp.lm_head_weight, inp.targets, ignore_index=IGNORE_INDEX,
                                     reduction="none")

    def loss(inp):
        return gk.grpo_loss(logprobs_of(inp), inp.completion_mask, inp.advantages, old_logprobs=inp.old_logprobs,
                            ref_logprobs=inp.ref_logprobs, **options)[0]

    return Impl("cce", "Cut Cross-Entropy linear_cross_entropy(reduction='none', default filter_eps) + our grpo_loss",
                loss, logprobs_of, version=_version("cut-cross-entropy"))


# Our variants (the stage-1 kit measures each): name -> (keyword arguments of token_logprobs and
# fused_linear_grpo_loss, what it is). ``backward`` (issue #18: "workspace", the default, or
# "atomic") reaches a function only when its signature has it (see ``ours_keywords``).
OURS_VARIANTS = {
    "ours": ({}, "default: workspace backward (d logits, then cuBLAS GEMMs; no atomics), float32 accumulation, "
                 "4 matmuls"),
    "ours_filtered": ({"filter_eps": 2.0**-12}, "default + filter_eps=2**-12 (CCE-style gradient filtering)"),
    "ours_atomic": ({"backward": "atomic"}, "backward='atomic', exact: float32 atomics, 5 matmuls"),
    "ours_fast": ({"backward": "atomic", "exact": False},
                  "backward='atomic', exact=False: single pass, d weight accumulated in its dtype, 4 matmuls"),
    "ours_fast_filtered": ({"backward": "atomic", "exact": False, "filter_eps": 2.0**-12},
                           "backward='atomic', exact=False, filter_eps=2**-12"),
}


def _accepts(fn, keyword: str) -> bool:
    import inspect

    return keyword in inspect.signature(fn).parameters


def default_backward() -> str:
    """token_logprobs' default backward: its ``backward`` keyword's default, or "atomic" before
    issue #18 added the keyword (the one backward then)."""
    import inspect

    import grpo_kernels as gk

    parameter = inspect.signature(gk.token_logprobs).parameters.get("backward")
    return parameter.default if parameter is not None else "atomic"


def variant_backward(name: str) -> tuple[str, bool]:
    """(backward, exact) that variant ``name`` runs."""
    kwargs = OURS_VARIANTS[name][0]
    return kwargs.get("backward", default_backward()), kwargs.get("exact", True)


def ours_keywords(name: str, fn) -> tuple[dict | None, str | None]:
    """The keywords variant ``name`` passes to ``fn`` (``token_logprobs`` or
    ``fused_linear_grpo_loss``), or (None, why) when ``fn`` cannot run it. A function without a
    ``backward`` keyword (all of them before issue #18) runs token_logprobs' default backward:
    asking for that one drops the keyword, asking for another cannot run."""
    kwargs = dict(OURS_VARIANTS[name][0])
    wanted = kwargs.get("backward")
    if wanted is None or _accepts(fn, "backward"):
        return kwargs, None
    runs = default_backward()
    if wanted != runs:
        return None, f"{fn.__name__} has no backward= keyword: it runs the default backward ({runs!r}), not {wanted!r}"
    del kwargs["backward"]
    if not kwargs:
        return None, (f"same as 'ours': {fn.__name__} has no backward= keyword, and its default backward is "
                      f"{runs!r} (issue #18 not merged)")
    return kwargs, None


def _ours_impl(options, device, name="ours") -> Impl:
    import grpo_kernels as gk

    what = OURS_VARIANTS[name][1]
    # On CPU (the smoke) the PyTorch path: the Triton interpreter would take seconds per call;
    # tests/ exercise the kernels themselves.
    backend = "auto" if device.type == "cuda" else "torch"
    logprob_kwargs, logprob_skip = ours_keywords(name, gk.token_logprobs)
    loss_kwargs, loss_skip = ours_keywords(name, gk.fused_linear_grpo_loss)
    if logprob_kwargs is None:
        return Impl(name, "", skip_reason=logprob_skip)

    def loss(inp):
        return gk.fused_linear_grpo_loss(inp.hidden, inp.lm_head_weight, inp.completion_ids, inp.completion_mask,
                                         inp.advantages, old_logprobs=inp.old_logprobs,
                                         ref_logprobs=inp.ref_logprobs, backend=backend, **loss_kwargs,
                                         **options)[0]

    def logprobs(inp):
        return gk.token_logprobs(inp.hidden, inp.lm_head_weight, inp.targets, temperature=options["temperature"],
                                 ignore_index=IGNORE_INDEX, backend=backend, **logprob_kwargs)

    description = f"grpo_kernels.fused_linear_grpo_loss; log-probs: grpo_kernels.token_logprobs; {what}"
    if backend == "torch":
        description += " (PyTorch backend on CPU)"
    impl = Impl(name, description, loss if loss_kwargs is not None else None, logprobs,
                version=_version("grpo-kernels") or gk.__version__)
    if loss_kwargs is None:
        impl.skip_ops["loss"] = loss_skip
    return impl


IMPL_NAMES = ("torch", "trl", "trl_fused", "liger", "cce", "ours")


def build_impls(device: torch.device, names=IMPL_NAMES, options=None) -> list[Impl]:
    """The implementations in ``names`` order; a peer that cannot run here comes back with
    ``skip_reason`` set (the suite prints it and records it)."""
    options = dict(LOSS_OPTIONS if options is None else options)
    builders = {
        "torch": lambda: _torch_impl(options),
        "trl": lambda: _trl_impl(options),
        "trl_fused": lambda: _trl_fused_impl(options),
        "liger": lambda: _liger_impl(options, device),
        "cce": lambda: _cce_impl(options, device),
        **{variant: (lambda variant=variant: _ours_impl(options, device, variant)) for variant in OURS_VARIANTS},
    }
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {list(builders)}")
    return [builders[name]() for name in names]


# ---------------------------------------------------------------------------------------------
# Group advantages
# ---------------------------------------------------------------------------------------------


def trl_group_advantages(rewards_per_func, reward_weights, num_generations):
    """TRL 1.16 ``_generate_and_score_completions`` (sum_then_normalize, scale_rewards="group"):
    its lines from the reward matrix to the advantages, with TRL's own nanstd."""
    from trl.trainer.utils import nanstd

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    advantages = (rewards - mean_grouped_rewards) / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def build_advantage_impls(names=IMPL_NAMES) -> dict[str, Callable]:
    """name -> fn(rewards [B, K], reward_weights [K], group_size) -> advantages [B], for the
    implementations that compute group advantages (TRL's torch code and ours)."""
    impls = {}
    if "trl" in names:
        try:
            import trl.trainer.utils  # noqa: F401

            impls["trl"] = lambda rewards, weights, group_size: trl_group_advantages(rewards, weights, group_size)[0]
        except ImportError as exc:
            print(f"[bench] advantages/trl: skipped, trl is not installed ({exc})")
    if "ours" in names:
        import grpo_kernels as gk

        impls["ours"] = lambda rewards, weights, group_size: gk.group_advantages(
            rewards, group_size, reward_weights=weights).advantages
    return impls
