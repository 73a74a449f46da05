"""From a padded batch of rows to the actor's packed micro-batches (pure torch, no collectives).

Input: `ActorBatch` rows (prompt + response, right-padded), everything aligned with input_ids:
loss_mask[r, t] = 1 means token t of row r is trained, scored by the logits at position t - 1.

Rows are assigned to data-parallel ranks (token-balanced, deterministic), then packed into
micro-batches by a token budget (first-fit decreasing). One micro-batch is ONE packed row
[1, S] holding several sequences back to back:

    tokens      [1, S]  ids, sequence after sequence, then padding
    segment     [S]     local sequence index, -1 on padding
    targets     [S]     token t+1 of the same sequence (0 where none)
    loss_mask   [S]     1 where targets[t] is a trained token (= row loss_mask at t + 1)
    attn_mask   [1, 1, S, S] bool, True = masked: block-diagonal causal (a token sees only
                earlier tokens of its own sequence; padding sees itself). Built only for the
                local spec (with_mask=True); None on the THD path, where Transformer Engine
                takes the sequence boundaries as cu_seqlens (an [S, S] mask is S^2 bytes per
                micro-batch: 256 MiB at S = 16K)

This is sequence packing on every backend: on CPU the local attention takes the block-diagonal
mask (RoPE depends only on position differences, so a sequence's attention is the same wherever
it sits in the row); on GPU the same packing can be given to Transformer Engine as THD
(`cu_seqlens`). All micro-batches of a step share one S (a multiple of tp * 2 * cp) because
pipeline p2p and the allgather MoE dispatcher need fixed shapes.

With context parallelism the packed row is split into 2*cp chunks; cp rank r keeps chunks r and
2*cp - 1 - r (megatron's load balancing), see `cp_split`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class ActorBatch:
    """Rows for the actor. All per-token tensors are [rows, W] and aligned with input_ids.

    input_ids        long   prompt + response, right-padded
    sequence_lengths long   [rows] real tokens of each row
    loss_mask        float  1 on trained tokens (response tokens the loss sees)
    advantages       float  [rows] (per row) or [rows, W] (per token); None for log-probs only
    old_logprobs     float  log p_old(token t) at t; None: force_on_policy or recomputed by the actor
    ref_logprobs     float  reference-model log-probs (KL); optional
    is_weights       float  detached per-token weights of the policy term (truncated importance
                            sampling against the rollout engine, core.mismatch); optional
    """

    input_ids: torch.Tensor
    sequence_lengths: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [rows, W], got shape {tuple(self.input_ids.shape)}")
        rows, w = self.input_ids.shape
        if self.sequence_lengths.shape != (rows,):
            raise ValueError(f"sequence_lengths must be [rows={rows}], got {tuple(self.sequence_lengths.shape)}")
        if int(self.sequence_lengths.max()) > w or int(self.sequence_lengths.min()) < 1:
            raise ValueError(f"sequence_lengths must be in [1, W={w}]")
        for name in ("loss_mask", "old_logprobs", "ref_logprobs", "is_weights"):
            x = getattr(self, name)
            if x is not None and x.shape != (rows, w):
                raise ValueError(f"{name} must be [rows={rows}, W={w}], got {tuple(x.shape)}")
        if self.advantages is not None and self.advantages.shape not in ((rows,), (rows, w)):
            raise ValueError(f"advantages must be [rows={rows}] or [rows, W={w}], got {tuple(self.advantages.shape)}")

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def from_packed(cls, packed: Any, old_logprobs: Optional[torch.Tensor] = None,
                    ref_logprobs: Optional[torch.Tensor] = None,
                    is_weights: Optional[torch.Tensor] = None) -> "ActorBatch":
        """From megatron_denoise.core.fold.PackedBatch (same alignment convention)."""
        adv = packed.row_advantages if packed.row_advantages is not None else packed.advantages
        return cls(input_ids=packed.input_ids, sequence_lengths=packed.sequence_lengths,
                   loss_mask=packed.loss_mask, advantages=adv, old_logprobs=old_logprobs,
                   ref_logprobs=ref_logprobs, is_weights=is_weights)

    def row_advantages(self, r: int) -> torch.Tensor:
        """[W] advantages of row r."""
        w = self.input_ids.shape[1]
        if self.advantages is None:
            return torch.zeros(w)
        a = self.advantages[r]
        return a.expand(w).float() if a.dim() == 0 else a.float()


@dataclass
class MicroBatch:
    tokens: torch.Tensor        # [1, S] long
    position_ids: torch.Tensor  # [1, S] long, restarting at 0 for each sequence
    attn_mask: Optional[torch.Tensor]  # [1, 1, S, S] bool, True = masked; None on the THD path
    segment: torch.Tensor       # [S] long, -1 on padding
    targets: torch.Tensor       # [S] long
    loss_mask: torch.Tensor     # [S] float
    advantages: torch.Tensor    # [S] float
    old_logprobs: Optional[torch.Tensor]  # [S] float
    ref_logprobs: Optional[torch.Tensor]  # [S] float
    seq_num_tokens: torch.Tensor  # [n_seq] float loss tokens of each local sequence (whole row)
    rows: list = field(default_factory=list)        # batch row index of each local sequence
    starts: list = field(default_factory=list)      # offset of each sequence in the packed row
    lengths: list = field(default_factory=list)
    positions: Optional[torch.Tensor] = None        # [S] global packed positions kept by this rank (CP)
    is_weights: Optional[torch.Tensor] = None       # [S] float (truncated IS), or None

    @property
    def seq_ids(self) -> torch.Tensor:
        """[S] local sequence id of every position (padding mapped to 0; its mask is 0)."""
        return self.segment.clamp_min(0)

    def to(self, device: torch.device) -> "MicroBatch":
        """The same micro-batch with its tensors on `device` (no-op on CPU)."""
        if device.type == "cpu":
            return self
        moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def packed_seq_params(mb: MicroBatch, device: torch.device) -> object:
    """THD description of a packed micro-batch for Transformer Engine attention (GPU path): one
    entry per sequence, plus the tail padding as a sequence of its own, so RoPE positions and
    attention restart at every sequence boundary without an [S, S] mask."""
    from megatron.core.packed_seq_params import PackedSeqParams

    s = int(mb.tokens.shape[1])
    bounds = [0]
    for start, n in zip(mb.starts, mb.lengths):
        bounds.append(start + n)
    if bounds[-1] < s:
        bounds.append(s)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def assign_rows(lengths: list[int], dp: int) -> list[list[int]]:
    """Rows per data-parallel rank: longest first to the least-loaded rank (ties: lowest rank),
    so every rank gets about the same number of tokens. Deterministic."""
    load = [0] * dp
    out: list[list[int]] = [[] for _ in range(dp)]
    for r in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = min(range(dp), key=lambda j: (load[j], j))
        out[k].append(r)
        load[k] += lengths[r]
    return [sorted(x) for x in out]


def pack_rows(rows: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing bins of rows with total length <= budget (a longer row gets its own
    bin). Bins keep the rows in ascending order for readability."""
    bins: list[list[int]] = []
    fill: list[int] = []
    for r in sorted(rows, key=lambda i: (-lengths[i], i)):
        for k in range(len(bins)):
            if fill[k] + lengths[r] <= budget:
                bins[k].append(r)
                fill[k] += lengths[r]
                break
        else:
            bins.append([r])
            fill.append(lengths[r])
    return [sorted(b) for b in bins]


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def build_micro_batch(batch: ActorBatch, rows: list[int], seq_len: int, with_mask: bool = True) -> MicroBatch:
    """Pack `rows` of `batch` into one row of length seq_len (see the module docstring).
    with_mask=False: no [S, S] attention mask (attn_mask None; the THD path)."""
    s = seq_len
    tokens = torch.zeros(s, dtype=torch.long)
    pos = torch.zeros(s, dtype=torch.long)
    segment = torch.full((s,), -1, dtype=torch.long)
    targets = torch.zeros(s, dtype=torch.long)
    loss_mask = torch.zeros(s)
    adv = torch.zeros(s)
    old = torch.zeros(s) if batch.old_logprobs is not None else None
    ref = torch.zeros(s) if batch.ref_logprobs is not None else None
    isw = torch.zeros(s) if batch.is_weights is not None else None
    seq_tokens = []
    starts, lens = [], []
    off = 0
    for k, r in enumerate(rows):
        n = int(batch.sequence_lengths[r])
        ids = batch.input_ids[r, :n]
        tokens[off:off + n] = ids
        pos[off:off + n] = torch.arange(n)
        segment[off:off + n] = k
        targets[off:off + n - 1] = ids[1:]
        lm = batch.loss_mask[r, 1:n].float() if batch.loss_mask is not None else torch.zeros(n - 1)
        loss_mask[off:off + n - 1] = lm
        adv[off:off + n - 1] = batch.row_advantages(r)[1:n]
        if old is not None:
            old[off:off + n - 1] = batch.old_logprobs[r, 1:n].float()
        if ref is not None:
            ref[off:off + n - 1] = batch.ref_logprobs[r, 1:n].float()
        if isw is not None:
            isw[off:off + n - 1] = batch.is_weights[r, 1:n].float()
        seq_tokens.append(float(lm.sum()))
        starts.append(off)
        lens.append(n)
        off += n
    if off > s:
        raise ValueError(f"rows {rows} hold {off} tokens, more than the micro-batch length {s}")
    masked = block_causal_mask(segment)[None, None] if with_mask else None
    return MicroBatch(tokens=tokens[None], position_ids=pos[None], attn_mask=masked,
                      segment=segment, targets=targets, loss_mask=loss_mask, advantages=adv,
                      old_logprobs=old, ref_logprobs=ref,
                      seq_num_tokens=torch.tensor(seq_tokens, dtype=torch.float32),
                      rows=list(rows), starts=starts, lengths=lens, is_weights=isw)


