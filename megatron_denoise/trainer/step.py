"""One DenoiseRL training step, top to bottom, in the method's words (METHOD.md sections 2-4).

    sample problems -> build N main + K denoise rows -> generate -> verify -> (DAPO filter and
    re-sampling) -> old (and reference) log-probs -> (KL reward penalty) -> advantages by group
    -> mismatch metrics and corrections -> train -> refit the engine -> metrics

With rollout.async one_step the first part (collect_batch: sample ... DAPO) of step t + 1 runs in
the background while step t trains (trainer/rollouts.py: the schedule and its staleness).

Plain GRPO/DAPO is the same loop with K = 0. Everything heavy sits behind the small interfaces of
`StepContext`: the policy (Megatron actor workers), the rollout engine, the reward pool and the
problem sampler; the algorithm itself is the pure code of `megatron_denoise.core`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from dataclasses import replace

from megatron_denoise import chaos
from megatron_denoise.config.schema import AsyncMode, Config, KLUse, PrefixKind
from megatron_denoise.core.advantages import DynamicSampler, apply_overlong_shaping, compute_advantages
from megatron_denoise.core.fold import fold_rollout, pack, verifier_text
from megatron_denoise.core.metrics import step_metrics
from megatron_denoise.core.mismatch import engine_logprobs, kl_reward_penalty, measure_and_correct
from megatron_denoise.core.prefix import build_step_requests
from megatron_denoise.core.prefix_state import DenoiseState, prefix_source_metrics
from megatron_denoise.core.types import Problem, Rollout
from megatron_denoise.rollout.engine import SamplingSpec
from megatron_denoise.trainer.rollouts import RolloutBatch, RolloutSchedule
from megatron_denoise.trainer.timing import PhaseTimer


class Policy(Protocol):
    """The trained model (one Megatron actor per rank, behind Ray or in-process)."""

    def compute_logprobs(self, batch) -> "Any":  # [rows, W] log p(input_ids[:, t] | < t), 0 at t = 0
        ...

    def train(self, batch, old_logprobs, **extra) -> dict[str, float]:  # one optimizer step per mini-batch
        ...                      # extra: ref_logprobs (KL in the loss), is_weights (truncated IS)

    # (with algorithm.kl.coef > 0) reference-policy log-probs [rows, W]:
    # def compute_ref_logprobs(self, batch) -> Any

    def refit(self, engine: Any) -> Any:  # push the current weights (HF names) into the engine
        ...


class Scorer(Protocol):
    def score_batch(self, texts: Sequence[str], ground_truths: Sequence[Any]) -> list:
        """megatron_denoise.reward.VerifyResult per text (score 0/1, status ok|no_box|timeout|error)."""
        ...


class ProblemSource(Protocol):
    def next_problems(self, n: int) -> list[Problem]:
        ...


@dataclass
class StepContext:
    cfg: Config
    policy: Policy
    engine: Any  # megatron_denoise.rollout.engine.RolloutEngine
    scorer: Scorer
    problems: ProblemSource
    tokenizer: Any
    prompt_ids: Callable[[Problem], tuple[int, ...]]
    decode: Callable[[Sequence[int]], str]
    pad_id: int = 0
    totals: dict = field(default_factory=dict)  # run-long counters (e.g. problems seen)
    # the run's online pool / rho controller (core.prefix_state; None for the paper's configuration);
    # built from cfg.denoise when not given, saved in and restored from the checkpoint by the trainer
    denoise_state: Any = None
    # where each step's rows come from (trainer.rollouts; built by the first train_step if None)
    rollouts: Any = None

    def __post_init__(self) -> None:
        if self.denoise_state is None:
            self.denoise_state = DenoiseState.for_config(self.cfg.denoise)


def generate_and_verify(ctx: StepContext, problems: list[Problem], step: int, gen_batch: int,
                        timer: PhaseTimer) -> tuple[list[list[Rollout]], dict[str, float]]:
    """Rows of one generation batch, generated, verified and grouped per problem."""
    cfg = ctx.cfg
    R = cfg.data.max_response_length

    # build N main + K denoise rows (token-level prefixes; fallbacks counted, never raised)
    state = ctx.denoise_state
    plan = build_step_requests(problems, [ctx.prompt_ids(p) for p in problems], ctx.tokenizer, cfg.denoise, R,
                               step, gen_batch=gen_batch, sampling_seed=cfg.rollout.seed, state=state)

    # generate: main and denoise rows in ONE call, so the engine batches them and shares prompts;
    # the engine also returns its sampling log-probs when the mismatch is measured or corrected
    with timer.phase("generate"):
        chaos.point("generate")
        completions = ctx.engine.generate(plan.requests, SamplingSpec.from_config(
            cfg.rollout, logprobs=mismatch_wanted(cfg)))

    # verify: prefix + continuation, last \boxed{} against the ground truth
    with timer.phase("reward"):
        chaos.point("reward")
        texts = [verifier_text(req, comp, ctx.decode) for req, comp in zip(plan.requests, completions)]
        truths = [problems[req.group_id].ground_truth for req in plan.requests]
        results = ctx.scorer.score_batch(texts, truths)
    scores = [(float(r.score), r.status.value) for r in results]
    rollouts = [Rollout(request=req, completion=comp, reward=acc, accuracy=acc, verifier_status=status)
                for req, comp, (acc, status) in zip(plan.requests, completions, scores)]
    groups = [rollouts[b * plan.group_size:(b + 1) * plan.group_size] for b in range(plan.num_problems)]
    counts = {"fallbacks": float(plan.fallback_count), "problems_without_pool": float(plan.problems_without_pool),
              "verifier_timeouts": float(sum(s == "timeout" for _, s in scores)),
              "verifier_errors": float(sum(s == "error" for _, s in scores))}
    for reason, n in plan.fallbacks.items():
        counts[f"fallback/{reason}"] = float(n)
    if state is not None:
        # online pool refilled by this batch's main rows, controller moved by its denoise rows: a
        # later generation batch of the same step (DAPO) already sees both
        counts.update(prefix_source_metrics(plan.requests))
        state.observe(groups, step)
    return groups, counts


def _denoise_state_metrics(metrics: dict) -> dict[str, float]:
    """Share of prefixes drawn from the online pool, mean age of those entries, mean rho drawn (the
    sums counted per generation batch are replaced by these ratios)."""
    n = metrics.pop("prefixes", 0.0)
    online = metrics.get("prefixes_online", 0.0)
    age_sum, rho_sum = metrics.pop("prefix_online_age_sum", 0.0), metrics.pop("prefix_rho_sum", 0.0)
    out = {"online_share": online / n if n else math.nan,
           "online_age_mean": age_sum / online if online else math.nan,
           "rho_mean": rho_sum / n if n else math.nan}
    return out


def mismatch_wanted(cfg: Config) -> bool:
    m = cfg.algorithm.mismatch
    return bool(m.metrics or m.tis_cap is not None or m.seq_mask_low is not None or m.seq_mask_high is not None)


def collect_batch(ctx: StepContext, step: int, version: int) -> RolloutBatch:
    """Step `step`'s verified rollouts, generated by the engine's weights (policy `version`).
    With rollout.async one_step this runs in a background thread while the previous step trains
    (trainer.rollouts); it is the only part of a step that draws problems or touches the engine's
    generation."""
    cfg = ctx.cfg
    B = cfg.data.problems_per_step
    timer = PhaseTimer()
    dapo = cfg.algorithm.dynamic_sampling
    counts: dict[str, float] = {}
    uids: list[str] = []
    if ctx.denoise_state is not None:
        ctx.denoise_state.begin_step(step)  # online entries older than max_age are dropped

    # sample problems -> rows -> generate -> verify; with DAPO dynamic sampling, keep drawing
    # generation batches until B problems have groups that are neither all-right nor all-wrong
    sampler = DynamicSampler(B, dapo.max_gen_batches if dapo.enabled else 1)
    while True:
        problems = ctx.problems.next_problems(B)
        uids.extend(p.uid for p in problems)
        groups, c = generate_and_verify(ctx, problems, step, sampler.gen_batches, timer)
        for k, v in c.items():
            counts[k] = counts.get(k, 0.0) + v
        if not dapo.enabled:
            break
        sampler.add(groups)
        if sampler.done:
            groups = sampler.take()
            break
    if ctx.denoise_state is not None:  # pool sizes / rho now: with one_step the next collection runs
        counts.update(ctx.denoise_state.metrics())  # while this batch trains, so they are read here
    return RolloutBatch(step=step, version=version, groups=groups, counts=counts,
                        dapo=sampler.stats() if dapo.enabled else None, uids=uids,
                        seen=int(getattr(ctx.problems, "seen", 0)), seconds=dict(timer.seconds))


def rollout_schedule(ctx: StepContext, version: int) -> RolloutSchedule:
    """The run's schedule (rollout.async), its engine at policy `version`; kept in ctx.rollouts."""
    ctx.rollouts = RolloutSchedule(ctx.cfg.rollout.async_, lambda s, v: collect_batch(ctx, s, v), version,
                                   ctx.cfg.trainer.total_steps)
    return ctx.rollouts


