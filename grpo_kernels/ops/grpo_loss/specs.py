"""Every configuration the launcher can pick, for the sm_90 compile check
(``python -m grpo_kernels.ops.sm90_check --module grpo_kernels.ops.grpo_loss``): derived from the
tables, so a new loss type, KL estimator or switch is compiled without being listed here.
"""

from __future__ import annotations

from grpo_kernels.ops.grpo_loss.kernel import BLOCK_B, BLOCK_T, KERNEL_MASK_DTYPES, NUM_STAGES, NUM_WARPS, grpo_loss_kernel
from grpo_kernels.ops.grpo_loss.options import IMPORTANCE_SAMPLING_LEVELS
from grpo_kernels.ops.grpo_loss.table import (
    DEFAULT_RS_STAT,
    KL_ESTIMATORS,
    LOSS_TYPES_TABLE,
    POLICIES,
    REJECTION_SAMPLING,
    ROLLOUT_IS_LEVELS,
    ROW_LOG_RATIO_MEAN,
    RS_NONE,
    RS_SEQ_MAX,
    RS_TOKEN,
)
from grpo_kernels.ops.grpo_loss.terms import kl_trl_k3
from grpo_kernels.ops.utils import CompileSpec


def _switch_combinations():
    """A covering set of ``kernel.kernel_switches`` results: every policy x ratio level x off-policy
    mask on the default KL estimator, then every KL estimator once (the estimator is a leaf of
    ``terms.token_loss`` and shares no code with the switches it is not combined with), then rollout
    correction: each source x IS level x rejection level, each rejection statistic once, and the
    heaviest combinations (sequence-level ratios, the off-policy mask and rejection together).
    Packed sequences (``PACKED``: the same walks over segments): every policy x ratio level, each
    rollout-correction reduction, and the heaviest combinations."""
    combos = {}
    off = {"RC_SOURCE": 0, "RC_IS": 0, "RS_LEVEL": RS_NONE, "RS_STAT": DEFAULT_RS_STAT, "PACKED": False}

    def add(switches):
        combos[tuple((k, id(v) if callable(v) else v) for k, v in switches.items())] = switches

    def switches_of(loss_type, level="token", off_policy=False, kl=kl_trl_k3, **correction):
        policy = POLICIES[LOSS_TYPES_TABLE[loss_type].policy]
        return {"POLICY": policy.jit, "KL": kl,
                "ROW_LOG_RATIO": ROW_LOG_RATIO_MEAN if level == "sequence" else policy.row_log_ratio,
                "FOLDS_IS_RATIO": policy.folds_is_ratio, "OFF_POLICY": off_policy,
                "TOKEN_VALUE": policy.token_selection is not None, **off, **correction}

    for name, spec in LOSS_TYPES_TABLE.items():
        for level in IMPORTANCE_SAMPLING_LEVELS:
            if level == "sequence" and not spec.sequence_level:
                continue
            for off_policy in (False, True) if spec.off_policy_mask else (False,):
                add(switches_of(name, level, off_policy))
            add(switches_of(name, level, PACKED=True))
    for jit, _ in KL_ESTIMATORS.values():
        add(switches_of("dapo", kl=jit))
    rejection_levels = {criterion.level: criterion.stat for criterion in REJECTION_SAMPLING.values()}
    for source in (1, 2):  # each IS level alone, each rejection level alone
        for rc_is in range(1, len(ROLLOUT_IS_LEVELS)):
            add(switches_of("dapo", RC_SOURCE=source, RC_IS=rc_is))
        for rs_level, stat in rejection_levels.items():
            add(switches_of("dapo", RC_SOURCE=source, RS_LEVEL=rs_level, RS_STAT=stat))
    for criterion in REJECTION_SAMPLING.values():  # each statistic once (a leaf: per token suffices)
        add(switches_of("dapo", RC_SOURCE=1, RS_LEVEL=RS_TOKEN, RS_STAT=criterion.stat))
    for name, level in (("grpo", "sequence"), ("rloo", "token"), ("gpg", "token"), ("kl_cov", "token")):
        spec = LOSS_TYPES_TABLE[name]  # the row reductions and token selection, with what they allow
        add(switches_of(name, level, RC_SOURCE=2, RC_IS=1, RS_LEVEL=RS_TOKEN if "rollout_rs" in spec.rollout_correction
                        else RS_NONE))
    for rc_is in range(1, len(ROLLOUT_IS_LEVELS)):  # packed: each per-row reduction of rollout correction
        add(switches_of("dapo", RC_SOURCE=1, RC_IS=rc_is, PACKED=True))
    for rs_level, stat in rejection_levels.items():
        add(switches_of("dapo", RC_SOURCE=2, RS_LEVEL=rs_level, RS_STAT=stat, PACKED=True))
    for rs_level in (RS_TOKEN, RS_SEQ_MAX):  # the heaviest
        for name in ("grpo", "rloo"):
            for packed in (False, True):
                add(switches_of(name, "sequence" if name == "grpo" else "token", off_policy=True, RC_SOURCE=1,
                                RC_IS=2, RS_LEVEL=rs_level, RS_STAT=rejection_levels[rs_level], PACKED=packed))
    return list(combos.values())


