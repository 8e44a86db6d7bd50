"""The error policy of the loss options (issue #21, docs/semantics.md "Error policy"): strict types
through every API that takes them (grpo_loss, fused_linear_grpo_loss, FusedLinearGRPOLoss, the verl
adapter's config reading, the trainer's config), declared ranges, the loss types that read each
option (the generated table agrees with the validation), num_items_in_batch where TRL reads it,
a rollout IS mode without a ratio, masks in [0, 1], NaN advantages, the LossConfig repr."""

import math

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from grpo_kernels import FusedLinearGRPOLoss
from grpo_kernels.ops.grpo_loss import (
    LOSS_TYPES,
    LOSS_TYPES_TABLE,
    OPTIONS,
    option_readers,
    validate_loss_options,
)
from grpo_kernels.ops.grpo_loss import op as grpo_loss_op
from grpo_kernels.ops.grpo_loss.options import ACCEPTED_UNUSED
from grpo_kernels.reference import grpo_loss_reference
from test_grpo_loss import BACKENDS, make_batch, make_fused, run_loss

try:
    import verl  # noqa: F401

    HAS_VERL = True
except ImportError:
    HAS_VERL = False
needs_verl = pytest.mark.skipif(not HAS_VERL, reason="verl is not installed (CI installs verl 0.9.1 separately)")


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


@pytest.fixture
def no_launch(monkeypatch):
    """Any launch would crash differently: the errors below come before it."""
    monkeypatch.setattr(grpo_loss_op, "ROW_PASS", None)


def loss(batch, backend, **options):
    return gk.grpo_loss(batch["logp"], options.pop("mask", batch["mask"]), batch["adv"], old_logprobs=batch["old"],
                        backend=backend, **options)


# ---------------------------------------------------------------------------------------------
# Types: never converted
# ---------------------------------------------------------------------------------------------


def wrong_types(name):
    """Values of the wrong type for option ``name``, from what its check accepts."""
    accepts = OPTIONS[name].check.accepts
    if "torch.Generator" in accepts:
        return [3, "seed"]
    if "a bool" in accepts:
        return [1, 0.0, "True", "false"]
    if accepts.startswith("one of") or accepts.startswith("None or one of"):
        return [[OPTIONS[name].default or "token"], 1]
    return ["0.5", "1", True, False]


TYPE_CASES = [(name, value) for name in OPTIONS for value in wrong_types(name)]


@pytest.mark.parametrize("name,value", TYPE_CASES, ids=[f"{n}={v!r}" for n, v in TYPE_CASES])
def test_wrong_types_are_refused_everywhere(name, value, no_launch):
    match = f"{name} must be"
    with pytest.raises(TypeError, match=match):
        validate_loss_options(**{name: value})
    batch = make_batch()
    for backend in BACKENDS:
        with pytest.raises(TypeError, match=match):
            loss(batch, backend, **{name: value})
    batch, hidden, weight, bias, ids = make_fused()
    with pytest.raises(TypeError, match=match):
        gk.fused_linear_grpo_loss(hidden, weight, ids, batch["mask"], batch["adv"], **{name: value})


def test_loss_type_list_is_a_type_error():
    with pytest.raises(TypeError, match="loss_type must be one of 'grpo'.*got list"):
        validate_loss_options(loss_type=["grpo"])


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    config = validate_loss_options(beta=np.float32(0.04), max_completion_length=np.int64(7), loss_type="dr_grpo",
                                   use_bias_correction_kl=np.bool_(True))
    assert config.beta == pytest.approx(0.04) and config.max_completion_length == 7
    assert config.use_bias_correction_kl is True


LIGER_ARGUMENTS = ["beta", "epsilon_low", "epsilon_high", "max_completion_length", "sapo_temperature_pos",
                   "sapo_temperature_neg", "temperature", "delta", "use_bias_correction_kl", "vespo_k_pos",
                   "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "compiled", "use_ref_model", "chunk_size",
                   "loss_type", "importance_sampling_level"]


@pytest.mark.parametrize("name", LIGER_ARGUMENTS)
def test_liger_module_arguments_are_checked_at_construction(name):
    """Every argument, the options of loss types the module does not run included (Liger keeps
    them and ignores them): a string or a bool where a number goes, 1 where a bool goes."""
    flags = ("use_bias_correction_kl", "compiled", "use_ref_model")
    choices = ("loss_type", "importance_sampling_level")
    bad = [1, "True"] if name in flags else [["grpo"]] if name in choices else ["0.5", True]
    for value in bad:
        with pytest.raises(TypeError, match=f"{name} must be"):
            FusedLinearGRPOLoss(**{name: value})
    with pytest.raises(TypeError, match="kl_tau must be a number"):
        FusedLinearGRPOLoss(loss_type="ipo", loss_options={"kl_tau": "0.1"})
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        FusedLinearGRPOLoss(chunk_size=0)