def segment_mask(segment: torch.Tensor) -> torch.Tensor:
    """[1, 1, 1, S] long segment ids (-1 on padding): what the local spec's SegmentAttention takes
    in place of the [1, 1, S, S] mask (megatron_denoise.megatron.packed_attention)."""
    return segment.reshape(1, 1, 1, -1)


def block_causal_mask(segment: torch.Tensor) -> torch.Tensor:
    """[S, S] bool, True = masked: block-diagonal causal over `segment` (a token sees earlier
    tokens of its own sequence; padding, segment -1, sees only itself)."""
    s = segment.shape[0]
    seg_q = segment[:, None]
    seg_k = segment[None, :]
    causal = torch.arange(s)[None, :] > torch.arange(s)[:, None]
    same = (seg_q == seg_k) & (seg_q >= 0)
    eye = torch.eye(s, dtype=torch.bool)
    return ~((same & ~causal) | eye)


def empty_micro_batch(seq_len: int, with_old: bool, with_ref: bool, with_is: bool = False,
                      with_mask: bool = True) -> MicroBatch:
    """A micro-batch with no sequences (every position is padding, loss mask 0): keeps the
    number of micro-batches equal across data-parallel ranks (MoE collectives span them)."""
    s = seq_len
    mask = (~torch.eye(s, dtype=torch.bool))[None, None] if with_mask else None
    return MicroBatch(tokens=torch.zeros(1, s, dtype=torch.long), position_ids=torch.zeros(1, s, dtype=torch.long),
                      attn_mask=mask, segment=torch.full((s,), -1, dtype=torch.long),
                      targets=torch.zeros(s, dtype=torch.long), loss_mask=torch.zeros(s), advantages=torch.zeros(s),
                      old_logprobs=torch.zeros(s) if with_old else None,
                      ref_logprobs=torch.zeros(s) if with_ref else None,
                      seq_num_tokens=torch.zeros(0), rows=[], starts=[], lengths=[],
                      is_weights=torch.zeros(s) if with_is else None)


