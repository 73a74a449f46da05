"""Semantic validation of a typed config: every problem at once, each naming keys and numbers.

Runs before any process group or engine starts (`load_config` calls it; the trainer's --dry-run
prints its result).
"""
from __future__ import annotations

from typing import Optional

from megatron_denoise.config.schema import Config
from megatron_denoise.layout import ParallelLayout, check_layout

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
DTYPES = ("float32", "bfloat16", "float16")
LOSS_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")  # megatron distributed-optimizer sharding types


def _choice(errors: list[str], key: str, value, allowed) -> None:
    if value not in allowed:
        errors.append(f"{key} ({value!r}) must be one of {', '.join(map(str, allowed))}")


def _unit(errors: list[str], key: str, value: float) -> None:
    """In (0, 1], the range of a prefix ratio."""
    if not (0.0 < value <= 1.0):
        errors.append(f"{key} ({value}) must be in (0, 1]")


def validate_config(cfg: Config, world_size: Optional[int] = None) -> list[str]:
    e: list[str] = []
    m, d, dn, a, r = cfg.model, cfg.data, cfg.denoise, cfg.algorithm, cfg.rollout

    # model
    _choice(e, "model.family", m.family, FAMILIES)
    _choice(e, "model.params_dtype", m.params_dtype, DTYPES)
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
        if getattr(m, key) < 1:
            e.append(f"model.{key} ({getattr(m, key)}) must be >= 1")
    if m.family == "qwen3_moe" and m.moe.num_experts < 1:
        e.append(f"model.moe.num_experts ({m.moe.num_experts}) must be >= 1 for model.family qwen3_moe")
    if m.family != "qwen3_moe" and m.moe.num_experts > 0:
        e.append(f"model.moe.num_experts ({m.moe.num_experts}) > 0 needs model.family qwen3_moe (got {m.family})")
    _choice(e, "model.moe.token_dispatcher_type", m.moe.token_dispatcher_type, ("allgather", "alltoall"))
    if m.rope_scaling.type is not None:
        _choice(e, "model.rope_scaling.type", m.rope_scaling.type, ("linear", "dynamic", "yarn", "llama3"))

    # data and lengths
    P, R = d.max_prompt_length, d.max_response_length
    if P < 1:
        e.append(f"data.max_prompt_length ({P}) must be >= 1")
    if R < 1:
        e.append(f"data.max_response_length ({R}) must be >= 1")
    if P >= 1 and R >= 1 and P + R > m.max_position_embeddings:
        e.append(f"data.max_prompt_length + data.max_response_length ({P} + {R} = {P + R}) exceeds "
                 f"model.max_position_embeddings ({m.max_position_embeddings})")
    if d.problems_per_step < 1:
        e.append(f"data.problems_per_step ({d.problems_per_step}) must be >= 1")
    _choice(e, "data.bad_rows", d.bad_rows, ("skip", "error"))

    # denoise
    if dn.n_main < 0:
        e.append(f"denoise.n_main ({dn.n_main}) must be >= 0")
    if dn.k_denoise < 0:
        e.append(f"denoise.k_denoise ({dn.k_denoise}) must be >= 0")
    if dn.n_main >= 0 and dn.k_denoise >= 0 and dn.n_main + dn.k_denoise < 1:
        e.append("denoise.n_main + denoise.k_denoise must be >= 1 (rows per problem)")
    _choice(e, "denoise.pool_sampling", dn.pool_sampling, ("first", "random"))
    _choice(e, "denoise.partial_mode", dn.partial_mode, ("cutdown", "shift", "none"))
    rho = dn.rho
    _choice(e, "denoise.rho.strategy", rho.strategy, ("fixed", "uniform", "normal"))
    if rho.strategy == "fixed":
        _unit(e, "denoise.rho.value", rho.value)
    else:
        _unit(e, "denoise.rho.low", rho.low)
        _unit(e, "denoise.rho.high", rho.high)
        if rho.low > rho.high:
            e.append(f"denoise.rho.low ({rho.low}) must be <= denoise.rho.high ({rho.high})")
    if rho.strategy == "normal" and rho.std <= 0:
        e.append(f"denoise.rho.std ({rho.std}) must be > 0 for the normal strategy")

    # algorithm
    _choice(e, "algorithm.name", a.name, ("grpo", "dapo", "dr_grpo"))
    _choice(e, "algorithm.std", a.std, ("unbiased", "population"))
    _choice(e, "algorithm.loss_agg", a.loss_agg, LOSS_AGGS)
    if not (0.0 <= a.clip_low < 1.0):
        e.append(f"algorithm.clip_low ({a.clip_low}) must be in [0, 1)")
    if a.clip_high < 0:
        e.append(f"algorithm.clip_high ({a.clip_high}) must be >= 0")
    if a.dual_clip is not None and a.dual_clip <= 1.0:
        e.append(f"algorithm.dual_clip ({a.dual_clip}) must be > 1 (or null)")
    if a.ppo_epochs < 1:
        e.append(f"algorithm.ppo_epochs ({a.ppo_epochs}) must be >= 1")
    if a.mini_batches < 1:
        e.append(f"algorithm.mini_batches ({a.mini_batches}) must be >= 1")
    _choice(e, "algorithm.kl.type", a.kl.type, ("k1", "k3"))
    if a.kl.coef < 0:
        e.append(f"algorithm.kl.coef ({a.kl.coef}) must be >= 0")
    if a.dynamic_sampling.max_gen_batches < 1:
        e.append(f"algorithm.dynamic_sampling.max_gen_batches ({a.dynamic_sampling.max_gen_batches}) must be >= 1")
    if a.overlong.enabled and not (0 < a.overlong.buffer < R):
        e.append(f"algorithm.overlong.buffer ({a.overlong.buffer}) must be in (0, data.max_response_length={R})")

    # rollout
    _choice(e, "rollout.engine", r.engine, ("vllm", "hf"))
    if not (0.0 < r.gpu_memory_utilization <= 1.0):
        e.append(f"rollout.gpu_memory_utilization ({r.gpu_memory_utilization}) must be in (0, 1]")
    if r.temperature < 0:
        e.append(f"rollout.temperature ({r.temperature}) must be >= 0")
    if not (0.0 < r.top_p <= 1.0):
        e.append(f"rollout.top_p ({r.top_p}) must be in (0, 1]")

    # reward
    if cfg.reward.num_workers < 1:
        e.append(f"reward.num_workers ({cfg.reward.num_workers}) must be >= 1")
    if cfg.reward.deadline_s <= 0:
        e.append(f"reward.deadline_s ({cfg.reward.deadline_s}) must be > 0")

    # optimizer, trainer, checkpointing, cluster
    o = cfg.optimizer
    _choice(e, "optimizer.name", o.name, ("adam", "sgd"))
    _choice(e, "optimizer.scheduler", o.scheduler, ("constant", "cosine", "linear"))
    if o.lr <= 0:
        e.append(f"optimizer.lr ({o.lr}) must be > 0")
    if o.clip_grad < 0:
        e.append(f"optimizer.clip_grad ({o.clip_grad}) must be >= 0")
    if cfg.trainer.total_steps < 0:
        e.append(f"trainer.total_steps ({cfg.trainer.total_steps}) must be >= 0")
    if cfg.trainer.micro_batch_tokens < P + R:
        e.append(f"trainer.micro_batch_tokens ({cfg.trainer.micro_batch_tokens}) must hold one full row "
                 f"(data.max_prompt_length + data.max_response_length = {P + R})")
    if cfg.checkpoint.save_interval < 0:
        e.append(f"checkpoint.save_interval ({cfg.checkpoint.save_interval}) must be >= 0 (0: only at exit)")
    _choice(e, "checkpoint.optimizer_format", cfg.checkpoint.optimizer_format, OPTIMIZER_FORMATS)
    _choice(e, "cluster.backend", cfg.cluster.backend, ("auto", "nccl", "gloo"))
    _choice(e, "cluster.device", cfg.cluster.device, ("auto", "cuda", "cpu"))
    if cfg.cluster.num_nodes < 1 or cfg.cluster.gpus_per_node < 1:
        e.append(f"cluster.num_nodes ({cfg.cluster.num_nodes}) and cluster.gpus_per_node "
                 f"({cfg.cluster.gpus_per_node}) must be >= 1")

    # parallel layout against the world size, the model and the sequence length
    ws = world_size if world_size is not None else cfg.cluster.world_size
    layout_errors = check_layout(cfg.parallel, ws, m, P + R)
    e.extend(layout_errors)
    if not layout_errors and ws >= 1:
        lay = ParallelLayout.from_config(cfg.parallel, ws)
        rows = d.problems_per_step * (dn.n_main + dn.k_denoise)
        if rows >= 1 and a.mini_batches >= 1 and rows % (a.mini_batches * lay.dp):
            e.append(f"rows per step (data.problems_per_step x (denoise.n_main + denoise.k_denoise) = {rows}) "
                     f"must be divisible by algorithm.mini_batches x dp ({a.mini_batches} x {lay.dp})")
    return e