def test_liger_module_num_items_in_batch(no_launch):
    batch, hidden, weight, bias, ids = make_fused()
    module = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False)  # dapo
    with pytest.raises(TypeError, match="num_items_in_batch must be a number"):
        module(hidden, weight, ids, batch["mask"], batch["adv"], num_items_in_batch="12")


# ---------------------------------------------------------------------------------------------
# Ranges, orders, combinations
# ---------------------------------------------------------------------------------------------

RANGE_CASES = [
    (dict(loss_type="kl_cov", kl_cov_ratio=5), r"kl_cov_ratio must be in \(0, 1\], got 5.0"),
    (dict(loss_type="kl_cov", kl_cov_ratio=0.0), r"kl_cov_ratio must be in \(0, 1\]"),
    (dict(loss_type="clip_cov", clip_cov_ratio=5), r"clip_cov_ratio must be in \(0, 1\], got 5.0"),
    (dict(loss_type="clip_cov", clip_cov_lb=6.0), r"clip_cov_lb 6.0 > clip_cov_ub 5.0"),
    (dict(loss_type="clip_cov", clip_cov_lb=2.0, clip_cov_ub=1.0), r"clip_cov_lb 2.0 > clip_cov_ub 1.0"),
    (dict(rollout_is_mode="mask", rollout_is_clip_min=2.0, rollout_is_clip_max=1.0), "rollout_is_clip_min 2.0 >"),
    (dict(sequence_log_ratio_max=10.0), "sequence_log_ratio_max needs importance_sampling_level"),
    (dict(loss_type="geo_mean", importance_sampling_level="sequence_token"), "makes no sense"),
    (dict(num_items_in_batch=10, loss_agg_mode="token-mean"), "num_items_in_batch needs loss_agg_mode=None"),
]


@pytest.mark.parametrize("options,match", RANGE_CASES, ids=[m for _, m in RANGE_CASES])
def test_ranges_and_combinations(options, match, no_launch):
    with pytest.raises(ValueError, match=match):
        validate_loss_options(**options)
    batch = make_batch()
    for backend in BACKENDS:  # (kl_cov_ratio=5 was torch.topk's "selected index k out of range")
        with pytest.raises(ValueError, match=match):
            loss(batch, backend, **options)