def cp_chunk_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Positions of the packed row kept by `cp_rank`: chunks cp_rank and 2*cp-1-cp_rank of 2*cp
    equal chunks (megatron's load-balanced causal split, get_batch_on_this_cp_rank)."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 * cp ({2 * cp})")
    c = seq_len // (2 * cp)
    a = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    b = torch.arange((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c)
    return torch.cat([a, b])


def cp_split(mb: MicroBatch, cp: int, cp_rank: int) -> MicroBatch:
    """This CP rank's share of a micro-batch: per-position tensors keep only `positions`; the
    attention mask keeps its query rows (keys stay global: the CP attention gathers K/V)."""
    if cp == 1:
        return mb
    s = mb.tokens.shape[1]
    keep = cp_chunk_positions(s, cp, cp_rank)

    def take(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x[keep]

    return MicroBatch(tokens=mb.tokens[:, keep], position_ids=mb.position_ids[:, keep],
                      attn_mask=None if mb.attn_mask is None else mb.attn_mask[:, :, keep, :], segment=take(mb.segment), targets=take(mb.targets),
                      loss_mask=take(mb.loss_mask), advantages=take(mb.advantages),
                      old_logprobs=take(mb.old_logprobs), ref_logprobs=take(mb.ref_logprobs),
                      seq_num_tokens=mb.seq_num_tokens, rows=mb.rows, starts=mb.starts, lengths=mb.lengths,
                      positions=keep, is_weights=take(mb.is_weights))


@dataclass
class StepPlan:
    """The micro-batches of this rank for one step."""

    micro_batches: list
    seq_len: int
    local_loss_tokens: float   # loss tokens of the rows this DP rank owns
    local_seqs: float          # rows with at least one loss token


def plan_step(batch: ActorBatch, *, dp: int, dp_rank: int, budget: int, multiple: int,
              num_micro_batches: Optional[int] = None, seq_len: Optional[int] = None) -> tuple[list[list[int]], int]:
    """Bins of rows for this DP rank and the packed length they need (before agreeing on the
    step-wide maxima with the other ranks)."""
    lengths = [int(x) for x in batch.sequence_lengths]
    mine = assign_rows(lengths, dp)[dp_rank]
    bins = pack_rows(mine, lengths, budget)
    need = max([sum(lengths[r] for r in b) for b in bins], default=1)
    return bins, round_up(max(need, 1), multiple)


def materialise(batch: ActorBatch, bins: list[list[int]], seq_len: int, num_micro_batches: int,
                with_mask: bool = True) -> list[MicroBatch]:
    """The micro-batches of `bins`, padded with empty ones to `num_micro_batches`. with_mask=False
    (the THD / Transformer Engine path): no [S, S] attention masks are built."""
    mbs = [build_micro_batch(batch, b, seq_len, with_mask) for b in bins]
    while len(mbs) < num_micro_batches:
        mbs.append(empty_micro_batch(seq_len, batch.old_logprobs is not None, batch.ref_logprobs is not None,
                                     batch.is_weights is not None, with_mask))
    return mbs


def scatter_back(values: torch.Tensor, mb: MicroBatch, out: torch.Tensor) -> None:
    """Write per-position values [S_local] of a micro-batch into token-aligned rows of `out`
    [rows, W]: position t of a sequence scores its token t + 1."""
    values = values.detach().cpu()
    positions = mb.positions.cpu() if mb.positions is not None else torch.arange(values.shape[0])
    for k, r in enumerate(mb.rows):
        start, n = mb.starts[k], mb.lengths[k]
        sel = (positions >= start) & (positions < start + n - 1)
        out[r, (positions[sel] - start) + 1] = values[sel].to(out.dtype)
