"""The warm-start config as the Megatron actor sees it (pure).

The actor, checkpoint and export code take a training `Config`; the warm-start's `SFTConfig`
shares its model, parallel, cluster, optimizer, checkpoint and logging sections, and its sft
section supplies the rest (micro-batch budget, steps for the LR schedule, seed, NaN guard).
"""
from __future__ import annotations

from megatron_denoise.config.schema import Config, SFTConfig, TrainerConfig


def actor_config(cfg: SFTConfig, total_steps: int) -> Config:
    """The training Config the actor is built from for this warm-start run."""
    s = cfg.sft
    return Config(name=cfg.name, model=cfg.model, parallel=cfg.parallel, cluster=cfg.cluster,
                  optimizer=cfg.optimizer, checkpoint=cfg.checkpoint, logging=cfg.logging,
                  trainer=TrainerConfig(total_steps=int(total_steps), micro_batch_tokens=s.micro_batch_tokens,
                                        seed=s.seed, test_freq=0, nan_guard=s.nan_guard))
