"""Make Triton's CPU interpreter work with numpy >= 2.3.

Triton 3.6's interpreter (``TRITON_INTERPRET=1``) turns a scalar kernel value into a Python int
with ``int(array)`` on a one-element 1-D array, which numpy 2.3 removed (only 0-d arrays convert).
Every ``range()`` over a runtime bound then fails with "only 0-dimensional arrays can be converted
to Python scalars". The fix re-registers that one conversion through ``reshape(-1)[0]``, which
every numpy accepts. It is applied only when the interpreter is on, numpy is >= 2.3, and the
interpreter still has the function it wraps, so compiled GPU runs and fixed Triton releases are
untouched.
"""

from __future__ import annotations

import os


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def apply() -> bool:
    """Patch the interpreter if needed; returns True when the patch is (now) in place."""
    if not _interpreter_on():
        return False
    import numpy

    if tuple(int(part) for part in numpy.__version__.split(".")[:2]) < (2, 3):
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "_grpo_kernels_numpy_fix", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._grpo_kernels_numpy_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
