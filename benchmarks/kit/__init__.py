"""The GPU kit: ``bash benchmarks/gpu_session.sh --budget-s 420`` on a CUDA machine (issue 9).

Stages, each a module run under its own time cap by ``gpu_session.sh``, each writing its results
as soon as it has them (``common.write_json`` / ``write_text`` replace files atomically):

- ``smoke``  (stage 0): device and versions; compiled correctness of every launchable kernel
  configuration against ``grpo_kernels.reference`` (float64), the log-prob kernel at a real shape
  against a float32 chunked reference, every loss type, the advantages kernel;
- ``peers``  (stage 1): the log-prob op and the fused GRPO loss against CCE, Liger, TRL 1.16's
  streamed LM head and materialized logits, with ratios to a bf16 matmul timed in the same run,
  on random and on realistic logits (``inputs``);
- ``sweep``  (stage 2): block sizes of the log-prob kernels, pre-filtered by the sm_90 compiler,
  timed by overriding ``grpo_kernels.ops.logprobs.GPU_CONFIG``;
- stages 3 and 4 are ``benchmarks.suite --quick`` and ``benchmarks.bench_e2e_step``;
- ``session`` writes the per-stage summary (``session.json`` / ``session.md``).

``--dry-run`` runs every stage on CPU at tiny shapes (Triton interpreter or torch path) into a
temporary results folder: ``tests/test_gpu_kit.py`` runs it in CI.
"""
