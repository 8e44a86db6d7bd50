"""The loss package's layout: its public names, and an import that needs neither numpy nor
Triton's interpreter when the interpreter is off (a bare install runs the torch path)."""

import os
import subprocess
import sys

import grpo_kernels.ops.grpo_loss as grpo_loss_package

ROOT = os.path.join(os.path.dirname(__file__), "..")

_WITHOUT_NUMPY = """
import sys
sys.modules["numpy"] = None  # `import numpy` raises ImportError from here on
import torch
import grpo_kernels
logp = -torch.rand(3, 5)
loss, metrics = grpo_kernels.grpo_loss(logp, torch.ones(3, 5), torch.randn(3), backend="torch", loss_type="grpo")
assert torch.isfinite(loss), loss
assert "triton.runtime.interpreter" not in sys.modules
print("imported without numpy")
"""


def test_import_and_torch_path_without_numpy():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _WITHOUT_NUMPY], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "imported without numpy" in result.stdout, result.stderr[-3000:]


def test_public_names():
    for name in ("grpo_loss", "grpo_loss_prepared", "prepare_loss_inputs", "validate_loss_options", "metric_names",
                 "LOSS_TYPES", "LOSS_TYPES_TABLE", "OPTIONS", "KL_ESTIMATORS", "LOSS_AGG_MODES",
                 "IMPORTANCE_SAMPLING_LEVELS", "options_markdown", "docs_in_sync", "sm90_compile_specs"):
        assert hasattr(grpo_loss_package, name), name
    assert set(grpo_loss_package.__all__) <= set(dir(grpo_loss_package))
