"""Token-level prefixes with the real SmolLM2 BPE tokenizer and chat template, and the boundary bug
they avoid: a wrong solution starting with "\\n\\n" re-tokenised after the prompt TEXT merges with the
generation header's newline, so the reference's text round trip feeds the engine different ids
than the prompt ids + the first p ids of w (METHOD.md section 2)."""
from __future__ import annotations

import os

import pytest

from megatron_denoise.config.schema import DenoiseConfig, RhoConfig
from megatron_denoise.core.prefix import build_step_requests, render_prompt_ids
from megatron_denoise.core.types import Problem, RowKind

pytestmark = pytest.mark.slow  # loading the tokenizer from the GGUF takes 20-50 s on 2 cores


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from megatron_denoise.prepare.models import smollm2_gguf_path
    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def test_token_level_prefix_avoids_the_text_round_trip_boundary(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = ({"role": "system", "content": "you are a helpful assistant."},
                {"role": "user", "content": "What is 2+2?"})
    prompt = render_prompt_ids(tok, messages)
    prompt_text = tok.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert list(prompt) == tok.encode(prompt_text, add_special_tokens=False)

    wrong = "\n\nTo solve this, we add 2 and 2 to get 5. So the answer is \\boxed{5}."
    w_ids = tok.encode(wrong, add_special_tokens=False)
    prob = Problem(uid="p", index=0, prompt=messages, ground_truth="4", wrong_pool=(wrong,))
    cfg = DenoiseConfig(n_main=1, k_denoise=1, pool_sampling="first", rho=RhoConfig(strategy="fixed", value=0.2))
    main, den = build_step_requests([prob], [prompt], tok, cfg, 256, step=0).requests
    p = max(1, int(0.2 * len(w_ids)))
    assert main.kind is RowKind.MAIN and den.prefix.length == p and den.prefix.source_num_tokens == len(w_ids)
    assert den.engine_input_ids == prompt + tuple(w_ids[:p])
    assert den.max_tokens == 256 - p
    # The reference's way (prefix text appended to the prompt text, re-encoded) shifts the boundary:
    # "\n" of the header and "\n\n" of w merge, so its ids differ from the model's own prompt ids.
    text_round_trip = tok.encode(prompt_text + tok.decode(w_ids[:p]), add_special_tokens=False)
    assert text_round_trip != list(den.engine_input_ids)
    assert text_round_trip[:len(prompt) - 1] == list(prompt[:-1])  # identical up to the header's last token
