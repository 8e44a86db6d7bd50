"""docs/semantics.md's options table is the one generated from the loss tables."""

import os

from grpo_kernels.ops import grpo_loss as grpo_loss_module

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "semantics.md")


def test_options_table_in_sync():
    assert grpo_loss_module.docs_in_sync(DOC), (
        "docs/semantics.md is out of date: run `python -m grpo_kernels.ops.grpo_loss --write-docs`")


def test_every_option_and_loss_type_documented():
    text = grpo_loss_module.options_markdown()
    for name in list(grpo_loss_module.OPTIONS) + list(grpo_loss_module.LOSS_TYPES_TABLE):
        assert f"`{name}`" in text
