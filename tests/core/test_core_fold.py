"""Folding: visible response, loss mask per partial mode, reward position, verifier text, packing."""
from __future__ import annotations

import pytest
import torch

from core_testlib import EOS, char_decode, char_encode, denoise_cfg, problem
from megatron_denoise.core.fold import fold, fold_rollout, pack, response_loss_mask, verifier_text
from megatron_denoise.core.prefix import build_step_requests
from megatron_denoise.core.types import Completion, Rollout

PROMPT = (10, 11)


def rows_for(mode: str, R: int = 12):
    # |w| = 15 ("wrong: 1+1=3 so" ...), rho 0.2 -> p = 3: prefix ids = "wro"
    reqs = build_step_requests([problem("a", ["wrong: 1+1=3 ok"])], [PROMPT], char_encode,
                               denoise_cfg(n=1, k=1, mode=mode), R, step=0)
    return reqs.requests


@pytest.mark.parametrize("mode,mask,budget", [
    ("cutdown", (0, 0, 0, 1, 1, 1), 9),   # gradient on the continuation incl. EOS; R - p
    ("shift",   (1, 1, 1, 1, 1, 1), 9),   # gradient on prefix and continuation; R - p
    ("none",    (0, 0, 0, 1, 1, 1), 12),  # continuation only; R
])
def test_denoise_row_mask_and_budget_per_mode(mode, mask, budget):
    main, den = rows_for(mode)
    assert den.max_tokens == budget
    comp = Completion(token_ids=(ord("n"), ord("g"), EOS), finish_reason="stop")
    f = fold(den, comp, mode)
    assert f.response_ids == tuple(char_encode("wro")) + (ord("n"), ord("g"), EOS)
    assert f.loss_mask == mask
    assert (f.prefix_length, f.continuation_length, f.folded_length) == (3, 3, 6)
    assert f.reward_index == 5 and f.num_loss_tokens == sum(mask)
    assert f.prompt_ids == PROMPT
    # The main row of the same group: continuation only, mask all ones, in every mode.
    fm = fold(main, Completion(token_ids=(7, 8, EOS), finish_reason="stop"), mode)
    assert fm.response_ids == (7, 8, EOS) and fm.loss_mask == (1, 1, 1) and fm.reward_index == 2


def test_mask_table_and_errors():
    assert response_loss_mask(0, 0, "cutdown") == ()
    assert response_loss_mask(2, 0, "shift") == (1, 1)
    assert response_loss_mask(2, 1, "none") == (0, 0, 1)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        response_loss_mask(-1, 1, "cutdown")


def test_over_budget_completion_and_empty_response():
    main, den = rows_for("cutdown")
    with pytest.raises(ValueError, match=r"slot 1\) generated 10 tokens, more than its max_tokens 9"):
        fold(den, Completion(token_ids=tuple(range(10)), finish_reason="length"), "cutdown")
    empty = fold(main, Completion(token_ids=(), finish_reason="abort"), "cutdown")
    assert empty.reward_index is None and empty.folded_length == 0


def test_verifier_sees_prefix_plus_continuation_decoded_together():
    _, den = rows_for("cutdown", R=20)
    comp = Completion(token_ids=tuple(char_encode("ng, it is 2")) + (EOS,), finish_reason="stop")
    assert verifier_text(den, comp, char_decode) == "wrong, it is 2"  # EOS skipped by the decoder
    r = Rollout(request=den, completion=comp, reward=1.0, accuracy=1.0)
    assert fold_rollout(r, "shift").loss_mask == (1,) * (3 + 12)


def test_pack_layout_by_hand():
    main, den = rows_for("cutdown")
    fm = fold(main, Completion(token_ids=(7, EOS), finish_reason="stop"), "cutdown")        # 2 + 2 tokens
    fd = fold(den, Completion(token_ids=(8, 9, EOS), finish_reason="stop"), "cutdown")     # 2 + 3 + 3 tokens
    b = pack([fm, fd], advantages=[0.5, -1.0], pad_id=0)
    w, r, o = ord("w"), ord("r"), ord("o")
    assert b.input_ids.tolist() == [[10, 11, 7, EOS, 0, 0, 0, 0], [10, 11, w, r, o, 8, 9, EOS]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert b.response_start.tolist() == [2, 2] and b.sequence_lengths.tolist() == [4, 8]
    assert b.advantages.tolist() == [[0, 0, .5, .5, 0, 0, 0, 0], [0, 0, 0, 0, 0, -1, -1, -1]]
    assert b.num_rows == 2 and b.input_ids.dtype == torch.long
    wide = pack([fm], width=6)
    assert wide.input_ids.shape == (1, 6) and wide.advantages is None
    with pytest.raises(ValueError, match="row 1 has 8 tokens"):
        pack([fm, fd], width=6)
    with pytest.raises(ValueError, match="advantages has 1 entries for 2 rows"):
        pack([fm, fd], advantages=[1.0])
