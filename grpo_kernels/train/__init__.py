"""A thin GRPO trainer for Hugging Face causal LMs on the fused loss (single device, DDP, FSDP2).

    python -m grpo_kernels.train --config cfg.yaml [--key value ...]

or from Python::

    from grpo_kernels.train import GRPOConfig, GRPOTrainer
    GRPOTrainer(GRPOConfig(model=..., dataset="data.jsonl")).train()
"""

from grpo_kernels.train.config import GRPOConfig, load_config, parse_args
from grpo_kernels.train.trainer import GRPOTrainer

__all__ = ["GRPOConfig", "GRPOTrainer", "load_config", "parse_args"]
