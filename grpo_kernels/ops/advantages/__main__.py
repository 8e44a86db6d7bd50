"""python -m grpo_kernels.ops.advantages [--write-docs]: check (or rewrite) docs/semantics.md's
estimator table; exit 1 when it is out of date."""

import os
import sys

from grpo_kernels.ops.advantages.estimators import docs_in_sync

docs = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "semantics.md")
sys.exit(0 if docs_in_sync(docs, write="--write-docs" in sys.argv) else 1)
