"""One DenoiseRL training step, top to bottom, in the method's words (METHOD.md sections 2-4).

    sample problems -> build N main + K denoise rows -> generate -> verify -> advantages by group
    -> (DAPO filter and re-sampling) -> old log-probs -> train -> refit the engine -> metrics

Plain GRPO/DAPO is the same loop with K = 0. Everything heavy sits behind the small interfaces of
`StepContext`: the policy (Megatron actor workers), the rollout engine, the reward pool and the
problem sampler; the algorithm itself is the pure code of `megatron_denoise.core`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from megatron_denoise.config.schema import Config
from megatron_denoise.core.advantages import DynamicSampler, apply_overlong_shaping, compute_advantages
from megatron_denoise.core.fold import fold_rollout, pack, verifier_text
from megatron_denoise.core.metrics import step_metrics
from megatron_denoise.core.prefix import build_step_requests
from megatron_denoise.core.types import Problem, Rollout
from megatron_denoise.rollout.engine import SamplingSpec
from megatron_denoise.trainer.timing import PhaseTimer


class Policy(Protocol):
    """The trained model (one Megatron actor per rank, behind Ray or in-process)."""

    def compute_logprobs(self, batch) -> "Any":  # [rows, W] log p(input_ids[:, t] | < t), 0 at t = 0
        ...

    def train(self, batch, old_logprobs) -> dict[str, float]:  # one optimizer step per mini-batch
        ...

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


def generate_and_verify(ctx: StepContext, problems: list[Problem], step: int, gen_batch: int,
                        timer: PhaseTimer) -> tuple[list[list[Rollout]], dict[str, float]]:
    """Rows of one generation batch, generated, verified and grouped per problem."""
    cfg = ctx.cfg
    R = cfg.data.max_response_length

    # build N main + K denoise rows (token-level prefixes; fallbacks counted, never raised)
    plan = build_step_requests(problems, [ctx.prompt_ids(p) for p in problems], ctx.tokenizer, cfg.denoise, R,
                               step, gen_batch=gen_batch, sampling_seed=cfg.rollout.seed)

    # generate: main and denoise rows in ONE call, so the engine batches them and shares prompts
    with timer.phase("generate"):
        completions = ctx.engine.generate(plan.requests, SamplingSpec.from_config(cfg.rollout))

    # verify: prefix + continuation, last \boxed{} against the ground truth
    with timer.phase("reward"):
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
    return groups, counts


def train_step(ctx: StepContext, step: int) -> dict[str, float]:
    """Run step `step` (0-based) and return its metrics."""
    cfg = ctx.cfg
    B = cfg.data.problems_per_step
    timer = PhaseTimer()
    dapo = cfg.algorithm.dynamic_sampling
    counts: dict[str, float] = {}

    # sample problems -> rows -> generate -> verify; with DAPO dynamic sampling, keep drawing
    # generation batches until B problems have groups that are neither all-right nor all-wrong
    sampler = DynamicSampler(B, dapo.max_gen_batches if dapo.enabled else 1)
    while True:
        problems = ctx.problems.next_problems(B)
        groups, c = generate_and_verify(ctx, problems, step, sampler.gen_batches, timer)
        for k, v in c.items():
            counts[k] = counts.get(k, 0.0) + v
        if not dapo.enabled:
            break
        sampler.add(groups)
        if sampler.done:
            groups = sampler.take()
            break

    # advantages by group: all N + K rows of a problem share one baseline (shared_baseline)
    groups = apply_overlong_shaping(groups, cfg.algorithm.overlong)
    advantages = compute_advantages(groups, cfg.algorithm, cfg.denoise.shared_baseline)
    rows = [r for g in groups for r in g]
    folded = [fold_rollout(r, cfg.denoise.partial_mode) for r in rows]
    batch = pack(folded, advantages.tolist(), pad_id=ctx.pad_id)

    # old log-probs: recomputed by the actor (never the engine's: prefix tokens are off-policy);
    # force_on_policy replaces them by the detached current ones inside the loss (ratio == 1)
    old_logprobs = None
    if not cfg.algorithm.force_on_policy:
        with timer.phase("old_logprob"):
            old_logprobs = ctx.policy.compute_logprobs(batch)

    # train: the Megatron actor, global-token-normalised loss, one update per mini-batch
    if cfg.rollout.colocate and hasattr(ctx.engine, "sleep"):
        ctx.engine.sleep()
    with timer.phase("train"):
        train_metrics = ctx.policy.train(batch, old_logprobs)
    if cfg.rollout.colocate and hasattr(ctx.engine, "wake_up"):
        ctx.engine.wake_up()

    # refit the engine's weights from the actor, unless the update was skipped (NaN guard)
    with timer.phase("refit"):
        if train_metrics.get("skipped", 0.0) < train_metrics.get("updates", 1.0):
            ctx.policy.refit(ctx.engine)

    # metrics (METHOD.md section 4) + time per phase
    metrics = step_metrics(groups, cfg.data.max_response_length,
                           sampler.stats() if dapo.enabled else None)
    metrics.update(counts)
    metrics.update(train_metrics)
    metrics.update(timer.metrics())
    metrics["step"] = float(step + 1)
    return metrics