def test_option_bounds_are_inclusive():
    validate_loss_options(loss_type="kl_cov", kl_cov_ratio=1.0)
    validate_loss_options(loss_type="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=5.0)
    validate_loss_options(top_entropy_quantile=0.0)


# An example non-default value of each option, with what it needs.
EXAMPLES = {
    "beta": dict(beta=0.1), "kl_estimator": dict(kl_estimator="k2"), "epsilon_low": dict(epsilon_low=0.1),
    "epsilon_high": dict(epsilon_high=0.3), "delta": dict(delta=1.5), "clip_ratio_c": dict(clip_ratio_c=4.0),
    "importance_sampling_level": dict(importance_sampling_level="sequence"),
    "sequence_log_ratio_max": dict(importance_sampling_level="sequence_token", sequence_log_ratio_max=10.0),
    "max_completion_length": dict(max_completion_length=9), "num_items_in_batch": dict(num_items_in_batch=10),
    "loss_agg_mode": dict(loss_agg_mode="token-sum"), "dp_size": dict(loss_agg_mode="token-sum", dp_size=2),
    "batch_num_tokens": dict(loss_agg_mode="token-mean", batch_num_tokens=10),
    "global_batch_size": dict(loss_agg_mode="seq-mean-token-sum", global_batch_size=4),
    "loss_scale_factor": dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=3.0),
    "rollout_is_mode": dict(rollout_is_mode="mask"),
    "rollout_is_clip_min": dict(rollout_is_mode="mask", rollout_is_clip_min=0.5),
    "rollout_is_clip_max": dict(rollout_is_mode="truncate", rollout_is_clip_max=2.0),
    "sapo_temperature_pos": dict(sapo_temperature_pos=0.5), "sapo_temperature_neg": dict(sapo_temperature_neg=0.5),
    "vespo_k_pos": dict(vespo_k_pos=1.0), "vespo_lambda_pos": dict(vespo_lambda_pos=1.0),
    "vespo_k_neg": dict(vespo_k_neg=1.0), "vespo_lambda_neg": dict(vespo_lambda_neg=1.0),
    "kl_cov_ratio": dict(kl_cov_ratio=0.1), "ppo_kl_coef": dict(ppo_kl_coef=0.5),
    "clip_cov_ratio": dict(clip_cov_ratio=0.1), "clip_cov_lb": dict(clip_cov_lb=0.5),
    "clip_cov_ub": dict(clip_cov_ub=4.0), "cispo_ratio_min": dict(cispo_ratio_min=0.5),
    "generator": dict(generator=torch.Generator()), "use_bias_correction_kl": dict(use_bias_correction_kl=True),
    "entropy_coef": dict(entropy_coef=0.1), "top_entropy_quantile": dict(top_entropy_quantile=0.5),
    "off_policy_mask_threshold": dict(off_policy_mask_threshold=0.1), "dro_beta": dict(dro_beta=0.3),
    "adv_tau": dict(adv_tau=0.5), "kl_tau": dict(kl_tau=0.1), "ipo_threshold": dict(ipo_threshold=0.2),
    "rollout_is": dict(rollout_is="token"),
    "rollout_is_batch_normalize": dict(rollout_is="token", rollout_is_batch_normalize=True),
    "rollout_rs": dict(rollout_rs="token_k2", rollout_rs_threshold=1.0),
    "rollout_rs_threshold": dict(rollout_rs="token_k2", rollout_rs_threshold=1.0),
    "rollout_rs_threshold_lower": dict(rollout_rs="token_k1", rollout_rs_threshold=2.0,
                                       rollout_rs_threshold_lower=0.5),
    "bypass_mode": dict(rollout_is="token", bypass_mode=True),
}
REQUIRED = {"dr_grpo": dict(max_completion_length=7), "dro": dict(dro_beta=0.5)}


@pytest.mark.parametrize("name", [name for name in OPTIONS if name != "loss_type"])
def test_the_readers_of_each_option_are_what_validation_accepts(name):
    """docs/semantics.md's error-policy table (``option_readers``) is what validate_loss_options does:
    a non-default value is accepted exactly by the loss types that read it (and, for the clip range
    and max_completion_length, by every loss type)."""
    assert set(EXAMPLES) == set(OPTIONS) - {"loss_type"}
    readers = option_readers(name)
    assert readers, name
    for loss_type in LOSS_TYPES:
        options = {**REQUIRED.get(loss_type, {}), **EXAMPLES[name], "loss_type": loss_type}
        if loss_type in readers or name in ACCEPTED_UNUSED:
            validate_loss_options(**options)
        else:
            with pytest.raises(ValueError):
                validate_loss_options(**options)


# ---------------------------------------------------------------------------------------------
# num_items_in_batch: where TRL 1.16 reads it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_num_items_in_batch_is_refused_where_it_would_be_ignored(loss_type, no_launch):
    options = dict(REQUIRED.get(loss_type, {}), loss_type=loss_type, num_items_in_batch=57)
    if loss_type in ("dapo", "cispo", "vespo"):
        validate_loss_options(**options)
        with pytest.raises(ValueError, match="num_items_in_batch needs loss_agg_mode=None"):
            validate_loss_options(**options, loss_agg_mode="token-mean")
    else:  # (grpo and kl_cov ignored it silently)
        with pytest.raises(ValueError, match="num_items_in_batch is only used by loss_type cispo, dapo, vespo"):
            loss(make_batch(), "torch", **options)


def test_num_items_in_batch_readers_follow_trl():
    """The loss types whose TRL 1.16 loss changes with num_items_in_batch are those that take it."""
    pytest.importorskip("trl")
    from test_grpo_loss import trl_compute_loss

    batch = make_batch()
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
        losses = []
        for items in (batch["mask"].sum().float(), 3 * batch["mask"].sum().float()):
            logp = batch["logp"].clone().requires_grad_()
            value, _ = trl_compute_loss(
                batch, logp, batch["entropy"], loss_type=loss_type, level="token", beta=0.0,
                epsilon_high=5.0 if loss_type == "cispo" else 0.28, delta=None, use_bias_correction_kl=False,
                entropy_coef=0.0, top_entropy_quantile=1.0, off_policy_mask_threshold=None, rollout_is_ratio=None,
                num_items_in_batch=items)
            losses.append(value.item())
        trl_reads = not math.isclose(losses[0], losses[1])
        assert trl_reads == ("num_items_in_batch" in LOSS_TYPES_TABLE[loss_type].options), loss_type
        assert trl_reads == (loss_type in option_readers("num_items_in_batch")), loss_type


