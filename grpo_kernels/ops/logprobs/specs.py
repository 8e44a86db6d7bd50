"""Every kernel configuration the launcher can pick, for the sm_90 compile check
(``python -m grpo_kernels.ops.sm90_check``) and the GPU kit."""

from itertools import product

from grpo_kernels.ops.logprobs.kernels import (
    _logprobs_bwd_atomic_kernel,
    _logprobs_dlogits_kernel,
    _logprobs_fwd_kernel,
    _logprobs_merge_kernel,
)
from grpo_kernels.ops.logprobs.launch import (
    BACKWARD_GROUP_ROWS,
    FORWARD_GROUP_ROWS,
    GPU_CONFIG,
    TOPK_SLOTS,
    dot_precision,
    forward_kind,
    forward_switches,
)
from grpo_kernels.ops.utils import FLOAT_DTYPES, TRITON_DTYPE, CompileSpec

_FLOAT_ARGS = ("inv_temp", "softcap", "filter_eps")


def _spec(name, kernel, pointers, constexprs, config, float_atomics=False):
    """A CompileSpec whose signature is derived from the kernel's arguments: ``pointers`` names the
    pointer arguments' types, ``_FLOAT_ARGS`` are fp32 scalars, every other argument is an i32."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
        else:
            signature[arg] = "fp32" if arg in _FLOAT_ARGS else "i32"
    *_, num_warps, num_stages = config
    return CompileSpec(name=name, kernel=kernel, signature=signature, constexprs=constexprs,
                       num_warps=num_warps, num_stages=num_stages, float_atomics=float_atomics)


def _tiles(config):
    block_n, block_v, block_d, _, _ = config
    return {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d}


def _forward_variants():
    """Every ForwardSwitches the launcher can pick (launch.forward_switches over all requests)."""
    requests = [(entropy, stats, topk) for entropy in (False, True) for stats in (False, True)
                for topk in (0,) + TOPK_SLOTS]
    return sorted(set(forward_switches(*request) for request in requests))


def sm90_compile_specs() -> list[CompileSpec]:
    specs = []
    flags = [(bias, softcap, entropy) for bias in (False, True) for softcap in (False, True) for entropy in (False, True)]
    # ROW_TEMP: one temperature per row (a tensor) or one for all (a float); every kernel but the merge
    row_temps = (False, True)
    for dtype in FLOAT_DTYPES:
        ty = TRITON_DTYPE[dtype]
        common = {"DOT_PRECISION": dot_precision(dtype), "INTERPRETER": False}
        inputs = {"Hidden": f"*{ty}", "Weight": f"*{ty}", "Bias": f"*{ty}", "Targets": "*i32", "RowIdx": "*i32",
                  "InvTemp": "*fp32"}
        grads_in = {"Lse": "*fp32", "MeanLogit": "*fp32", "GradLogp": "*fp32", "GradLogpSum": "*fp32",
                    "GradEnt": "*fp32"}

        config = GPU_CONFIG["merge"][dtype]
        for entropy, stats in sorted({(switches.entropy, switches.stats) for switches in _forward_variants()}):
            specs.append(_spec(
                f"logprobs_merge[{ty},entropy={entropy},stats={stats}]", _logprobs_merge_kernel,
                {name: "*fp32" for name in ("PartMax", "PartSum", "PartEnt", "PartSq", "PartZsum", "PartBefore",
                                            "Lse", "Entropy", "LogSumSq", "MeanLogits", "RowMax", "MaxBefore")},
                {"BLOCK_N": config[0], "COMPUTE_ENTROPY": entropy, "LOG_SUM_SQ": stats, "MEAN_LOGITS": stats,
                 "TOP1": stats}, config))

        for switches in _forward_variants():
            kind = forward_kind(switches)
            config = GPU_CONFIG[kind][dtype]
            for bias, softcap, row_temp in product((False, True), (False, True), row_temps):
                specs.append(_spec(
                    (f"logprobs_{kind}[{ty},bias={bias},softcap={softcap},entropy={switches.entropy},"
                     f"stats={switches.stats},topk={switches.topk_slots},rowtemp={row_temp}]"), _logprobs_fwd_kernel,
                    {**inputs, **{name: "*fp32" for name in ("PartMax", "PartSum", "PartEnt", "PartSq", "PartZsum",
                                                             "PartBefore", "TargetLogit")},
                     "PartTopk": "*i64" if switches.topk_slots else "*fp32"},
                    {**_tiles(config), **common, "GROUP_N": FORWARD_GROUP_ROWS, "HAS_BIAS": bias,
                     "HAS_SOFTCAP": softcap, "COMPUTE_ENTROPY": switches.entropy, "LOG_SUM_SQ": switches.stats,
                     "MEAN_LOGITS": switches.stats, "TOP1": switches.stats, "TOPK": switches.topk_slots,
                     "ROW_TEMP": row_temp},
                    config))

        config = GPU_CONFIG["bwd_atomic"][dtype]
        # (d hidden, d weight, d weight accumulator dtype): pass 1 without / with d weight, and
        # the exact d-weight pass into a float32 chunk buffer (16-bit weights only).
        passes = [(True, False, ty), (True, True, ty)] + ([(False, True, "fp32")] if ty != "fp32" else [])
        for (bias, softcap, entropy), row_temp in product(flags, row_temps):
            for hidden_grad, weight_grad, grad_weight_ty in passes:
                specs.append(_spec(
                    (f"logprobs_bwd_atomic[{ty},bias={bias},softcap={softcap},entropy={entropy},dH={hidden_grad},"
                     f"dW={weight_grad and grad_weight_ty},rowtemp={row_temp}]"), _logprobs_bwd_atomic_kernel,
                    {**inputs, **grads_in, "GradHidden": "*fp32", "GradBias": "*fp32",
                     "GradWeight": f"*{grad_weight_ty}"},
                    {**_tiles(config), **common, "GROUP_N": BACKWARD_GROUP_ROWS, "HAS_BIAS": bias,
                     "HAS_SOFTCAP": softcap, "ENTROPY_GRAD": entropy, "HIDDEN_GRAD": hidden_grad,
                     "WEIGHT_GRAD": weight_grad, "ROW_TEMP": row_temp},
                    config, float_atomics=True))

        config = GPU_CONFIG["dlogits"][dtype]
        for (bias, softcap, entropy), row_temp in product(flags, row_temps):
            specs.append(_spec(
                f"logprobs_dlogits[{ty},bias={bias},softcap={softcap},entropy={entropy},rowtemp={row_temp}]",
                _logprobs_dlogits_kernel,
                {**inputs, **grads_in, "GradLogits": f"*{ty}", "BiasPartial": "*fp32"},
                {**_tiles(config), **common, "GROUP_N": BACKWARD_GROUP_ROWS, "HAS_BIAS": bias, "HAS_SOFTCAP": softcap,
                 "ENTROPY_GRAD": entropy, "ROW_TEMP": row_temp},
                config))
    return specs
