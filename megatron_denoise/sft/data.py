"""Warm-start rows: reference-schema problems + their solution text -> token rows and batches.

Pure (torch tensors at most, no engine, no process group): testable without processes.

    examples, report = load_examples(files, sft_cfg, tokenizer)   # every bad row reported
    batch = make_batch(examples, indices, pad_id)                  # ActorBatch, loss on solutions

One example is the policy's view of a solved problem:

    tokens = render_prompt_ids(tokenizer, prompt)   the RL prompt, token for token (chat template
             + encode(solution)                     + generation header), then the solution text
             + [eos]                                encoded without special tokens, then the
                                                    tokenizer's EOS (trained: the model learns to stop)
    loss_mask[t] = 1 for t >= len(prompt ids)       solution and EOS tokens only

Rows are read by the project's data layer (megatron_denoise.data.load_problems: the same schema
checks and bad-row reporting as training data); a row is also bad here when its solution is
missing/empty or the whole row is longer than sft.max_seq_length. sft.bad_rows decides: error
(raise one BadDataError listing all of them, by file and row) | skip (report and go on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from megatron_denoise.config.schema import DataConfig, SFTTrainConfig
from megatron_denoise.core.types import Problem
from megatron_denoise.data import BadRow, DataReport, load_problems
from megatron_denoise.data.report import apply_mode


@dataclass(frozen=True)
class SFTExample:
    """One training row: prompt + solution + EOS ids, and where the solution starts."""

    uid: str
    tokens: tuple[int, ...]
    prompt_len: int          # tokens[:prompt_len] are the prompt (no loss)
    file: str = ""
    row: int = -1

    @property
    def num_loss_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len


def solution_of(problem: Problem, field: str) -> Any:
    """The value at `field` ("column" or "column.key") of a problem's row, or None."""
    col, _, key = field.partition(".")
    extra = problem.extra
    value = extra.get(col) if isinstance(extra, Mapping) else None
    if key:
        if isinstance(value, list) and all(isinstance(kv, tuple) and len(kv) == 2 for kv in value):
            value = dict(value)  # an arrow map column reads back as (key, value) pairs
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id: the warm-start "
                         f"trains the solution's end-of-sequence token")
    return int(eos)


def encode_example(tokenizer: Any, problem: Problem, solution: str) -> SFTExample:
    from megatron_denoise.core.prefix import as_encoder, render_prompt_ids

    prompt = render_prompt_ids(tokenizer, problem.prompt)
    sol = tuple(int(t) for t in as_encoder(tokenizer)(solution))
    extra = problem.extra if isinstance(problem.extra, Mapping) else {}
    return SFTExample(uid=problem.uid, tokens=tuple(prompt) + sol + (eos_id(tokenizer),), prompt_len=len(prompt),
                      file=str(extra.get("file", "")), row=int(extra.get("row", -1)))


def examples_from_problems(problems: Sequence[Problem], sft: SFTTrainConfig,
                           tokenizer: Any) -> tuple[list[SFTExample], list[BadRow]]:
    """Examples of the problems that have a solution and fit, and a BadRow for each other one."""
    out: list[SFTExample] = []
    bad: list[BadRow] = []
    for p in problems:
        file, row = str(p.extra.get("file", "")), int(p.extra.get("row", -1))
        sol = solution_of(p, sft.solution_field)
        if not isinstance(sol, str) or not sol.strip():
            what = "is missing" if sol is None else ("is empty" if isinstance(sol, str) else
                                                     f"is not a string ({type(sol).__name__})")
            bad.append(BadRow(file, row, f"{sft.solution_field} {what} (sft.solution_field)"))
            continue
        ex = encode_example(tokenizer, p, sol)
        if len(ex.tokens) > sft.max_seq_length:
            bad.append(BadRow(file, row, f"prompt + solution + EOS is {len(ex.tokens)} tokens > "
                                         f"sft.max_seq_length ({sft.max_seq_length})"))
            continue
        out.append(ex)
    return out, bad


