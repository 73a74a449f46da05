"""Validation renders the held-out problems' own prompts, even when their uids equal training uids.

Task files (and e.g. GSM8K train/test) name problems `<data_source>:<index>`, so a held-out file's
uids repeat the training file's. The trainer once validated through the training stream's
uid-keyed prompt cache: after training had drawn `synthetic/arith:7`, held-out problem 7 was asked
the TRAINING question 7 and scored against the held-out answer (the testbed's held-out accuracy
fell from 64.5% to 48% while the exported policy scored 66.5%). An engine that answers whatever
question its prompt asks makes the difference visible: right answers with the validation's own
cache, wrong ones through the training cache.
"""
from __future__ import annotations

import re

from megatron_denoise.config.schema import Config, DataConfig, TaskConfig
from megatron_denoise.core.types import Completion
from megatron_denoise.prepare.models import byte_tokenizer
from megatron_denoise.prepare.tasks import TESTBED_PROMPT, write_task_file
from megatron_denoise.reward.boxed import last_boxed
from megatron_denoise.reward.result import VerifyResult, VerifyStatus


class ArithmeticEngine:
    """Reads `Compute a+b-c.` out of the prompt ids and answers it correctly."""

    def __init__(self, tok):
        self.tok = tok

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            expr = re.search(r"Compute ([0-9+\-]+)\.", self.tok.decode(r.engine_input_ids)).group(1)
            ids = self.tok("\\boxed{%d}" % eval(expr), add_special_tokens=False)["input_ids"]  # noqa: S307
            out.append(Completion(token_ids=tuple(ids) + (self.tok.eos_token_id,), finish_reason="stop"))
        return out


class BoxedScorer:
    def score_batch(self, texts, truths):
        return [VerifyResult(score=float(last_boxed(t) == g), status=VerifyStatus.OK, answer=last_boxed(t))
                for t, g in zip(texts, truths)]


def test_validation_uses_its_own_prompts_when_uids_collide_with_training(tmp_path):
    from megatron_denoise.data import load_eval_set, load_problems
    from megatron_denoise.trainer.problems import ProblemStream, PromptCache
    from megatron_denoise.trainer.run import _validate

    tok = byte_tokenizer()
    train, held = tmp_path / "train.parquet", tmp_path / "heldout.parquet"
    write_task_file(train, TaskConfig(seed=1, count=20, max_operand=9), TESTBED_PROMPT)
    write_task_file(held, TaskConfig(seed=2, count=20, max_operand=9), TESTBED_PROMPT, "heldout", [train])
    data = DataConfig(prompt=TESTBED_PROMPT)
    stream = ProblemStream(load_problems([str(train)], data, tokenizer=tok)[0], tok, seed=0, shuffle=False)
    for p in stream.next_problems(20):  # training has drawn (and cached) every training uid
        stream.prompt_ids(p)
    eval_sets = {"heldout": load_eval_set(str(held), data, tok)}
    assert {p.uid for p in eval_sets["heldout"]} == {p.uid for p in stream.problems}  # the collision

    cfg = Config()
    cfg.data = data
    cfg.logging.output_dir = str(tmp_path / "run")
    cfg.eval.k = {"heldout": 1}
    engine, scorer = ArithmeticEngine(tok), BoxedScorer()
    ok = _validate(cfg, engine, tok, eval_sets, scorer, PromptCache(tok), step=1)
    assert ok["val/heldout/avg@1"] == 1.0
    # the old wiring (the training stream's cache) asks the training questions: mostly wrong
    wrong = _validate(cfg, engine, tok, eval_sets, scorer, stream.prompt_ids, step=2)
    assert wrong["val/heldout/avg@1"] < 0.5
    assert (tmp_path / "run" / "eval" / "step_1.json").is_file()
