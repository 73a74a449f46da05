"""Semantic validation of a typed config: every problem at once, each naming keys and numbers.

Runs before any process group or engine starts (`load_config` calls it; the trainer's --dry-run
prints its result).
"""
from __future__ import annotations

from pathlib import Path

from typing import Optional

from megatron_denoise.config.schema import (AsyncMode, Config, Device, DType, Family, OptimizerName, PolicyLoss,
                                            PoolSource, PrefixKind, RhoConfig, RhoStrategy, RopeScaling, SFTConfig)
from megatron_denoise.layout import ParallelLayout, check_layout

def _unit(errors: list[str], key: str, value: float) -> None:
    """In (0, 1], the range of a prefix ratio."""
    if not (0.0 < value <= 1.0):
        errors.append(f"{key} ({value}) must be in (0, 1]")


def rho_errors(rho: RhoConfig) -> list[str]:
    """The prefix-ratio sampler's settings (also used by core.prefix.validate_rho_config)."""
    e: list[str] = []
    if rho.strategy == RhoStrategy.FIXED:
        _unit(e, "denoise.rho.value", rho.value)
    else:
        _unit(e, "denoise.rho.low", rho.low)
        _unit(e, "denoise.rho.high", rho.high)
        if rho.low > rho.high:
            e.append(f"denoise.rho.low ({rho.low}) must be <= denoise.rho.high ({rho.high})")
    if rho.strategy == RhoStrategy.NORMAL and not rho.std > 0:
        e.append(f"denoise.rho.std ({rho.std}) must be > 0 for the {rho.strategy} strategy")
    if rho.strategy == RhoStrategy.ADAPTIVE:
        if not rho.low <= rho.value <= rho.high:
            e.append(f"denoise.rho.value ({rho.value}), the {rho.strategy} strategy's starting rho, must be in "
                     f"[denoise.rho.low, denoise.rho.high] ([{rho.low}, {rho.high}])")
        if not 0.0 < rho.target < 1.0:
            e.append(f"denoise.rho.target ({rho.target}) must be in (0, 1)")
        if not rho.gain > 0:
            e.append(f"denoise.rho.gain ({rho.gain}) must be > 0 for the {rho.strategy} strategy")
    return e


def denoise_source_errors(dn) -> list[str]:
    """pool_source / prefix_kind / online_pool against N and K (issue 18): an option that could not act
    (no denoise slot to use it, no main rollout to refill the pool) is refused, not ignored."""
    e: list[str] = []
    op = dn.online_pool
    online = dn.pool_source != PoolSource.OFFLINE
    if dn.k_denoise == 0:
        for key, value, default in (("denoise.pool_source", dn.pool_source, PoolSource.OFFLINE),
                                    ("denoise.prefix_kind", dn.prefix_kind, PrefixKind.WRONG),
                                    ("denoise.rho.strategy", dn.rho.strategy, None)):
            if (value == RhoStrategy.ADAPTIVE) if default is None else (value != default):
                e.append(f"{key} ({value}) needs denoise.k_denoise >= 1: with K = 0 no row has a prefix")
    if online and dn.n_main < 1:
        e.append(f"denoise.pool_source ({dn.pool_source}) needs denoise.n_main >= 1: main rollouts refill the "
                 f"online pool")
    if online:
        if op.max_size < 1:
            e.append(f"denoise.online_pool.max_size ({op.max_size}) must be >= 1")
        if op.max_age is not None and op.max_age < 1:
            e.append(f"denoise.online_pool.max_age ({op.max_age}) must be >= 1 (or null: no ageing)")
    if dn.pool_source == PoolSource.MIXED and not 0.0 < op.share < 1.0:
        e.append(f"denoise.online_pool.share ({op.share}) must be in (0, 1) for denoise.pool_source {dn.pool_source} "
                 f"(use {PoolSource.OFFLINE} or {PoolSource.ONLINE} for one source only)")
    if dn.prefix_kind == PrefixKind.CORRECT and dn.pool_source != PoolSource.ONLINE \
            and dn.correct_pool_column == dn.pool_column:
        e.append(f"denoise.correct_pool_column ({dn.correct_pool_column}) must differ from denoise.pool_column: "
                 f"correct prefixes would be read from the wrong-solution column")
    return e


