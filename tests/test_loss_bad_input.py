"""Bad input to the loss API (issue #10 classes 3-5, #15): a clear error naming the argument, never
a wrong number or a NaN, on both backends. Each case here passed silently (or failed obscurely)
before."""

import pytest
import torch

import grpo_kernels as gk
from conftest import DEVICE
from test_grpo_loss import make_batch, make_fused

BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


def loss(batch, backend, **kwargs):
    return gk.grpo_loss(batch["logp"], kwargs.pop("mask", batch["mask"]), batch["adv"], old_logprobs=batch["old"],
                        backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value,error,match", [
    ("epsilon_low", -0.1, ValueError, "epsilon_low must be >= 0"),
    ("epsilon_high", -0.1, ValueError, "epsilon_high must be >= 0"),
    ("beta", -0.04, ValueError, "beta must be >= 0"),
    ("num_items_in_batch", 0, ValueError, "num_items_in_batch must be > 0"),
    ("num_items_in_batch", -3.0, ValueError, "num_items_in_batch must be > 0"),
    ("num_items_in_batch", float("nan"), ValueError, "num_items_in_batch must be finite"),
    ("num_items_in_batch", "tensor-nan", ValueError, "num_items_in_batch must be finite and > 0"),
    ("num_items_in_batch", "tensor-zero", ValueError, "num_items_in_batch must be finite and > 0"),
    ("temperature", "0.7", TypeError, "temperature must be a number"),
    ("temperature", 0.0, ValueError, "temperature must be finite and > 0"),
])
def test_bad_scalar(backend, name, value, error, match):
    batch = make_batch()
    if value == "tensor-nan":
        value = torch.tensor(float("nan"))
    elif value == "tensor-zero":
        value = torch.tensor(0.0)
    with pytest.raises(error, match=match):
        loss(batch, backend, **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_or_negative_mask(backend):
    batch = make_batch()
    for bad in (float("nan"), -1.0, float("inf")):
        mask = batch["mask"].float()
        mask[0, 2] = bad
        with pytest.raises(ValueError, match=r"completion_mask must be in \[0, 1\]"):
            loss(batch, backend, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_or_nan_rollout_is_ratio(backend):
    batch = make_batch()
    for bad in (-0.5, float("nan")):
        ratio = torch.ones(4, 7)
        ratio[2, 3] = bad
        with pytest.raises(ValueError, match="rollout_is_ratio must be >= 0"):
            loss(batch, backend, rollout_is_ratio=ratio)


def test_sequence_level_cispo_sapo_use_ligers_phrase():
    batch = make_batch()
    for loss_type in ("cispo", "sapo"):
        with pytest.raises(ValueError, match="Sequence-level importance sampling is not supported"):
            loss(batch, "torch", loss_type=loss_type, importance_sampling_level="sequence")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_completion_ids_under_the_mask(backend):
    batch, hidden, weight, bias, ids = make_fused()
    mask = batch["mask"]
    row, col = (mask != 0).nonzero()[0].tolist()
    for bad in (-100, weight.shape[0], -1):
        bad_ids = ids.clone()
        bad_ids[row, col] = bad
        with pytest.raises(ValueError, match=r"completion_ids holds 1 id\(s\) outside \[0, 37\)"):
            gk.fused_linear_grpo_loss(hidden, weight, bad_ids, mask, batch["adv"], backend=backend)
    with pytest.raises(TypeError, match="temperature must be a number"):
        gk.fused_linear_grpo_loss(hidden, weight, ids, mask, batch["adv"], temperature="0.7", backend=backend)