def train_step(ctx: StepContext, step: int) -> dict[str, float]:
    """Run step `step` (0-based) and return its metrics."""
    cfg = ctx.cfg
    timer = PhaseTimer()
    sched = ctx.rollouts or rollout_schedule(ctx, version=step)

    # this step's rows: generated now (async off), or while the previous step trained (one_step);
    # one_step then starts generating the next step's rows with the engine's current weights
    rollouts = sched.take(step)
    groups, counts = rollouts.groups, rollouts.counts
    sched.prefetch(step + 1)

    # memory choreography (colocated engine): generation is done for this step, so the engine
    # sleeps while the actor computes log-probs and trains (level 2 drops its weights: a refit
    # follows), then wakes its weights, is refitted, and wakes its KV cache last. one_step
    # generates while the actor trains: its engine never sleeps (on GPU it is not colocated)
    slept = 0 if sched.mode == AsyncMode.ONE_STEP else _engine_sleep(ctx, timer)

    algo = cfg.algorithm
    groups = apply_overlong_shaping(groups, algo.overlong)
    rows = [r for g in groups for r in g]
    folded = [fold_rollout(r, cfg.denoise.partial_mode) for r in rows]
    batch = pack(folded, pad_id=ctx.pad_id)

    # old log-probs: recomputed by the actor (never the engine's: prefix tokens are off-policy);
    # force_on_policy replaces them by the detached current ones inside the loss (ratio == 1), but
    # they are still computed when the engine's log-probs are compared with them (mismatch).
    # Reference log-probs (KL) come from the frozen starting weights in the same phase.
    kl_on = algo.kl.coef > 0
    have_engine_lp = any(r.completion.logprobs for r in rows)
    old_logprobs = ref_logprobs = None
    # the mismatch metrics alone need the current log-probs: the update's own forward gives them
    # (same weights, same micro-batches) instead of a separate forward, when nothing else needs
    # them before the update (trainer.logprobs_from_train)
    from_train = bool(have_engine_lp and _logprobs_from_train(ctx))
    if (not algo.force_on_policy or kl_on or have_engine_lp) and not from_train:
        with timer.phase("old_logprob"):
            old_logprobs = ctx.policy.compute_logprobs(batch)
            if kl_on:
                ref_logprobs = ctx.policy.compute_ref_logprobs(batch)
    extra_metrics: dict[str, float] = {}
    if kl_on and algo.kl.use == KLUse.REWARD:
        # PPO-style: reward -= coef x the row's summed per-token KL, before the advantages
        pen = kl_reward_penalty(old_logprobs, ref_logprobs, batch.loss_mask, algo.kl.coef, algo.kl.type).tolist()
        it = iter(pen)
        groups = [[replace(r, reward=r.reward - next(it)) for r in g] for g in groups]
        rows = [r for g in groups for r in g]
        extra_metrics["kl/reward_penalty"] = sum(pen) / len(pen)

    # advantages by group: all N + K rows of a problem share one baseline (shared_baseline)
    advantages = compute_advantages(groups, algo, cfg.denoise.shared_baseline)
    batch.row_advantages = advantages.to(batch.loss_mask.dtype)
    batch.advantages = batch.row_advantages[:, None] * batch.loss_mask
    if ref_logprobs is not None:  # the KL between the sampling policy and the reference, logged
        from megatron_denoise.core.losses import kl_penalty

        mk = batch.loss_mask
        kl = kl_penalty(old_logprobs.double(), ref_logprobs.double(), algo.kl.type)
        extra_metrics["kl/policy_vs_reference"] = float((kl * mk).sum() / mk.sum().clamp_min(1.0))

    # rollout-training mismatch: measured per row kind, corrected if configured (core.mismatch)
    is_weights = None
    if have_engine_lp and old_logprobs is not None:
        elp, have = engine_logprobs(rows, batch.response_start, batch.input_ids.shape[1])
        mm = measure_and_correct(old_logprobs, elp, have, batch.loss_mask, [r.kind.value for r in rows],
                                 algo.mismatch)
        extra_metrics.update(mm.metrics)
        is_weights = mm.is_weights
        if not bool((mm.loss_mask == batch.loss_mask).all()):
            batch = replace(batch, loss_mask=mm.loss_mask, advantages=batch.row_advantages[:, None] * mm.loss_mask)

    # train: the Megatron actor, global-token-normalised loss, one update per mini-batch
    extra = {}
    if ref_logprobs is not None and algo.kl.use == KLUse.LOSS:
        extra["ref_logprobs"] = ref_logprobs
    if is_weights is not None:
        extra["is_weights"] = is_weights
    with timer.phase("train"):
        chaos.point("train")
        if from_train:
            train_metrics, old_logprobs = ctx.policy.train(batch, None, return_logprobs=True)
        else:
            train_metrics = ctx.policy.train(batch, None if algo.force_on_policy else old_logprobs, **extra)
    if from_train:  # metrics only (no correction: _logprobs_from_train), from the update's forward
        elp, have = engine_logprobs(rows, batch.response_start, batch.input_ids.shape[1])
        extra_metrics.update(measure_and_correct(old_logprobs, elp, have, batch.loss_mask,
                                                 [r.kind.value for r in rows], algo.mismatch).metrics)
    _policy_empty_cache(ctx)

    # refit the engine's weights from the actor, unless the update was skipped (NaN guard); after
    # a level-2 sleep the engine's weights are gone, so it is refitted whatever the update did
    updated = train_metrics.get("skipped", 0.0) < train_metrics.get("updates", 1.0)
    if sched.in_flight:  # one_step: the next step's rows must be done before the refit
        with timer.phase("generate_wait"):
            sched.settle()
    if slept:
        with timer.phase("wake"):
            ctx.engine.wake_up(tags=["weights"])
    refit_figures = None
    with timer.phase("refit"):
        chaos.point("refit")
        if updated or slept == 2:
            refit_figures = ctx.policy.refit(ctx.engine)
    if slept:
        with timer.phase("wake"):
            ctx.engine.wake_up(tags=["kv_cache"])
    sched.refitted(step + 1)  # (a skipped update left the weights, and so the engine, unchanged)

    # metrics (METHOD.md section 4) + time per phase
    metrics = step_metrics(groups, cfg.data.max_response_length, rollouts.dapo)
    metrics.update(counts)
    if ctx.denoise_state is not None:
        metrics.update(_denoise_state_metrics(metrics))
    if cfg.denoise.prefix_kind == PrefixKind.CORRECT:  # rows continuing a CORRECT prefix recover nothing
        metrics["correct_prefix_pass_rate"] = metrics.pop("recovery_rate")
    metrics.update(extra_metrics)
    metrics.update(train_metrics)
    if isinstance(refit_figures, dict):
        metrics.update({k: float(v) for k, v in refit_figures.items()})
    metrics.update(timer.metrics())
    # generate / reward: the rows' own wall time (with one_step spent while the previous step trained)
    metrics.update({f"time/{k}": v for k, v in rollouts.seconds.items()})
    metrics.update(sched.metrics(rollouts))
    # faults the workers recovered from since the previous step's metrics (run-long counts)
    now, last = fault_counts(ctx), ctx.totals.get("faults", {})
    metrics.update({f"faults/{k}": float(v - last.get(k, 0)) for k, v in now.items()})
    ctx.totals["faults"] = now
    metrics["step"] = float(step + 1)
    return metrics