def sm90_compile_specs() -> list[CompileSpec]:
    """Every switch combination x every mask dtype the launcher passes, at the one tile shape."""
    signature = {name: "*fp32" for name in ("Logp", "OldLogp", "RefLogp", "SamplingLogp", "Advantages")}
    signature["Mask"] = None  # per spec
    signature.update({name: "*fp32" for name in ("Entropy", "RolloutRatio", "EntropyThreshold", "TokenValue",
                                                 "IsScale", "GradLogp", "GradEntropy", "RowStats")})
    signature["CuSeqlens"] = None  # per spec: int64 cu_seqlens packed, a placeholder (RowStats) padded
    signature.update({name: "i32" for name in (
        "B", "T", "stride_logp", "stride_old", "stride_ref", "stride_sampling", "stride_mask",
        "stride_adv_b", "stride_adv_t", "stride_ent_b", "stride_ent_t", "stride_is_b", "stride_is_t",
        "stride_token_value")})
    signature.update({name: "fp32" for name in ("p0", "p1", "p2", "p3", "beta")})
    signature["bias_kl"] = "i32"
    signature.update({name: "fp32" for name in ("log_ratio_bound", "is_clip_min", "is_clip_max")})
    signature["is_mask_mode"] = "i32"
    signature.update({name: "fp32" for name in ("off_policy_threshold", "rs_lower", "rs_upper")})
    signature["write_grad_entropy"] = "i32"
    specs = []
    for switches in _switch_combinations():
        constexprs = dict(switches, BLOCK_B=BLOCK_B, BLOCK_T=BLOCK_T)
        label = ",".join(f"{k.lower()}={v.fn.__name__ if callable(v) else v}" for k, v in switches.items())
        # the mask dtype does not interact with the loss type: every dtype once, on the default switches
        first_of_policy = (not switches["OFF_POLICY"] and switches["KL"] is kl_trl_k3 and not switches["RC_SOURCE"]
                           and not switches["PACKED"])
        mask_types = KERNEL_MASK_DTYPES.values() if first_of_policy else ("fp32",)
        cu_seqlens_ty = "*i64" if switches["PACKED"] else "*fp32"
        for mask_ty in mask_types:
            specs.append(CompileSpec(
                name=f"grpo_loss[{label},mask={mask_ty}]",
                kernel=grpo_loss_kernel,
                signature={**signature, "Mask": f"*{mask_ty}", "CuSeqlens": cu_seqlens_ty,
                           **{name: "constexpr" for name in constexprs}},
                constexprs=constexprs,
                num_warps=NUM_WARPS,
                num_stages=NUM_STAGES,
            ))
    return specs
