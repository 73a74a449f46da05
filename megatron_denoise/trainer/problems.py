"""The trainer's view of the data: problems drawn in a seeded, resumable order, with their
rendered prompt ids cached by uid (the chat template is applied once per problem, not per row)."""
from __future__ import annotations

from typing import Optional, Any

from megatron_denoise.config.schema import Config, PoolSource, PrefixKind
from megatron_denoise.core.prefix import render_prompt_ids
from megatron_denoise.core.types import Problem


class PromptCache:
    """Rendered prompt ids by problem uid (the chat template applied once per problem). uids are
    unique within one set of problems only: the training stream and each validation keep their own
    cache (a held-out file may reuse the training file's `<data_source>:<index>` uids)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._ids: dict[str, tuple[int, ...]] = {}

    def __call__(self, problem: Problem) -> tuple[int, ...]:
        ids = self._ids.get(problem.uid)
        if ids is None:
            ids = self._ids[problem.uid] = render_prompt_ids(self.tokenizer, problem.prompt)
        return ids


class ProblemStream:
    def __init__(self, problems: list[Problem], tokenizer: Any, seed: int, shuffle: bool, report: Any = None):
        from megatron_denoise.data import DataCursor

        self.problems = problems
        self.tokenizer = tokenizer
        self.cursor = DataCursor(len(problems), seed=seed, shuffle=shuffle)
        self.report = report
        self.prompt_ids = PromptCache(tokenizer)  # Problem -> rendered prompt ids
        self.drawn: list[str] = []  # uids drawn by this process (tests compare runs with it)

    @classmethod
    def from_config(cls, cfg: Config, tokenizer: Any) -> "ProblemStream":
        from megatron_denoise.data import load_problems

        problems, report = load_problems(cfg.data.train_files, cfg.data, tokenizer=tokenizer,
                                         pool_column=cfg.denoise.pool_column)
        return cls(problems, tokenizer, cfg.data.seed, cfg.data.shuffle, report)

    def describe(self) -> str:
        pools = sum(1 for p in self.problems if p.wrong_pool)
        dropped = len(self.report.bad_rows) if self.report is not None else 0
        text = (f"{len(self.problems)} training problems ({pools} with a wrong-solution pool; "
                f"{dropped} bad rows skipped)")
        if dropped:
            text += "".join(f"\n  {b}" for b in self.report.bad_rows[:3])
            text += f"\n  ... and {dropped - 3} more" if dropped > 3 else ""
        notes = self.report.notes if self.report is not None else []
        return text + "".join(f"\n  note: {n}" for n in notes)

    def next_problems(self, n: int) -> list[Problem]:
        out = [self.problems[i] for i in self.cursor.next_indices(n)]
        self.drawn.extend(p.uid for p in out)
        return out

    @property
    def seen(self) -> int:
        return self.cursor.seen

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)


def check_pools(cfg: Config, problems: list) -> Optional[str]:
    """K > 0 rows drawn from the prepared pools need a pool somewhere: training files in which no
    problem has one turn every denoise row into an ordinary rollout (plain GRPO, counted only as
    fallback/empty_pool in the metrics). Returns the warning the trainer prints for that case (the
    run goes on: the tiny demo configs train on pool-less named sets on purpose), else None.
    A problem without a pool is fine (its denoise slots fall back, counted per step)."""
    dn = cfg.denoise
    offline_wrong = dn.pool_source == PoolSource.OFFLINE and dn.prefix_kind == PrefixKind.WRONG
    if dn.k_denoise > 0 and offline_wrong and problems and not any(p.wrong_pool for p in problems):
        return (f"warning: data.train_files {list(map(str, cfg.data.train_files))}: none of the {len(problems)} "
                f"problems has an entry in the pool column {dn.pool_column!r}, and denoise.k_denoise is "
                f"{dn.k_denoise}: every denoise row will be an ordinary rollout (fallback/empty_pool). Build the pool "
                f"first (launch/prepare_data.py or prepare.pool), or set denoise.k_denoise=0 for plain GRPO")
    return None


def load_eval_sets(cfg: Config, tokenizer: Any) -> dict[str, list[Problem]]:
    from megatron_denoise.data import eval_set_names, load_eval_set

    sources = eval_set_names(list(cfg.data.val_files) or list(cfg.eval.sets))
    return {name: load_eval_set(src, cfg.data, tokenizer, max_problems=cfg.eval.max_problems)
            for name, src in sources.items()}
