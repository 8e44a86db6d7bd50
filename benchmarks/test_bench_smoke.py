"""CPU smoke of the benchmark suite: ``pytest benchmarks/ --benchmark-enable --benchmark-only`` (seconds).

Tiny shapes; numbers from here mean nothing about GPU performance. What it checks: every
implementation runs on the same inputs and computes the same loss and log-probs as the float32
reference, peers that cannot run are reported, and the suite writes its JSON / Markdown / PNG
outputs (into pytest's tmp dir, never benchmarks/results/).
"""

import json

import pytest
import torch

from benchmarks import heads, report, shapes, suite
from benchmarks import impls as impls_module

DEVICE = torch.device("cpu")
SMOKE_SHAPE = shapes.Shape("smoke", 2, 8, 32, 97, torch.float32, "N")


@pytest.fixture(scope="module")
def impl_table():
    return {impl.name: impl for impl in impls_module.build_impls(DEVICE)}


@pytest.fixture(scope="module")
def smoke_inputs():
    return impls_module.make_inputs(SMOKE_SHAPE, DEVICE, seed=1, rotations=2, share_weight=False)


def _runnable(impl_table, name, op):
    impl = impl_table[name]
    if impl.skip_reason:
        pytest.skip(f"{name}: {impl.skip_reason}")
    return getattr(impl, op)


@pytest.mark.parametrize("name", impls_module.IMPL_NAMES)
def test_loss_fwd_bwd(benchmark, impl_table, smoke_inputs, name):
    loss_fn = _runnable(impl_table, name, "loss")
    counter = iter(range(10**6))

    def step():
        inp = smoke_inputs[next(counter) % len(smoke_inputs)]
        loss = loss_fn(inp)
        return inp, loss, torch.autograd.grad(loss, [inp.hidden, inp.lm_head_weight])

    inp, loss, (grad_hidden, grad_weight) = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    reference = impls_module.eager_grpo_loss(inp.reference_logprobs, inp.completion_mask, inp.advantages,
                                             inp.old_logprobs, inp.ref_logprobs, **impls_module.LOSS_OPTIONS)[0]
    torch.testing.assert_close(loss.detach().float(), reference, rtol=1e-4, atol=1e-5)
    assert grad_hidden.shape == inp.hidden.shape and grad_weight.shape == inp.lm_head_weight.shape
    assert torch.isfinite(grad_hidden).all() and grad_hidden.abs().sum() > 0


@pytest.mark.parametrize("name", impls_module.IMPL_NAMES)
def test_logprobs_nograd(benchmark, impl_table, smoke_inputs, name):
    logprobs_fn = _runnable(impl_table, name, "logprobs")
    inp = smoke_inputs[0].for_nograd_pass()
    logprobs = benchmark.pedantic(lambda: logprobs_fn(inp), rounds=3, warmup_rounds=1)
    assert not logprobs.requires_grad
    mask = inp.completion_mask.bool()
    torch.testing.assert_close(logprobs.float()[mask], inp.reference_logprobs[mask], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def head_table():
    return {impl.name: impl for impl in heads.build_head_impls(DEVICE)}


@pytest.mark.parametrize("op", list(heads.HEAD_OPS))
@pytest.mark.parametrize("name", heads.HEAD_IMPLS)
def test_head_ops(benchmark, head_table, smoke_inputs, name, op):
    """Issue 19's head operations (per-token statistics, the distillation divergence): ours, TRL
    1.16's own head and divergence, and materialized logits, on the same inputs, each checked
    against the float32 reference."""
    impl = head_table[name]
    if impl.skip_reason:
        pytest.skip(f"{name}: {impl.skip_reason}")
    step = heads.head_step(impl, op, smoke_inputs)
    counter = iter(range(10**6))
    result = benchmark.pedantic(lambda: step(next(counter) % len(smoke_inputs)), rounds=3, warmup_rounds=1)
    if heads.HEAD_OPS[op][1]:  # the gradients w.r.t. hidden and the LM head
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in result)
    assert heads.value_check(impl, op, smoke_inputs[0]) < 1e-4


@pytest.mark.parametrize("name", ["trl", "ours"])
def test_group_advantages(benchmark, name):
    fn = impls_module.build_advantage_impls((name,))[name]
    rewards = torch.randn(64, 3)
    rewards[torch.rand(64, 3) < 0.1] = float("nan")
    weights = torch.tensor([1.0, 0.5, 2.0])
    advantages = benchmark.pedantic(lambda: fn(rewards, weights, 16), rounds=3, warmup_rounds=1)
    expected = impls_module.trl_group_advantages(rewards.clone(), weights, 16)[0]
    torch.testing.assert_close(advantages, expected, rtol=1e-4, atol=1e-5)


def test_suite_writes_reports(benchmark, tmp_path, capsys):
    # CPU numbers never land next to the GPU results.
    with pytest.raises(SystemExit, match="refusing"):
        suite.run_suite(smoke=True, out_dir=suite.RESULTS_ROOT / "cpu")
    assert not (suite.RESULTS_ROOT / "cpu").exists()

    out_dir = benchmark.pedantic(lambda: suite.run_suite(smoke=True, out_dir=tmp_path, cpu_runs=1),
                                 rounds=1, iterations=1)
    printed = capsys.readouterr().out
    records = json.loads((out_dir / "kernels.json").read_text())
    assert records and all(set(report.REQUIRED_KEYS) <= set(r) for r in records)
    skipped = {name for name, impl in ((i.name, i) for i in impls_module.build_impls(DEVICE)) if impl.skip_reason}
    for name in skipped:
        assert f"[bench] {name}: skipped" in printed
    for r in records:
        if r["impl"] in skipped:
            assert r["status"].startswith("skipped: ")
            continue
        assert r["status"] == "ok", r
        assert r["ms_median"] > 0 and r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        if r["op"] in ("loss_fwd_bwd", "logprobs_nograd", "advantages"):  # value checks vs the reference
            assert r.get("check_abs_err") is not None and r["check_abs_err"] < 1e-4, r
    ops = {(r["impl"], r["op"]) for r in records}
    for name in set(impls_module.IMPL_NAMES) - skipped:
        assert {(name, "loss_fwd_bwd"), (name, "logprobs_nograd")} <= ops
    assert ("ours", "logprobs_fwd_bwd") in ops and ("ours", "advantages") in ops
    markdown = (out_dir / "kernels.md").read_text()
    assert "| N (B x T) |" in markdown and "ours" in markdown and "(x" in markdown
    assert json.loads((out_dir / "environment.json").read_text())["loss_options"] == impls_module.LOSS_OPTIONS
    assert list(out_dir.glob("loss_fwd_bwd_*_time.png")) and list(out_dir.glob("logprobs_nograd_*_time.png"))
