"""The rollout-engine protocol: token ids in, token ids + finish reason out.

Everything that generates (the trainer's step, data preparation, evaluation) talks to an engine
through this small interface; vLLM (`vllm_engine.VLLMEngine`, GPU and CPU builds) and transformers
(`hf_engine.HFEngine`, the parity oracle) implement it. Records are the algorithm core's
`RolloutRequest` and `Completion` (megatron_denoise/core/types.py).

Contract:
- One `generate` call receives ALL rows of a step (every problem's N main + K denoise rows), so
  the engine batches them and its prefix cache shares each prompt across the problem's rows.
- A row's input is `request.engine_input_ids` = prompt ids (chat template + generation header)
  followed by the prefix ids; the engine continues from there and returns the continuation only.
  Each row carries its own `max_tokens` (R - p for denoise rows in cutdown/shift) and `seed`.
- Completions come back in request order. `token_ids` include the EOS token when
  finish_reason == "stop". Log-probs (if asked) cover continuation tokens only; prefix tokens are
  off-policy and their log-probs are always recomputed by the trainer, never taken from here.
- `update_weights` pushes Hugging Face-named tensors (the full state dict) into the running
  engine and returns the seconds it took; cached KV of old weights is discarded.
- `sleep`/`wake_up` free and restore the engine's device memory around the training phase
  (GPU colocation); on CPU they only mark the engine unusable/usable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence, runtime_checkable

from megatron_denoise.core.types import Completion, RolloutRequest

__all__ = ["SamplingSpec", "RolloutEngine", "check_requests", "make_engine", "expected_tokens", "shard_rows"]


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling settings shared by all rows of one call (per-row: max_tokens and seed, on the request).

    temperature 0 means greedy. top_k -1 (or 0) means off. logprobs: return the log-prob of each
    sampled continuation token under the engine's unmodified model distribution (log-softmax of
    the raw logits, before temperature/top-p). ignore_eos: a row ends only at its max_tokens (an
    EOS it samples is kept and generation goes on; finish_reason "length").
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingSpec.temperature ({self.temperature}) must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingSpec.top_p ({self.top_p}) must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_config(cls, rollout_cfg, logprobs: bool = False) -> "SamplingSpec":
        """Training-rollout sampling from a `RolloutConfig`."""
        return cls(temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                   top_k=rollout_cfg.top_k, logprobs=logprobs, ignore_eos=rollout_cfg.ignore_eos)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[Completion]:
        """Continue every request from its engine_input_ids; results in request order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, "object"]]) -> float:
        """Load HF-named tensors (full state dict) into the running engine; returns seconds."""
        ...

    def sleep(self) -> None:
        ...

    def wake_up(self) -> None:
        ...

    def close(self) -> None:
        ...


def check_requests(requests: Sequence[RolloutRequest], max_model_len: int | None = None) -> None:
    """Reject rows an engine cannot run, naming the row (index, problem uid, slot)."""
    for i, r in enumerate(requests):
        if not isinstance(r, RolloutRequest):
            raise TypeError(f"request {i}: expected RolloutRequest, got {type(r).__name__}")
        if not r.prompt_ids:
            raise ValueError(f"request {i} (problem {r.problem_uid!r}, slot {r.slot}): empty prompt_ids")
        if max_model_len is not None:
            need = len(r.engine_input_ids) + r.max_tokens
            if need > max_model_len:
                raise ValueError(
                    f"request {i} (problem {r.problem_uid!r}, slot {r.slot}): prompt+prefix "
                    f"({len(r.engine_input_ids)}) + max_tokens ({r.max_tokens}) = {need} exceeds the "
                    f"engine's max_model_len ({max_model_len})")


def expected_tokens(r: RolloutRequest) -> int:
    """A row's worst-case cost in tokens: its input (prompt + prefix) plus its generation budget."""
    return len(r.engine_input_ids) + int(r.max_tokens)


def shard_rows(requests: Sequence[RolloutRequest], num_replicas: int) -> list[list[int]]:
    """Row indices per replica, balanced by expected tokens (longest-processing-time first).

    A problem's rows (same group_id) stay on one replica, so its prompt is prefilled once and
    shared through the prefix cache. Each replica's rows keep request order. Completions do not
    depend on the split: every row carries its own seed (vLLM draws a seeded row's tokens from a
    generator of its own), so any number of replicas returns what one would."""
    if num_replicas < 1:
        raise ValueError(f"shard_rows: num_replicas ({num_replicas}) must be >= 1")
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.group_id, []).append(i)
    cost = {g: sum(expected_tokens(requests[i]) for i in idx) for g, idx in groups.items()}
    load = [0] * num_replicas
    out: list[list[int]] = [[] for _ in range(num_replicas)]
    # heaviest group first onto the least-loaded replica; ties by first row (deterministic)
    for g in sorted(groups, key=lambda g: (-cost[g], groups[g][0])):
        k = min(range(num_replicas), key=lambda j: (load[j], j))
        load[k] += cost[g]
        out[k].extend(groups[g])
    return [sorted(idx) for idx in out]


def make_engine(model_path: str, rollout_cfg, *, max_model_len: int, run_dir: str | None = None,
                dtype: str | None = None, **vllm_options) -> RolloutEngine:
    """The engine named by `rollout_cfg.engine` (vllm | hf), imported lazily. vllm_options go to
    VLLMEngine (in_process, external_launcher, sleep_level, seed)."""
    if rollout_cfg.engine == "vllm":
        from megatron_denoise.rollout.vllm_engine import VLLMEngine
        return VLLMEngine(model_path, rollout_cfg, max_model_len=max_model_len, run_dir=run_dir, dtype=dtype,
                          **vllm_options)
    if rollout_cfg.engine == "hf":
        from megatron_denoise.rollout.hf_engine import HFEngine
        return HFEngine(model_path, dtype=dtype or "float32")
    raise ValueError(f"rollout.engine: unknown engine {rollout_cfg.engine!r}; expected vllm | hf")
