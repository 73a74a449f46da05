"""Typed records that flow through one DenoiseRL step (METHOD.md sections 2 and 3).

    Problem ──prefix.build_step_requests──> RolloutRequest (N main + K denoise per problem)
            ──engine──> Completion ──verifier──> Rollout ──fold──> FoldedRollout ──pack──> tensors

The wrong-solution prefix is a typed `PrefixSpan`, never a flag plus loose integers, so that
the loss mask is derived from it in exactly one place (`core.fold.response_loss_mask`).
All token ids are POLICY-tokenizer ids. Records are frozen: a stage returns new records instead of
mutating the ones it received. They hold tuples and plain Python values only (no torch), so they
pickle cheaply to reward workers and engine processes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from megatron_denoise.config.schema import PartialMode, PoolSource

__all__ = [
    "RowKind",
    "PartialMode",
    "FallbackReason",
    "Problem",
    "PrefixSpan",
    "RolloutRequest",
    "Completion",
    "Rollout",
    "FinishReason",
]

FinishReason = Literal["stop", "length", "abort"]
PARTIAL_MODES: tuple[str, ...] = PartialMode.values()  # the schema's type (config.schema.PartialMode)


class RowKind(str, enum.Enum):
    """What a row of a problem's group is.

    MAIN:     an ordinary rollout from the prompt (slots 0..N-1).
    DENOISE:  starts from the first p tokens of a wrong solution (slots N..N+K-1).
    FALLBACK: a denoise slot that could not get a prefix (empty pool, unbuildable prefix or
              p >= R) and became an ordinary rollout; the group stays N + K.
    """

    MAIN = "main"
    DENOISE = "denoise"
    FALLBACK = "fallback"


class FallbackReason(str, enum.Enum):
    """Why a denoise slot became an ordinary rollout (counted in the step metrics)."""

    EMPTY_POOL = "empty_pool"
    UNBUILDABLE_PREFIX = "unbuildable_prefix"  # non-string entry, 0 tokens, tokenizer error
    PREFIX_TOO_LONG = "prefix_too_long"  # p >= R: no room left to generate


@dataclass(frozen=True, eq=True)
class Problem:
    """One training problem as the data layer hands it over.

    `prompt` is the chat message list ({"role", "content"} mappings) before the chat template;
    the caller renders it to ids (`core.prefix.render_prompt_ids`). `wrong_pool` holds the weak
    model's wrong solutions (column `wrong_answer_with_boxed`), full decoded texts, sample order.
    Not hashable (it holds mappings): key dictionaries by `uid`.
    """

    uid: str
    index: int
    prompt: tuple[Mapping[str, str], ...]
    ground_truth: str
    wrong_pool: tuple[str, ...] = ()
    data_source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class PrefixSpan:
    """The first `length` (= p) policy tokens of one wrong solution, attached after the prompt.

    pool_index:        which entry of `Problem.wrong_pool` was used.
    source_num_tokens: |w|, policy-tokenizer tokens of the WHOLE wrong text.
    rho:               the sampled prefix ratio; length = max(1, floor(rho * |w|)).
    token_ids:         exactly `length` ids, the first ones of the tokenised wrong text (no
                       decode/re-encode, no end-of-turn token).
    source:            the pool it came from: offline (the prepared pool; pool_index indexes the
                       problem's wrong_pool, or its correct pool with prefix_kind correct) or online
                       (the policy's own answers; pool_index indexes the problem's online entries).
    age:               online entries: steps since the entry was generated (None for offline ones).
    """

    pool_index: int
    source_num_tokens: int
    rho: float
    length: int
    token_ids: tuple[int, ...]
    source: str = PoolSource.OFFLINE.value
    age: Optional[int] = None

    def __post_init__(self) -> None:
        if self.length != len(self.token_ids):
            raise ValueError(f"PrefixSpan.length ({self.length}) != len(token_ids) ({len(self.token_ids)})")
        if not 1 <= self.length <= self.source_num_tokens:
            raise ValueError(
                f"PrefixSpan.length ({self.length}) must be in [1, source_num_tokens ({self.source_num_tokens})]")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"PrefixSpan.rho ({self.rho}) must be in (0, 1]")


@dataclass(frozen=True)
class RolloutRequest:
    """One row to generate: prompt ids (+ optional prefix) and its own token budget and seed.

    group_id: the problem's position in the step's batch (all N + K rows of a problem share it;
              `core.advantages.group_keys` splits main/denoise when the baseline is not shared).
    slot:     0..N-1 main, N..N+K-1 denoise (or fallback) within the problem's group.
    max_tokens: generation budget of the continuation (R - p in cutdown/shift, R otherwise).
    seed:     per-request sampling seed, derived from (seed, step, problem uid, slot).
    """

    problem_uid: str
    group_id: int
    slot: int
    kind: RowKind
    prompt_ids: tuple[int, ...]
    prefix: Optional[PrefixSpan]
    max_tokens: int
    seed: int
    fallback_reason: Optional[FallbackReason] = None

    def __post_init__(self) -> None:
        if (self.kind is RowKind.DENOISE) != (self.prefix is not None):
            raise ValueError(f"RolloutRequest kind={self.kind.value} inconsistent with prefix={self.prefix!r}")
        if (self.kind is RowKind.FALLBACK) != (self.fallback_reason is not None):
            raise ValueError(f"RolloutRequest kind={self.kind.value} inconsistent with "
                             f"fallback_reason={self.fallback_reason!r}")
        if self.max_tokens < 1:
            raise ValueError(f"RolloutRequest.max_tokens ({self.max_tokens}) must be >= 1")

    @property
    def prefix_length(self) -> int:
        """p (0 for main and fallback rows)."""
        return 0 if self.prefix is None else self.prefix.length

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        return () if self.prefix is None else self.prefix.token_ids

    @property
    def engine_input_ids(self) -> tuple[int, ...]:
        """What the engine continues from: prompt ids (with generation header) + prefix ids."""
        return self.prompt_ids + self.prefix_ids


@dataclass(frozen=True)
class Completion:
    """What the engine generated after `engine_input_ids` (the continuation only).

    token_ids include the EOS token when finish_reason == "stop". `logprobs` (optional, one per
    continuation token) are the engine's sampling log-probs; they never cover prefix tokens.
    """

    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if self.finish_reason not in ("stop", "length", "abort"):
            raise ValueError(f"Completion.finish_reason {self.finish_reason!r} not in stop|length|abort")
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"Completion.logprobs has {len(self.logprobs)} entries for "
                             f"{len(self.token_ids)} tokens")


@dataclass(frozen=True)
class Rollout:
    """A generated and verified row.

    accuracy: the verifier's 0/1 outcome on prefix + continuation (metrics, DAPO filter).
    reward:   the scalar the advantages use (accuracy, possibly plus overlong shaping).
    verifier_status: "ok" | "timeout" | "error" (timeouts and crashes score 0 and are counted).
    """

    request: RolloutRequest
    completion: Completion
    reward: float
    accuracy: float
    verifier_status: str = "ok"

    @property
    def kind(self) -> RowKind:
        return self.request.kind

    @property
    def prefix_length(self) -> int:
        return self.request.prefix_length

    @property
    def continuation_length(self) -> int:
        return len(self.completion.token_ids)
