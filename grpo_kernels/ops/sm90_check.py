"""Compile every kernel configuration the library can launch for H100 (sm_90), without a GPU, and
gate on what the compiled code shows.

    python -m grpo_kernels.ops.sm90_check [--jobs 2] [--filter NAME] [--markdown PATH] [--json PATH]

Triton's interpreter does not catch what the real GPU compiler does (``tl.dot`` shapes under 16,
dtype mismatches, too much shared memory, register spills, which MMA instructions a dot becomes).
This runs the real compiler (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``)
for every ``CompileSpec`` that the ops modules declare, in two alignment variants (16-divisible
pointers and sizes, as the launcher sees for usual shapes, and none, for odd shapes), and fails a
configuration on any of these gates:

- a compile error;
- a register spill: ``ptxas -v``'s "bytes spill stores" / "bytes spill loads" (cuobjdump never
  reports a spill as LOCAL: spilled registers live in the STACK frame, so ptxas is asked only
  when there is one);
- shared memory over the sm_90 per-block limit;
- a kernel whose Triton IR has a tensor-core dot (16-bit operands, or float32 with tf32
  precision) but no Hopper ``wgmma.mma_async`` in its PTX, and any ``mma.sync`` at all (the
  Ampere instruction: a quarter of Hopper's dense rate). float32 dots with IEEE precision run on
  FMA units by design (the library's float32 path) and need neither;
- a floating-point atomic (``atom``/``red`` with an ``.f16/.bf16/.f32/.f64`` type) in a spec not
  marked ``float_atomics=True`` (integer atomics, e.g. a lock or a counter, are counted apart and
  allowed).

It prints a per-configuration table (and writes it with ``--markdown``): registers, spill bytes,
shared memory, CTAs per SM (from registers, shared memory and warps for sm_90), the dots' tile
shapes against the ``wgmma`` instructions per inner-loop iteration (instructions per warp group ->
multiply-adds per CTA, which should equal the tile's M x N x K per dot in the loop), ``mma.sync``
count and atomics. Must run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple, Optional

SPEC_MODULES = ("grpo_kernels.ops.logprobs.specs", "grpo_kernels.ops.grpo_loss", "grpo_kernels.ops.advantages",
                "grpo_kernels.ops.divergence.specs")

# sm_90 (H100/H200) per-SM and per-block limits, for the shared-memory gate and the CTAs-per-SM column.
SM90_MAX_SHARED_PER_BLOCK = 227 * 1024  # opt-in maximum of one block
SM90_SHARED_PER_SM = 228 * 1024
SM90_SHARED_RESERVED_PER_BLOCK = 1024  # the driver keeps 1 KiB of each block's shared memory
SM90_REGISTERS_PER_SM = 64 * 1024
SM90_REGISTER_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SM90_THREADS_PER_SM = 2048
SM90_MAX_BLOCKS_PER_SM = 32


class Waiver(NamedTuple):
    reason: str
    max_spill_bytes: Optional[int] = None  # spill gate only: waived up to this many bytes stored or loaded
    min_triton: Optional[tuple] = None  # only with this Triton (major, minor) or newer (CI also runs the newest)


def _triton_version() -> tuple:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


# Known failures of shipped configurations, each waived for one gate with its reason: they are
# printed and tabled as "waived", and do not fail the run. A waiver that no longer matches any
# configuration of its module fails the check: delete it then.
# (module, spec-name prefix, gate, "aligned" / "unaligned" / None for both) -> Waiver
WAIVERS = {
    ("grpo_kernels.ops.logprobs.specs", "logprobs_bwd_atomic[fp32,", "spill", None): Waiver(
        "float32 atomic backward: 8-24 B spilled with d hidden only, 11-16 KB with d weight in the same pass "
        "(ptxas drops to 32 registers), up to 18 KB unaligned; the atomic backward stays selectable only until "
        "a GPU run has compared it with the workspace backward (issue #18)"),
    ("grpo_kernels.ops.logprobs.specs", "logprobs_bwd_atomic[", "spill", "unaligned"): Waiver(
        "atomic backward, no 16-divisible argument (odd D or strides): 420 B-2.7 KB spilled; it stays selectable "
        "only until a GPU run has compared it with the workspace backward (issue #18)"),
    ("grpo_kernels.ops.logprobs.specs", "logprobs_bwd_atomic[bf16,bias=False,softcap=True,entropy=True,", "spill",
     "aligned"): Waiver(
        "atomic backward, 16-bit, soft-cap with an entropy gradient and no bias: 352-404 B spilled since the "
        "soft-cap became accurate at every size (issue #21: a tanh series next to the exponential form); eight "
        "formulations moved the spill between this kernel and the default backward's d-logits kernel, which now "
        "compiles clean in every variant; the atomic backward stays selectable only until a GPU run has compared "
        "it with the workspace backward (issue #18)", max_spill_bytes=420),
    ("grpo_kernels.ops.logprobs.specs", "logprobs_bwd_atomic[fp16,bias=False,softcap=True,entropy=True,", "spill",
     "aligned"): Waiver(
        "atomic backward, 16-bit, soft-cap with an entropy gradient and no bias: 352-404 B spilled since the "
        "soft-cap became accurate at every size (issue #21: a tanh series next to the exponential form); eight "
        "formulations moved the spill between this kernel and the default backward's d-logits kernel, which now "
        "compiles clean in every variant; the atomic backward stays selectable only until a GPU run has compared "
        "it with the workspace backward (issue #18)", max_spill_bytes=420),
    ("grpo_kernels.ops.logprobs.specs", "logprobs_dlogits[", "spill", "unaligned"): Waiver(
        "the default backward's d-logits kernel, no 16-divisible argument (odd D or strides): up to 308 B "
        "spilled (the usual shapes compile aligned and do not spill); for the log-prob kernels' owners"),
    ("grpo_kernels.ops.logprobs.specs", "logprobs_fwd", "spill", "unaligned"): Waiver(
        "forward (every kind: fwd, fwd_stats, fwd_topk), no 16-divisible argument (odd D or strides): 16-468 B "
        "spilled (the usual shapes compile aligned and do not spill); for the log-prob kernels' owners"),
    ("grpo_kernels.ops.logprobs.specs", "logprobs_", "spill", "aligned"): Waiver(
        "Triton 3.9 (CI's newest-Triton run) spills 8-24 B in 12 of the 118 aligned log-prob configurations "
        "(forward, float32 with entropy; d-logits and atomic backward with bias and soft-cap); Triton 3.6 spills "
        "none there; for the log-prob kernels' owners", max_spill_bytes=24, min_triton=(3, 7)),
    ("grpo_kernels.ops.grpo_loss", "grpo_loss[", "spill", None): Waiver(
        "the loss kernel spills 4-32 B in 9 of its 272 configurations under Triton 3.6 (ptxas keeps it at 128 "
        "registers; GSPO-token's with integer masks spill 4 B); for the owners of grpo_kernels/ops/grpo_loss/",
        max_spill_bytes=32),
    ("grpo_kernels.ops.divergence.specs", "divergence_fwd[fp32,", "spill", None): Waiver(
        "float32 student forward (no teacher, odd shapes): 12 B spilled at 128 registers since the soft-cap "
        "goes through the log-prob kernels' accurate _softcap (series + exponential form); for the owners of "
        "grpo_kernels/ops/divergence/", max_spill_bytes=16),
    ("grpo_kernels.ops.divergence.specs", "divergence_jsd[fp32,", "spill", None): Waiver(
        "float32 student and teacher JSD forward: 12 B spilled at 128 registers since the accurate _softcap; "
        "for the owners of grpo_kernels/ops/divergence/", max_spill_bytes=16),
    ("grpo_kernels.ops.advantages", "group_advantages[", "spill", None): Waiver(
        "4-36 B of stack stores around ptxas's float64 division / square-root subroutines (CALL.REL in the "
        "SASS) in 16 of its 144 configurations; for the owners of grpo_kernels/ops/advantages/",
        max_spill_bytes=40),
}

_RESOURCE_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# PTX atomics: atom.global.gpu.relaxed.add.v4.f32, red.global.add.noftz.bf16x2, atom.cas.b32, ...
_ATOMIC_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:atom|red)\.[\w.]+)", re.MULTILINE)
_FLOAT_TYPE_RE = re.compile(r"\.(?:f16|bf16|f32|f64|f16x2|bf16x2|e4m3x\d|e5m2x\d)\b")
_WGMMA_RE = re.compile(r"wgmma\.mma_async\.[\w.]*?\.m(\d+)n(\d+)k(\d+)")
_MMA_SYNC_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?mma\.sync\.", re.MULTILINE)
_LABEL_RE = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH_RE = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
# tt.dot %a, %b, %c[, inputPrecision = tf32] : tensor<MxKxTy> * tensor<KxNxTy> -> tensor<MxNxf32>
_DOT_RE = re.compile(r"tt\.dot [^\n]*: tensor<(\d+)x(\d+)x(\w+)> \* tensor<(\d+)x(\d+)x\w+>")
_PRECISION_RE = re.compile(r"inputPrecision = (\w+)")


def all_specs(modules=SPEC_MODULES):
    specs = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        specs.extend((module_name, spec) for spec in module.sm90_compile_specs())
    return specs


def _alignment_attrs(spec, aligned: bool):
    """tt.divisibility=16 on every pointer and non-constexpr int argument, as the launcher
    specializes for 16-divisible values (the common case) - or on none (odd shapes)."""
    if not aligned:
        return {}
    names = spec.kernel.arg_names
    return {
        (names.index(name),): [["tt.divisibility", 16]]
        for name, ty in spec.signature.items()
        if ty.startswith("*") or ty in ("i32", "i64")
    }


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """Resident CTAs per sm_90 SM and what limits them ("regs", "smem", "threads" or "blocks")."""
    per_warp = -(-registers * 32 // SM90_REGISTER_ALLOC_UNIT) * SM90_REGISTER_ALLOC_UNIT
    by_regs = (SM90_REGISTERS_PER_SM // per_warp) // num_warps if per_warp else SM90_MAX_BLOCKS_PER_SM
    limits = {"regs": by_regs}
    if shared_bytes:
        limits["smem"] = SM90_SHARED_PER_SM // (shared_bytes + SM90_SHARED_RESERVED_PER_BLOCK)
    limits.update(threads=SM90_THREADS_PER_SM // (32 * num_warps), blocks=SM90_MAX_BLOCKS_PER_SM)
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


def dot_shapes(ttir: str) -> list[dict]:
    """Every ``tt.dot`` of the Triton IR: M, N, K, operand type, and whether it belongs on tensor
    cores (16-bit operands, or float32 with tf32 precision; float32 IEEE dots run on FMA units)."""
    dots = []
    for line in ttir.splitlines():
        found = _DOT_RE.search(line)
        if not found:
            continue
        m, k, operand, _, n = found.groups()
        precision = _PRECISION_RE.search(line)
        precision = precision.group(1) if precision else "ieee"  # omitted at its default, IEEE
        tensor_core = operand != "f32" or precision.startswith("tf32")
        dots.append({"m": int(m), "n": int(n), "k": int(k), "operand": operand, "precision": precision,
                     "tensor_core": tensor_core})
    return dots


def float_atomic(op: str) -> bool:
    return bool(_FLOAT_TYPE_RE.search(op)) or ".noftz" in op


def wgmma_loops(ptx: str, num_warps: int) -> list[dict]:
    """The PTX loops holding ``wgmma`` instructions of their own (not of a nested loop): per loop,
    the instructions one warp group issues per iteration and the multiply-adds per CTA that makes
    (every warp group of the CTA issues its own)."""
    lines = ptx.splitlines()
    labels, loops = {}, []
    for i, line in enumerate(lines):
        label = _LABEL_RE.match(line)
        if label:
            labels[label.group(1)] = i
        branch = _BRANCH_RE.search(line)
        if branch and branch.group(1) in labels:  # a backward branch closes a loop
            loops.append((labels[branch.group(1)], i))
    wgmma_lines = [(i, tuple(int(x) for x in m.groups())) for i, line in enumerate(lines)
                   for m in [_WGMMA_RE.search(line)] if m]
    found = []
    for begin, end in sorted(set(loops)):
        inner = [(b, e) for b, e in loops if begin <= b and e <= end and (b, e) != (begin, end)]
        own = [shape for i, shape in wgmma_lines if begin <= i <= end
               and not any(b <= i <= e for b, e in inner)]
        if own:
            shapes = sorted({f"m{m}n{n}k{k}" for m, n, k in own})
            found.append({"instructions": len(own), "shapes": shapes,
                          "macs_per_cta": sum(m * n * k for m, n, k in own) * max(1, num_warps // 4)})
    return found


def _spill_bytes(ptx: str, fp_fusion: bool) -> tuple[int, int]:
    """(spill stores, spill loads) in bytes, from ``ptxas -v`` on the kernel's PTX with Triton's
    own ptxas options (cuobjdump cannot tell a spill from any other stack use)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        command = [get_ptxas(90).path, "-lineinfo", "-v", *([] if fp_fusion else ["--fmad=false"]),
                   f"--gpu-name={sm_arch_from_capability(90)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    found = _SPILL_RE.search(log)
    if found is None:
        raise RuntimeError(f"no spill line in ptxas -v output:\n{log}")
    return int(found.group(1)), int(found.group(2))


def inspect_compiled(spec, aligned: bool = True) -> dict:
    """Compile ``spec`` for sm_90 and read what the gates and the table need. On a compile error:
    ``{"error": "..."}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        source = ASTSource(spec.kernel, spec.signature, spec.constexprs, _alignment_attrs(spec, aligned))
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as exc:  # a compile error is the finding, not a crash of the checker
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    regs, stack, static_shared, _local = (int(x) for x in _RESOURCE_RE.search(dump).groups())
    ptx = compiled.asm["ptx"]
    # Spilled registers live in the stack frame: with none (cuobjdump's STACK:0) there is no spill,
    # and the second ptxas run is skipped.
    spill_stores, spill_loads = (_spill_bytes(ptx, getattr(compiled.metadata, "enable_fp_fusion", True))
                                 if stack else (0, 0))
    shared = compiled.metadata.shared + static_shared
    ctas, limiter = ctas_per_sm(regs, shared, spec.num_warps)
    atomics = _ATOMIC_RE.findall(ptx)
    return {
        "registers": regs, "stack": stack, "spill_stores": spill_stores, "spill_loads": spill_loads,
        "shared": shared, "ctas_per_sm": ctas, "cta_limiter": limiter,
        "dots": dot_shapes(compiled.asm["ttir"]),
        "wgmma": len(_WGMMA_RE.findall(ptx)), "wgmma_loops": wgmma_loops(ptx, spec.num_warps),
        "mma_sync": len(_MMA_SYNC_RE.findall(ptx)),
        "float_atomics": sum(float_atomic(op) for op in atomics),
        "int_atomics": sum(not float_atomic(op) for op in atomics),
    }


def gate_problems(spec, usage: dict) -> dict:
    """gate -> problem, for every gate this compiled configuration fails."""
    if "error" in usage:
        return {"compile": f"compile error: {usage['error']}"}
    problems = {}
    if usage["spill_stores"] or usage["spill_loads"]:
        problems["spill"] = (f"register spill ({usage['spill_stores']} B stores, {usage['spill_loads']} B loads; "
                             f"{usage['registers']} registers)")
    if usage["shared"] > SM90_MAX_SHARED_PER_BLOCK:
        problems["shared"] = f"shared memory {usage['shared']} B > {SM90_MAX_SHARED_PER_BLOCK} B"
    if any(d["tensor_core"] for d in usage["dots"]) and not usage["wgmma"]:
        problems["wgmma"] = "a tensor-core dot compiled without wgmma.mma_async"
    if usage["mma_sync"]:
        problems["mma_sync"] = f"{usage['mma_sync']} mma.sync instruction(s) (Ampere MMA, not wgmma)"
    if usage["float_atomics"] and not spec.float_atomics:
        problems["float_atomics"] = (f"{usage['float_atomics']} floating-point atomic instruction(s) in a spec "
                                     "not marked float_atomics")
    return problems


def _waiver(module_name: str, spec_name: str, gate: str, aligned: bool, usage: dict):
    """The reason a failure of ``gate`` is waived, or None."""
    for (module, prefix, waived_gate, alignment), waiver in WAIVERS.items():
        if (module == module_name and spec_name.startswith(prefix) and gate == waived_gate
                and alignment in (None, "aligned" if aligned else "unaligned")
                and (waiver.max_spill_bytes is None
                     or max(usage["spill_stores"], usage["spill_loads"]) <= waiver.max_spill_bytes)
                and (waiver.min_triton is None or _triton_version() >= waiver.min_triton)):
            return waiver.reason
    return None


def compile_one(args) -> dict:
    modules, index, aligned = args
    module_name, spec = all_specs(modules)[index]
    usage = inspect_compiled(spec, aligned)
    problems = gate_problems(spec, usage)
    waived = {gate: _waiver(module_name, spec.name, gate, aligned, usage) for gate in problems}
    return {"spec": spec.name, "module": module_name, "aligned": aligned, "num_warps": spec.num_warps,
            "num_stages": spec.num_stages, "float_atomics_allowed": spec.float_atomics, "usage": usage,
            "problems": {g: p for g, p in problems.items() if not waived[g]},
            "waived": {g: problems[g] for g, reason in waived.items() if reason},
            "waiver_reasons": {g: reason for g, reason in waived.items() if reason}}


def _heaviest_per_kernel(specs, indices):
    """Per (kernel, pointer dtypes), the spec with the most boolean constexprs switched on: the one
    most likely to run out of registers or shared memory."""
    best = {}
    for i in indices:
        spec = specs[i][1]
        key = (getattr(spec.kernel, "__name__", repr(spec.kernel)),
               tuple(sorted(v for v in spec.signature.values() if v.startswith("*"))))
        weight = sum(1 for v in spec.constexprs.values() if v is True)
        if key not in best or weight > best[key][0]:
            best[key] = (weight, i)
    return sorted(i for _, i in best.values())


def _fmt_int(value: int) -> str:
    return f"{value:,}"


def table_markdown(records: list[dict]) -> str:
    """One row per compiled configuration."""
    header = ["configuration", "status", "regs", "spill B (st/ld)", "smem B", "CTAs/SM (limiter)",
              "dots M x N x K (MACs)", "wgmma per inner iteration: instr/WG -> MACs/CTA", "mma.sync",
              "float atomics (int)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        u = r["usage"]
        label = f"{r['spec']} [{'aligned' if r['aligned'] else 'unaligned'}, w{r['num_warps']} s{r['num_stages']}]"
        status = "FAIL: " + "; ".join(r["problems"].values()) if r["problems"] else (
            "waived: " + "; ".join(r["waived"]) if r["waived"] else "ok")
        if "error" in u:
            lines.append(f"| {label} | {status} |" + " |" * (len(header) - 2))
            continue
        dots = ", ".join(f"{d['m']}x{d['n']}x{d['k']} {d['operand']}/{d['precision']} "
                         f"({_fmt_int(d['m'] * d['n'] * d['k'])})" for d in u["dots"]) or "-"
        loops = "; ".join(f"{loop['instructions']} {'/'.join(loop['shapes'])} -> {_fmt_int(loop['macs_per_cta'])}"
                          for loop in u["wgmma_loops"]) or ("-" if not u["wgmma"] else f"{u['wgmma']} outside loops")
        lines.append(
            f"| {label} | {status} | {u['registers']} | {u['spill_stores']}/{u['spill_loads']} | {u['shared']} | "
            f"{u['ctas_per_sm']} ({u['cta_limiter']}) | {dots} | {loops} | {u['mma_sync']} | "
            f"{u['float_atomics']} ({u['int_atomics']}) |")
    return "\n".join(lines) + "\n"


def stale_waivers(modules, names) -> list[str]:
    """Waivers of a checked module whose prefix matches none of its configurations."""
    return [f"waiver {prefix!r} ({gate}) matches no configuration of {module}: delete it from WAIVERS"
            for (module, prefix, gate, _) in WAIVERS
            if module in modules and not any(n.startswith(prefix) for m, n in names if m == module)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--filter", default="", help="only specs whose name contains this")
    parser.add_argument("--module", action="append", help="only these ops modules (default: all)")
    parser.add_argument("--heaviest-per-kernel", action="store_true",
                        help="only, per kernel and dtype, the spec with the most constexpr switches on "
                             "(the test suite's quick check; CI and the GPU kit compile every spec)")
    parser.add_argument("--aligned-only", action="store_true",
                        help="only the 16-divisible variant of each spec (the gates' own tests)")
    parser.add_argument("--markdown", help="write the per-configuration table to this file")
    parser.add_argument("--json", help="write every configuration's record (usage, problems) to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("sm90_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    modules = tuple(args.module or SPEC_MODULES)
    specs = all_specs(modules)
    chosen = [i for i, (_, spec) in enumerate(specs) if args.filter in spec.name]
    if args.heaviest_per_kernel:
        chosen = _heaviest_per_kernel(specs, chosen)
    work = [(modules, i, aligned) for i in chosen for aligned in ((True,) if args.aligned_only else (True, False))]
    records = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for record in pool.map(compile_one, work):
            records.append(record)
            label = f"{record['spec']}[{'aligned' if record['aligned'] else 'unaligned'}]"
            status = ("FAIL " + "; ".join(record["problems"].values()) if record["problems"]
                      else "WAIVED " + "; ".join(record["waived"].values()) if record["waived"] else "ok")
            print(f"{label}: {status}", flush=True)
    table = table_markdown(records)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("# sm_90 compile check: every configuration (`python -m grpo_kernels.ops.sm90_check`)\n\n" + table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    reasons = {}
    for r in records:
        if not r["problems"]:
            for reason in r["waiver_reasons"].values():
                reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        print(f"waived ({count} configurations): {reason}")
    stale = [] if args.filter else stale_waivers(modules, [(m, s.name) for m, s in specs])
    for line in stale:
        print(f"FAIL {line}")
    failures = sum(bool(r["problems"]) for r in records)
    waived = sum(bool(r["waived"]) and not r["problems"] for r in records)
    print(f"sm90_check: {len(work) - failures - waived} compiled clean, {failures} failed, {waived} waived "
          f"(known failures, see WAIVERS), of {len(work)} configurations"
          + (f"; {len(stale)} stale waiver(s)" if stale else ""))
    return 1 if failures or stale else 0


if __name__ == "__main__":
    sys.exit(main())
