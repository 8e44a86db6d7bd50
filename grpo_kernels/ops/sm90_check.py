"""Compile every kernel configuration the library can launch for H100 (sm_90), without a GPU.

    python -m grpo_kernels.ops.sm90_check [--jobs 2] [--filter NAME]

Triton's interpreter does not catch what the real GPU compiler rejects (``tl.dot`` shapes under
16, dtype mismatches, too much shared memory, register spills). This runs the real compiler
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``) for every
``CompileSpec`` that the ops modules declare, in two alignment variants (16-divisible pointers
and sizes, as the launcher sees for usual shapes, and none, for odd shapes), reads register,
spill and shared-memory use from the cubin and the atomic instructions from the PTX, and exits
non-zero on a compile error, a spill, shared memory over the H100 limit, or an atomic instruction
in a spec not marked ``float_atomics``. Must run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

SPEC_MODULES = ("grpo_kernels.ops.logprobs.specs", "grpo_kernels.ops.grpo_loss", "grpo_kernels.ops.advantages",
                "grpo_kernels.ops.divergence.specs")
H100_MAX_SHARED_BYTES = 227 * 1024  # per block, opt-in maximum on sm_90
_RESOURCE_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ATOMIC_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.", re.MULTILINE)  # PTX atomic instructions


def all_specs(modules=SPEC_MODULES):
    specs = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        specs.extend(module.sm90_compile_specs())
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


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(args):
    modules, index, aligned = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = all_specs(modules)[index]
    label = f"{spec.name}[{'aligned' if aligned else 'unaligned'}]"
    try:
        source = ASTSource(spec.kernel, spec.signature, spec.constexprs, _alignment_attrs(spec, aligned))
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as exc:  # a compile error is the finding, not a crash of the checker
        return label, f"compile error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    regs, stack, static_shared, local = (int(x) for x in _RESOURCE_RE.search(dump).groups())
    shared = compiled.metadata.shared + static_shared
    atomics = len(_ATOMIC_RE.findall(compiled.asm["ptx"]))
    usage = {"registers": regs, "stack": stack, "local": local, "shared": shared, "atomics": atomics}
    problems = []
    if not spec.float_atomics and atomics:
        problems.append(f"{atomics} atomic instruction(s) in a kernel that must have none")
    if local > 0:
        problems.append(f"register spill ({local} bytes of local memory)")
    if shared > H100_MAX_SHARED_BYTES:
        problems.append(f"shared memory {shared} B > {H100_MAX_SHARED_BYTES} B")
    return label, "; ".join(problems), usage


def _heaviest_per_kernel(specs, indices):
    """Per (kernel, pointer dtypes), the spec with the most boolean constexprs switched on: the one
    most likely to run out of registers or shared memory."""
    best = {}
    for i in indices:
        spec = specs[i]
        key = (getattr(spec.kernel, "__name__", repr(spec.kernel)),
               tuple(sorted(v for v in spec.signature.values() if v.startswith("*"))))
        weight = sum(1 for v in spec.constexprs.values() if v is True)
        if key not in best or weight > best[key][0]:
            best[key] = (weight, i)
    return sorted(i for _, i in best.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--filter", default="", help="only specs whose name contains this")
    parser.add_argument("--module", action="append", help="only these ops modules (default: all)")
    parser.add_argument("--heaviest-per-kernel", action="store_true",
                        help="only, per kernel and dtype, the spec with the most constexpr switches on "
                             "(the test suite's quick check; CI and the GPU kit compile every spec)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("sm90_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    modules = tuple(args.module or SPEC_MODULES)
    specs = all_specs(modules)
    chosen = [i for i, spec in enumerate(specs) if args.filter in spec.name]
    if args.heaviest_per_kernel:
        chosen = _heaviest_per_kernel(specs, chosen)
    work = [(modules, i, aligned) for i in chosen for aligned in (True, False)]
    failures = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for label, problem, usage in pool.map(compile_one, work):
            status = "FAIL " + problem if problem else "ok"
            detail = (f"regs={usage['registers']:3d} shared={usage['shared']:6d}B local={usage['local']} "
                      f"atomics={usage['atomics']}" if usage else "")
            print(f"{status:4s} {label:90s} {detail}")
            failures += bool(problem)
    print(f"sm90_check: {len(work) - failures} compiled clean, {failures} failed, of {len(work)} configurations")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
