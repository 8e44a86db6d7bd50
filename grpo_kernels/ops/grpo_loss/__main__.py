"""``python -m grpo_kernels.ops.grpo_loss [--write-docs]``: check (or rewrite) docs/semantics.md's
generated options tables; exit status 1 when they are out of date."""

import os
import sys

from grpo_kernels.ops.grpo_loss.options import docs_in_sync

docs = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "semantics.md")
sys.exit(0 if docs_in_sync(docs, write="--write-docs" in sys.argv) else 1)