def validator_for(root: type):
    """The validator of a configuration root class: (cfg, world_size) -> list of problems."""
    validators = {Config: validate_config, SFTConfig: validate_sft_config}
    if root not in validators:
        raise TypeError(f"no validator for configuration class {root.__name__}")
    return validators[root]


def check_model(e: list[str], m) -> None:
    """The model section (every configuration root has one)."""
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
        if getattr(m, key) < 1:
            e.append(f"model.{key} ({getattr(m, key)}) must be >= 1")
    if m.family == Family.QWEN3_MOE and m.moe.num_experts < 1:
        e.append(f"model.moe.num_experts ({m.moe.num_experts}) must be >= 1 for model.family {m.family}")
    if m.family != Family.QWEN3_MOE and m.moe.num_experts > 0:
        e.append(f"model.moe.num_experts ({m.moe.num_experts}) > 0 needs model.family qwen3_moe (got {m.family})")
    if m.params_dtype == DType.FLOAT16:
        e.append("model.params_dtype (float16) is refused: the actor wires no loss scaling (megatron's "
                 "grad_scale_func), so small float16 gradients underflow to zero and updates vanish; use bfloat16 "
                 "(or float32)")
    if m.rope_scaling.type is not None and m.rope_scaling.type not in (RopeScaling.LINEAR, RopeScaling.LLAMA3):
        e.append(f"model.rope_scaling.type ({m.rope_scaling.type}) is not built by the megatron actor "
                 f"(supported: null, linear, llama3): the model would raise at start-up")


def check_optimizer(e: list[str], cfg) -> None:
    """optimizer.* (with the parallel section it depends on)."""
    o = cfg.optimizer
    if o.name == OptimizerName.SGD and cfg.parallel.use_distributed_optimizer:
        e.append(f"optimizer.name={o.name} needs parallel.use_distributed_optimizer=false (megatron's distributed "
                 "optimizer supports Adam only)")
    if o.lr <= 0:
        e.append(f"optimizer.lr ({o.lr}) must be > 0")
    if o.clip_grad < 0:
        e.append(f"optimizer.clip_grad ({o.clip_grad}) must be >= 0")


def check_checkpoint_and_cluster(e: list[str], cfg) -> None:
    """checkpoint.* and cluster.* (every configuration root has them)."""
    if cfg.checkpoint.save_interval < 0:
        e.append(f"checkpoint.save_interval ({cfg.checkpoint.save_interval}) must be >= 0 (0: only at exit)")
    if cfg.cluster.num_nodes < 1 or cfg.cluster.gpus_per_node < 1:
        e.append(f"cluster.num_nodes ({cfg.cluster.num_nodes}) and cluster.gpus_per_node "
                 f"({cfg.cluster.gpus_per_node}) must be >= 1")


def async_placement_error(mode: str, colocate: bool, gpu: bool) -> Optional[str]:
    """Why `rollout.async` cannot run with this placement (None: it can). Checked here when
    cluster.device is cuda, and by the trainer once the placement knows (device auto)."""
    if mode == AsyncMode.ONE_STEP and colocate and gpu:
        return (f"rollout.async={AsyncMode.ONE_STEP.value} generates while the actor trains, but a colocated "
                f"engine (rollout.colocate=true) shares the actor's GPUs and sleeps while it trains, so the two "
                f"cannot overlap: set rollout.colocate=false (a dedicated generation pool of rollout.num_gpus "
                f"GPUs) or rollout.async={AsyncMode.OFF.value}")
    return None


def check_async(e: list[str], cfg: Config) -> None:
    """rollout.async against the placement and the mismatch path that corrects its stale rows."""
    r, mm = cfg.rollout, cfg.algorithm.mismatch
    err = async_placement_error(r.async_, r.colocate, cfg.cluster.device == Device.CUDA)
    if err:
        e.append(err)
    if r.async_ == AsyncMode.ONE_STEP and not (mm.metrics or mm.tis_cap is not None or mm.seq_mask_low is not None
                                               or mm.seq_mask_high is not None):
        e.append(f"rollout.async={AsyncMode.ONE_STEP.value} trains on rows one update old: it needs the engine's "
                 f"log-probs to measure them (algorithm.mismatch.metrics=true) and/or to correct them "
                 f"(algorithm.mismatch.tis_cap, seq_mask_low/high); all are off")


