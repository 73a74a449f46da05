"""AVG@k evaluation (METHOD.md section 5): k sampled answers per problem, scored 0/1 by the
verifier, averaged per problem and then over the set.

    AVG@k(set) = 1/|set| * sum_problems 1/k * sum_{j<k} score(problem, sample j)

The paper reports AVG@16 on AIME24, AIME25 and AMC23 and AVG@1 on MATH-500, sampled at
temperature 0.6, top_p 0.95, with max tokens R. `overall` is the unweighted mean of the sets'
AVG@k (the paper's "avg" column, which also includes BBEH); `overall_micro` weights every problem
equally. pass@k (some sample correct) comes for free and is reported beside it.

The same function serves the trainer's validation (its live, colocated engine, every
`test_freq` steps) and `launch/evaluate.py` (a fresh engine on an HF folder):

    result = evaluate(engine, tokenizer, {"math500": problems, ...}, cfg.eval, scorer=pool,
                      max_tokens=cfg.data.max_response_length)
    logger.log(step, result.metrics())           # val/<set>/avg@k, val/overall, ...

- `engine`: any `rollout.engine.RolloutEngine`; all k samples of all problems of a set go in ONE
  `generate` call (the engine batches them and its prefix cache shares each prompt k ways).
- `scorer`: a `reward.VerifierPool` (anything with `score_batch(texts, ground_truths)`).
- Sampling seeds derive from (seed, set, problem uid, sample), not from the training step, so
  successive validations of one run use the same random numbers and their differences reflect the
  policy, not the sampling noise.
- A prompt that leaves no room to generate under the engine's `max_model_len` scores 0 for all
  its samples (counted as `prompt_too_long`): the denominator stays the full set, so numbers stay
  comparable with published ones. Rows whose budget had to be cut below R are counted as `capped`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from megatron_denoise.core.seeding import derive_seed
from megatron_denoise.core.types import Problem, RolloutRequest, RowKind

__all__ = [
    "avg_at_k",
    "pass_at_k",
    "SetResult",
    "EvalResult",
    "k_for_set",
    "evaluate",
    "evaluate_set",
]


# ---------------------------------------------------------------------------------------------
# Pure aggregation
# ---------------------------------------------------------------------------------------------

def _check_scores(scores: Sequence[Sequence[float]], where: str) -> int:
    """All problems must carry the same number k >= 1 of samples; returns k."""
    if not scores:
        raise ValueError(f"{where}: no problems to aggregate")
    k = len(scores[0])
    for i, row in enumerate(scores):
        if len(row) != k or k == 0:
            raise ValueError(f"{where}: problem {i} has {len(row)} samples, expected {k} (>= 1) like problem 0")
        for j, s in enumerate(row):
            if not (0.0 <= float(s) <= 1.0):
                raise ValueError(f"{where}: problem {i} sample {j} has score {s!r} outside [0, 1]")
    return k


def avg_at_k(scores: Sequence[Sequence[float]], where: str = "avg_at_k") -> float:
    """Mean over problems of the mean score of each problem's k samples (scores in [0, 1])."""
    _check_scores(scores, where)
    return sum(sum(map(float, row)) / len(row) for row in scores) / len(scores)


