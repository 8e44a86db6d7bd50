"""Speed and memory of the fused linear + GRPO loss against its peers (issue 4).

``python -m benchmarks.suite`` runs the full suite on a GPU; ``pytest benchmarks/ --benchmark-only``
runs a tiny CPU smoke version. See benchmarks/README.md.
"""
