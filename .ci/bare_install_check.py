"""CI's bare-install check: after `pip install .` (no extras) into a fresh virtual environment,
`import grpo_kernels` works and every public op runs forward and backward on CPU.

The environment must hold only what `pip install .` brings (torch, triton and their own
dependencies): no numpy, no transformers. The ops take their PyTorch path (TRITON_INTERPRET is
not set). Prints one line per op; exits non-zero at the first failure.

    python .ci/bare_install_check.py
"""

from __future__ import annotations

import importlib.util
import os
import sys


def main() -> None:
    for name in ("numpy", "transformers"):
        if importlib.util.find_spec(name) is not None:
            sys.exit(f"bare_install_check: {name} is installed here; run this in a fresh venv with `pip install .` only")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bare_install_check: unset TRITON_INTERPRET (the interpreter needs numpy, which a bare install lacks)")

    import torch

    import grpo_kernels as gk

    torch.manual_seed(0)
    B, G, T, D, V = 4, 2, 6, 16, 50  # 2 prompts x 2 completions

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    def finite_grads(name, *tensors):
        for tensor in tensors:
            if tensor.grad is None or not torch.isfinite(tensor.grad).all() or not tensor.grad.abs().sum() > 0:
                raise SystemExit(f"bare_install_check: {name}: no finite, non-zero gradient")
        print(f"ok  {name}: forward + backward")

    completion_ids = torch.randint(0, V, (B, T))
    completion_mask = torch.ones(B, T)
    completion_mask[0, -2:] = 0

    # group_advantages, gfpo_keep_mask: rewards in, advantages / a mask out (no gradient to take)
    rewards = torch.randn(B)
    keep = gk.gfpo_keep_mask(-torch.arange(B, dtype=torch.float32), group_size=G, k=1)
    assert keep.dtype == torch.bool and keep.view(-1, G).sum(1).eq(1).all(), keep
    print("ok  gfpo_keep_mask: forward")
    advantages = gk.group_advantages(rewards, group_size=G, keep_mask=keep).advantages
    assert advantages.shape == (B,) and torch.isfinite(advantages).all(), advantages
    print("ok  group_advantages: forward")
    advantages = gk.group_advantages(rewards, group_size=G).advantages

    hidden, weight = leaf(B, T, D), leaf(V, D)
    logprobs = gk.token_logprobs(hidden, weight, completion_ids, temperature=0.7)
    assert logprobs.shape == (B, T) and (logprobs <= 0).all(), logprobs
    logprobs.sum().backward()
    finite_grads("token_logprobs", hidden, weight)

    policy = leaf(B, T)
    with torch.no_grad():
        policy.sub_(policy.abs().add(1.0))  # log-probs are negative
    old = (policy.detach() + 0.1 * torch.randn(B, T)).clamp(max=0.0)
    loss, _ = gk.grpo_loss(policy, completion_mask, advantages, old_logprobs=old, ref_logprobs=old, beta=0.04,
                           loss_type="dapo")
    loss.backward()
    finite_grads("grpo_loss", policy)

    hidden, weight = leaf(B, T, D), leaf(V, D)
    loss, _ = gk.fused_linear_grpo_loss(hidden, weight, completion_ids, completion_mask, advantages,
                                        old_logprobs=old, ref_logprobs=old, beta=0.04, loss_type="grpo",
                                        temperature=0.7)
    loss.backward()
    finite_grads("fused_linear_grpo_loss", hidden, weight)

    hidden, weight = leaf(B, T, D), leaf(V, D)
    module = gk.FusedLinearGRPOLoss(beta=0.04, loss_type="dapo")
    loss, _ = module(hidden, weight, completion_ids, completion_mask, advantages, ref_per_token_logps=old,
                     old_per_token_logps=old)
    loss.backward()
    finite_grads("FusedLinearGRPOLoss", hidden, weight)

    # fused_divergence: a student head against a teacher head (a wider one), and the top-k forms
    teacher_hidden, teacher_weight = torch.randn(B, T, D + 8), torch.randn(V, D + 8)
    for mode, extra in (("full", {}), ("student_topk", {"topk": 4})):
        hidden, weight = leaf(B, T, D), leaf(V, D)
        out = gk.fused_divergence(hidden, weight, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                  mode=mode, beta=0.5, temperature=0.9, mask=completion_mask, **extra)
        assert out.divergence.shape == (B, T) and (out.divergence >= -1e-6).all(), out.divergence
        out.divergence.sum().backward()
        finite_grads(f"fused_divergence({mode})", hidden, weight)
    hidden, weight = leaf(B, T, D), leaf(V, D)
    teacher_topk_logprobs, teacher_topk_ids = torch.log_softmax(torch.randn(B, T, V), dim=-1).topk(3, dim=-1)
    out = gk.fused_divergence(hidden, weight, teacher_topk_ids=teacher_topk_ids,
                              teacher_topk_logprobs=teacher_topk_logprobs, mode="teacher_topk")
    out.divergence.sum().backward()
    finite_grads("fused_divergence(teacher_topk)", hidden, weight)
    print(f"bare install: grpo_kernels {gk.__version__} on torch {torch.__version__}: every public op ran")


if __name__ == "__main__":
    main()
