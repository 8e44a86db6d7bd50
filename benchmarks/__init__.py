"""Speed and memory of the fused linear + GRPO loss against its peers (issue 4), and the GPU kit.

``python -m benchmarks.suite`` runs the full suite on a GPU; ``pytest benchmarks/ --benchmark-enable --benchmark-only``
runs a tiny CPU smoke version; ``bash benchmarks/gpu_session.sh --budget-s 420`` is the budgeted
GPU session (``benchmarks.kit``). See benchmarks/README.md.
"""

import os as _os
import sys as _sys

# Peer wheels that gpu_session.sh installed into a private folder (--target) are importable
# *after* the interpreter's own site-packages: the machine's torch, triton and numpy always win.
_peer_site = _os.environ.get("GRPO_KERNELS_PEER_SITE")
if _peer_site and _os.path.isdir(_peer_site) and _peer_site not in _sys.path:
    _sys.path.append(_peer_site)
