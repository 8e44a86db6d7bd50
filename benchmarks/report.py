"""kernels.json (the records), environment.json, kernels.md (tables with ratios to ours) and PNG plots."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

REQUIRED_KEYS = ("impl", "head", "B", "T", "N", "D", "V", "dtype", "ms_median", "ms_p20", "ms_p80", "peak_mb",
                 "status")
OP_TITLES = {
    "loss_fwd_bwd": "Fused linear + GRPO loss, forward + backward",
    "logprobs_nograd": "Log-prob pass alone, no grad (old / reference log-probs)",
    "logprobs_fwd_bwd": "Log-prob kernel alone, forward + backward (issue 3's yardstick for ours)",
}
PLOTTED_OPS = ("loss_fwd_bwd", "logprobs_nograd")


def write_all(records, env, out_dir: Path, *, plots=True) -> None:
    out_dir = Path(out_dir)
    for record in records:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        assert not missing, f"record {record} lacks {missing}"
    (out_dir / "kernels.json").write_text(json.dumps(records, indent=1) + "\n")
    (out_dir / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    (out_dir / "kernels.md").write_text(markdown(records, env))
    if plots:
        write_plots(records, out_dir)


def _group_key(record):
    """Which table a record belongs to: one per head and dtype (N sweep), one for the V sweep."""
    if record["sweep"] == "V":
        return ("V", f"V sweep: D {record['D']}, N {record['N']} ({record['B']} x {record['T']}), {record['dtype']}")
    return ("N", f"{record['head']} (D {record['D']}, V {record['V']}), {record['dtype']}")


def _impl_order(records):
    order = []
    for r in records:
        if r["impl"] not in order and r["impl"] != "cublas":
            order.append(r["impl"])
    # ours last, as the reference column
    return [i for i in order if i != "ours"] + (["ours"] if "ours" in order else [])


def _cell(record, ours, field, fmt):
    if record is None:
        return ""
    if record["status"] != "ok":
        return "OOM" if record["status"] == "OOM" else record["status"].split(":")[0]
    value = record[field]
    if value is None:
        return "n/a"
    text = fmt.format(value)
    if ours is not None and ours["status"] == "ok" and ours.get(field) and record is not ours:
        text += f" (x{value / ours[field]:.2f})"
    return text


def _roofline_cell(record):
    if record is None:
        return ""
    if record["status"] != "ok":
        return _cell(record, None, "ms_median", "")
    return f"{100 * record['roofline_frac']:.0f}%" if record.get("roofline_frac") else "n/a"


def _table(rows, impls, x_name, cell):
    header = f"| {x_name} | " + " | ".join(impls) + " |"
    lines = [header, "|" + "---|" * (len(impls) + 1)]
    for x_label, by_impl in rows:
        lines.append(f"| {x_label} | " + " | ".join(cell(by_impl.get(i), by_impl.get("ours")) for i in impls) + " |")
    return "\n".join(lines)


def markdown(records, env) -> str:
    out = [f"# Kernel benchmarks: {env['device']}", ""]
    out.append(f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
               f"Python {env['python']}. Command: `{env['command']}`.")
    out.append("")
    opts = ", ".join(f"{k}={v}" for k, v in env["loss_options"].items())
    out += [
        f"Loss configuration (Liger-Kernel's defaults, the same for every implementation): {opts}; "
        "old and reference log-probs given; completions right-padded to T (lengths T/2..T).",
        "",
        "Time: median of the timed runs (CUDA events via `triton.testing.do_bench`, L2 flushed before each "
        "run, inputs rotated over 3 sets, after warm-up), in ms; `(xR)`: R = this / ours (R > 1: slower than "
        "ours, or more memory). p20/p80 and run counts are in kernels.json. Peak memory: "
        "`torch.cuda.max_memory_allocated` above the inputs, in a separate run, in MB. Roofline: achieved "
        "TFLOP/s (counting 4 x 2NDV for forward + backward, 2NDV for the no-grad pass) as a percentage of a "
        "bf16 [N, D] x [D, V] cuBLAS matmul measured in the same run. `OOM`: out of memory; `skipped`: not "
        "installed or cannot run on this device; `check`: |loss - float32 reference| (max |log p - "
        "reference| for the log-prob pass) on the first input set.",
        "",
        "| impl | version | what runs | skipped |",
        "|---|---|---|---|",
    ]
    for name, info in env["impls"].items():
        out.append(f"| {name} | {info['version']} | {info['description']} | {info['skipped'] or ''} |")
    out.append("")

    for op, title in OP_TITLES.items():
        op_records = [r for r in records if r["op"] == op]
        if not op_records:
            continue
        out += [f"## {title}", ""]
        impls = _impl_order(op_records)
        groups = defaultdict(list)
        for r in op_records:
            groups[_group_key(r)].append(r)
        for (sweep, label), group in groups.items():
            x_field = "V" if sweep == "V" else "N"
            rows = defaultdict(dict)
            for r in group:
                rows[(r[x_field], r["B"], r["T"])][r["impl"]] = r
            matmul = {(r[x_field], r["B"], r["T"]): r for r in records if r["op"] == "matmul_bf16"
                      and _group_key(r) == (sweep, label)}
            ordered = sorted(rows.items())
            x_label = "V" if sweep == "V" else "N (B x T)"
            labelled = [(f"{x}" if sweep == "V" else f"{x} ({b} x {t})", by_impl) for (x, b, t), by_impl in ordered]
            out += [f"### {label}", "", "Time, ms:", ""]
            out.append(_table(labelled, impls, x_label, lambda r, o: _cell(r, o, "ms_median", "{:.2f}")))
            out += ["", "Peak memory above the inputs, MB:", ""]
            out.append(_table(labelled, impls, x_label, lambda r, o: _cell(r, o, "peak_mb", "{:.0f}")))
            if matmul:
                out += ["", "Roofline: achieved TFLOP/s as % of the bf16 matmul's:", ""]
                out.append(f"| {x_label} | matmul TFLOP/s | " + " | ".join(impls) + " |")
                out.append("|" + "---|" * (len(impls) + 2))
                for (key, by_impl), (label_x, _) in zip(ordered, labelled):
                    mm = matmul.get(key)
                    cells = [_roofline_cell(by_impl.get(i)) for i in impls]
                    mm_text = f"{mm['tflops']:.0f}" if mm and mm.get("tflops") else (mm or {}).get("status", "-")
                    out.append(f"| {label_x} | {mm_text} | " + " | ".join(cells) + " |")
            checks = [(r["impl"], r["check_abs_err"]) for r in group if r.get("check_abs_err") is not None]
            if checks:
                worst = defaultdict(float)
                for name, err in checks:
                    worst[name] = max(worst[name], err)
                out += ["", "check (largest over the rows): " + ", ".join(f"{n} {e:.1e}" for n, e in worst.items())]
            out.append("")

    yardstick = _yardstick(records)
    if yardstick:
        out += ["## Ours: fused GRPO loss over the log-prob kernel alone (forward + backward)", "",
                "| head | N | dtype | loss ms | log-prob ms | time ratio | loss MB | log-prob MB | memory ratio |",
                "|---|---|---|---|---|---|---|---|---|", *yardstick, ""]

    adv = [r for r in records if r["op"] == "advantages"]
    if adv:
        impls = _impl_order(adv)
        rows = defaultdict(dict)
        for r in adv:
            rows[(r["B"], r.get("G"), r.get("K"))][r["impl"]] = r
        out += ["## Group advantages (G completions per prompt, K reward functions, 5% NaN rewards)", "",
                "Time, ms:", ""]
        labelled = [(f"{b} (G {g}, K {k})", by_impl) for (b, g, k), by_impl in sorted(rows.items())]
        out.append(_table(labelled, impls, "B", lambda r, o: _cell(r, o, "ms_median", "{:.3f}")))
        out += ["", "Peak memory above the inputs, MB:", ""]
        out.append(_table(labelled, impls, "B", lambda r, o: _cell(r, o, "peak_mb", "{:.1f}")))
        out.append("")
    return "\n".join(out) + "\n"


def _yardstick(records):
    lines = []
    by_key = defaultdict(dict)
    for r in records:
        if r["impl"] == "ours" and r["op"] in ("loss_fwd_bwd", "logprobs_fwd_bwd"):
            by_key[(r["head"], r["N"], r["dtype"])][r["op"]] = r
    for (head, n, dtype), ops in by_key.items():
        loss, logp = ops.get("loss_fwd_bwd"), ops.get("logprobs_fwd_bwd")
        if not (loss and logp and loss["status"] == "ok" and logp["status"] == "ok"):
            continue

        def ratio(field):
            return f"{loss[field] / logp[field]:.3f}" if loss[field] and logp[field] else "n/a"

        fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {head} | {n} | {dtype} | {fmt(loss['ms_median'], '{:.2f}')} | "
                     f"{fmt(logp['ms_median'], '{:.2f}')} | {ratio('ms_median')} | {fmt(loss['peak_mb'], '{:.0f}')} | "
                     f"{fmt(logp['peak_mb'], '{:.0f}')} | {ratio('peak_mb')} |")
    return lines


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_plots(records, out_dir: Path) -> list[Path]:
    """Per op and table group: time vs N (or V) and peak memory vs N (or V), one line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op in PLOTTED_OPS:
        groups = defaultdict(list)
        for r in records:
            if r["op"] == op and r["status"] == "ok":
                groups[_group_key(r)].append(r)
        for (sweep, label), group in groups.items():
            x_field = "V" if sweep == "V" else "N"
            for field, ylabel, suffix in (("ms_median", "time per step, ms", "time"),
                                          ("peak_mb", "peak memory above inputs, MB", "memory")):
                series = defaultdict(list)
                for r in group:
                    if r[field] is not None:
                        series[r["impl"]].append((r[x_field], r[field]))
                if not series:
                    continue  # e.g. memory on CPU
                fig, ax = plt.subplots(figsize=(6.4, 4.4))
                for impl in _impl_order(group):
                    points = sorted(series.get(impl, []))
                    if points:
                        ax.plot(*zip(*points), marker="o", label=impl, linewidth=2.5 if impl == "ours" else 1.5)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("vocabulary V" if sweep == "V" else "tokens N = B x T")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{OP_TITLES[op].split(',')[0]}\n{label}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
                fig.tight_layout()
                path = out_dir / f"{op}_{_slug(label)}_{suffix}.png"
                fig.savefig(path, dpi=110)
                plt.close(fig)
                written.append(path)
    return written
