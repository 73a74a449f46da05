"""Shared fixtures of the rollout tests: the SmolLM2 folder, one vLLM engine and one transformers
oracle per module (engine start-up costs 10-30 s: tests share them)."""
from __future__ import annotations

import os

import pytest



@pytest.fixture(scope="session")
def smollm2() -> str:
    from megatron_denoise.prepare.models import smollm2_path
    return smollm2_path()


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def chat(tokenizer):
    """text -> prompt ids with the chat template's generation header, as the trainer builds them."""
    def ids(text: str) -> tuple[int, ...]:
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
        return tuple(out["input_ids"])
    return ids
