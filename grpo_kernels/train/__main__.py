"""``python -m grpo_kernels.train --config cfg.yaml [--key value ...]`` (console script: grpo-kernels-train).

Under several processes: ``torchrun --nproc_per_node N -m grpo_kernels.train --config cfg.yaml --mode fsdp2``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from grpo_kernels.train.config import parse_args
    from grpo_kernels.train.trainer import GRPOTrainer

    config = parse_args(sys.argv[1:] if argv is None else argv)
    trainer = GRPOTrainer(config)
    try:
        history = trainer.train()
        if trainer.dist.is_main and history:
            last = history[-1]
            print(f"done: {len(history)} steps, reward {history[0]['reward']:.3f} -> {last['reward']:.3f}; "
                  f"outputs in {config.output_dir}")
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
