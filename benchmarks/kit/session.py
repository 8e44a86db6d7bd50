"""The session summary: ``session.json`` / ``session.md`` from ``stages.tsv`` and the stage results.

    python -m benchmarks.kit.session RESULTS_DIR --budget-s 420 --command "..."

``gpu_session.sh`` appends one line per finished stage to ``RESULTS_DIR/stages.tsv``
(name, cap in s, seconds taken, status, exit code) and calls this after every stage, so the
summary on disk is always current. Imports no torch: it takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.kit.common import md_table, utc_now, write_json, write_text

STAGES = {  # name -> (what it is, the files it writes)
    "setup": ("peer wheels into a private target dir, device query", []),
    "stage0_smoke": ("compiled correctness smoke", ["smoke.md", "smoke.json", "device.json"]),
    "stage1_peers": ("log-prob op, fused loss, head statistics and divergence vs peers, matmul floor, "
                     "random + realistic logits",
                     ["peers.md", "peers.json", "peers_time.png"]),
    "stage2_sweep": ("block-size sweep of the log-prob kernels", ["sweep.md", "sweep.json"]),
    "stage3_suite": ("quick peer suite", ["suite/kernels.md", "suite/kernels.json"]),
    "stage4_e2e": ("end-to-end GRPO update step", ["e2e_step.md", "e2e_step.json"]),
}


def read_stages(results: Path) -> list[dict]:
    path = results / "stages.tsv"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            name, cap, seconds, status, rc = line.split("\t")
            rows.append({"stage": name, "cap_s": int(cap), "seconds": float(seconds), "status": status, "rc": int(rc)})
    return rows


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _recommendation(records) -> str:
    from benchmarks.kit import modelled  # imports no torch

    return modelled.recommendation(records)


def headlines(results: Path) -> list[str]:
    """A few lines worth reading first, from whatever stage files exist."""
    lines = []
    smoke = _load(results / "smoke.json")
    if smoke:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(smoke.get("counts", {}).items()))
        lines.append(f"- stage 0: {counts}" + (f"; coverage: {smoke['coverage']['status']}" if smoke.get("coverage")
                                                  else ""))
        failed = [f"{r['check']}[{r['case']}]: {r['status']}" for r in smoke.get("records", [])
                  if r["status"].startswith(("FAIL", "error"))]
        lines += [f"  - {f[:200]}" for f in failed[:10]]
    peers = _load(results / "peers.json")
    if peers:
        ok = [r for r in peers["records"] if r.get("status") == "ok" and r.get("x_floor")]
        if ok:
            n_max = max(r["N"] for r in ok)
            for mode in ("random", "realistic"):
                for op in ("logprobs_fwd_bwd", "loss_fwd_bwd"):
                    cells = [f"{r['impl']} {r['ms_median']:.1f} ms (x{r['x_floor']:.2f} floor, "
                             f"{r['peak_mb']:.0f} MiB)" for r in ok
                             if r["N"] == n_max and r["mode"] == mode and r["op"] == op and r.get("peak_mb") is not None]
                    if cells:
                        lines.append(f"- stage 1, N={n_max} {mode} {op}: " + "; ".join(cells))
        lines.append(f"- stage 1: {_recommendation(peers['records'])}")
    sweep = _load(results / "sweep.json")
    if sweep:
        for w in sweep.get("winners", []):
            lines.append(f"- stage 2: {w['kind']} {w['dtype']} winner {tuple(w['winner'])} {w['winner_ms']} ms vs "
                         f"shipped {tuple(w['shipped'])} {w['shipped_ms']} ms ({w['gain']})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--budget-s", type=int, required=True)
    parser.add_argument("--caps", default="", help="name=cap,... of every planned stage")
    parser.add_argument("--command", default="")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    stages = read_stages(args.results)
    planned = dict(item.split("=") for item in args.caps.split(",") if item)
    done = {s["stage"] for s in stages}
    for name, cap in planned.items():
        if name not in done:
            stages.append({"stage": name, "cap_s": int(cap), "seconds": None, "status": "not run yet", "rc": None})
    device = (_load(args.results / "device.json") or {}).get("device", "unknown device")
    summary = {"date": utc_now(), "device": device, "dry_run": args.dry_run, "budget_s": args.budget_s,
               "caps_sum_s": sum(int(c) for c in planned.values()) if planned else None,
               "seconds_so_far": round(sum(s["seconds"] or 0 for s in stages), 1), "command": args.command,
               "stages": stages}
    write_json(args.results / "session.json", summary)
    rows = [[s["stage"], STAGES.get(s["stage"], ("", []))[0], s["cap_s"],
             "" if s["seconds"] is None else f"{s['seconds']:.0f}", s["status"],
             ", ".join(f for f in STAGES.get(s["stage"], ("", []))[1] if (args.results / f).exists())]
            for s in stages]
    text = [f"# GPU kit session: {device}" + (" (dry run, CPU)" if args.dry_run else ""), "",
            f"{summary['date']}; budget {args.budget_s} s, stage caps sum to {summary['caps_sum_s']} s; "
            f"{summary['seconds_so_far']} s used. Command: `{args.command}`.", "",
            md_table(["stage", "what", "cap s", "took s", "status", "files"], rows), ""]
    peers = _load(args.results / "peers.json")
    if peers:
        summary["recommendation"] = _recommendation(peers["records"])
        write_json(args.results / "session.json", summary)
    heads = headlines(args.results)
    if heads:
        text += ["## Headlines", "", *heads, ""]
    write_text(args.results / "session.md", "\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
