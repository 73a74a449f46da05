"""Folding a generated row into what the verifier and the actor see (METHOD.md sections 2 and 3).

The visible response of every row is [prefix, continuation] (the prefix is empty for main and
fallback rows). Which of its tokens get gradient depends on the partial mode:

    mode     loss mask over [prefix (p) | continuation (c)]     generation budget
    cutdown  0 ... 0 | 1 ... 1 (incl. EOS)                      R - p
    shift    1 ... 1 | 1 ... 1                                   R - p
    none     0 ... 0 | 1 ... 1                                   R

`response_loss_mask` is the ONE place this table lives. The outcome reward sits on the last
response token. The verifier sees prefix + continuation decoded together (special tokens
skipped), so a word split across the boundary decodes as the model sees it.

Packing convention (`pack`): each row is prompt + response, right-padded to a common width W.
`loss_mask[r, t] = 1` means token t of row r is a trained response token, i.e. the actor uses
`logits[r, t - 1]` to score `input_ids[r, t]`: with next-token logits `[rows, W - 1]`, use
`loss_mask[:, 1:]`. In `none` mode the folded response can reach p + R tokens (the continuation
alone has R), so size W for that or let `pack` take the longest row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from megatron_denoise.config.schema import PartialMode
from megatron_denoise.core.types import Completion, Rollout, RolloutRequest

if TYPE_CHECKING:  # torch is imported lazily by `pack` so that reward workers need not load it
    import torch

__all__ = [
    "response_loss_mask",
    "FoldedRollout",
    "fold",
    "fold_rollout",
    "verifier_text",
    "hf_decoder",
    "PackedBatch",
    "pack",
]


def response_loss_mask(prefix_length: int, continuation_length: int, partial_mode: str) -> tuple[int, ...]:
    """Loss mask over the folded response [prefix, continuation]: 1 = gets gradient.

    Prefix tokens are off-policy (a weak model wrote them); only `shift` trains on them.
    """
    if prefix_length < 0 or continuation_length < 0:
        raise ValueError(f"lengths must be >= 0 (prefix {prefix_length}, continuation {continuation_length})")
    on_prefix = 1 if partial_mode == PartialMode.SHIFT else 0
    return (on_prefix,) * prefix_length + (1,) * continuation_length


@dataclass(frozen=True)
class FoldedRollout:
    """One row as the actor trains on it.

    response_ids = prefix ids + continuation ids; loss_mask has the same length.
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    prefix_length: int
    continuation_length: int

    @property
    def folded_length(self) -> int:
        """p + c: tokens of the visible response."""
        return self.prefix_length + self.continuation_length

    @property
    def reward_index(self) -> Optional[int]:
        """Index (within the response) of the last response token, where the outcome reward sits;
        None for an empty response (an aborted main row that produced nothing)."""
        return self.folded_length - 1 if self.folded_length > 0 else None

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def fold(request: RolloutRequest, completion: Completion, partial_mode: str) -> FoldedRollout:
    """Fold a request and its completion into [prefix, continuation] with the mode's loss mask."""
    cont = tuple(completion.token_ids)
    if len(cont) > request.max_tokens:
        raise ValueError(f"row (problem {request.problem_uid!r}, slot {request.slot}) generated {len(cont)} "
                         f"tokens, more than its max_tokens {request.max_tokens}")
    p = request.prefix_length
    return FoldedRollout(
        prompt_ids=request.prompt_ids,
        response_ids=request.prefix_ids + cont,
        loss_mask=response_loss_mask(p, len(cont), partial_mode),
        prefix_length=p,
        continuation_length=len(cont),
    )


def fold_rollout(rollout: Rollout, partial_mode: str) -> FoldedRollout:
    return fold(rollout.request, rollout.completion, partial_mode)


def verifier_text(request: RolloutRequest, completion: Completion, decode: Callable[[Sequence[int]], str]) -> str:
    """The text the reward sees: prefix + continuation decoded in one call.

    `decode` must skip special tokens (EOS, end-of-turn); `hf_decoder` builds one.
    """
    return decode(list(request.prefix_ids) + list(completion.token_ids))


def hf_decoder(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """`ids -> text` with special tokens skipped, for a Hugging Face tokenizer."""
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class PackedBatch:
    """Rows right-padded to width W = max over rows of len(prompt) + len(response) (or given).

    input_ids      [rows, W] long   prompt, response, then pad_id
    attention_mask [rows, W] bool   True on prompt and response tokens
    loss_mask      [rows, W] float  1 on trained response tokens (aligned with input_ids)
    response_start [rows] long      index of the first response token (= len(prompt))
    sequence_lengths [rows] long    len(prompt) + len(response)
    advantages     [rows, W] float  the row's advantage on its loss-mask positions, 0 elsewhere
                   (None if no advantages were given)
    row_advantages [rows] float
    """

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    loss_mask: "torch.Tensor"
    response_start: "torch.Tensor"
    sequence_lengths: "torch.Tensor"
    advantages: Optional["torch.Tensor"] = None
    row_advantages: Optional["torch.Tensor"] = None

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


def pack(folded: Sequence[FoldedRollout], advantages: Optional[Sequence[float]] = None,
         width: Optional[int] = None, pad_id: int = 0) -> PackedBatch:
    """Pack folded rows into padded tensors for the actor (see the module docstring's convention)."""
    import torch

    if len(folded) == 0:
        raise ValueError("pack() needs at least one row")
    lengths = [len(f.prompt_ids) + len(f.response_ids) for f in folded]
    w = max(lengths) if width is None else width
    for r, n in enumerate(lengths):
        if n > w:
            raise ValueError(f"row {r} has {n} tokens (prompt {len(folded[r].prompt_ids)} + response "
                             f"{len(folded[r].response_ids)}), more than the packing width {w}")
    rows = len(folded)
    input_ids = torch.full((rows, w), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, w), dtype=torch.bool)
    loss_mask = torch.zeros((rows, w), dtype=torch.float32)
    start = torch.empty(rows, dtype=torch.long)
    for r, f in enumerate(folded):
        s, n = len(f.prompt_ids), lengths[r]
        input_ids[r, :n] = torch.tensor(f.prompt_ids + f.response_ids, dtype=torch.long)
        attention[r, :n] = True
        loss_mask[r, s:n] = torch.tensor(f.loss_mask, dtype=torch.float32)
        start[r] = s
    out = PackedBatch(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask,
                      response_start=start, sequence_lengths=torch.tensor(lengths, dtype=torch.long))
    if advantages is not None:
        row_adv = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)
        if row_adv.numel() != rows:
            raise ValueError(f"advantages has {row_adv.numel()} entries for {rows} rows")
        out.row_advantages = row_adv
        out.advantages = row_adv[:, None] * loss_mask
    return out
