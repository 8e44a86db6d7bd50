"""Measured / modelled: which path of the performance model (``grpo_kernels.ops.perf_model``) each
of our stage-1 variants runs, its modelled lower bound, and which backward the run favours.

The model knows the H100 SXM and the H200 (``perf_model.GPUS``); on any other device (an H100 PCIe,
a CPU dry run) there is no modelled time and the ratio is left out.
"""

from __future__ import annotations

# stage-1 op -> whether it runs the backward
OP_BACKWARD = {"logprobs_fwd_bwd": True, "loss_fwd_bwd": True, "logprobs_fwd": False, "loss_fwd": False}


def gpu_key(device_name: str) -> str | None:
    """perf_model.GPUS key of a CUDA device name, or None when the model does not describe it."""
    name = device_name.upper()
    if "H200" in name:
        return "h200"
    if "H100" in name and not any(other in name for other in ("PCIE", "NVL")):
        return "h100"
    return None


def model_path(variant: str, op: str) -> str:
    """The perf_model row of our ``variant`` running stage-1 ``op`` (the loss's elementwise work
    is not modelled: the loss ops take the log-prob op's row)."""
    from benchmarks import impls as impls_module  # torch: not at import (the session summary imports this)

    if not OP_BACKWARD[op]:
        return "no-grad pass = forward"
    backward, exact = impls_module.variant_backward(variant)
    return "fwd+bwd, workspace" if backward == "workspace" else f"fwd+bwd, atomic, exact={exact}"


def modelled_ms(variant: str, op: str, num_rows: int, dim: int, vocab: int, dtype, device_name: str):
    """(modelled lower bound in ms, model row name), or (None, why not)."""
    key = gpu_key(device_name)
    if key is None:
        return None, f"the model describes H100 SXM and H200 only, not {device_name}"
    from grpo_kernels.ops import perf_model

    result = perf_model.model(perf_model.Shape(num_rows, dim, vocab, dtype), perf_model.GPUS[key])
    rows = {r.path: r for r in result["rows"]}
    path = model_path(variant, op)
    return rows[path].time_ms, path


def recommendation(records: list[dict]) -> str:
    """One line: which backward was faster (forward + backward, our unfiltered variants), and so
    which default ``token_logprobs`` should ship. Compares the workspace backward with the atomic
    one at ``exact=True`` (both keep every gradient in float32) wherever both were measured."""
    by_key = {}
    for r in records:
        if r.get("status") != "ok" or not r.get("ms_median") or r.get("op") not in ("logprobs_fwd_bwd", "loss_fwd_bwd"):
            continue
        if r.get("impl") not in ("ours", "ours_atomic") or r.get("backward") is None:
            continue
        if r["backward"] == "atomic" and not r.get("exact", True):
            continue
        by_key.setdefault((r["N"], r["mode"], r["op"]), {})[r["backward"]] = r
    pairs = [(key, v["workspace"], v["atomic"]) for key, v in sorted(by_key.items())
             if "workspace" in v and "atomic" in v]
    if not pairs:
        return ("Recommendation: none - the run did not measure both backwards (token_logprobs needs the "
                "backward= keyword of issue #18, and ours / ours_atomic must both finish on a GPU).")
    workspace_ms = sum(w["ms_median"] for _, w, _ in pairs)
    atomic_ms = sum(a["ms_median"] for _, _, a in pairs)
    wins = sum(w["ms_median"] < a["ms_median"] for _, w, a in pairs)
    where = "; ".join(f"N={n} {mode} {op}: workspace {w['ms_median']:.1f} ms / {w.get('peak_mb') or 0:.0f} MiB vs "
                      f"atomic {a['ms_median']:.1f} ms / {a.get('peak_mb') or 0:.0f} MiB"
                      for (n, mode, op), w, a in pairs)
    if workspace_ms <= atomic_ms:
        verdict = (f"keep backward='workspace' as the default: faster in {wins} of {len(pairs)} comparisons, "
                   f"{100 * (atomic_ms / workspace_ms - 1):.1f}% less time in all")
    else:
        verdict = (f"the atomic backward was faster ({len(pairs) - wins} of {len(pairs)} comparisons, "
                   f"{100 * (workspace_ms / atomic_ms - 1):.1f}% less time in all): consider backward='atomic' as "
                   "the default (it is not deterministic run to run)")
    return f"Recommendation (set by a human in code): {verdict}. Measured: {where}."