def fault_counts(ctx: StepContext) -> dict[str, int]:
    """Run-long counts of the faults the workers recovered from (logged per step as faults/*):
    verifier workers that died while judging (replaced, their answers judged again), rollout
    replicas re-created (and refitted from the policy) and generate calls retried."""
    stats = getattr(ctx.scorer, "stats", None)
    stats = stats if isinstance(stats, dict) else {}
    engine = getattr(ctx.engine, "faults", None)
    engine = engine if isinstance(engine, dict) else {}
    return {"verifier_restarts": int(stats.get("workers_died", 0)),
            "verifier_rescored": int(stats.get("rescored", 0)),
            "rollout_restarts": int(engine.get("rollout_restarts", 0)),
            "generate_retries": int(engine.get("generate_retries", 0))}


def _logprobs_from_train(ctx: StepContext) -> bool:
    """The old-log-prob forward can be skipped: the log-probs are wanted for the mismatch metrics
    only, and the update's own forward computes them with the same weights."""
    cfg, algo = ctx.cfg, ctx.cfg.algorithm
    m = algo.mismatch
    return bool(cfg.trainer.logprobs_from_train and algo.force_on_policy and algo.kl.coef <= 0
                and m.tis_cap is None and m.seq_mask_low is None and m.seq_mask_high is None
                and int(algo.ppo_epochs) == 1 and int(algo.mini_batches) == 1
                and getattr(ctx.policy, "trains_with_logprobs", False))


def _engine_sleep(ctx: StepContext, timer: PhaseTimer) -> int:
    """Put a colocated engine to sleep at rollout.sleep_level; returns the level (0: awake)."""
    r = ctx.cfg.rollout
    if not (r.colocate and r.sleep_level > 0 and hasattr(ctx.engine, "sleep")):
        return 0
    with timer.phase("sleep"):
        ctx.engine.sleep(level=r.sleep_level)
    return r.sleep_level


def _policy_empty_cache(ctx: StepContext) -> None:
    """Hand cached device memory back at a phase boundary (before the engine wakes)."""
    if ctx.cfg.rollout.colocate and hasattr(ctx.policy, "empty_cache"):
        ctx.policy.empty_cache()
