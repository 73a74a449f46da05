"""The row building and folding with a real Hugging Face tokenizer (the project's in-memory byte-level
BPE tokenizer with a ChatML template: instant, no files): chat-template rendering with the
generation header, encode without special tokens, token-level prefix, verifier decode."""
from __future__ import annotations

import pytest

from megatron_denoise.config.schema import DenoiseConfig, RhoConfig
from megatron_denoise.core.fold import fold, hf_decoder, verifier_text
from megatron_denoise.core.prefix import build_step_requests, render_prompt_ids
from megatron_denoise.core.types import Completion, Problem, RowKind


@pytest.fixture(scope="module")
def tok():
    from megatron_denoise.prepare.models import byte_tokenizer
    return byte_tokenizer()


def test_prompt_prefix_fold_and_verifier_text_with_a_hf_tokenizer(tok):
    messages = ({"role": "system", "content": "you are a helpful assistant."},
                {"role": "user", "content": "What is 1+1?"})
    prompt = render_prompt_ids(tok, messages)
    assert isinstance(prompt, tuple) and all(isinstance(t, int) for t in prompt)
    header = tuple(tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
    assert prompt[-len(header):] == header  # ends with the generation header
    assert tok.decode(list(prompt)).startswith("<|im_start|>system\nyou are a helpful assistant.<|im_end|>")

    wrong = "We add: 1+1=3, so \\boxed{3}"  # 27 bytes -> |w| = 27, rho 0.5 -> p = 13
    prob = Problem(uid="p0", index=0, prompt=messages, ground_truth="2", wrong_pool=(wrong,))
    cfg = DenoiseConfig(n_main=1, k_denoise=1, pool_sampling="first", rho=RhoConfig(strategy="fixed", value=0.5))
    main, den = build_step_requests([prob], [prompt], tok, cfg, 64, step=0).requests
    assert main.kind is RowKind.MAIN and den.kind is RowKind.DENOISE
    assert den.prefix.source_num_tokens == 27 and den.prefix.length == 13
    assert den.engine_input_ids == prompt + tuple(tok.encode("We add: 1+1=3", add_special_tokens=False))
    assert tok.eos_token_id not in den.prefix.token_ids  # no end-of-turn after the prefix
    assert den.max_tokens == 64 - 13

    cont = tuple(tok.encode(" is wrong; 1+1=2, \\boxed{2}", add_special_tokens=False)) + (tok.eos_token_id,)
    comp = Completion(token_ids=cont, finish_reason="stop")
    assert verifier_text(den, comp, hf_decoder(tok)) == "We add: 1+1=3 is wrong; 1+1=2, \\boxed{2}"
    folded = fold(den, comp, "cutdown")
    assert folded.loss_mask == (0,) * 13 + (1,) * len(cont)
    assert folded.response_ids[-1] == tok.eos_token_id and folded.reward_index == 13 + len(cont) - 1