# ---------------------------------------------------------------------------------------------
# A rollout IS mode needs a ratio
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_rollout_is_mode_without_a_ratio_is_refused(backend, mode):
    """(The kernel bounded an implicit ratio of 1, giving 0 where the reference gave 0.298.)"""
    batch = make_batch(3, 5)
    options = dict(rollout_is_mode=mode, rollout_is_clip_min=1.5, rollout_is_clip_max=3.0)
    for fn in (loss, lambda b, be, **o: grpo_loss_reference(b["logp"], b["mask"], b["adv"], old_logprobs=b["old"],
                                                             **o)):
        with pytest.raises(ValueError, match=f"rollout_is_mode={mode!r}|rollout_is_mode bounds a rollout IS ratio"):
            fn(batch, backend, **options)
    fused, hidden, weight, bias, ids = make_fused()
    with pytest.raises(ValueError, match="bounds a rollout IS ratio"):
        gk.fused_linear_grpo_loss(hidden, weight, ids, fused["mask"], fused["adv"], backend=backend, **options)
    # with a ratio (given, or computed by rollout_is) the bounds apply, as in the reference
    ratio = torch.full((3, 5), 1.2)
    got = loss(batch, backend, rollout_is_ratio=ratio, **options)[0]
    want = grpo_loss_reference(batch["logp"], batch["mask"], batch["adv"], old_logprobs=batch["old"],
                               rollout_is_ratio=ratio, **options)[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# Values: masks in [0, 1], NaN advantages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,bad", [(torch.int64, 2), (torch.int32, 2), (torch.int32, -1), (torch.uint8, 2),
                                       (torch.float32, 2.0), (torch.float32, 1.0001), (torch.float32, -1.0),
                                       (torch.float32, float("nan")), (torch.float32, float("inf")),
                                       (torch.bfloat16, 1.5)], ids=str)
