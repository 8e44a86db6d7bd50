"""grpo_loss is a PyTorch custom op (``grpo_kernels::grpo_loss``): ``torch.library.opcheck`` passes,
and a training step under ``torch.compile(fullgraph=True)`` calls it without graph breaks, with
the eager loss and gradients."""

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.ops import grpo_loss as grpo_loss_module
from grpo_kernels.ops.grpo_loss.op import COUNT_OPTIONS
from test_grpo_loss import make_batch, make_fused
from test_packed_loss import make_packed


def op_args(batch, backend, **options):
    cfg, t = grpo_loss_module.prepare_loss_inputs(
        batch["logp"].shape, batch["logp"].device, batch["mask"], batch["adv"], old_logprobs=batch["old"],
        ref_logprobs=batch["ref"], entropy=batch["entropy"], **options)
    logp = batch["logp"].clone().requires_grad_()
    entropy = batch["entropy"].clone().requires_grad_()
    counts = [getattr(cfg, n).float() if isinstance(getattr(cfg, n), torch.Tensor) else None
              for n in COUNT_OPTIONS]
    return (logp, entropy, t["mask"], t["advantages"], t["old"], t["ref"], t["sampling"], t["is_ratio"], *counts,
            None, t["cu_seqlens"], cfg.as_json(), backend, cfg.entropy_coef != 0)  # None: no Clip-Cov draw seed


@pytest.mark.parametrize("backend,options,packed", [
    ("torch", dict(loss_type="dapo", beta=0.04, entropy_coef=0.01, num_items_in_batch=torch.tensor(20.0)), False),
    ("triton", dict(loss_type="vespo", top_entropy_quantile=0.5), False),
    ("torch", dict(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.01), True),
    ("triton", dict(loss_type="rloo", rollout_rs="seq_max_k2", rollout_rs_threshold=0.1, bypass_mode=True), True),
], ids=["torch-dapo", "triton-vespo", "torch-gspo-packed", "triton-rloo-packed"])
def test_opcheck(backend, options, packed):
    if packed:
        batch = make_packed()
        options["cu_seqlens"] = batch["cu"]
    else:
        batch = make_batch()
    torch.library.opcheck(torch.ops.grpo_kernels.grpo_loss.default, op_args(batch, backend, **options),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_fullgraph_packed():
    batch = make_packed()

    def step(logp):
        return gk.grpo_loss(logp[None], batch["mask"], batch["adv"], old_logprobs=batch["old"],
                            cu_seqlens=batch["cu"], loss_type="grpo", importance_sampling_level="sequence",
                            backend="torch")[0]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        logp = batch["logp"].clone().requires_grad_()
        loss = fn(logp)
        loss.backward()
        results.append((loss.detach(), logp.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_matches_eager():
    batch = make_batch()
    num_items = batch["mask"].sum().float()

    def step(logp, entropy):
        loss, metrics = gk.grpo_loss(logp, batch["mask"], batch["adv"], old_logprobs=batch["old"],
                                     ref_logprobs=batch["ref"], entropy=entropy, loss_type="dapo", beta=0.04,
                                     entropy_coef=0.01, top_entropy_quantile=0.6, num_items_in_batch=num_items,
                                     backend="torch")
        return loss * 2.0, metrics["clip_ratio/region_mean"]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        logp = batch["logp"].clone().requires_grad_()
        entropy = batch["entropy"].clone().requires_grad_()
        loss, clip = fn(logp, entropy)
        loss.backward()
        results.append((loss.detach(), clip, logp.grad, entropy.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_compile_keeps_the_value_checks():
    batch = make_batch()
    mask = batch["mask"].float()
    mask[0, 0] = float("nan")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(logp):
        return gk.grpo_loss(logp, mask, batch["adv"], backend="torch")[0]

    with pytest.raises(Exception, match="completion_mask must be finite"):
        step(batch["logp"].clone().requires_grad_())


def test_fused_compile_fullgraph_matches_eager():
    batch, hidden, weight, bias, ids = make_fused()

    def step(hidden, weight):
        return gk.fused_linear_grpo_loss(hidden, weight, ids, batch["mask"], batch["adv"], old_logprobs=batch["old"],
                                         loss_type="grpo", backend="torch")[0]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_completion_targets_opcheck():
    _, _, weight, _, ids = make_fused()
    mask = (torch.rand(ids.shape) > 0.3).long()
    ids = ids.clamp(max=weight.shape[0] - 1)
    torch.library.opcheck(torch.ops.grpo_kernels.completion_targets.default, (ids, mask, weight.shape[0]),
                          test_utils=("test_schema", "test_faketensor"))
