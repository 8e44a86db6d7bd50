"""Stage 1: the log-prob op, the fused GRPO loss and the head operations of issue 19 against every peer, with
the matmul floor.

    python -m benchmarks.kit.peers --results-dir DIR [--deadline-s 140] [--dry-run]

At D=4096, V=151936, bf16, N = 16 x 1024 and 8 x 1024 (every completion full length, so N is the
work), in two input modes (``benchmarks.logits``: random and realistic logits), for each of

- ``logprobs_fwd_bwd``: per-token log-probs, forward + backward (a masked mean as the loss);
- ``logprobs_fwd``: the no-grad log-prob pass (old / reference log-probs);
- ``loss_fwd_bwd``: hidden states -> GRPO loss (dapo, beta 0.04, Liger's defaults), forward + backward;
- ``loss_fwd``: the same loss under ``torch.no_grad()``;

and, for issue 19's head operations (``benchmarks.heads``: every per-token statistic of TRL's head
forward, log-probs + entropy forward + backward, the distillation JSD forward + backward and
forward), ours against TRL 1.16's own head and divergence (``ChunkedLogProbFunction``,
``ChunkedDivergenceFunction``: on CUDA their Triton folds) and materialized logits, on the same
inputs (the teacher: ``heads.teacher_of``);

and every implementation (ours: the defaults, i.e. the workspace backward of issue #18,
``backward="atomic"`` with ``exact=True`` and ``False``, with and without ``filter_eps``; Cut
Cross-Entropy; Liger's ``LigerFusedLinearGRPOLoss`` and fused linear cross-entropy; TRL 1.16's
``ChunkedLogProbFunction``; materialized logits), it records median / p20 / p80 time, peak memory above the inputs, and
``x_floor``: the time over the floor measured in the same run, 4 bf16 ``[N, D] x [D, V]`` matmuls
for forward + backward, 1 for forward only. An OOM is a result. For our variants it also records
``x_model``, measured over the modelled lower bound of the path they run
(``benchmarks.kit.modelled``), and ``peers.md`` says which backward was faster. ``backward=`` is
passed only where the function accepts it (an older token_logprobs has one backward, the atomic
one: ``ours_atomic`` is then recorded as the same as ``ours``).

The work is a priority list (N = 16k first, both modes, the log-prob op and the loss, then the head
operations, then the forward-only passes, then N = 8k); every finished item rewrites ``peers.json`` / ``peers.md`` /
``peers_time.png``, and items the deadline leaves out are listed as ``not reached``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks import heads
from benchmarks import impls as impls_module
from benchmarks import logits as logit_modes
from benchmarks.kit import modelled
from benchmarks.kit.common import Deadline, device_info, md_table, stage_device, write_json, write_text
from benchmarks.measure import Measurement, matmul_step, measure, release_memory
from benchmarks.shapes import Shape

OPS = {  # op -> (matmuls in the floor, needs grad)
    "logprobs_fwd_bwd": (4, True),
    "loss_fwd_bwd": (4, True),
    "logprobs_fwd": (1, False),
    "loss_fwd": (1, False),
}
ALL_OPS = {**OPS, **{op: spec for op, spec in heads.HEAD_OPS.items()}}
OURS = tuple(impls_module.OURS_VARIANTS)
PEERS = ("cce", "liger", "trl_fused", "torch")
GPU_SHAPES = [(16, 1024), (8, 1024)]  # (B, T): N = 16384, 8192
DRY_SHAPES = [(2, 8)]
GPU_HEAD = (4096, 151936)
DRY_HEAD = (48, 311)
ROTATIONS = 2


def work_list(shapes) -> list[dict]:
    """Every (shape, mode, op, impl), most valuable first."""
    items = []
    for b, t in shapes:
        for tier_ops, impls in ((("logprobs_fwd_bwd", "loss_fwd_bwd"), ("ours", "ours_atomic", "ours_fast", "cce",
                                                                         "trl_fused", "liger", "torch",
                                                                         "ours_fast_filtered",
                                                                         "ours_filtered")),
                                (tuple(heads.HEAD_OPS), heads.HEAD_IMPLS),
                                (("logprobs_fwd", "loss_fwd"), ("ours", "cce", "trl_fused", "liger", "torch"))):
            for mode in logit_modes.MODES:
                for op in tier_ops:
                    items += [{"B": b, "T": t, "mode": mode, "op": op, "impl": impl} for impl in impls]
    return items


def thin_for_dry_run(items):
    """Every op and mode for ours and materialized logits, each other impl once: the code paths
    without the interpreter's minutes (Liger's kernels run interpreted on CPU)."""
    kept, seen = [], set()
    for item in items:
        if item["op"] in heads.HEAD_OPS:  # TRL's head folds in torch on CPU: cheap, every impl kept
            kept.append(item)
        elif item["impl"] in ("ours", "torch") or (item["impl"] not in seen and item["op"] == "loss_fwd_bwd"):
            kept.append(item)
            seen.add(item["impl"])
    return kept


HEAD_OP_TEXT = {"stats_fwd": "every TRL head statistic, no grad", "stats_fwd_bwd": "log-probs + entropy, fwd + bwd",
                "divergence_fwd_bwd": f"JSD beta {heads.DIVERGENCE_BETA} vs a teacher head, fwd + bwd",
                "divergence_fwd": f"JSD beta {heads.DIVERGENCE_BETA}, no grad"}


def _step(impl, op, inputs):
    if op.endswith("fwd_bwd"):
        fn = impl.loss if op == "loss_fwd_bwd" else impl.logprobs_loss

        def step(i):
            inp = inputs[i]
            return torch.autograd.grad(fn(inp), [inp.hidden, inp.lm_head_weight])
    else:
        nograd = [inp.for_nograd_pass() for inp in inputs]

        def step(i):
            with torch.no_grad():
                return impl.loss(nograd[i]) if op == "loss_fwd" else impl.logprobs(nograd[i])
    return step


def _value_check(impl, op, inp) -> float | None:
    """|loss - float32 reference loss|, or max |log p - float32 reference| (completion tokens)."""
    with torch.no_grad():
        if op.startswith("logprobs"):
            got = impl.logprobs(inp.for_nograd_pass())
            return float((got.float() - inp.reference_logprobs)[inp.completion_mask.bool()].abs().max())
        reference = impls_module.eager_grpo_loss(inp.reference_logprobs, inp.completion_mask, inp.advantages,
                                                 inp.old_logprobs, inp.ref_logprobs, **impls_module.LOSS_OPTIONS)[0]
        return float((impl.loss(inp).float() - reference).abs())


def _fmt(record, ours):
    if record is None:
        return ""
    if record["status"] != "ok":
        return record["status"].split(":")[0] if not record["status"].startswith("not reached") else "not reached"
    text = f"{record['ms_median']:.1f} ms"
    if record.get("x_floor"):
        text += f", x{record['x_floor']:.2f} floor"
    if record.get("peak_mb") is not None:
        text += f", {record['peak_mb']:.0f} MiB"
    if record.get("x_model"):
        text += f", x{record['x_model']:.2f} model"
    if ours and ours is not record and ours.get("status") == "ok" and ours.get("ms_median"):
        text += f" ({record['ms_median'] / ours['ms_median']:.2f}x ours)"
    return text


def write_results(out_dir: Path, meta, records, floors, stats, plots=True):
    write_json(out_dir / "peers.json", {"meta": meta, "floors": floors, "logit_stats": stats, "records": records})
    lines = [f"# Stage 1: log-prob op, fused GRPO loss and head operations vs peers, {meta['device']}", "",
             f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; D={meta['D']}, V={meta['V']}, "
             f"{meta['dtype']}, every completion full length. Command: `{meta['command']}`.", "",
             "Each cell: median time (CUDA events, `triton.testing.do_bench`, 2 input sets rotated), `xR floor`: "
             "time over the floor measured in the same run (4 bf16 [N, D] x [D, V] matmuls for forward + "
             "backward, 1 for forward only), peak memory allocated above the inputs, for our variants `xM model`: "
             "measured over the lower bound of `grpo_kernels.ops.perf_model` for the path the variant runs (H100 SXM "
             "and H200 only), and the time relative to `ours` (the defaults). OOM: out of memory. p20/p80, runs, "
             "value checks and the model's path are in peers.json.", "",
             modelled.recommendation(records), "",
             "| impl | version | what runs |", "|---|---|---|"]
    for name, info in meta["impls"].items():
        lines.append(f"| {name} | {info['version']} | {info['skipped'] or info['description']} |")
    lines += ["", "Head operations (issue 19, `benchmarks.heads`): " + "; ".join(
        f"`{op}` ({HEAD_OP_TEXT[op]})" for op in heads.HEAD_OPS) + ".", "", "| impl (heads) | version | what runs |",
        "|---|---|---|"]
    for name, info in meta.get("head_impls", {}).items():
        lines.append(f"| {name} | {info['version']} | {info['skipped'] or info['description']} |")
    lines.append("")
    shapes = sorted({(r["B"], r["T"]) for r in records}, key=lambda s: -s[0] * s[1])
    for b, t in shapes:
        for mode in logit_modes.MODES:
            group = [r for r in records if (r["B"], r["T"], r["mode"]) == (b, t, mode)]
            if not group:
                continue
            floor = floors.get(f"{b * t}/{mode}")
            lines += [f"## N = {b * t} ({b} x {t}), {mode} logits", ""]
            if floor:
                lines.append(f"bf16 matmul [N, D] x [D, V]: {floor['ms_median']:.2f} ms ({floor.get('tflops', 0):.0f} "
                             f"TFLOP/s); floors: forward + backward {4 * floor['ms_median']:.2f} ms, forward "
                             f"{floor['ms_median']:.2f} ms.")
                lines.append("")
            if stats.get(f"{b * t}/{mode}"):
                s = stats[f"{b * t}/{mode}"]
                lines.append(f"Logit statistics ({s['rows']} rows): sampled-token log-prob quantiles (5/25/50/75/95%) "
                             f"{s['logp_q05_q25_q50_q75_q95']}, {100 * s['frac_logp_in_-3_0']:.0f}% in [-3, 0]; "
                             f"entropy quantiles {s['entropy_q05_q25_q50_q75_q95']} nats (mean "
                             f"{s['entropy_mean']}); median top-1 probability {s['top1_prob_median']}; "
                             f"probabilities under 2^-12: {100 * s['frac_probs_below_2^-12']:.1f}%.")
                lines.append("")
            impls = list(dict.fromkeys(r["impl"] for r in group))
            ops = [op for op in ALL_OPS if any(r["op"] == op for r in group)]
            by = {(r["impl"], r["op"]): r for r in group}
            rows = [[impl] + [_fmt(by.get((impl, op)), by.get(("ours", op))) for op in ops] for impl in impls]
            lines += [md_table(["impl"] + ops, rows), ""]
    write_text(out_dir / "peers.md", "\n".join(lines) + "\n")
    if plots:
        _plot(out_dir, records)


def _plot(out_dir: Path, records):
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_max = max(r["B"] * r["T"] for r in ok)
    panels = [(mode, op) for mode in logit_modes.MODES for op in ALL_OPS
              if any(r["mode"] == mode and r["op"] == op and r["B"] * r["T"] == n_max for r in ok)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)), 4), squeeze=False)
    for ax, (mode, op) in zip(axes[0], panels):
        group = [r for r in ok if r["mode"] == mode and r["op"] == op and r["B"] * r["T"] == n_max]
        values = [r.get("x_floor") or r["ms_median"] for r in group]
        ax.bar(range(len(group)), values, color=["tab:red" if r["impl"].startswith("ours") else "tab:gray"
                                                 for r in group])
        ax.set_xticks(range(len(group)), [r["impl"] for r in group], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{op}\n{mode}, N={n_max}", fontsize=8)
        ax.set_ylabel("time / matmul floor" if group and group[0].get("x_floor") else "ms", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "peers_time.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=None)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, torch path")
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    deadline = Deadline(args.deadline_s)
    device = stage_device(args.dry_run)
    dim, vocab = DRY_HEAD if args.dry_run else GPU_HEAD
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if device.type == "cuda":
        import torch._dynamo.config as dynamo_config

        for knob in ("recompile_limit", "cache_size_limit"):  # Liger's compiled chunk: one graph per shape
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 256))
    # The dry run leaves the peers out (their imports and interpreted kernels take most of a
    # minute on CPU; benchmarks/test_bench_smoke.py runs them there) and records them as skipped.
    names = ("torch",) + OURS if args.dry_run else PEERS + OURS
    impls = {impl.name: impl for impl in impls_module.build_impls(device, names)}
    for name in PEERS:
        impls.setdefault(name, impls_module.Impl(name, "", skip_reason="dry run: peers are exercised on CPU by "
                                                 "benchmarks/test_bench_smoke.py"))
    head_impls = {impl.name: impl for impl in heads.build_head_impls(device)}
    meta = {**device_info(device), "D": dim, "V": vocab, "dtype": str(dtype)[6:],
            "loss_options": impls_module.LOSS_OPTIONS,
            "command": "python -m benchmarks.kit.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
            "impls": {n: {"version": i.version, "description": i.description, "skipped": i.skip_reason}
                      for n, i in impls.items()},
            "head_impls": {n: {"version": i.version, "description": i.description, "skipped": i.skip_reason}
                           for n, i in head_impls.items()}}
    items = work_list(DRY_SHAPES if args.dry_run else GPU_SHAPES)
    if args.dry_run:
        items = thin_for_dry_run(items)
    records = [{**item, "status": "not reached"} for item in items]
    floors, stats = {}, {}
    inputs_key, inputs = None, None
    cpu_runs = 1 if args.dry_run else 2
    for index, item in enumerate(items):
        if deadline.expired():
            break
        key = (item["B"], item["T"], item["mode"])
        label = f"{item['B'] * item['T']}/{item['mode']}"
        if key != inputs_key:
            inputs = None
            release_memory(device, collect=True)
            shape = Shape("kit", item["B"], item["T"], dim, vocab, dtype, "N")
            inputs = impls_module.make_inputs(shape, device, seed=item["B"] * item["T"], rotations=ROTATIONS,
                                              logits=item["mode"], full_length=True)
            inputs_key = key
            stats[label] = logit_modes.logit_stats(inputs[0].hidden.detach(), inputs[0].lm_head_weight.detach(),
                                                   inputs[0].completion_ids, max_rows=64 if args.dry_run else 2048)
            if device.type == "cuda":
                m = measure(matmul_step(inputs), ROTATIONS, device, min_runs=args.min_runs)
                floors[label] = {"status": m.status, "ms_median": m.ms_median, "ms_p20": m.ms_p20,
                                 "ms_p80": m.ms_p80,
                                 "tflops": 2.0 * item["B"] * item["T"] * dim * vocab / (m.ms_median * 1e9)
                                 if m.ms_median else None}
                print(f"[peers] {label}: matmul {m.ms_median} ms", flush=True)
        head_op = item["op"] in heads.HEAD_OPS
        impl = head_impls[item["impl"]] if head_op else impls[item["impl"]]
        record = dict(item, N=item["B"] * item["T"], D=dim, V=vocab)
        if item["impl"] in OURS and not head_op:
            record["backward"], record["exact"] = impls_module.variant_backward(item["impl"])
        op_skip = impl.skip_ops.get("loss") if not head_op and item["op"].startswith("loss") else None
        if impl.skip_reason or op_skip:
            record["status"] = f"skipped: {impl.skip_reason or op_skip}"
        else:
            step = heads.head_step(impl, item["op"], inputs) if head_op else _step(impl, item["op"], inputs)
            m = measure(step, ROTATIONS, device, min_runs=args.min_runs, cpu_runs=cpu_runs)
            record.update(status=m.status, ms_median=m.ms_median, ms_p20=m.ms_p20, ms_p80=m.ms_p80, runs=m.runs,
                          peak_mb=m.peak_mb)
            floor = floors.get(label, {}).get("ms_median")
            if m.status == "ok" and floor:
                record["x_floor"] = m.ms_median / (ALL_OPS[item["op"]][0] * floor)
            if m.status == "ok" and item["impl"] in OURS and item["op"] in modelled.OP_BACKWARD:
                model_ms, record["model_path"] = modelled.modelled_ms(item["impl"], item["op"], record["N"], dim, vocab,
                                                                      dtype, meta["device"])
                if model_ms:
                    record["model_ms"] = model_ms
                    record["x_model"] = m.ms_median / model_ms
            if m.status == "ok":
                try:
                    check = heads.value_check if head_op else _value_check
                    record["check_abs_err"] = check(impl, item["op"], inputs[0])
                except Exception as exc:  # noqa: BLE001 - e.g. an OOM of the check itself
                    record["check_abs_err"] = f"failed: {type(exc).__name__}"
                release_memory(device, collect=True)
        records[index] = record
        print(f"[peers] {label} {item['op']} {item['impl']}: {record['status']} {record.get('ms_median')}"
              + (f" (model {record['model_ms']:.1f} ms: measured / modelled {record['x_model']:.2f}, "
                 f"{record['model_path']})" if record.get("model_ms") else ""), flush=True)
        write_results(args.results_dir, meta, records, floors, stats, plots=False)
    write_results(args.results_dir, meta, records, floors, stats, plots=not args.no_plots)
    done = sum(r["status"] != "not reached" for r in records)
    print(f"[peers] {done} of {len(records)} items measured or recorded", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