def check_rollout_placement(e: list[str], cfg: Config) -> None:
    """Engine replicas, sleep mode and refit buckets against the cluster shape (issue 14)."""
    r, c = cfg.rollout, cfg.cluster
    tp = r.tensor_parallel_size
    if tp < 1:
        e.append(f"rollout.tensor_parallel_size ({tp}) must be >= 1")
    elif c.gpus_per_node >= 1:
        if c.gpus_per_node % tp:
            e.append(f"rollout.tensor_parallel_size ({tp}) must divide cluster.gpus_per_node ({c.gpus_per_node}): "
                     f"an engine replica's TP group must not straddle two nodes")
        if r.colocate is False and r.num_gpus and r.num_gpus % tp:
            e.append(f"rollout.num_gpus ({r.num_gpus}) must be a multiple of rollout.tensor_parallel_size ({tp})")
    if r.num_gpus < 0:
        e.append(f"rollout.num_gpus ({r.num_gpus}) must be >= 0")
    elif r.num_gpus and r.colocate:
        e.append(f"rollout.num_gpus ({r.num_gpus}) applies only with rollout.colocate false (colocated engines "
                 f"share the actor's GPUs)")
    if r.sleep_level not in (0, 1, 2):
        e.append(f"rollout.sleep_level ({r.sleep_level}) must be one of 0, 1, 2")
    if r.refit_bucket_mb < 1:
        e.append(f"rollout.refit_bucket_mb ({r.refit_bucket_mb}) must be >= 1")
    if r.placement_timeout_s <= 0:
        e.append(f"rollout.placement_timeout_s ({r.placement_timeout_s}) must be > 0")
    if r.cpu_threads < 0:
        e.append(f"rollout.cpu_threads ({r.cpu_threads}) must be >= 0 (0: the policy rank's share of the cores)")


