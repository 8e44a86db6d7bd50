"""Input modes for the LM head: random (a nearly flat softmax) and realistic (a trained LM's shape).

Random weights at scale 0.02 give every row a softmax close to uniform over V (entropy near
log V = 11.9 nats at V = 151936, sampled-token log-probs near -12): no trained model looks like
that, and it hides what gradient filtering (``filter_eps``) skips, since with a flat softmax no
``d logit`` is small. ``realistic_head`` builds logits shaped like a trained LM's on its own
samples:

    z_n[v] = alpha * prior[v]  +  sum_j a_nj <E_cj, E_v>  +  sigma * <u_n, E_v>

- ``prior[v] = -log(rank_v)``: a Zipf unigram prior (exponent ``alpha``), carried by the last
  hidden dimension (``weight[:, -1] = prior``, ``hidden[:, -1] = alpha``): the long tail;
- ``E``: near-unit random token embeddings in the other ``D - 1`` dimensions; each hidden state is
  aligned with a few candidate tokens ``c_nj`` (drawn from the prior, like frequent tokens) with
  heights ``a_nj`` (one peak per row, uniform in ``peak_range``, the next candidates a little
  lower): rows range from confident (entropy near 0) to undecided (several nats);
- ``sigma * <u_n, E_v>``: per-row logit noise of standard deviation ``sigma``.

The weight is a structured (rank-D, Zipf-column) matrix, the hidden states lie near a few of its
rows, and the targets are sampled from the model's own softmax (Gumbel-max over float32 logits of
the 16-bit tensors the kernels see), so the sampled-token log-probs come out mostly in [-3, 0]
with a tail. ``logit_stats`` measures what was built; the kit reports it next to its timings.
"""

from __future__ import annotations

import math

import torch

MODES = ("random", "realistic")
CHUNK_BYTES = 1 << 30  # float32 logits held at once while sampling / measuring


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def random_head(vocab, dim, *, dtype, device, generator, scale=0.02) -> torch.Tensor:
    """[V, D] weight with i.i.d. N(0, scale^2) entries (the suite's historical input)."""
    return (torch.randn(vocab, dim, generator=generator, device=device) * scale).to(dtype)


def realistic_head(vocab, dim, *, dtype, device, generator, alpha=1.25) -> torch.Tensor:
    """[V, D] weight: near-unit random token embeddings in D - 1 dimensions, and a Zipf prior
    ``-log(rank)`` (a random rank per token) in the last one."""
    if dim < 2:
        raise ValueError(f"the realistic head needs D >= 2, got {dim}")
    weight = torch.randn(vocab, dim, generator=generator, device=device) / math.sqrt(dim - 1)
    ranks = torch.randperm(vocab, generator=generator, device=device).float() + 1
    weight[:, -1] = -torch.log(ranks) * alpha
    return weight.to(dtype)


def realistic_hidden(weight, num_rows, *, generator, num_candidates=3, peak_range=(1.5, 11.0), sigma=0.6,
                     dtype=None) -> torch.Tensor:
    """[N, D] hidden states near ``num_candidates`` rows of ``weight`` each (see the module doc)."""
    vocab, dim = weight.shape
    device = weight.device
    embeddings = weight[:, :-1].float()
    prior = weight[:, -1].float()
    # Candidates drawn from the prior itself (frequent tokens are likelier candidates).
    candidates = torch.multinomial(torch.softmax(prior, 0), num_rows * num_candidates, replacement=True,
                                   generator=generator).view(num_rows, num_candidates)
    low, high = peak_range
    peak = low + (high - low) * torch.rand(num_rows, 1, generator=generator, device=device)
    gaps = torch.cat([torch.zeros(num_rows, 1, device=device),
                      torch.rand(num_rows, num_candidates - 1, generator=generator, device=device) * 3], 1)
    heights = (peak - gaps.cumsum(1)).clamp(min=0)  # [N, C]
    # <E_c, E_c> ~ 1: dividing by the squared norm puts the candidate's logit at its height.
    chosen = embeddings[candidates]  # [N, C, D-1]
    scale = heights / chosen.pow(2).sum(-1).clamp(min=1e-6)
    hidden = torch.empty(num_rows, dim, device=device)
    hidden[:, :-1] = (scale[..., None] * chosen).sum(1)
    hidden[:, :-1] += sigma * torch.randn(num_rows, dim - 1, generator=generator, device=device)
    hidden[:, -1] = 1.0
    return hidden.to(dtype or weight.dtype)


@torch.no_grad()
def sample_targets(hidden, weight, *, generator, temperature=1.0) -> torch.Tensor:
    """[N] token ids sampled from softmax(hidden @ weight.T / temperature) (Gumbel-max, float32)."""
    weight32 = weight.float()
    rows = _rows_per_chunk(weight.shape[0])
    out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = hidden[start:start + rows].float() @ weight32.t() / temperature
        uniform = torch.rand(logits.shape, generator=generator, device=hidden.device).clamp_(min=1e-20)
        out[start:start + rows] = (logits - torch.log(-torch.log(uniform))).argmax(-1)
    return out


@torch.no_grad()
def logit_stats(hidden, weight, targets, *, max_rows=4096) -> dict:
    """What the distributions look like (float32, over up to ``max_rows`` rows): quantiles of the
    sampled tokens' log-probs and of the entropies, the fraction of log-probs in [-3, 0], the
    median top-1 probability, and the fraction of ``|d logit|`` under 2**-12 (what filtering skips)."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1])[:max_rows], targets.reshape(-1)[:max_rows]
    weight32 = weight.float()
    rows = _rows_per_chunk(weight.shape[0])
    logps, entropies, top1, small = [], [], [], 0
    for start in range(0, hidden.shape[0], rows):
        log_p = (hidden[start:start + rows].float() @ weight32.t()).log_softmax(-1)
        p = log_p.exp()
        logps.append(log_p.gather(1, targets[start:start + rows, None].long())[:, 0])
        entropies.append(-(p * log_p).sum(-1))
        top1.append(p.max(-1).values)
        small += int((p < 2.0**-12).sum())  # |d logit| = p off the target, for g = 1
    logp, entropy = torch.cat(logps).double().cpu(), torch.cat(entropies).double().cpu()
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)

    def q(x):
        return [round(v, 3) for v in torch.quantile(x, quantiles).tolist()]

    return {
        "rows": int(logp.numel()), "vocab": int(weight.shape[0]),
        "logp_q05_q25_q50_q75_q95": q(logp), "logp_mean": round(logp.mean().item(), 3),
        "frac_logp_in_-3_0": round(((logp >= -3) & (logp <= 0)).double().mean().item(), 3),
        "frac_logp_below_-10": round((logp < -10).double().mean().item(), 4),
        "entropy_q05_q25_q50_q75_q95": q(entropy), "entropy_mean": round(entropy.mean().item(), 3),
        "top1_prob_median": round(torch.cat(top1).double().median().item(), 3),
        "frac_probs_below_2^-12": round(small / (logp.numel() * weight.shape[0]), 4),
    }
