"""Every kernel configuration the divergence drivers can launch, for the sm_90 compile check
(``python -m grpo_kernels.ops.sm90_check --module grpo_kernels.ops.divergence.specs``).

Configurations: the student's dtype x the teacher's dtype (or no teacher tile), which set the
tiles and pointer types, x the d-logits kernel's KIND. Bias and soft-cap are runtime switches,
compiled into every configuration.
"""

from grpo_kernels.ops.divergence.kernels import (
    FORWARD_KL,
    JSD,
    REVERSE_KL,
    TARGETS,
    _divergence_dlogits_kernel,
    _divergence_fwd_kernel,
    _divergence_jsd_kernel,
    _divergence_merge_kernel,
    _split_sum_kernel,
)
from grpo_kernels.ops.divergence.launch import DTYPE_PAIRS, GPU_CONFIG, dot_precision
from grpo_kernels.ops.logprobs.launch import BACKWARD_GROUP_ROWS, FORWARD_GROUP_ROWS
from grpo_kernels.ops.utils import FLOAT_DTYPES, TRITON_DTYPE, CompileSpec

_FLOAT_ARGS = ("s_scale", "s_softcap", "t_scale", "t_softcap", "beta", "log_beta", "log_one_minus_beta")
_KIND_NAMES = {FORWARD_KL: "forward_kl", REVERSE_KL: "reverse_kl", JSD: "jsd", TARGETS: "targets"}


def _spec(name, kernel, pointers, constexprs, config):
    """A CompileSpec whose signature follows the kernel's arguments: pointer arguments (Capitalized
    names) are float32 unless ``pointers`` names their type, ``_FLOAT_ARGS`` are fp32 scalars, every
    other argument is an i32."""
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg[0].isupper() and not arg.isupper():  # Capitalized: a pointer (M, V, DS, ...: sizes)
            signature[arg] = pointers.get(arg, "*fp32")
        else:
            signature[arg] = "fp32" if arg in _FLOAT_ARGS else "i32"
    *_, num_warps, num_stages = config
    return CompileSpec(name=name, kernel=kernel, signature=signature, constexprs=constexprs,
                       num_warps=num_warps, num_stages=num_stages)


def _head_pointers(student_ty, teacher_ty):
    return {"SHidden": f"*{student_ty}", "SWeight": f"*{student_ty}", "SBias": f"*{student_ty}",
            "THidden": f"*{teacher_ty}", "TWeight": f"*{teacher_ty}", "TBias": f"*{teacher_ty}",
            "RowIdx": "*i32", "Ids": "*i32"}


def _tile_constexprs(config, student_dtype, teacher_dtype, group_n):
    block_n, block_v, block_d, *_ = config
    return {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_DS": block_d, "BLOCK_DT": block_d, "GROUP_N": group_n,
            "S_DOT_PRECISION": dot_precision(student_dtype), "T_DOT_PRECISION": dot_precision(teacher_dtype),
            "INTERPRETER": False}


def sm90_compile_specs() -> list[CompileSpec]:
    specs = []
    merge = GPU_CONFIG["merge"][(FLOAT_DTYPES[0], None)]
    for has_teacher in (False, True):
        specs.append(_spec(f"divergence_merge[teacher={has_teacher}]", _divergence_merge_kernel, {},
                           {"BLOCK_N": merge[0], "HAS_TEACHER": has_teacher}, merge))
    specs.append(_spec("divergence_split_sum", _split_sum_kernel, {}, {"NUM_SUMS": 2, "BLOCK_N": merge[0]}, merge))
    for student_dtype, teacher_dtype in DTYPE_PAIRS:
        has_teacher = teacher_dtype is not None
        # without a teacher tile the stand-in teacher pointers are the student's
        t_dtype = teacher_dtype or student_dtype
        s_ty, t_ty = TRITON_DTYPE[student_dtype], TRITON_DTYPE[t_dtype]
        heads = _head_pointers(s_ty, t_ty)
        label = f"{s_ty},teacher={t_ty if has_teacher else None}"
        pair = (student_dtype, teacher_dtype)
        config = GPU_CONFIG["fwd"][pair]
        specs.append(_spec(
            f"divergence_fwd[{label}]", _divergence_fwd_kernel, heads,
            {**_tile_constexprs(config, student_dtype, t_dtype, FORWARD_GROUP_ROWS), "HAS_TEACHER": has_teacher},
            config))
        if has_teacher:
            config = GPU_CONFIG["jsd"][pair]
            specs.append(_spec(f"divergence_jsd[{label}]", _divergence_jsd_kernel, heads,
                               _tile_constexprs(config, student_dtype, t_dtype, FORWARD_GROUP_ROWS), config))
        config = GPU_CONFIG["dlogits"][pair]
        for kind in (FORWARD_KL, REVERSE_KL, JSD) if has_teacher else (TARGETS,):
            specs.append(_spec(
                f"divergence_dlogits[{label},kind={_KIND_NAMES[kind]}]", _divergence_dlogits_kernel,
                {**heads, "GradLogits": f"*{s_ty}"},
                {**_tile_constexprs(config, student_dtype, t_dtype, BACKWARD_GROUP_ROWS), "KIND": kind}, config))
    return specs
