"""The sm_90 compile check (grpo_kernels.ops.sm90_check): the shipped kernel configurations pass its
gates (spills from ptxas, wgmma for tensor-core dots and no mma.sync, no float atomics outside specs
marked float_atomics, shared memory), and each gate fails on a known-bad kernel defined here.
Runs the real Triton compiler on this CPU-only machine, in a subprocess without TRITON_INTERPRET.

The suite compiles, per kernel and dtype, the heaviest configuration (most switches on); CI
(`.ci/run`) and the GPU kit compile every shipped configuration with the same module, before the
suite (some 750 compiles: minutes with a cold Triton cache on 2 cores)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from grpo_kernels.ops import perf_model, sm90_check
from grpo_kernels.ops.sm90_check import SPEC_MODULES
from grpo_kernels.ops.utils import CompileSpec

TESTS = os.path.dirname(os.path.abspath(__file__))


def _run_check(*args, tmp_path, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    records_path = tmp_path / "records.json"
    result = subprocess.run([sys.executable, "-m", "grpo_kernels.ops.sm90_check", *args, "--json", str(records_path)],
                            env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-5000:], result.stderr[-5000:])
    records = json.loads(records_path.read_text()) if records_path.exists() else []
    return result, records


@pytest.mark.parametrize("module", SPEC_MODULES)
def test_heaviest_kernel_configs_compile_for_sm90(module, tmp_path):
    result, records = _run_check("--module", module, "--heaviest-per-kernel", tmp_path=tmp_path)
    assert result.returncode == 0, f"sm_90 compile check failed:\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}"
    assert " 0 failed" in result.stdout and records
    if module == "grpo_kernels.ops.logprobs.specs":
        # The table's arithmetic on the main kernel: one wgmma loop whose multiply-adds per CTA are
        # the tile's (128 x 128 x 64 in bf16), and the occupancy the performance model assumes.
        aligned = {r["spec"].split("[")[0] + "/" + r["spec"].split("[")[1].split(",")[0]: r["usage"]
                   for r in records if r["aligned"]}
        # the heaviest forward without a top-k is the one with the statistics: the same tiles as fwd
        fwd = aligned["logprobs_fwd_stats/bf16"]
        (dot,) = fwd["dots"]
        assert dot["tensor_core"] and fwd["mma_sync"] == 0
        assert [loop["macs_per_cta"] for loop in fwd["wgmma_loops"]] == [dot["m"] * dot["n"] * dot["k"]]
        assert fwd["ctas_per_sm"] == aligned["logprobs_dlogits/bf16"]["ctas_per_sm"] == perf_model.CTAS_PER_SM
        # The float-atomic count sees the atomic backward's adds (a spec marked float_atomics), and
        # none in the default backward's d-logits kernel or the forward.
        assert aligned["logprobs_bwd_atomic/bf16"]["float_atomics"] > 0
        assert aligned["logprobs_dlogits/bf16"]["float_atomics"] == fwd["float_atomics"] == 0
    if module == "grpo_kernels.ops.divergence.specs":
        # Two heads' tile GEMMs per vocabulary tile: two wgmma loops, each the shipped tile's
        # multiply-adds per CTA; the backward's d-logits kernel (the default and only backward) has
        # no float atomics.
        from grpo_kernels.ops.divergence.launch import GPU_CONFIG

        # (a bf16 student with an fp16 teacher: the suite's selection compiles its d-logits kernel
        # with a teacher tile; bf16 with bf16 shares its key with the teacher-less one)
        block_n, block_v, block_d, *_ = GPU_CONFIG["fwd"][(torch.bfloat16, torch.float16)]
        for prefix in ("divergence_fwd[bf16,teacher=fp16]", "divergence_dlogits[bf16,teacher=fp16,"):
            (usage,) = [r["usage"] for r in records if r["aligned"] and r["spec"].startswith(prefix)]
            assert [loop["macs_per_cta"] for loop in usage["wgmma_loops"]] == [block_n * block_v * block_d] * 2
            assert usage["float_atomics"] == usage["mma_sync"] == 0


# ---------------------------------------------------------------------------------------------
# Known-bad kernels: each gate must fail on one (compiled by the subprocess below, which imports
# this file as the spec module `test_compile_sm90`)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _spilling_kernel(X, Out, BLOCK: tl.constexpr):
    # A [128, 128] float32 tile held by one warp (512 values a thread) across two reductions.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
    y = x - tl.max(x, axis=1)[:, None]
    z = y / tl.sum(tl.exp(y), axis=0)[None, :]
    tl.store(Out + offs[:, None] * BLOCK + offs[None, :], z)


@triton.jit
def _tiny_dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    # A 16 x 16 x 16 bf16 dot on one warp: wgmma needs a warp group, so this becomes mma.sync.
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def _float_atomic_kernel(X, Out, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(Out + offs, tl.load(X + offs), sem="relaxed")


@triton.jit
def _counter_kernel(X, Out, Counter, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(X + offs) * 2)
    tl.atomic_add(Counter, 1)  # an integer atomic (a counter): allowed anywhere


def sm90_compile_specs():
    pointers = {"X": "*fp32", "Out": "*fp32", "BLOCK": "constexpr"}
    dot = {"A": "*bf16", "B": "*bf16", "C": "*fp32", "M": "constexpr", "N": "constexpr", "K": "constexpr"}
    return [
        CompileSpec("bad_spill", _spilling_kernel, pointers, {"BLOCK": 128}, num_warps=1, num_stages=1),
        CompileSpec("bad_mma_sync", _tiny_dot_kernel, dot, {"M": 16, "N": 16, "K": 16}, num_warps=1, num_stages=1),
        CompileSpec("bad_float_atomic", _float_atomic_kernel, pointers, {"BLOCK": 128}, num_stages=1),
        CompileSpec("marked_float_atomic", _float_atomic_kernel, pointers, {"BLOCK": 128}, num_stages=1,
                    float_atomics=True),
        CompileSpec("int_atomic", _counter_kernel, {**pointers, "Counter": "*i32"}, {"BLOCK": 128}, num_stages=1),
    ]


def test_each_gate_fails_on_a_known_bad_kernel(tmp_path):
    result, records = _run_check("--module", "test_compile_sm90", "--jobs", "2", "--aligned-only", "--markdown",
                                 str(tmp_path / "table.md"), tmp_path=tmp_path, extra_path=TESTS)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    problems = {}
    for r in records:
        problems.setdefault(r["spec"], set()).update(r["problems"])
    assert problems == {"bad_spill": {"spill"}, "bad_mma_sync": {"wgmma", "mma_sync"},
                        "bad_float_atomic": {"float_atomics"}, "marked_float_atomic": set(), "int_atomic": set()}
    by_name = {r["spec"]: r["usage"] for r in records}
    assert by_name["bad_spill"]["spill_stores"] > 0 and by_name["bad_mma_sync"]["mma_sync"] > 0
    assert by_name["int_atomic"]["int_atomics"] >= 1 and by_name["int_atomic"]["float_atomics"] == 0
    assert by_name["marked_float_atomic"]["float_atomics"] >= 1
    table = (tmp_path / "table.md").read_text()
    assert "| bad_spill [aligned, w1 s1] | FAIL: register spill" in table
    assert " 3 failed" in result.stdout and "of 5 configurations" in result.stdout


def test_cta_occupancy_on_sm90():
    assert sm90_check.ctas_per_sm(255, 99328, 8) == (1, "regs")  # the shipped bf16 tiles
    assert sm90_check.ctas_per_sm(32, 0, 4) == (16, "regs")  # 16 x 128 threads = 2048 as well
    assert sm90_check.ctas_per_sm(64, 120 * 1024, 4) == (1, "smem")
    assert sm90_check.ctas_per_sm(16, 0, 1) == (32, "blocks")


def test_ptx_readers():
    assert sm90_check.float_atomic("atom.global.gpu.relaxed.add.v4.f32")
    assert sm90_check.float_atomic("red.global.add.noftz.bf16x2")
    assert not sm90_check.float_atomic("atom.global.add.u32") and not sm90_check.float_atomic("atom.cas.b32")
    ttir = ("%1 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<128x64xbf16> * tensor<64x256xbf16> -> "
            "tensor<128x256xf32>\n%2 = tt.dot %d, %e, %f : tensor<64x32xf32> * tensor<32x16xf32> -> tensor<64x16xf32>")
    assert sm90_check.dot_shapes(ttir) == [
        {"m": 128, "n": 256, "k": 64, "operand": "bf16", "precision": "tf32", "tensor_core": True},
        {"m": 64, "n": 16, "k": 32, "operand": "f32", "precision": "ieee", "tensor_core": False}]
    wgmma = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}, %rd1, %rd2, %p1, 1, 1, 0, 0;"
    ptx = "\n".join(["$L__BB0_1:", wgmma, "$L__BB0_2:", wgmma, wgmma, "@%p1 bra $L__BB0_2;", wgmma,
                     "@%p2 bra $L__BB0_1;", "ret;"])
    # the inner loop: 2 instructions; the outer one: 2 of its own; 8 warps = 2 warp groups
    assert sm90_check.wgmma_loops(ptx, 8) == [
        {"instructions": 2, "shapes": ["m64n128k16"], "macs_per_cta": 2 * 64 * 128 * 16 * 2}] * 2


def test_a_waiver_that_matches_nothing_is_reported():
    # every waiver matched by a configuration: none stale; drop the configurations of one: that one
    names = [(module, prefix + "x]") for module, prefix, _, _ in sm90_check.WAIVERS]
    modules = {module for module, _ in names}
    assert not sm90_check.stale_waivers(modules, names)
    module, prefix = names[0][0], next(iter(sm90_check.WAIVERS))[1]
    stale = sm90_check.stale_waivers(modules, [(m, n) for m, n in names if not n.startswith(prefix)])
    assert len(stale) == 1 and repr(prefix) in stale[0]
    assert not sm90_check.stale_waivers(("some.other.module",), [])


def test_a_capped_waiver_stops_at_its_bytes():
    (module, prefix, gate, _), waiver = next((k, w) for k, w in sm90_check.WAIVERS.items()
                                             if w.max_spill_bytes and not w.min_triton)
    cap = waiver.max_spill_bytes
    assert sm90_check._waiver(module, prefix + "x]", gate, True, {"spill_stores": cap, "spill_loads": 4})
    assert sm90_check._waiver(module, prefix + "x]", gate, True, {"spill_stores": 4, "spill_loads": cap + 1}) is None


def test_a_waiver_for_a_newer_triton_applies_to_it_only(monkeypatch):
    (module, prefix, gate, alignment), waiver = next((k, w) for k, w in sm90_check.WAIVERS.items() if w.min_triton)
    usage, aligned = {"spill_stores": waiver.max_spill_bytes, "spill_loads": 0}, alignment != "unaligned"
    monkeypatch.setattr(sm90_check, "_triton_version", lambda: waiver.min_triton)
    assert sm90_check._waiver(module, prefix + "x]", gate, aligned, usage)
    monkeypatch.setattr(sm90_check, "_triton_version", lambda: (waiver.min_triton[0], waiver.min_triton[1] - 1))
    assert sm90_check._waiver(module, prefix + "x]", gate, aligned, usage) is None