def validate_config(cfg: Config, world_size: Optional[int] = None) -> list[str]:
    e: list[str] = []
    m, d, dn, a, r = cfg.model, cfg.data, cfg.denoise, cfg.algorithm, cfg.rollout
    check_model(e, m)

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

    # denoise
    if dn.n_main < 0:
        e.append(f"denoise.n_main ({dn.n_main}) must be >= 0")
    if dn.k_denoise < 0:
        e.append(f"denoise.k_denoise ({dn.k_denoise}) must be >= 0")
    if dn.n_main >= 0 and dn.k_denoise >= 0 and dn.n_main + dn.k_denoise < 1:
        e.append("denoise.n_main + denoise.k_denoise must be >= 1 (rows per problem)")
    e.extend(rho_errors(dn.rho))
    e.extend(denoise_source_errors(dn))

    # algorithm
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
    if a.kl.coef < 0:
        e.append(f"algorithm.kl.coef ({a.kl.coef}) must be >= 0")
    if a.loss_norm_tokens is not None and a.loss_norm_tokens < 1:
        e.append(f"algorithm.loss_norm_tokens ({a.loss_norm_tokens}) must be >= 1 (or null)")
    if not (0.0 <= a.cispo_clip_high):
        e.append(f"algorithm.cispo_clip_high ({a.cispo_clip_high}) must be >= 0")
    if a.policy_loss == PolicyLoss.GSPO and cfg.parallel.context_parallel_size > 1:
        e.append(f"algorithm.policy_loss={a.policy_loss} needs whole sequences on a rank: "
                 f"parallel.context_parallel_size ({cfg.parallel.context_parallel_size}) must be 1")
    mm = a.mismatch
    if mm.threshold <= 1.0:
        e.append(f"algorithm.mismatch.threshold ({mm.threshold}) must be > 1")
    if mm.tis_cap is not None and mm.tis_cap <= 0:
        e.append(f"algorithm.mismatch.tis_cap ({mm.tis_cap}) must be > 0 (or null)")
    lo, hi = mm.seq_mask_low, mm.seq_mask_high
    if lo is not None and lo <= 0:
        e.append(f"algorithm.mismatch.seq_mask_low ({lo}) must be > 0 (or null)")
    if lo is not None and hi is not None and lo >= hi:
        e.append(f"algorithm.mismatch.seq_mask_low ({lo}) must be < algorithm.mismatch.seq_mask_high ({hi})")
    if a.dynamic_sampling.max_gen_batches < 1:
        e.append(f"algorithm.dynamic_sampling.max_gen_batches ({a.dynamic_sampling.max_gen_batches}) must be >= 1")
    if a.overlong.enabled and not (0 < a.overlong.buffer < R):
        e.append(f"algorithm.overlong.buffer ({a.overlong.buffer}) must be in (0, data.max_response_length={R})")

    # rollout
    if not (0.0 < r.gpu_memory_utilization <= 1.0):
        e.append(f"rollout.gpu_memory_utilization ({r.gpu_memory_utilization}) must be in (0, 1]")
    if r.temperature < 0:
        e.append(f"rollout.temperature ({r.temperature}) must be >= 0")
    if not (0.0 < r.top_p <= 1.0):
        e.append(f"rollout.top_p ({r.top_p}) must be in (0, 1]")
    check_rollout_placement(e, cfg)
    check_async(e, cfg)

    # reward
    if cfg.reward.num_workers < 1:
        e.append(f"reward.num_workers ({cfg.reward.num_workers}) must be >= 1")
    if cfg.reward.deadline_s <= 0:
        e.append(f"reward.deadline_s ({cfg.reward.deadline_s}) must be > 0")

    # optimizer, trainer, checkpointing, cluster
    check_optimizer(e, cfg)
    if cfg.trainer.total_steps < 0:
        e.append(f"trainer.total_steps ({cfg.trainer.total_steps}) must be >= 0")
    if not cfg.trainer.call_timeout_s > 0:
        e.append(f"trainer.call_timeout_s ({cfg.trainer.call_timeout_s}) must be > 0")
    if cfg.trainer.malloc_arena_max < 0:
        e.append(f"trainer.malloc_arena_max ({cfg.trainer.malloc_arena_max}) must be >= 0 (0: glibc's default)")
    if cfg.trainer.micro_batch_tokens < P + R:
        e.append(f"trainer.micro_batch_tokens ({cfg.trainer.micro_batch_tokens}) must hold one full row "
                 f"(data.max_prompt_length + data.max_response_length = {P + R})")
    check_checkpoint_and_cluster(e, cfg)

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
    check_prepare(e, cfg)
    return e


def check_prepare(e: list[str], cfg: Config) -> None:
    """The prepare: section (task files, warm-start, pool), checked before anything runs."""
    from megatron_denoise.prepare.tasks import check as task_errors

    p = cfg.prepare
    if p.task.enabled:
        e.extend(task_errors(p.task.train, "prepare.task.train"))
        e.extend(task_errors(p.task.heldout, "prepare.task.heldout"))
    ws = p.warm_start
    if ws.config is not None:
        from megatron_denoise.prepare.stage import find_config

        try:
            find_config(ws.config)
        except FileNotFoundError as err:
            e.append(str(err))
        if ws.weak_step is not None and ws.weak_step < 1:
            e.append(f"prepare.warm_start.weak_step ({ws.weak_step}) must be >= 1")
    if p.pool.enabled:
        if not cfg.data.train_files:
            e.append("prepare.pool.enabled needs data.train_files[0]: the pool file the run trains on")
        if p.pool.source is None and not p.task.enabled:
            e.append("prepare.pool.source is null and prepare.task is off: no problems to build a pool for")
        if p.pool.n < 1:
            e.append(f"prepare.pool.n ({p.pool.n}) must be >= 1")
        if p.pool.chunk_size < 1:
            e.append(f"prepare.pool.chunk_size ({p.pool.chunk_size}) must be >= 1")
        if p.pool.max_tokens is not None and p.pool.max_tokens < 1:
            e.append(f"prepare.pool.max_tokens ({p.pool.max_tokens}) must be >= 1")
        if p.pool.max_problems is not None and p.pool.max_problems < 1:
            e.append(f"prepare.pool.max_problems ({p.pool.max_problems}) must be >= 1")
        # the pool of <stem> is written as <stem>.with_wrong_boxed.parquet beside the run's train file
        source = p.pool.source if p.pool.source is not None else "train.parquet"
        stem = Path(str(source)).name
        for ext in (".parquet", ".jsonl", ".json"):
            stem = stem[: -len(ext)] if stem.endswith(ext) else stem
        if cfg.data.train_files and Path(str(cfg.data.train_files[0])).name != f"{stem}.with_wrong_boxed.parquet":
            e.append(f"data.train_files[0] ({cfg.data.train_files[0]}) is not the pool that prepare.pool builds "
                     f"from {source} ({stem}.with_wrong_boxed.parquet)")


