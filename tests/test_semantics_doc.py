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


def test_error_policy_table_lists_every_option():
    """The error-policy table (docs/semantics.md, "Error policy") has one row per option, generated
    from the option table (kept in sync by test_options_table_in_sync)."""
    rows = [line for line in grpo_loss_module.error_policy_markdown().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(grpo_loss_module.OPTIONS)
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Error policy"):text.index("## torch.compile")]
    assert all(row in section for row in rows)
