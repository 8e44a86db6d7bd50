"""``grpo-kernels-train --config cfg.yaml [--key value ...]`` (also ``python -m grpo_kernels.train``).

Under several processes: ``torchrun --nproc_per_node N -m grpo_kernels.train --config cfg.yaml --mode fsdp2``.
A user error (a bad key, value or file; an output_dir that holds another run; no intact checkpoint to
resume from) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from grpo_kernels.train.checkpoint import CheckpointError
    from grpo_kernels.train.config import ConfigError, parse_args_or_exit
    from grpo_kernels.train.trainer import GRPOTrainer

    prog = "grpo-kernels-train"
    config = parse_args_or_exit(sys.argv[1:] if argv is None else argv, prog)
    try:
        trainer = GRPOTrainer(config)
    except (ConfigError, CheckpointError, ImportError, OSError, ValueError) as error:  # set-up: the user's input
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        history = trainer.train()
        if trainer.dist.is_main and history:
            last = history[-1]
            print(f"done: {len(history)} step{'s' * (len(history) != 1)}, reward {history[0]['reward']:.3f} -> {last['reward']:.3f}; "
                  f"outputs in {config.output_dir}")
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
