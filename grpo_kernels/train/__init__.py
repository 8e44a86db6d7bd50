"""A thin GRPO trainer for Hugging Face causal LMs on the fused loss (single device, DDP, FSDP2).

    grpo-kernels-train --config cfg.yaml [--key value ...]      (or python -m grpo_kernels.train ...)

or from Python::

    from grpo_kernels.train import GRPOConfig, GRPOTrainer
    GRPOTrainer(GRPOConfig(model=..., dataset="data.jsonl")).train()

A bad configuration raises :class:`ConfigError` (a ValueError) when the config or the trainer is
built; a checkpoint that cannot be resumed from raises :class:`CheckpointError`.
"""

from grpo_kernels.train.checkpoint import CheckpointError
from grpo_kernels.train.config import ConfigError, GRPOConfig, load_config, parse_args
from grpo_kernels.train.trainer import GRPOTrainer

__all__ = ["CheckpointError", "ConfigError", "GRPOConfig", "GRPOTrainer", "load_config", "parse_args"]