def load_examples(sources: Sequence[Any], sft: SFTTrainConfig, tokenizer: Any,
                  label: str = "sft.train_files") -> tuple[list[SFTExample], DataReport]:
    """Examples of all `sources` (files or named sets) in order, and the report of every bad row
    (schema problems found by the data layer and the warm-start's own: no solution, too long).
    Raises BadDataError listing them all when sft.bad_rows is error, ValueError when nothing is left."""
    if not sources:
        raise ValueError(f"{label} is empty")
    # the data layer collects schema problems; the mode is applied once, to all bad rows together
    problems, report = load_problems(list(sources), DataConfig(prompt=sft.prompt, bad_rows="skip"))
    examples, bad = examples_from_problems(problems, sft, tokenizer)
    report.bad_rows.extend(bad)
    report.rows_kept = len(examples)
    err = apply_mode(report.bad_rows, sft.bad_rows)
    if err is not None:
        raise err
    if not examples:
        raise ValueError(f"{label}: no usable rows in {list(map(str, sources))}:\n{report.summary()}")
    return examples, report


def make_batch(examples: Sequence[SFTExample], indices: Sequence[int], pad_id: int = 0) -> Any:
    """An ActorBatch of the given examples: right-padded ids, loss mask 1 on solution + EOS tokens
    (the actor's convention: loss_mask[r, t] = 1 trains token t, scored by the logits at t - 1)."""
    import torch

    from megatron_denoise.megatron.batching import ActorBatch

    rows = [examples[i] for i in indices]
    width = max(len(e.tokens) for e in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    lengths = torch.tensor([len(e.tokens) for e in rows], dtype=torch.long)
    for r, e in enumerate(rows):
        ids[r, :len(e.tokens)] = torch.tensor(e.tokens, dtype=torch.long)
        mask[r, e.prompt_len:len(e.tokens)] = 1.0
    return ActorBatch(input_ids=ids, sequence_lengths=lengths, loss_mask=mask)


# ------------------------------------------------------------------------------------------------
# the plan of a run (dry-run and the loop share it)


@dataclass(frozen=True)
class SFTPlan:
    rows: int                   # training examples
    rows_per_step: int
    total_steps: int
    epochs: float               # passes over the rows the steps make
    tokens: int = 0             # tokens of all training examples (0: unknown, dry-run without data)
    loss_tokens: int = 0

    def describe(self) -> list[str]:
        out = [f"rows: {self.rows or '? (data not read)'}", f"rows_per_step: {self.rows_per_step}",
               f"total_steps: {self.total_steps}"] + ([f"epochs: {self.epochs:.3f}"] if self.rows else [])
        if self.tokens:
            mean = self.tokens / self.rows
            out += [f"tokens: {self.tokens} (mean {mean:.1f} per row; {self.loss_tokens} solution tokens)",
                    f"tokens_per_step: ~{mean * self.rows_per_step:.0f}",
                    f"tokens_total: ~{mean * self.rows_per_step * self.total_steps:.0f}"]
        return out


def plan(sft: SFTTrainConfig, rows: int, examples: Optional[Sequence[SFTExample]] = None) -> SFTPlan:
    """Steps from sft.total_steps, or from sft.epochs: ceil(epochs x rows / rows_per_step)."""
    if sft.total_steps is not None:
        steps = int(sft.total_steps)
    else:
        steps = max(1, math.ceil(float(sft.epochs) * rows / sft.rows_per_step))
    tokens = sum(len(e.tokens) for e in examples) if examples else 0
    loss_tokens = sum(e.num_loss_tokens for e in examples) if examples else 0
    return SFTPlan(rows=rows, rows_per_step=sft.rows_per_step, total_steps=steps,
                   epochs=steps * sft.rows_per_step / max(rows, 1), tokens=tokens, loss_tokens=loss_tokens)