def validate_sft_config(cfg: SFTConfig, world_size: Optional[int] = None) -> list[str]:
    """The warm-start stage: the shared model/optimizer/checkpoint/cluster checks and the parallel
    layout (against sft.max_seq_length), then the sft section."""
    e: list[str] = []
    m, s = cfg.model, cfg.sft
    check_model(e, m)
    check_optimizer(e, cfg)
    check_checkpoint_and_cluster(e, cfg)
    if not m.hf_path:
        e.append("model.hf_path is not set: the warm-start starts from a Hugging Face model folder")
    if not s.train_files:
        e.append("sft.train_files is empty")
    if not s.solution_field.strip() or s.solution_field.count(".") > 1:
        e.append(f"sft.solution_field ({s.solution_field!r}) must be a column or column.key")
    if s.max_seq_length < 2:
        e.append(f"sft.max_seq_length ({s.max_seq_length}) must be >= 2")
    elif s.max_seq_length > m.max_position_embeddings:
        e.append(f"sft.max_seq_length ({s.max_seq_length}) exceeds model.max_position_embeddings "
                 f"({m.max_position_embeddings})")
    if s.micro_batch_tokens is not None and s.micro_batch_tokens < s.max_seq_length:
        e.append(f"sft.micro_batch_tokens ({s.micro_batch_tokens}) must hold one full row "
                 f"(sft.max_seq_length = {s.max_seq_length})")
    if s.rows_per_step < 1:
        e.append(f"sft.rows_per_step ({s.rows_per_step}) must be >= 1")
    if (s.total_steps is None) == (s.epochs is None):
        e.append(f"set exactly one of sft.total_steps ({s.total_steps}) and sft.epochs ({s.epochs})")
    if s.total_steps is not None and s.total_steps < 1:
        e.append(f"sft.total_steps ({s.total_steps}) must be >= 1")
    if s.epochs is not None and s.epochs <= 0:
        e.append(f"sft.epochs ({s.epochs}) must be > 0")
    if s.val_freq < 0:
        e.append(f"sft.val_freq ({s.val_freq}) must be >= 0")
    if s.stop_after is not None and s.stop_after < 1:
        e.append(f"sft.stop_after ({s.stop_after}) must be >= 1 (or null)")
    bad_steps = [x for x in s.export_hf_steps if isinstance(x, bool) or not isinstance(x, int) or x < 1]
    if bad_steps:
        e.append(f"sft.export_hf_steps must be positive step numbers, got {bad_steps}")
    elif s.total_steps is not None and any(x > s.total_steps for x in s.export_hf_steps):
        late = sorted(x for x in s.export_hf_steps if x > s.total_steps)
        e.append(f"sft.export_hf_steps {late} come after the last step (sft.total_steps = {s.total_steps})")

    ws = world_size if world_size is not None else cfg.cluster.world_size
    layout_errors = check_layout(cfg.parallel, ws, m, s.max_seq_length)
    e.extend(layout_errors)
    if not layout_errors and ws >= 1 and s.rows_per_step >= 1:
        dp = ParallelLayout.from_config(cfg.parallel, ws).dp
        if s.rows_per_step < dp:
            e.append(f"sft.rows_per_step ({s.rows_per_step}) must be >= dp ({dp}): every data-parallel rank needs a row")
    return e
