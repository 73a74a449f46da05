"""The warm-start config as the Megatron actor sees it (pure).

The actor, checkpoint and export code take a training `Config`; the warm-start's `SFTConfig`
shares its model, parallel, cluster, optimizer, checkpoint and logging sections, and its sft
section supplies the rest (micro-batch budget, steps for the LR schedule, seed, NaN guard).
"""
from __future__ import annotations

from megatron_denoise.config.schema import AlgorithmConfig, Config, SFTConfig, SFTTrainConfig, TrainerConfig


def micro_batch_tokens(s: SFTTrainConfig) -> int:
    """sft.micro_batch_tokens, or 2 x max_seq_length when null. Measured on the testbed's 1.1M Llama
    (64 rows of ~75 tokens, 1 CPU thread): 256 tokens 0.92 s/step, 512 1.17, 1024 2.0, 128 1.33:
    packed attention grows with the row length, tiny micro-batches pay per-micro-batch overhead."""
    return int(s.micro_batch_tokens) if s.micro_batch_tokens is not None else 2 * int(s.max_seq_length)


def actor_config(cfg: SFTConfig, total_steps: int) -> Config:
    """The training Config the actor is built from for this warm-start run."""
    s = cfg.sft
    return Config(name=cfg.name, model=cfg.model, parallel=cfg.parallel, cluster=cfg.cluster,
                  optimizer=cfg.optimizer, checkpoint=cfg.checkpoint, logging=cfg.logging,
                  algorithm=AlgorithmConfig(loss_impl=s.loss_impl),
                  trainer=TrainerConfig(total_steps=int(total_steps), micro_batch_tokens=micro_batch_tokens(s),
                                        seed=s.seed, test_freq=0, nan_guard=s.nan_guard,
                                        segment_attention=s.segment_attention))
