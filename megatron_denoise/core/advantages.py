"""Group advantages (GRPO, Dr. GRPO), DAPO dynamic sampling and overlong shaping (METHOD.md section 3).

Groups: all N + K rows of a problem share one baseline when `denoise.shared_baseline` (the
reference's use_problem_id_as_uid); fallback rows are ordinary members. Without a shared baseline,
rows with a prefix (DENOISE) form one group and rows without (MAIN and FALLBACK, both ordinary
rollouts from the prompt) another.

    GRPO     A_i = (r_i - mean_g) / (std_g + eps), std unbiased (n - 1, reference) or population
    Dr. GRPO A_i = r_i - mean_g
    groups of size 1 get A = 0

Steps receive rollouts grouped per problem (a sequence of groups, each the problem's N + K rows),
so problems gathered from several DAPO generation batches never collide on a group id.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Hashable, Sequence

from megatron_denoise.config.schema import AlgorithmConfig, AlgorithmName, OverlongConfig, StdMode
from megatron_denoise.core.types import Rollout, RowKind

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALGORITHMS",
    "group_keys",
    "group_advantages",
    "compute_advantages",
    "overlong_penalty",
    "apply_overlong_shaping",
    "keep_group",
    "DynamicSampler",
    "DynamicSamplingExhausted",
]

ALGORITHMS = AlgorithmName.values()  # the schema's type; the loader rejects anything else


def group_keys(groups: Sequence[Sequence[Rollout]], shared_baseline: bool) -> list[tuple[int, int]]:
    """One key per row (flattened in group order): (problem position, 0) when shared, else
    (problem position, 1 for rows with a prefix / 0 for ordinary rows)."""
    keys = []
    for g, rows in enumerate(groups):
        for row in rows:
            split = 0 if shared_baseline else int(row.request.kind is RowKind.DENOISE)
            keys.append((g, split))
    return keys


def group_advantages(rewards: "torch.Tensor", keys: Sequence[Hashable], *, scale_by_std: bool = True,
                     std: StdMode = StdMode.UNBIASED, eps: float = 1e-6) -> "torch.Tensor":
    """Per-row advantages [rows] (float32) from rewards [rows] and a group key per row.

    scale_by_std=True: GRPO (divide by std + eps); False: Dr. GRPO (mean-centred only).
    Computed in float64 so that rows of equal reward get exactly equal advantages.
    """
    import torch

    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if r.numel() != len(keys):
        raise ValueError(f"{r.numel()} rewards for {len(keys)} group keys")
    out = torch.zeros_like(r)
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    for idx in members.values():
        if len(idx) < 2:  # a lone row has no baseline to compare with
            continue
        ix = torch.tensor(idx)
        x = r[ix]
        centred = x - x.mean()
        if scale_by_std:
            s = x.std(unbiased=(std == StdMode.UNBIASED))
            centred = centred / (s + eps)
        out[ix] = centred
    return out.to(torch.float32)


def compute_advantages(groups: Sequence[Sequence[Rollout]], algorithm: AlgorithmConfig,
                       shared_baseline: bool = True) -> "torch.Tensor":
    """Advantages [rows] for rollouts grouped per problem, flattened in group order.

    algorithm.name: grpo and dapo scale by the group std (algorithm.std, algorithm.eps);
    dr_grpo only subtracts the group mean.
    """
    rewards = [row.reward for rows in groups for row in rows]
    return group_advantages(rewards, group_keys(groups, shared_baseline),
                            scale_by_std=algorithm.name != AlgorithmName.DR_GRPO, std=algorithm.std, eps=algorithm.eps)


def overlong_penalty(length: int, max_length: int, buffer: int, penalty_factor: float) -> float:
    """DAPO soft overlong punishment: 0 up to max_length - buffer, then a linear ramp reaching
    -penalty_factor at max_length (and staying there beyond)."""
    if buffer < 1:
        raise ValueError(f"algorithm.overlong.buffer ({buffer}) must be >= 1")
    if buffer > max_length:
        raise ValueError(f"algorithm.overlong.buffer ({buffer}) must be <= the generation budget ({max_length})")
    exceed = length - (max_length - buffer)
    if exceed <= 0:
        return 0.0
    return -min(exceed, buffer) / buffer * penalty_factor


def apply_overlong_shaping(groups: Sequence[Sequence[Rollout]], overlong: OverlongConfig) -> list[list[Rollout]]:
    """Rollouts with reward += overlong penalty (no change when `overlong.enabled` is False).

    Length = continuation tokens against the row's own budget `max_tokens`: for a cutdown/shift
    denoise row (budget R - p) this equals the folded length p + c against R; for `none` rows and
    ordinary rows it is c against R. The buffer is capped at the budget for very short budgets.
    """
    if not overlong.enabled:
        return [list(rows) for rows in groups]
    out = []
    for rows in groups:
        shaped = []
        for row in rows:
            budget = row.request.max_tokens
            pen = overlong_penalty(row.continuation_length, budget, min(overlong.buffer, budget),
                                   overlong.penalty_factor)
            shaped.append(replace(row, reward=row.reward + pen))
        out.append(shaped)
    return out


def keep_group(rows: Sequence[Rollout]) -> bool:
    """DAPO dynamic sampling: keep a problem unless its mean accuracy over all N + K rows is exactly
    0 or 1 (then every advantage is 0 and the group carries no signal)."""
    if len(rows) == 0:
        return False
    acc = [row.accuracy for row in rows]
    return not (all(a == 0 for a in acc) or all(a == 1 for a in acc))


class DynamicSamplingExhausted(RuntimeError):
    """Too few problems survived dynamic sampling within the allowed generation batches."""


@dataclass
class DynamicSampler:
    """Collects generation batches until `target_problems` groups survive the DAPO filter.

        sampler = DynamicSampler(B, cfg.algorithm.dynamic_sampling.max_gen_batches)
        while not sampler.done:
            sampler.add(generate_and_verify(next_problems(), gen_batch=sampler.gen_batches))
        groups = sampler.take()

    `add` raises DynamicSamplingExhausted once `max_gen_batches` batches have been added and fewer
    than `target_problems` groups survived. Survivors are kept in arrival order; `take` returns the
    first `target_problems` (surplus survivors are counted in `surplus`).
    """

    target_problems: int
    max_gen_batches: int
    gen_batches: int = 0
    dropped_all_wrong: int = 0
    dropped_all_correct: int = 0
    kept: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.target_problems < 1:
            raise ValueError(f"data.problems_per_step ({self.target_problems}) must be >= 1")
        if self.max_gen_batches < 1:
            raise ValueError(f"algorithm.dynamic_sampling.max_gen_batches ({self.max_gen_batches}) must be >= 1")

    @property
    def done(self) -> bool:
        return len(self.kept) >= self.target_problems

    @property
    def dropped(self) -> int:
        return self.dropped_all_wrong + self.dropped_all_correct

    @property
    def surplus(self) -> int:
        return max(0, len(self.kept) - self.target_problems)

    def add(self, groups: Sequence[Sequence[Rollout]]) -> None:
        if self.done:
            raise RuntimeError("DynamicSampler.add() after enough problems survived; call take()")
        self.gen_batches += 1
        for rows in groups:
            if keep_group(rows):
                self.kept.append(list(rows))
            elif all(row.accuracy == 1 for row in rows) and len(rows) > 0:
                self.dropped_all_correct += 1
            else:
                self.dropped_all_wrong += 1
        if not self.done and self.gen_batches >= self.max_gen_batches:
            raise DynamicSamplingExhausted(
                f"DAPO dynamic sampling: only {len(self.kept)} of {self.target_problems} problems "
                f"(data.problems_per_step) survived after {self.gen_batches} generation batches "
                f"(algorithm.dynamic_sampling.max_gen_batches={self.max_gen_batches}); dropped "
                f"{self.dropped_all_wrong} all-wrong and {self.dropped_all_correct} all-correct groups. "
                f"Raise max_gen_batches, use easier/harder data, or disable dynamic sampling.")

    def take(self) -> list[list[Rollout]]:
        if not self.done:
            raise RuntimeError(f"DynamicSampler.take(): only {len(self.kept)} of {self.target_problems} "
                               f"problems survived so far")
        return self.kept[:self.target_problems]

    def stats(self) -> dict[str, float]:
        return {"dapo/gen_batches": float(self.gen_batches), "dapo/kept": float(min(len(self.kept), self.target_problems)),
                "dapo/dropped": float(self.dropped), "dapo/dropped_all_wrong": float(self.dropped_all_wrong),
                "dapo/dropped_all_correct": float(self.dropped_all_correct), "dapo/surplus": float(self.surplus)}