def pass_at_k(scores: Sequence[Sequence[float]], where: str = "pass_at_k") -> float:
    """Share of problems with at least one correct sample among their k (score > 0.5)."""
    _check_scores(scores, where)
    return sum(any(float(s) > 0.5 for s in row) for row in scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass
class SetResult:
    name: str
    k: int
    num_problems: int
    avg_at_k: float
    pass_at_k: float
    per_problem: list[float]  # mean score of each problem's k samples, in set order
    mean_response_tokens: float  # generated tokens per sample (samples actually generated)
    truncated_fraction: float  # samples that hit max_tokens (finish_reason "length")
    status_counts: dict[str, int]  # verifier outcome per sample: ok / no_box / timeout / error
    prompt_too_long: int = 0  # problems scored 0 without generation
    capped: int = 0  # samples whose budget was cut below R to fit the engine's max_model_len
    seconds: float = 0.0
    samples: Optional[list[dict]] = None  # per sample (uid, j, text, answer, score, status) if kept


@dataclass
class EvalResult:
    sets: dict[str, SetResult]
    overall: float  # unweighted mean of the sets' AVG@k
    overall_micro: float  # every problem weighs the same
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def metrics(self, prefix: str = "val/") -> dict[str, float]:
        """Flat metrics for the MetricsLogger: <prefix><set>/avg@k, .../pass@k, <prefix>overall."""
        m: dict[str, float] = {}
        for name, r in self.sets.items():
            m[f"{prefix}{name}/avg@{r.k}"] = r.avg_at_k
            m[f"{prefix}{name}/pass@{r.k}"] = r.pass_at_k
            m[f"{prefix}{name}/response_tokens"] = r.mean_response_tokens
        m[f"{prefix}overall"] = self.overall
        m[f"{prefix}overall_micro"] = self.overall_micro
        m["time/eval"] = self.seconds
        return m

    def to_dict(self, with_samples: bool = False) -> dict:
        """Plain JSON-able dict; NaN (nothing generated) becomes None, so the JSON stays strict."""
        sets = {}
        for name, r in self.sets.items():
            d = asdict(r)
            if not with_samples:
                d.pop("samples")
            sets[name] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
        return {"overall": self.overall, "overall_micro": self.overall_micro, "sets": sets,
                "settings": dict(self.settings), "seconds": self.seconds}

    def markdown(self) -> str:
        """A markdown table: one row per set plus the overall row (accuracies in percent)."""
        def num(x: float, spec: str) -> str:  # NaN when nothing was generated (all prompts too long)
            return format(x, spec) if math.isfinite(x) else "-"

        lines = ["| set | problems | k | AVG@k (%) | pass@k (%) | mean tokens | truncated (%) | prompt too long |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in self.sets.items():
            lines.append(f"| {name} | {r.num_problems} | {r.k} | {100 * r.avg_at_k:.1f} | {100 * r.pass_at_k:.1f} "
                         f"| {num(r.mean_response_tokens, '.0f')} | {num(100 * r.truncated_fraction, '.1f')} "
                         f"| {r.prompt_too_long} |")
        total = sum(r.num_problems for r in self.sets.values())
        lines.append(f"| **overall** (mean of sets) | {total} | | {100 * self.overall:.1f} | | | | |")
        return "\n".join(lines)


def _macro_micro(results: Mapping[str, SetResult]) -> tuple[float, float]:
    if not results:
        return math.nan, math.nan
    macro = sum(r.avg_at_k for r in results.values()) / len(results)
    n = sum(r.num_problems for r in results.values())
    micro = sum(r.avg_at_k * r.num_problems for r in results.values()) / n
    return macro, micro


# ---------------------------------------------------------------------------------------------
# Running an evaluation
# ---------------------------------------------------------------------------------------------

def k_for_set(eval_cfg, name: str, override: Optional[int] = None) -> int:
    """k of a set: the override, else `eval.k[name]`, else 1 (a set absent from eval.k)."""
    k = override if override is not None else (eval_cfg.k or {}).get(name, 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"eval.k[{name!r}] must be an integer >= 1, got {k!r}")
    return k


def _default_prompt_ids(tokenizer: Any) -> Callable[[Problem], tuple[int, ...]]:
    from megatron_denoise.core.prefix import render_prompt_ids

    return lambda p: render_prompt_ids(tokenizer, p.prompt)


def evaluate_set(engine: Any, tokenizer: Any, name: str, problems: Sequence[Problem], k: int, *,
                 scorer: Any, max_tokens: int, temperature: float = 0.6, top_p: float = 0.95,
                 seed: int = 0, prompt_ids: Optional[Callable[[Problem], tuple[int, ...]]] = None,
                 decode: Optional[Callable[[Sequence[int]], str]] = None,
                 keep_samples: bool = False) -> SetResult:
    """AVG@k of one set: one generate call for all k samples of all problems, one verify batch."""
    from megatron_denoise.rollout.engine import SamplingSpec

    if not problems:
        raise ValueError(f"eval set {name!r} has no problems")
    if max_tokens < 1:
        raise ValueError(f"max_tokens ({max_tokens}) must be >= 1")
    t0 = time.perf_counter()
    prompt_ids = prompt_ids or _default_prompt_ids(tokenizer)
    if decode is None:  # what the verifier sees in training too: special tokens skipped
        from megatron_denoise.core.fold import hf_decoder
        decode = hf_decoder(tokenizer)
    max_model_len = getattr(engine, "max_model_len", None)

    requests: list[RolloutRequest] = []
    too_long: set[int] = set()
    capped = 0
    for i, p in enumerate(problems):
        ids = tuple(prompt_ids(p))
        budget = max_tokens if max_model_len is None else min(max_tokens, int(max_model_len) - len(ids))
        if budget < 1:
            too_long.add(i)
            continue
        capped += k * (budget < max_tokens)
        for j in range(k):
            requests.append(RolloutRequest(
                problem_uid=p.uid, group_id=i, slot=j, kind=RowKind.MAIN, prompt_ids=ids, prefix=None,
                max_tokens=budget, seed=derive_seed("eval", seed, name, p.uid, j)))

    sampling = SamplingSpec(temperature=temperature, top_p=top_p)
    completions = engine.generate(requests, sampling) if requests else []
    if len(completions) != len(requests):
        raise RuntimeError(f"engine returned {len(completions)} completions for {len(requests)} requests")
    texts = [decode(c.token_ids) for c in completions]
    verdicts = scorer.score_batch(texts, [problems[r.group_id].ground_truth for r in requests]) if texts else []

    scores = [[0.0] * k for _ in problems]  # prompt_too_long problems keep their zeros
    status_counts: dict[str, int] = {}
    samples = [] if keep_samples else None
    for r, c, text, v in zip(requests, completions, texts, verdicts):
        scores[r.group_id][r.slot] = float(v.score)
        st = getattr(v.status, "value", str(v.status))
        status_counts[st] = status_counts.get(st, 0) + 1
        if samples is not None:
            samples.append({"uid": r.problem_uid, "sample": r.slot, "text": text, "answer": v.answer,
                            "ground_truth": problems[r.group_id].ground_truth, "score": float(v.score),
                            "status": st, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)})
    if too_long:
        status_counts["prompt_too_long"] = k * len(too_long)

    lengths = [len(c.token_ids) for c in completions]
    return SetResult(
        name=name, k=k, num_problems=len(problems),
        avg_at_k=avg_at_k(scores, where=f"eval set {name!r}"),
        pass_at_k=pass_at_k(scores, where=f"eval set {name!r}"),
        per_problem=[sum(row) / k for row in scores],
        mean_response_tokens=sum(lengths) / len(lengths) if lengths else math.nan,
        truncated_fraction=(sum(c.finish_reason == "length" for c in completions) / len(completions)
                            if completions else math.nan),
        status_counts=status_counts, prompt_too_long=len(too_long), capped=capped,
        seconds=time.perf_counter() - t0, samples=samples)


def evaluate(engine: Any, tokenizer: Any, sets: Mapping[str, Sequence[Problem]], eval_cfg, *,
             scorer: Any, max_tokens: int, k: Optional[int] = None, seed: int = 0,
             prompt_ids: Optional[Callable[[Problem], tuple[int, ...]]] = None,
             decode: Optional[Callable[[Sequence[int]], str]] = None,
             keep_samples: bool = False) -> EvalResult:
    """AVG@k per set and overall.

    sets: set name -> problems (already loaded and rendered by the data layer; `eval_cfg.max_problems`
        keeps the first n of each). eval_cfg: an `EvalConfig` (k per set, temperature, top_p).
    k: one k for every set, overriding `eval_cfg.k`. max_tokens: R.
    """
    t0 = time.perf_counter()
    results: dict[str, SetResult] = {}
    n_max = getattr(eval_cfg, "max_problems", None)
    for name, problems in sets.items():
        probs = list(problems)[:n_max] if n_max is not None else list(problems)
        results[name] = evaluate_set(
            engine, tokenizer, name, probs, k_for_set(eval_cfg, name, k), scorer=scorer,
            max_tokens=max_tokens, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p, seed=seed,
            prompt_ids=prompt_ids, decode=decode, keep_samples=keep_samples)
    macro, micro = _macro_micro(results)
    settings = {"temperature": eval_cfg.temperature, "top_p": eval_cfg.top_p, "max_tokens": max_tokens,
                "seed": seed, "k": {n: r.k for n, r in results.items()}, "max_problems": n_max}
    return EvalResult(sets=results, overall=macro, overall_micro=micro, settings=settings,
                      seconds=time.perf_counter() - t0)
