"""The performance model (grpo_kernels/ops/perf_model.py): its L2 simulation on cases small enough
to count by hand, its closed forms, that it reads the shipped launch interface, and that
docs/performance.md holds its current output."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from grpo_kernels.ops import perf_model as pm

SHAPE_8K = pm.Shape(8192, 4096, 151936, torch.bfloat16)


def test_docs_in_sync():
    assert pm.docs_in_sync(), (
        "docs/performance.md is out of date: run `python -m grpo_kernels.ops.perf_model --write-docs`")


def _two_operands(hidden_bytes, weight_bytes):
    return (pm.Operand("hidden", hidden_bytes, "row"), pm.Operand("weight", weight_bytes, "col"))


def test_l2_reads_every_block_once_when_the_working_set_fits():
    # 4 row blocks x 2 columns of 3 tiles each, everything fits: each block comes from HBM once.
    order = pm.row_fastest_order(4, 2)
    tiles = [range(0, 3), range(3, 6)]
    misses = pm.simulate_l2(order, tiles, _two_operands(10, 1), concurrency=8, capacity=1000)
    assert misses == {"hidden": 4 * 10, "weight": 6 * 1}


def test_l2_thrashes_when_a_wave_does_not_fit():
    # One wave of 4 programs (rows 0-3, column 0) stepping through 5 tiles: per step 4 hidden blocks
    # of 10 B and a 1 B tile. With 45 B of cache they stay; with 35 B LRU evicts each block just
    # before its next use, and every step re-reads all four.
    order, tiles = pm.row_fastest_order(4, 1), [range(5)]
    assert pm.simulate_l2(order, tiles, _two_operands(10, 1), 4, 45)["hidden"] == 4 * 10
    assert pm.simulate_l2(order, tiles, _two_operands(10, 1), 4, 35)["hidden"] == 5 * 4 * 10


def test_accumulator_misses_cost_a_read_and_a_write():
    order, tiles = pm.row_fastest_order(2, 1), [range(1)]
    ops = _two_operands(10, 1) + (pm.Operand("acc", 4, "row", rmw=True),)
    assert pm.simulate_l2(order, tiles, ops, 2, 1000)["acc"] == 2 * 2 * 4


def test_grouped_order_keeps_row_blocks_of_a_group_together():
    assert pm.grouped_order(4, 2, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    assert pm.row_fastest_order(2, 2) == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_forward_raster_traffic_matches_the_static_analysis():
    # Issue #18's static analysis: the row-block-fastest forward (before #18) re-streams hidden, ~40 GB at
    # N=8192; grouping row blocks brings it to a few GB (the weight read once per group).
    launch = pm._shipped_launch()
    ungrouped = pm.forward_path(SHAPE_8K, pm.H100_SXM, launch, group_rows=None)
    assert 30e9 < ungrouped.sum("hbm_bytes") < 50e9
    grouped = pm.forward_path(SHAPE_8K, pm.H100_SXM, launch, group_rows=16)
    assert grouped.sum("hbm_bytes") < 6e9
    assert grouped.kernels[0].rereads["hidden"] == pytest.approx(1.0)
    assert grouped.kernels[0].rereads["weight"] == pytest.approx(64 / 16, rel=0.1)  # 64 row blocks / 16


def test_flops_atomics_and_rmw_follow_the_closed_forms():
    launch = pm._shipped_launch()
    n, d, v = SHAPE_8K.num_rows, SHAPE_8K.dim, SHAPE_8K.vocab
    rows = {r.path: r for r in pm.model(SHAPE_8K, pm.H100_SXM, launch)["rows"]}
    assert rows["fwd+bwd, workspace"].gemms == pytest.approx(4.0)
    assert rows["fwd+bwd, atomic, exact=True"].gemms == pytest.approx(5.0)
    assert rows["fwd+bwd, atomic, exact=False"].gemms == pytest.approx(4.0)
    assert rows["backward, workspace"].atomic_gb == 0
    block_n, block_v = launch.GPU_CONFIG["bwd_atomic"][torch.bfloat16][:2]
    # exact=True: d hidden (float32) per vocabulary tile, d weight (float32) per row block
    assert rows["backward, atomic, exact=True"].atomic_gb * 1e9 == pytest.approx(
        n * v * d * 4 / block_v + n * v * d * 4 / block_n)
    assert rows["backward, atomic, exact=False"].atomic_gb * 1e9 == pytest.approx(
        n * v * d * 4 / block_v + n * v * d * 2 / block_n)
    plan = launch.backward_plan(n, v, d, torch.bfloat16)
    chunks = -(-v // plan.ids_per_chunk)
    # the float32 d hidden accumulator: written by the first chunk, read and written by the others
    assert rows["backward, workspace"].rmw_gb * 1e9 == pytest.approx(n * d * 4 * (2 * chunks - 1))


def test_the_model_reads_the_launch_interface():
    launch = pm._shipped_launch()
    for name in ("GPU_CONFIG", "FORWARD_GROUP_ROWS", "BACKWARD_GROUP_ROWS", "FORWARD_PARTIAL_BYTES",
                 "INVARIANT_SPLIT_VOCAB", "DEFAULT_WORKSPACE_BYTES", "ATOMIC_GRAD_CHUNK_BYTES", "forward_splits",
                 "backward_plan", "source"):
        assert hasattr(launch, name), name
    assert set(launch.GPU_CONFIG) >= {"fwd", "merge", "dlogits", "bwd_atomic"}
    base = pm.workspace_backward_path(SHAPE_8K, pm.H100_SXM, launch)
    # A plan with half the ids per chunk: twice the chunks, so about twice the accumulator's
    # read-modify-writes (written by the first chunk, read and written by the others).
    plan = launch.backward_plan(SHAPE_8K.num_rows, SHAPE_8K.vocab, SHAPE_8K.dim, torch.bfloat16)
    halved = SimpleNamespace(**{**vars(launch), "backward_plan": lambda *args, **kw: plan._replace(
        ids_per_chunk=plan.ids_per_chunk // 2)})
    more = pm.workspace_backward_path(SHAPE_8K, pm.H100_SXM, halved)

    def rmw_passes(ids):
        return 2 * -(-SHAPE_8K.vocab // ids) - 1

    assert more.sum("rmw_bytes") / base.sum("rmw_bytes") == pytest.approx(
        rmw_passes(plan.ids_per_chunk // 2) / rmw_passes(plan.ids_per_chunk))
    # The forward's group size comes from FORWARD_GROUP_ROWS.
    regrouped = SimpleNamespace(**{**vars(launch), "FORWARD_GROUP_ROWS": 32})
    assert pm.forward_path(SHAPE_8K, pm.H100_SXM, regrouped).notes.endswith("groups of 32 row blocks")


def test_lower_bound_is_the_slowest_of_compute_memory_and_atomics():
    kernel = pm.Kernel("k", flops=989.4e12 * pm.GEMM_SUSTAINED, hbm_bytes=0.0)  # one second of compute
    assert kernel.time(pm.H100_SXM, pm.H100_SXM.tensor_flops) == pytest.approx(1.0)
    heavy = dataclasses.replace(kernel, hbm_bytes=2 * 3.35e12 * pm.HBM_SUSTAINED)
    assert heavy.time(pm.H100_SXM, pm.H100_SXM.tensor_flops) == pytest.approx(2.0)
    atomic = dataclasses.replace(kernel, atomic_bytes=3 * 5.5e12)
    assert atomic.time(pm.H100_SXM, pm.H100_SXM.tensor_flops) == pytest.approx(3.0)
    assert atomic.time(pm.H100_SXM, pm.H100_SXM.tensor_flops, pm.ATOMIC_PESSIMISTIC) == pytest.approx(6.0)
    # 133 equal programs on 132 SMs take two waves
    quantized = pm.Kernel("q", flops=133.0, program_flops=1.0)
    assert quantized.time(pm.H100_SXM, 1 / pm.GEMM_SUSTAINED) == pytest.approx(133.0 * (2 * 132) / 133)


def test_targets_report_each_number_of_the_issue(capsys):
    found = {t["target"]: t for t in pm.targets()}
    assert len(found) == 11
    # The workspace backward reaches the time target; the exact atomic backward does not.
    assert found["N=16384 fwd+bwd, workspace <= 1.1x the 4-GEMM floor"]["met"]
    assert not found["N=16384 fwd+bwd, atomic, exact=True <= 1.1x the 4-GEMM floor"]["met"]
    assert found["N=16384 default backward: float atomics"]["value"] == 0
    assert pm.main(["--n", "8192"]) == 0
    out = capsys.readouterr().out
    assert "A MODEL, not a measurement" in out and "N=8192" in out
