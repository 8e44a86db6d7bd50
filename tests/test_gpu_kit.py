"""The GPU kit cannot rot between GPU sessions: ``gpu_session.sh --dry-run`` runs every stage on
CPU at tiny shapes and writes the same files (issue 9), plus the kit's own pieces."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import logits as logit_modes
from benchmarks.heads import HEAD_IMPLS, HEAD_OPS
from benchmarks.kit import smoke, sweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("kit")
    results, out = base / "results", base / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(OUT=str(out), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run", "--budget-s", "1200", "--results-dir",
                           str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, results, out


def test_dry_run_every_stage_ok(dry_run):
    proc, results, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    session = json.loads((results / "session.json").read_text())
    names = [s["stage"] for s in session["stages"]]
    assert names == ["setup", "stage0_smoke", "stage1_peers", "stage2_sweep", "stage3_suite", "stage4_e2e"]
    assert all(s["status"] == "ok" for s in session["stages"]), session["stages"]
    # A generous budget: CI machines are slow and shared. The caps are shares of it, stage 0's
    # clamped to 90 s (issue 9).
    assert session["caps_sum_s"] <= session["budget_s"] == 1200
    assert next(s for s in session["stages"] if s["stage"] == "stage0_smoke")["cap_s"] == 90
    assert (results / "session.md").read_text().startswith("# GPU kit session")


def test_dry_run_stage_files(dry_run):
    _, results, _ = dry_run
    smoke_result = json.loads((results / "smoke.json").read_text())
    statuses = {r["check"]: r["status"] for r in smoke_result["records"]}
    assert not [r for r in smoke_result["records"] if r["status"].startswith(("FAIL", "error", "unmapped"))]
    for check in ("logprobs_config", "logprobs_real_shape", "loss_types", "advantages_config"):
        assert statuses[check] == "ok", check
    assert set(smoke.CHECKS) <= set(statuses)

    peers = json.loads((results / "peers.json").read_text())
    ours = [r for r in peers["records"] if r["impl"] == "ours"]
    assert {r["op"] for r in ours} == {"logprobs_fwd_bwd", "loss_fwd_bwd", "logprobs_fwd", "loss_fwd"} | set(HEAD_OPS)
    assert all(r["status"] == "ok" and r["check_abs_err"] < 1e-4 for r in ours), ours
    # issue 19's head operations: TRL's own head and divergence as peers, on the same inputs
    head_records = [r for r in peers["records"] if r["op"] in HEAD_OPS]
    assert {(r["impl"], r["op"], r["mode"]) for r in head_records} == {
        (impl, op, mode) for impl in HEAD_IMPLS for op in HEAD_OPS for mode in ("random", "realistic")}
    assert all(r["status"] == "ok" and r["check_abs_err"] < 1e-4 for r in head_records), head_records
    assert "trl_fused" in peers["meta"]["head_impls"] and "| stats_fwd_bwd |" in (results / "peers.md").read_text()
    assert {r["mode"] for r in ours} == {"random", "realistic"}
    assert peers["logit_stats"]["16/realistic"]["entropy_mean"] < peers["logit_stats"]["16/random"]["entropy_mean"]
    assert (results / "peers_time.png").stat().st_size > 0

    swept = json.loads((results / "sweep.json").read_text())
    assert {w["kind"] for w in swept["winners"]} == set(sweep.KINDS)
    assert all(r["compile"] == "ok" for r in swept["rows"])  # the sm_90 pre-filter ran

    suite_records = json.loads((results / "suite" / "kernels.json").read_text())
    assert suite_records and all(r["status"] == "ok" for r in suite_records)
    e2e = json.loads((results / "e2e_step.json").read_text())
    assert [r["status"] for r in e2e["records"]] == ["ok", "ok"]


def test_dry_run_out_fits_the_device_limits(dry_run):
    _, _, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in files), files
    assert {"session.md", "results.tgz", "smoke.md", "peers.md", "sweep.md"} <= {p.name for p in files}


def test_dry_run_refuses_the_gpu_results_folder():
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run", "--results-dir",
                           "benchmarks/results/cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "never writes under benchmarks/results" in proc.stderr
    assert not (ROOT / "benchmarks" / "results" / "cpu").exists()


def test_realistic_logits_look_like_a_trained_lm():
    g = torch.Generator().manual_seed(0)
    weight = logit_modes.realistic_head(4096, 256, dtype=torch.bfloat16, device="cpu", generator=g)
    hidden = logit_modes.realistic_hidden(weight, 512, generator=g)
    targets = logit_modes.sample_targets(hidden, weight, generator=g)
    stats = logit_modes.logit_stats(hidden, weight, targets)
    assert stats["frac_logp_in_-3_0"] >= 0.7, stats  # sampled tokens mostly likely ...
    assert stats["logp_q05_q25_q50_q75_q95"][0] < -3, stats  # ... with a tail
    assert 0.2 <= stats["entropy_q05_q25_q50_q75_q95"][2] <= 3.0, stats  # a few nats at most
    assert stats["entropy_q05_q25_q50_q75_q95"][4] > 2.0, stats  # some rows undecided
    flat = logit_modes.logit_stats(torch.randn(512, 256).bfloat16(),
                                   logit_modes.random_head(4096, 256, dtype=torch.bfloat16, device="cpu", generator=g),
                                   torch.randint(0, 4096, (512,)))
    assert abs(flat["entropy_mean"] - math.log(4096)) < 0.1  # the random mode is nearly flat


def test_smoke_reports_failures_and_unmapped_configurations():
    @smoke.register("_test_fails")
    def failing(ctx):
        smoke.expect(1e-2, 1e-5, "something")

    try:
        record = smoke.run_case("_test_fails", 0, dry_run=True)["record"]
    finally:
        del smoke.CHECKS["_test_fails"]
    assert record["status"].startswith("FAIL: something: relative error")
    assert smoke._logprob_call({"Hidden": "*fp32"}, {"NEW_SWITCH": True, "BLOCK_N": 16}).startswith("unmapped")
    single_pass = smoke._logprob_call({"Hidden": "*bf16", "GradWeight": "*bf16"},
                                      {"HIDDEN_GRAD": True, "WEIGHT_GRAD": True, "HAS_BIAS": True, "BLOCK_N": 16})
    assert single_pass["exact"] is False and single_pass["bias_grad"] and single_pass["backward"]
    exact_pass = smoke._logprob_call({"Hidden": "*bf16", "GradWeight": "*fp32"},
                                     {"HIDDEN_GRAD": False, "WEIGHT_GRAD": True, "HAS_BIAS": False})
    assert exact_pass["exact"] is True and not exact_pass["hidden_grad"]


def test_sweep_candidates_and_override():
    from grpo_kernels.ops import logprobs

    for kind in sweep.KINDS:
        shipped = logprobs.GPU_CONFIG[kind][torch.bfloat16]
        found = sweep.candidates(kind, torch.bfloat16, shipped, 12)
        assert found[0] == tuple(shipped) and len(set(found)) == 12
        for config in found[1:]:
            registers, shared = sweep._budget(kind, config, 2)
            assert registers <= sweep.MAX_ACC_REGISTERS and shared <= sweep.SM90_MAX_SHARED
        with sweep.override(kind, torch.bfloat16, found[1]):
            assert logprobs.GPU_CONFIG[kind][torch.bfloat16] == found[1]
        assert logprobs.GPU_CONFIG[kind][torch.bfloat16] == shipped
        specs = sweep.specs_for(kind, torch.bfloat16, found[1], 2)
        assert len(specs) == 2 and all(s.num_warps == found[1][3] for s in specs)


def _float64_token_logprobs(hidden, weight, targets, *, softcap=None, return_lse=False, return_entropy=False,
                            batch_invariant=False, deterministic=False, temperature=1.0, process_group=None,
                            **_):
    """A stand-in with the keywords the feature checks look for, exact in float64: the checks'
    own plumbing is tested before the features land in token_logprobs."""
    z = hidden.double() @ weight.double().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = (z / temperature).log_softmax(-1)
    valid = targets != -100
    safe = torch.where(valid, targets, 0).long()
    logp = (log_p.gather(-1, safe) if targets.dim() == 2 else log_p.gather(-1, safe[:, None])[:, 0])
    logp = torch.where(valid, logp, 0.0)
    out = [logp]
    if return_entropy:
        entropy = -(log_p.exp() * log_p).sum(-1)
        out.append(torch.where(valid if targets.dim() == 1 else valid.any(-1), entropy, 0.0))
    if return_lse:
        out.append(torch.logsumexp(z / temperature, -1))
    return out[0] if len(out) == 1 else tuple(out)


@pytest.mark.parametrize("check", ["softcap", "return_lse", "k_targets", "deterministic", "batch_invariant",
                                   "vocab_parallel_group_of_1"])
def test_feature_checks_run_once_the_keyword_exists(monkeypatch, check):
    import grpo_kernels

    monkeypatch.setattr(grpo_kernels, "token_logprobs", _float64_token_logprobs)
    record = smoke.run_case(check, 0, dry_run=True)["record"]
    assert record["status"] == "ok", record


def test_measured_over_modelled_paths_and_devices(monkeypatch):
    from benchmarks import impls
    from benchmarks.kit import modelled

    assert modelled.gpu_key("NVIDIA H100 80GB HBM3") == "h100" and modelled.gpu_key("NVIDIA H200") == "h200"
    assert modelled.gpu_key("NVIDIA H100 PCIe") is None and modelled.gpu_key("cpu (2 cores)") is None
    assert modelled.model_path("ours", "logprobs_fwd") == "no-grad pass = forward"
    monkeypatch.setattr(impls, "default_backward", lambda: "workspace")
    assert modelled.model_path("ours", "loss_fwd_bwd") == "fwd+bwd, workspace"
    assert modelled.model_path("ours_atomic", "logprobs_fwd_bwd") == "fwd+bwd, atomic, exact=True"
    assert modelled.model_path("ours_fast", "logprobs_fwd_bwd") == "fwd+bwd, atomic, exact=False"
    ms, path = modelled.modelled_ms("ours", "logprobs_fwd_bwd", 8192, 4096, 151936, torch.bfloat16,
                                    "NVIDIA H100 80GB HBM3")
    assert path == "fwd+bwd, workspace" and 55 < ms < 70  # about the 4-GEMM floor at 70% of peak
    assert modelled.modelled_ms("ours", "logprobs_fwd", 16, 48, 311, torch.float32, "cpu")[0] is None


def test_backward_keyword_only_where_the_function_takes_it(monkeypatch):
    from benchmarks import impls

    def without(hidden, weight, targets, *, exact=True):
        pass

    def with_backward(hidden, weight, targets, *, exact=True, backward="workspace"):
        pass

    monkeypatch.setattr(impls, "default_backward", lambda: "atomic")  # before issue #18
    assert impls.ours_keywords("ours_fast", without) == ({"exact": False}, None)
    kwargs, why = impls.ours_keywords("ours_atomic", without)
    assert kwargs is None and why.startswith("same as 'ours'")
    monkeypatch.setattr(impls, "default_backward", lambda: "workspace")  # a loss without the keyword
    kwargs, why = impls.ours_keywords("ours_fast", without)
    assert kwargs is None and "runs the default backward ('workspace')" in why
    assert impls.ours_keywords("ours_atomic", with_backward) == ({"backward": "atomic"}, None)


def _record(impl, backward, ms, n=16384, mode="random", op="logprobs_fwd_bwd", exact=True):
    return {"impl": impl, "backward": backward, "exact": exact, "ms_median": ms, "peak_mb": 500.0, "status": "ok",
            "N": n, "mode": mode, "op": op}


def test_recommendation_names_the_faster_backward():
    from benchmarks.kit import modelled

    faster_workspace = [_record("ours", "workspace", 120.0), _record("ours_atomic", "atomic", 150.0),
                        _record("ours_fast", "atomic", 100.0, exact=False)]  # not a default candidate
    line = modelled.recommendation(faster_workspace)
    assert "keep backward='workspace' as the default" in line and "1 of 1" in line and "25.0%" in line
    faster_atomic = [_record("ours", "workspace", 150.0), _record("ours_atomic", "atomic", 120.0),
                     _record("ours", "workspace", 80.0, mode="realistic"),
                     _record("ours_atomic", "atomic", 70.0, mode="realistic")]
    assert "consider backward='atomic' as the default" in modelled.recommendation(faster_atomic)
    # before issue #18 both run the atomic backward: nothing to compare
    assert modelled.recommendation([_record("ours", "atomic", 150.0)]).startswith("Recommendation: none")
