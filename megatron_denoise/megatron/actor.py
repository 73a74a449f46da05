"""The Megatron actor: policy log-probs and GRPO/DAPO updates through megatron-core's schedules.

    actor = MegatronActor(cfg, groups)            # groups = parallel_state.initialize(layout, ...)
    logp, ent = actor.compute_logprobs(batch)     # [rows, W] each, identical on every rank
    metrics = actor.train_step(batch)             # one optimizer update on the whole batch
    metrics = actor.update(batch)                 # ppo_epochs x mini_batches updates (PPO path
                                                  # recomputes old log-probs first)

Every rank receives the same whole `ActorBatch`; the actor takes its data-parallel share
(token-balanced rows), packs it into micro-batches of at most `trainer.micro_batch_tokens`
tokens, and runs megatron-core's forward/backward schedule: no pipelining, 1F1B, or interleaved
1F1B with virtual stages, chosen by megatron from the layout.

Loss normalisation is GLOBAL: before the schedule, the loss-token and sequence counts of the
rows each DP rank owns are all-reduced, and every micro-batch's loss is its share of the whole
batch's loss (megatron_denoise.core.losses.policy_loss with global denominators). megatron then
SUMS gradients over data-parallel (and context-parallel) ranks (calculate_per_token_loss=True,
no rescaling in finalize_model_grads), so the update does not depend on how the batch is split.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_denoise import collectives as coll
from megatron_denoise.config.schema import AlgorithmConfig, Config, KLUse, LossImpl, OptimizerConfig
from megatron_denoise.megatron import batching
from megatron_denoise.megatron.batching import ActorBatch, MicroBatch
from megatron_denoise.megatron.logprobs import (
    enable_hidden_output,
    logprobs_from_hidden,
    policy_loss_from_hidden,
    set_hidden_output,
    vocab_parallel_logprobs_from_logits,
)
from megatron_denoise.megatron.model import BuildOptions, build_model, unwrap


@dataclass
class ActorOptions:
    """Actor settings that are not in the run config."""

    loss_impl: Optional[str] = None   # override of algorithm.loss_impl (fused | torch); None: the config's
    build: BuildOptions = field(default_factory=BuildOptions)
    total_steps_for_schedule: Optional[int] = None  # LR decay horizon (default trainer.total_steps)


def _ddp_config(cfg: Config) -> Any:
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bool(cfg.parallel.overlap_grad_reduce),
        use_distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
        check_for_nan_in_grad=False,  # the actor's NaN guard skips the step instead of raising
        average_in_collective=False,
    )


def _megatron_optimizer_config(opt: OptimizerConfig, use_distributed_optimizer: bool, dtype: torch.dtype) -> Any:
    from megatron.core.optimizer import OptimizerConfig as MOptConfig

    if opt.name not in ("adam", "sgd"):
        raise ValueError(f"optimizer.name={opt.name!r} is not one of adam | sgd")
    return MOptConfig(
        optimizer=opt.name,
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )


class MegatronActor:
    """Policy model chunks, optimizer and LR schedule of one rank."""

    def __init__(self, cfg: Config, groups: Any, options: Optional[ActorOptions] = None) -> None:
        from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg = cfg
        self.groups = groups
        self.options = options or ActorOptions()
        if not cfg.trainer.segment_attention:  # the old path: megatron's attention with an [S, S] mask
            self.options = replace(self.options, build=replace(self.options.build, segment_attention=False))
        self.loss_impl = LossImpl(self.options.loss_impl or cfg.algorithm.loss_impl)
        self._reference: Optional[list[torch.Tensor]] = None  # frozen starting weights (KL), see snapshot_reference
        layout = groups.layout
        chunks = build_model(cfg.model, groups, self.options.build)
        self.tf_config = chunks[0].config
        for c in chunks:
            if c.post_process:
                enable_hidden_output(c, groups.tp)
        ddp_cfg = _ddp_config(cfg)
        self.model = [
            DistributedDataParallel(config=self.tf_config, ddp_config=ddp_cfg, module=c,
                                    disable_bucketing=(i > 0))
            for i, c in enumerate(chunks)
        ]
        # gradients are already globally normalised by the loss: finalize must not rescale
        self.tf_config.finalize_model_grads_func = lambda model, num_tokens=None, **kw: finalize_model_grads(model, None)
        if len(self.model) > 1:
            self.tf_config.no_sync_func = [m.no_sync for m in self.model]
        else:
            self.tf_config.no_sync_func = self.model[0].no_sync
        self.optimizer = get_megatron_optimizer(
            _megatron_optimizer_config(cfg.optimizer, ddp_cfg.use_distributed_optimizer, self.tf_config.params_dtype),
            self.model)
        total = self.options.total_steps_for_schedule or cfg.trainer.total_steps
        o = cfg.optimizer
        style = {"constant": "constant", "cosine": "cosine", "linear": "linear"}.get(o.scheduler)
        if style is None:
            raise ValueError(f"optimizer.scheduler={o.scheduler!r} is not one of constant | cosine | linear")
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(total, o.warmup_steps + 1),
            lr_decay_style=style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(total, 1), wd_incr_style="constant")
        self.step = 0
        self.skipped_steps = 0

    # --------------------------------------------------------------------------------------------
    @property
    def chunks(self) -> list:
        """The GPTModel chunks (unwrapped)."""
        return [unwrap(m) for m in self.model]

    @property
    def vocab_size(self) -> int:
        return self.chunks[0].vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.chunks[0].padded_vocab_size

    def _multiple(self) -> int:
        lay = self.groups.layout
        return lay.tp * 2 * lay.cp if lay.cp > 1 else lay.tp

    def _plan(self, batch: ActorBatch) -> list[MicroBatch]:
        """This rank's micro-batches; S and their number agreed over the whole world."""
        lay = self.groups.layout
        budget = int(self.cfg.trainer.micro_batch_tokens)
        bins, need = batching.plan_step(batch, dp=lay.dp, dp_rank=self.groups.dp_rank, budget=budget,
                                        multiple=self._multiple())
        sizes = torch.tensor([need, len(bins)], dtype=torch.long)
        coll.all_reduce(sizes, op=dist.ReduceOp.MAX)
        seq_len, num_mb = int(sizes[0]), int(sizes[1])
        if len(self.model) > 1:
            # the interleaved schedule runs micro-batches in groups of pp per virtual stage
            num_mb = batching.round_up(num_mb, lay.pp)
        # THD (Transformer Engine) takes cu_seqlens and the local spec's SegmentAttention the
        # segment ids: no [S, S] mask per micro-batch there
        mbs = batching.materialise(batch, bins, seq_len, num_mb, with_mask=self._needs_mask())
        if lay.cp > 1 and self._use_thd():
            # THD + CP (GPU): every packed sequence split like megatron's load-balanced 2*cp
            # split (megatron_denoise.megatron.thd_cp), one layout length for every micro-batch
            from megatron_denoise.megatron import thd_cp

            most = torch.tensor([max((len(mb.rows) for mb in mbs), default=0)], dtype=torch.long)
            coll.all_reduce(most, op=dist.ReduceOp.MAX)
            total = thd_cp.fixed_length(seq_len, int(most[0]), lay.cp, lay.tp)
            return [thd_cp.split(mb, lay.cp, self.groups.cp_rank, total) for mb in mbs]
        return [batching.cp_split(mb, lay.cp, self.groups.cp_rank) for mb in mbs]

    def _global_counts(self, mbs: list[MicroBatch]) -> tuple[float, float]:
        """Loss tokens and trained sequences of the whole batch (all-reduced over DP: every
        micro-batch on every DP rank is normalised by the same two numbers)."""
        tok = sum(float(mb.seq_num_tokens.sum()) for mb in mbs)
        seq = sum(float((mb.seq_num_tokens > 0).sum()) for mb in mbs)
        t = torch.tensor([tok, seq], dtype=torch.float64)
        coll.all_reduce(t, group=self.groups.dp)
        return float(t[0]), float(t[1])

    def _iterators(self, mbs: list[MicroBatch]) -> Any:
        if len(self.model) > 1:
            return [iter(list(mbs)) for _ in self.model]
        return iter(list(mbs))

    def _run_schedule(self, mbs: list[MicroBatch], loss_fn: Any, forward_only: bool) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = self.groups.device
        thd = self._use_thd()

        def forward_step(data_iterator: Any, model: Any):
            mb = next(data_iterator).to(device)
            if thd:  # GPU / Transformer Engine: sequence boundaries as cu_seqlens, no [S, S] mask
                params = (mb.thd_packed_seq_params(device) if hasattr(mb, "thd_packed_seq_params")
                          else batching.packed_seq_params(mb, device))
                out = model(mb.tokens, mb.position_ids, None, packed_seq_params=params)
            elif mb.attn_mask is None:  # local spec, SegmentAttention: the segment ids [1, 1, 1, S]
                out = model(mb.tokens, mb.position_ids, batching.segment_mask(mb.segment))
            else:    # local spec (CPU), megatron's attention: the block-diagonal causal mask
                out = model(mb.tokens, mb.position_ids, mb.attn_mask)
            chunk = unwrap(model)
            return out, partial(loss_fn, mb, chunk)

        fb = get_forward_backward_func()
        lay = self.groups.layout
        fb(forward_step_func=forward_step, data_iterator=self._iterators(mbs), model=self.model,
           num_microbatches=len(mbs), seq_length=mbs[0].tokens.shape[1] * lay.cp, micro_batch_size=1,
           forward_only=forward_only)

    @contextlib.contextmanager
    def _router_losses_averaged(self, num_micro_batches: int):
        """MoE router losses (load balancing, z-loss) as the MEAN over micro-batches and DP ranks.

        megatron back-propagates them with a fixed scale per micro-batch: 1/num_microbatches
        (grads then averaged over DP) without per-token loss, but 1 with calculate_per_token_loss,
        which this actor uses with summed DP gradients and no rescaling in finalize. Left alone,
        the configured coefficients would act num_microbatches x dp times too strongly and change
        with the micro-batch budget; for the schedule's duration they are divided by that count
        (the logged router losses are divided by the coefficient in use, so they are unchanged)."""
        c = self.tf_config
        n = num_micro_batches * self.groups.layout.dp
        saved = {k: getattr(c, k, None) for k in ("moe_aux_loss_coeff", "moe_z_loss_coeff")}
        if not getattr(c, "num_moe_experts", None) or n == 1:
            yield
            return
        for k, v in saved.items():
            if isinstance(v, (list, tuple)):
                setattr(c, k, type(v)(x / n for x in v))
            elif v:
                setattr(c, k, v / n)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(c, k, v)

    def _forward_backward(self, mbs: list[MicroBatch], loss_fn: Any) -> None:
        """Gradients zeroed, then forward and backward of every micro-batch through megatron's
        schedule (MoE router losses averaged over micro-batches and DP ranks)."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        with self._router_losses_averaged(len(mbs)):
            self._run_schedule(mbs, loss_fn, forward_only=False)

    def _needs_mask(self) -> bool:
        """An [S, S] block-diagonal mask per micro-batch: only for megatron's own local attention
        (trainer.segment_attention false, or context parallelism on CPU)."""
        if self._use_thd():
            return False
        return not (self.options.build.segment_attention and self.groups.layout.cp == 1)

    def _use_thd(self) -> bool:
        """Packed sequences go to Transformer Engine as THD; the local spec takes the mask."""
        from megatron_denoise.megatron.model import use_transformer_engine

        return bool(use_transformer_engine(self.options.build))

    def _vocab_start(self, chunk: Any) -> int:
        return self.groups.tp_rank * (chunk.padded_vocab_size // self.groups.layout.tp)

    def _reports(self) -> bool:
        """This rank contributes per-token results (one copy per TP group, last stage only)."""
        return self.groups.tp_rank == 0 and self.groups.is_last_stage

    # --------------------------------------------------------------------------------------------
    def compute_logprobs(self, batch: ActorBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(token t) and the entropy of the distribution that produced it, [rows, W] each,
        token-aligned (column 0 and padding are 0). Identical on every rank."""
        rows, w = batch.input_ids.shape
        logp_out = torch.zeros(rows, w, dtype=torch.float64)
        ent_out = torch.zeros(rows, w, dtype=torch.float64)
        mbs = self._plan(batch)

        def loss_fn(mb: MicroBatch, chunk: Any, output: torch.Tensor):
            h = output.reshape(-1, output.shape[-1])                    # [S_local, H]
            lp, en = logprobs_from_hidden(h, chunk.output_layer.loss_weight_ref[0], self._vocab_start(chunk),
                                          chunk.vocab_size, mb.targets, self.groups.tp,
                                          impl=self.loss_impl)
            if self._reports():
                batching.scatter_back(lp, mb, logp_out)
                batching.scatter_back(en, mb, ent_out)
            zero = output.sum() * 0.0
            return zero, torch.tensor(0, dtype=torch.int), {}

        for m in self.model:
            m.eval()
        with torch.no_grad():
            self._run_schedule(mbs, loss_fn, forward_only=True)
        for m in self.model:
            m.train()
        coll.all_reduce(logp_out)
        coll.all_reduce(ent_out)
        return logp_out.float(), ent_out.float()

    # --------------------------------------------------------------------------------------------
    # the KL reference policy: a frozen copy of the starting weights, in the actor's own layout

    def _params(self) -> list:
        return [p for m in self.model for p in m.parameters()]

    def snapshot_reference(self) -> None:
        """Freeze the CURRENT weights as the reference policy of the KL term (call it once, after
        loading the starting weights and before any checkpoint resume). Each rank keeps a copy
        of its own shards, so the reference has the actor's layout (tp/pp/vpp/ep) by
        construction; with algorithm.kl.offload_reference it lives in host memory between uses."""
        offload = bool(self.cfg.algorithm.kl.offload_reference) and self.groups.device.type != "cpu"
        self._reference = [p.detach().to("cpu", copy=True) if offload else p.detach().clone()
                           for p in self._params()]

    @property
    def has_reference(self) -> bool:
        return self._reference is not None

    @contextlib.contextmanager
    def _reference_weights(self):
        """The model's parameters hold the reference weights for the duration (restored after,
        bit for bit; the optimizer's main params are never touched)."""
        if self._reference is None:
            raise RuntimeError("algorithm.kl needs the reference policy: call snapshot_reference() "
                               "after loading the starting weights")
        params = self._params()
        offload = self._reference[0].device != params[0].device if params else False
        saved = [p.detach().to("cpu", copy=True) if offload else p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, r in zip(params, self._reference):
                    p.data.copy_(r, non_blocking=offload)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.data.copy_(s, non_blocking=offload)

    def compute_ref_logprobs(self, batch: ActorBatch) -> torch.Tensor:
        """Reference-policy log-probs [rows, W] (token-aligned like compute_logprobs), identical on
        every rank: the same forward pass with the frozen starting weights swapped in."""
        with self._reference_weights():
            logp, _ = self.compute_logprobs(batch)
        return logp

    # --------------------------------------------------------------------------------------------
    def train_step(self, batch: ActorBatch, algo: Optional[AlgorithmConfig] = None,
                   logprobs_out: Optional[torch.Tensor] = None) -> dict:
        """One optimizer update on the whole `batch` (already this step's mini-batch).

        Needs batch.advantages and batch.loss_mask; batch.old_logprobs unless force_on_policy.
        Returns metrics (floats, identical on every rank): loss, pg_loss, entropy,
        clip_fraction, ..., grad_norm, lr, skipped (1.0 when the NaN/Inf guard dropped the
        update), num_micro_batches, loss_tokens, step_time_s.
        logprobs_out: a zero [rows, W] float64 tensor that receives the log-probs of this update's
        forward pass (the weights BEFORE the update; token-aligned like compute_logprobs, identical
        on every rank): the same numbers compute_logprobs would give, without a second forward, at
        the loss tokens (trainer.loss_tokens_only: 0 elsewhere; false: at every token).
        """
        algo = algo or self.cfg.algorithm
        if batch.advantages is None or batch.loss_mask is None:
            raise ValueError("train_step needs batch.advantages and batch.loss_mask")
        if not algo.force_on_policy and batch.old_logprobs is None:
            raise ValueError("algorithm.force_on_policy=false needs batch.old_logprobs "
                             "(use update(), which recomputes them with the actor)")
        if algo.kl.coef > 0 and algo.kl.use == KLUse.LOSS and batch.ref_logprobs is None:
            raise ValueError(f"algorithm.kl.coef={algo.kl.coef} (use={algo.kl.use}) needs batch.ref_logprobs "
                             "(compute_ref_logprobs after snapshot_reference): the KL term is never dropped")
        t0 = time.perf_counter()
        mbs = self._plan(batch)
        n_tok, n_seq = self._global_counts(mbs)
        norm_tokens = float(algo.loss_norm_tokens or self.cfg.data.max_response_length)
        sums: dict[str, float] = {}

        def loss_fn(mb: MicroBatch, chunk: Any, output: torch.Tensor):
            h = output.reshape(-1, output.shape[-1])
            loss, lp, _, metrics = policy_loss_from_hidden(
                h, chunk.output_layer.loss_weight_ref[0], self._vocab_start(chunk), chunk.vocab_size,
                mb.targets, mb.loss_mask, mb.advantages,
                None if algo.force_on_policy else mb.old_logprobs,
                tp_group=self.groups.tp, algo=algo, global_num_tokens=n_tok, global_num_seqs=n_seq,
                seq_ids=mb.seq_ids, seq_num_tokens=mb.seq_num_tokens, ref_logprobs=mb.ref_logprobs,
                is_weights=mb.is_weights, loss_norm_tokens=norm_tokens, impl=self.loss_impl,
                loss_tokens_only=self.cfg.trainer.loss_tokens_only)
            if logprobs_out is not None and self._reports():
                batching.scatter_back(lp, mb, logprobs_out)
            if self._reports():
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            return loss, torch.tensor(int(mb.loss_mask.sum()), dtype=torch.int), {}

        self._forward_backward(mbs, loss_fn)
        if logprobs_out is not None:
            coll.all_reduce(logprobs_out)

        # metric partial sums -> batch values, identical everywhere
        keys = ["loss", "pg_loss", "clip_fraction", "dual_clip_fraction", "ratio_mean", "approx_kl", "entropy", "kl"]
        vec = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        coll.all_reduce(vec)
        metrics = {k: float(v) for k, v in zip(keys, vec)}
        if batch.ref_logprobs is None:
            metrics.pop("kl")
        metrics["loss_impl_fused"] = 1.0 if self.loss_impl == LossImpl.FUSED else 0.0

        grad_norm, lr, skipped = self._apply_update(metrics["loss"])
        metrics.update(grad_norm=grad_norm, lr=lr,
                       skipped=1.0 if skipped else 0.0, num_micro_batches=float(len(mbs)),
                       loss_tokens=n_tok, step_time_s=time.perf_counter() - t0)
        return metrics

    def sft_step(self, batch: ActorBatch) -> dict:
        """One optimizer update of supervised cross-entropy on the tokens of batch.loss_mask (the
        warm-start stage, megatron_denoise.sft):

            loss = -sum_t mask_t log p(token_t) / (mask tokens of the WHOLE batch, over DP ranks)

        with log p from the last stage's hidden states and the local vocab shard: the fused kernel's
        differentiable vocab-parallel log-probs (loss_impl fused: no [tokens, V/tp] logits), or
        logprobs.vocab_parallel_logprobs_from_logits (torch: one micro-batch's shard logits).
        Same planning, global normalisation, schedule, NaN guard and optimizer step as train_step.
        Returns (identical on every rank): loss (mean NLL per loss token), grad_norm, lr, skipped,
        loss_impl_fused, loss_tokens, tokens (all tokens of the batch), num_micro_batches, step_time_s."""
        if batch.loss_mask is None:
            raise ValueError("sft_step needs batch.loss_mask (1 on the tokens to learn)")
        t0 = time.perf_counter()
        mbs = self._plan(batch)
        n_tok, _ = self._global_counts(mbs)
        if n_tok <= 0:
            raise ValueError("sft_step: the batch has no loss tokens (loss_mask is 0 everywhere)")
        sums = {"loss": 0.0}

        def loss_fn(mb: MicroBatch, chunk: Any, output: torch.Tensor):
            h = output.reshape(-1, output.shape[-1])
            w, start = chunk.output_layer.loss_weight_ref[0], self._vocab_start(chunk)
            if self.loss_impl == LossImpl.FUSED:
                from megatron_denoise.kernels import vocab_parallel_logprobs

                # dL/dhidden is reduced over TP by the region function upstream (enable_hidden_output)
                logp, _ = vocab_parallel_logprobs(h, w, start, mb.targets, vocab_size=chunk.vocab_size, entropy=False,
                                                  tp_group=self.groups.tp, reduce_grad_hidden=False)
            else:
                logp, _ = vocab_parallel_logprobs_from_logits(h @ w.t(), mb.targets, start, chunk.vocab_size,
                                                              self.groups.tp, with_entropy=False)
            loss = -(logp * mb.loss_mask).sum() / n_tok
            if self._reports():
                sums["loss"] += float(loss.detach())
            return loss, torch.tensor(int(mb.loss_mask.sum()), dtype=torch.int), {}

        self._forward_backward(mbs, loss_fn)
        vec = torch.tensor([sums["loss"]], dtype=torch.float64)
        coll.all_reduce(vec)
        loss = float(vec[0])
        grad_norm, lr, skipped = self._apply_update(loss)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": 1.0 if skipped else 0.0,
                "loss_impl_fused": 1.0 if self.loss_impl == LossImpl.FUSED else 0.0,
                "loss_tokens": n_tok, "tokens": float(batch.sequence_lengths.sum()),
                "num_micro_batches": float(len(mbs)), "step_time_s": time.perf_counter() - t0}

    def _apply_update(self, loss: float) -> tuple[float, float, bool]:
        """After the backward passes: the NaN/Inf guard (a non-finite loss or gradient norm on any
        rank skips the update), then the optimizer and LR-scheduler step. Returns (grad_norm, the
        lr this step used, skipped)."""
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        finite = torch.tensor([1.0 if (math.isfinite(grad_norm) and math.isfinite(loss)) else 0.0])
        coll.all_reduce(finite, op=dist.ReduceOp.MIN)
        skipped = bool(self.cfg.trainer.nan_guard and finite.item() < 1.0)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
        if skipped:
            self.optimizer.zero_grad()
            for m in self.model:
                m.zero_grad_buffer()
            self.skipped_steps += 1
        else:
            ok, _, _ = self.optimizer.step()
            if not ok:
                raise RuntimeError("megatron optimizer reported an unsuccessful step")
            self.scheduler.step(increment=1)
        self.step += 1
        return grad_norm, lr, skipped

    def update(self, batch: ActorBatch, algo: Optional[AlgorithmConfig] = None,
               return_logprobs: bool = False) -> list[dict]:
        """algorithm.ppo_epochs x algorithm.mini_batches updates on `batch` (rows split into
        contiguous mini-batches). On the PPO path (force_on_policy false) the old log-probs are
        recomputed by the actor first, never taken from the rollout engine.
        return_logprobs (one update only: ppo_epochs = mini_batches = 1): the log-probs of the
        update's own forward pass, the weights before it, are kept in `last_logprobs` [rows, W]."""
        algo = algo or self.cfg.algorithm
        if return_logprobs:
            if int(algo.ppo_epochs) != 1 or int(algo.mini_batches) != 1:
                raise ValueError(f"return_logprobs needs one update per step (algorithm.ppo_epochs "
                                 f"{algo.ppo_epochs}, algorithm.mini_batches {algo.mini_batches})")
            out = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
            metrics = self.train_step(batch, algo, logprobs_out=out)
            self.last_logprobs = out.float()
            return [metrics]
        if not algo.force_on_policy and batch.old_logprobs is None:
            old, _ = self.compute_logprobs(batch)
            batch = replace(batch, old_logprobs=old)
        rows = batch.num_rows
        k = max(1, int(algo.mini_batches))
        if k > rows:
            raise ValueError(f"algorithm.mini_batches ({k}) exceeds the rows of the batch ({rows})")
        bounds = [round(i * rows / k) for i in range(k + 1)]
        out = []
        for _ in range(int(algo.ppo_epochs)):
            for i in range(k):
                sel = slice(bounds[i], bounds[i + 1])
                out.append(self.train_step(_rows(batch, sel), algo))
        return out

    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, s, vocab_size] (padding columns dropped), gathered over TP,
        for plain (unpacked, causal) sequences. pp == 1 and cp == 1 only: for checks against
        Hugging Face and between layouts. Identical on every rank."""
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        lay = self.groups.layout
        if lay.pp != 1 or lay.cp != 1:
            raise ValueError(f"logits() needs pp == 1 and cp == 1 (layout: {lay})")
        chunk = self.chunks[0]
        b, s = input_ids.shape
        pad = batching.round_up(s, lay.tp) - s   # sequence parallel splits the sequence over TP
        ids = torch.nn.functional.pad(input_ids, (0, pad))
        pos = torch.arange(s + pad)[None].expand(b, -1)
        causal = torch.triu(torch.ones(s + pad, s + pad, dtype=torch.bool), diagonal=1)[None, None]
        set_hidden_output(chunk, False)
        chunk.eval()
        try:
            out = chunk(ids, pos, causal)                                    # [b, s, V/tp]
        finally:
            set_hidden_output(chunk, True)
            chunk.train()
        out = gather_from_tensor_model_parallel_region(out, group=self.groups.tp)
        return out[:, :s, : self.vocab_size].float()

    def set_inference_mode(self, on: bool) -> None:
        """Logits output (for HF-parity checks and generation) instead of hidden states."""
        for c in self.chunks:
            set_hidden_output(c, not on)


def _rows(batch: ActorBatch, sel: slice) -> ActorBatch:
    def take(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x[sel]

    return ActorBatch(input_ids=batch.input_ids[sel], sequence_lengths=batch.sequence_lengths[sel],
                      loss_mask=take(batch.loss_mask), advantages=take(batch.advantages),
                      old_logprobs=take(batch.old_logprobs), ref_logprobs=take(batch.ref_logprobs),
                      is_weights=take(batch.is_weights))
