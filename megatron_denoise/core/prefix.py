"""Building one step's rows: N main + K denoise requests per problem (METHOD.md section 2).

For each problem, slots 0..N-1 are ordinary rollouts and slots N..N+K-1 start from the first p
policy tokens of a wrong solution w drawn from the problem's pool:

    p = max(1, floor(rho * |w|))        |w| = policy-tokenizer tokens of the WHOLE wrong text
    engine input = prompt ids (chat template + generation header) + first p ids of w
    max_tokens   = R - p (cutdown, shift) or R (none)

The prefix is attached at token level: the wrong text is tokenised once and its first p ids are
appended; nothing is decoded and re-encoded (the reference re-tokenises text and can be off by a
token at the boundary) and no end-of-turn token is inserted.

A denoise slot that cannot get a prefix (empty pool; non-string entry, zero tokens or a tokenizer
error; p >= R) becomes an ordinary rollout of kind FALLBACK with R tokens of budget: the group stays
N + K, the reason is counted, and building never raises for a problem's data.

Beyond the paper (issue 18, state in core.prefix_state): with denoise.pool_source online | mixed a
slot may draw the policy's own recent answer (already token ids, nothing is tokenised); with
denoise.prefix_kind correct the prefix comes from a verified correct answer instead of a wrong one;
with denoise.rho.strategy adaptive rho is the controller's current value for the problem. A problem
with no entry in any pool it may draw from falls back exactly like an empty offline pool.

Randomness (pool choice, rho, per-request sampling seed) is derived from (seed, step, generation
batch, problem uid, slot) only, so a step is reproducible regardless of batch composition.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from megatron_denoise.config.schema import (DenoiseConfig, PartialMode, PoolSampling, PoolSource, PrefixKind, RhoConfig,
                                            RhoStrategy)
from megatron_denoise.config.validate import rho_errors
from megatron_denoise.core.seeding import derive_seed, derived_rng
from megatron_denoise.core.types import (
    FallbackReason,
    PrefixSpan,
    Problem,
    RolloutRequest,
    RowKind,
)

__all__ = [
    "Encoder",
    "as_encoder",
    "render_prompt_ids",
    "validate_rho_config",
    "sample_rho",
    "prefix_length",
    "generation_budget",
    "choose_pool_index",
    "StepRequests",
    "build_step_requests",
    "POOL_SAMPLING",
    "RHO_STRATEGIES",
]

POOL_SAMPLING = PoolSampling.values()   # the schema's types (config.schema); the loader checks them
RHO_STRATEGIES = RhoStrategy.values()

# A tokenizer as this module needs it: text -> policy token ids (no special tokens added).
Encoder = Callable[[str], Sequence[int]]


def as_encoder(tokenizer: Any) -> Encoder:
    """Adapt a tokenizer to `text -> ids` without special tokens.

    Accepts an object with `encode` (Hugging Face: called with add_special_tokens=False so that no
    BOS is glued to the wrong text) or a plain callable text -> ids (tests' fake tokenizers).
    """
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        def _encode(text: str) -> Sequence[int]:
            try:
                return encode(text, add_special_tokens=False)
            except TypeError:  # a minimal encode(text) without that keyword
                return encode(text)
        return _encode
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode() and is not callable")


def render_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]:
    """Prompt ids of a chat message list WITH the generation header (e.g. `<|im_start|>assistant\\n`).

    Uses the Hugging Face tokenizer's `apply_chat_template(add_generation_prompt=True,
    tokenize=True)`; transformers 5 returns a BatchEncoding there, older versions a list.
    """
    out = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if len(out) > 0 and isinstance(out[0], (list, tuple)):  # batched form of a single conversation
        if len(out) != 1:
            raise ValueError(f"apply_chat_template returned {len(out)} sequences for one conversation")
        out = out[0]
    return tuple(int(t) for t in out)


def validate_rho_config(rho: RhoConfig) -> None:
    """Raise ValueError naming the key if the rho sampler's settings are invalid."""
    errors = rho_errors(rho)  # the ONE rho check (config.validate), shared with the loader
    if errors:
        raise ValueError("; ".join(errors))


def sample_rho(rho: RhoConfig, rng: random.Random) -> float:
    """One prefix ratio: fixed value, uniform(low, high), or normal(mean, std) clipped to [low, high]."""
    if rho.strategy == RhoStrategy.FIXED:
        return float(rho.value)
    if rho.strategy == RhoStrategy.UNIFORM:
        return rng.uniform(rho.low, rho.high)
    if rho.strategy == RhoStrategy.NORMAL:
        return min(rho.high, max(rho.low, rng.gauss(rho.mean, rho.std)))
    if rho.strategy == RhoStrategy.ADAPTIVE:
        raise ValueError(f"denoise.rho.strategy {rho.strategy}: rho comes from the run's controller "
                         f"(core.prefix_state.RhoController), it is not sampled")
    raise ValueError(f"denoise.rho.strategy ({rho.strategy!r}) must be one of {' | '.join(RHO_STRATEGIES)}")


def prefix_length(rho: float, source_num_tokens: int) -> int:
    """p = max(1, floor(rho * |w|)), computed in floating point exactly as the reference's int()."""
    if source_num_tokens < 1:
        raise ValueError(f"source_num_tokens ({source_num_tokens}) must be >= 1")
    return max(1, math.floor(rho * source_num_tokens))


def generation_budget(partial_mode: str, max_response_length: int, p: int) -> int:
    """max_tokens of a row with a p-token prefix: R - p in cutdown and shift, R in none."""
    return max_response_length if partial_mode == PartialMode.NONE else max_response_length - p


def choose_pool_index(pool_sampling: str, pool_size: int, rng: random.Random) -> int:
    """`first`: always entry 0 (the reference code); `random`: uniform over the pool (the paper)."""
    if pool_size < 1:
        raise ValueError("cannot choose from an empty pool")
    if pool_sampling == PoolSampling.FIRST:
        return 0
    if pool_sampling == PoolSampling.RANDOM:
        return rng.randrange(pool_size)
    raise ValueError(f"denoise.pool_sampling ({pool_sampling!r}) must be one of {' | '.join(POOL_SAMPLING)}")


def _validate(denoise: DenoiseConfig, max_response_length: int) -> None:
    errors = []
    if denoise.n_main < 0:
        errors.append(f"denoise.n_main ({denoise.n_main}) must be >= 0")
    if denoise.k_denoise < 0:
        errors.append(f"denoise.k_denoise ({denoise.k_denoise}) must be >= 0")
    if denoise.n_main + denoise.k_denoise < 1:
        errors.append(f"denoise.n_main + denoise.k_denoise ({denoise.n_main} + {denoise.k_denoise}) must be >= 1")
    if max_response_length < 1:
        errors.append(f"data.max_response_length ({max_response_length}) must be >= 1")
    if errors:
        raise ValueError("; ".join(errors))
    validate_rho_config(denoise.rho)


@dataclass(frozen=True)
class StepRequests:
    """The requests of one generation batch, problem-major: problem b owns rows
    [b * G, (b + 1) * G) with G = N + K, slots in order.

    fallbacks: reason value -> count of denoise slots that became ordinary rollouts.
    problems_without_pool: problems with nothing to draw from (counted even when K = 0): an empty
        prepared pool (pool_source offline), no online entry yet (online), neither (mixed).
    """

    requests: tuple[RolloutRequest, ...]
    num_problems: int
    group_size: int
    fallbacks: Mapping[str, int]
    problems_without_pool: int

    @property
    def fallback_count(self) -> int:
        return sum(self.fallbacks.values())

    def group(self, b: int) -> tuple[RolloutRequest, ...]:
        """The N + K requests of problem b."""
        return self.requests[b * self.group_size:(b + 1) * self.group_size]


def offline_pool(problem: Problem, denoise: DenoiseConfig) -> tuple:
    """The prepared pool a slot draws from: the wrong solutions (Problem.wrong_pool), or with
    prefix_kind correct the problem's `denoise.correct_pool_column` (carried in Problem.extra)."""
    if denoise.prefix_kind == PrefixKind.WRONG:
        return problem.wrong_pool
    raw = problem.extra.get(denoise.correct_pool_column) if isinstance(problem.extra, Mapping) else None
    return tuple(raw) if isinstance(raw, (list, tuple)) else ()


def choose_source(denoise: DenoiseConfig, n_offline: int, n_online: int, slot_key: tuple) -> Optional[str]:
    """Which pool a slot draws from (None: both are empty -> fallback). mixed draws online with
    probability denoise.online_pool.share when both pools have entries, else the non-empty one."""
    src = denoise.pool_source
    if src == PoolSource.OFFLINE:
        return PoolSource.OFFLINE if n_offline else None
    if src == PoolSource.ONLINE:
        return PoolSource.ONLINE if n_online else None
    if n_offline and n_online:
        online = derived_rng("source", *slot_key).random() < denoise.online_pool.share
        return PoolSource.ONLINE if online else PoolSource.OFFLINE
    return PoolSource.ONLINE if n_online else (PoolSource.OFFLINE if n_offline else None)


def _try_prefix(problem: Problem, slot_key: tuple, denoise: DenoiseConfig, max_response_length: int,
                encode: Encoder, token_cache: dict, state: Any = None, step: int = 0,
                ) -> Union[PrefixSpan, FallbackReason]:
    """The slot's prefix, or the reason it cannot have one."""
    pool = offline_pool(problem, denoise)
    online = state.online_entries(problem.uid, step) if state is not None else ()
    source = choose_source(denoise, len(pool), len(online), slot_key)
    if source is None:
        return FallbackReason.EMPTY_POOL
    n = len(pool) if source == PoolSource.OFFLINE else len(online)
    pool_index = choose_pool_index(denoise.pool_sampling, n, derived_rng("pool", *slot_key))
    if denoise.rho.strategy == RhoStrategy.ADAPTIVE:
        if state is None:
            raise ValueError(f"denoise.rho.strategy {RhoStrategy.ADAPTIVE} needs the run's controller state "
                             f"(build_step_requests(..., state=DenoiseState))")
        rho = state.rho(problem.uid)
    else:
        rho = sample_rho(denoise.rho, derived_rng("rho", *slot_key))
    age = None
    if source == PoolSource.ONLINE:  # the policy's own token ids: nothing to tokenise
        entry = online[pool_index]
        ids, age = entry.token_ids, step - entry.step
    else:
        text = pool[pool_index]
        if pool_index not in token_cache:
            ids = None
            if isinstance(text, str):
                try:
                    ids = tuple(int(t) for t in encode(text))
                except Exception:  # noqa: BLE001 - a bad pool entry must not crash the step (counted)
                    ids = None
            token_cache[pool_index] = ids
        ids = token_cache[pool_index]
    if not ids:
        return FallbackReason.UNBUILDABLE_PREFIX
    p = prefix_length(rho, len(ids))
    if p >= max_response_length:
        return FallbackReason.PREFIX_TOO_LONG
    return PrefixSpan(pool_index=pool_index, source_num_tokens=len(ids), rho=rho, length=p, token_ids=ids[:p],
                      source=str(source.value), age=age)


def build_step_requests(
    problems: Sequence[Problem],
    prompt_ids: Sequence[Sequence[int]],
    tokenizer: Any,
    denoise: DenoiseConfig,
    max_response_length: int,
    step: int,
    *,
    gen_batch: int = 0,
    sampling_seed: int = 0,
    state: Any = None,
) -> StepRequests:
    """N main + K denoise requests for each problem of one generation batch.

    problems:   the B problems; `prompt_ids[b]` is problem b's rendered prompt (chat template with
                the generation header, see `render_prompt_ids`).
    tokenizer:  the POLICY tokenizer (anything `as_encoder` accepts), used on wrong texts only.
    denoise:    N, K, pool sampling, rho sampler, partial mode and `denoise.seed`.
    max_response_length: R (data.max_response_length).
    step, gen_batch: where in the run this batch is (DAPO may draw several batches per step).
    sampling_seed: base of the per-request engine sampling seeds (rollout.seed).
    state:      the run's core.prefix_state.DenoiseState (online pool, rho controller), needed with
                denoise.pool_source online | mixed or denoise.rho.strategy adaptive; None otherwise.
    """
    _validate(denoise, max_response_length)
    if len(prompt_ids) != len(problems):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} entries for {len(problems)} problems")
    encode = as_encoder(tokenizer)
    n, k = denoise.n_main, denoise.k_denoise
    requests: list[RolloutRequest] = []
    fallbacks: Counter[str] = Counter()
    without_pool = 0
    for b, (problem, ids) in enumerate(zip(problems, prompt_ids)):
        prompt = tuple(int(t) for t in ids)
        if len(prompt) == 0:
            raise ValueError(f"problem {problem.uid!r} (batch row {b}) has an empty prompt")
        n_online = len(state.online_entries(problem.uid, step)) if state is not None else 0
        if choose_source(denoise, len(offline_pool(problem, denoise)), n_online, ()) is None:
            without_pool += 1
        token_cache: dict[int, Optional[tuple[int, ...]]] = {}
        for slot in range(n + k):
            seed = derive_seed("sample", sampling_seed, step, gen_batch, problem.uid, slot, bits=31)
            common = dict(problem_uid=problem.uid, group_id=b, slot=slot, prompt_ids=prompt, seed=seed)
            if slot < n:
                requests.append(RolloutRequest(kind=RowKind.MAIN, prefix=None, max_tokens=max_response_length,
                                               **common))
                continue
            slot_key = (denoise.seed, step, gen_batch, problem.uid, slot)
            got = _try_prefix(problem, slot_key, denoise, max_response_length, encode, token_cache, state, step)
            if isinstance(got, FallbackReason):
                fallbacks[got.value] += 1
                requests.append(RolloutRequest(kind=RowKind.FALLBACK, prefix=None, max_tokens=max_response_length,
                                               fallback_reason=got, **common))
            else:
                budget = generation_budget(denoise.partial_mode, max_response_length, got.length)
                requests.append(RolloutRequest(kind=RowKind.DENOISE, prefix=got, max_tokens=budget, **common))
    return StepRequests(requests=tuple(requests), num_problems=len(problems), group_size=n + k,
                        fallbacks=dict(fallbacks), problems_without_pool=without_pool)