def test_mask_outside_the_unit_interval_is_refused(backend, dtype, bad):
    batch = make_batch()
    mask = batch["mask"].to(dtype)
    mask[0, 2] = bad
    with pytest.raises(ValueError, match=r"completion_mask must be in \[0, 1\]"):
        loss(batch, backend, mask=mask)
    fused, hidden, weight, bias, ids = make_fused()
    mask = fused["mask"].to(dtype)
    mask[0, 2] = bad
    with pytest.raises(ValueError, match=r"completion_mask must be in \[0, 1\]"):
        gk.fused_linear_grpo_loss(hidden, weight, ids, mask, fused["adv"], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_values_in_the_unit_interval_pass(backend):
    batch = make_batch()
    for mask in (batch["mask"].bool(), batch["mask"].int(), batch["mask"] * 0.5, batch["mask"].to(torch.uint8)):
        assert torch.isfinite(loss(batch, backend, mask=mask)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gpg", "geo_mean"])
def test_nan_advantages_propagate_on_kept_tokens_only(backend, loss_type):
    """Documented in docs/semantics.md: a NaN advantage on a kept token gives a NaN loss, as in TRL;
    on a row the mask drops entirely it is never read (TRL: NaN x 0 = NaN)."""
    batch = make_batch(5, 9)
    batch["adv"][3] = float("nan")  # a row with tokens
    assert batch["mask"][3].any()
    got = run_loss(gk.grpo_loss, batch, backend=backend, loss_type=loss_type)
    want = run_loss(grpo_loss_reference, batch, loss_type=loss_type)
    assert math.isnan(got[0].item()) and math.isnan(want[0].item())
    batch = make_batch(5, 9)
    batch["adv"][1] = float("nan")  # row 1 has no token (make_batch)
    assert not batch["mask"][1].any()
    got = run_loss(gk.grpo_loss, batch, backend=backend, loss_type=loss_type)
    batch["adv"][1] = 0.0
    clean = run_loss(gk.grpo_loss, batch, backend=backend, loss_type=loss_type)
    assert got[0].item() == clean[0].item() and torch.equal(got[2], clean[2])


# ---------------------------------------------------------------------------------------------
# The resolved options, readable
# ---------------------------------------------------------------------------------------------


def test_loss_config_repr_lists_every_resolved_option():
    config = validate_loss_options(loss_type="grpo", epsilon_low=0.1, beta=0.04)
    text = repr(config)
    assert text.startswith("LossConfig(loss_type='grpo', ")
    for name in OPTIONS:
        assert f"{name}=" in text, name
    assert "epsilon_high=0.1" in text  # resolved from epsilon_low
    assert "<" not in text.replace("<function", "")  # no default object repr
    assert "LossConfig object at" not in text


# ---------------------------------------------------------------------------------------------
# The verl adapter's reading of verl's config; the trainer's config
# ---------------------------------------------------------------------------------------------


@needs_verl
def test_verl_config_numbers_are_numbers():
    from omegaconf import OmegaConf

    from grpo_kernels.integrations.verl import policy_loss

    batch = make_batch(3, 5)
    logp, old, mask = batch["logp"], batch["old"], batch["mask"].bool()
    adv = batch["adv"][:, None].expand(3, 5)

    def run(name, config):
        return policy_loss(name, backend="torch")(old, logp, adv, mask, "token-mean", config)[0]

    plain = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3}
    as_omegaconf = OmegaConf.create(plain)
    assert run("vanilla", as_omegaconf).item() == run("vanilla", plain).item()
    for key, value in (("clip_ratio_low", "0.2"), ("clip_ratio_high", True), ("clip_ratio_c", "3.0"),
                       ("clip_ratio", "0.2")):
        config = OmegaConf.create({**plain, key: value, **({"clip_ratio_low": None} if key == "clip_ratio" else {})})
        with pytest.raises(TypeError, match=f"verl config {key} must be a number"):
            run("vanilla", config)
    with pytest.raises(TypeError, match="verl config tau_pos must be a number"):
        run("sapo", {"tau_pos": "1.0"})
    with pytest.raises(TypeError, match="verl config policy_loss.kl_cov_ratio must be a number"):
        run("kl_cov", {"policy_loss": {"kl_cov_ratio": "0.02"}})
    with pytest.raises(ValueError, match=r"kl_cov_ratio must be in \(0, 1\]"):  # (was torch.topk's error)
        run("kl_cov", {"policy_loss": {"kl_cov_ratio": 5}})
    with pytest.raises(TypeError, match="policy_loss.dro_beta must be a number"):
        run("dro", {"policy_loss": {"dro_beta": "0.3"}})
    bypass = {"loss_type": "reinforce", "rollout_is": "token", "rollout_is_threshold": 2.0,
              "rollout_is_batch_normalize": 1}
    with pytest.raises(TypeError, match="rollout_is_batch_normalize must be a bool"):
        run("bypass_mode", {"policy_loss": {"rollout_correction": bypass}})
    bypass = {"loss_type": "ppo_clip", "rollout_rs": "token_k1", "rollout_rs_threshold": True}
    with pytest.raises(TypeError, match="rollout_rs_threshold must be a number or verl's"):
        run("bypass_mode", {**plain, "policy_loss": {"rollout_correction": bypass}})


def test_trainer_config_refuses_strings_and_bools(tmp_path):
    from grpo_kernels.train.config import ConfigError, GRPOConfig, load_config

    for values, match in (({"beta": "0.04"}, "beta must be a number"), ({"beta": True}, "beta must be a number"),
                          ({"loss_type": "kl_cov", "kl_cov_ratio": "0.1"}, "kl_cov_ratio must be a number"),
                          ({"loss_type": "kl_cov", "kl_cov_ratio": 5.0}, r"kl_cov_ratio must be in \(0, 1\]"),
                          ({"loss_type": "clip_cov", "clip_cov_lb": 6.0}, "clip_cov_lb 6.0 > clip_cov_ub 5.0")):
        with pytest.raises(ConfigError, match=match):
            GRPOConfig(**values)
    with pytest.raises(ConfigError, match="beta must be a number"):  # (was parsed)
        load_config(None, {"beta": "0.04"})
    path = tmp_path / "cfg.yaml"
    path.write_text('beta: "0.04"\n')
    with pytest.raises(ConfigError, match="beta must be a number"):
        load_config(str(path))
    path.write_text("beta: 4e-2\nlearning_rate: 1E-6\n")  # YAML 1.2 numbers PyYAML reads as strings
    config = load_config(str(path))
    assert config.beta == pytest.approx(0.04) and config.learning_rate == pytest.approx(1e-6)
    # the levels come from the loss family's table (GSPO-token included)
    assert GRPOConfig(importance_sampling_level="sequence_token").loss_options()["importance_sampling_level"] == \
        "sequence_token"
