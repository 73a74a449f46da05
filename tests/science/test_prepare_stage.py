"""The main job's prepare stage through its real entry point (`train --prepare-only`): task files,
a warm-start through the Megatron actor exporting the weak step and the final policy, and the weak
model's pool built from the weak export over the generated training problems. Tiny settings
(~2 min); a re-run repeats nothing, and changed task settings are refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASK = "{kind: arith, min_steps: 1, max_steps: 2, max_operand: 9, seed: 1, count: 200}"
HELD = "{kind: arith, min_steps: 1, max_steps: 2, max_operand: 9, seed: 2, count: 20}"


def _prepare(run: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_denoise.launch.train", "--prepare-only",
           "--config", str(REPO / "configs" / "testbed-denoise-grpo-cpu-1n1g.yaml"),
           f"logging.output_dir={run}", f"prepare.task.train={TASK}", f"prepare.task.heldout={HELD}",
           "prepare.warm_start.weak_step=10", "prepare.warm_start.overrides=[sft.total_steps=20, sft.val_freq=0]",
           "data.max_problems=16", "prepare.pool.n=2", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.megatron
def test_prepare_only_runs_task_warm_start_and_pool_then_reuses_them(tmp_path):
    run = tmp_path / "run"
    r = _prepare(run)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the console (issue 17): the warm-start's step lines and the libraries' warnings are in the run's logs
    console = r.stdout + r.stderr
    assert "[sft] step" not in console and "Warning" not in console and "WARNING" not in console, console[-3000:]
    assert "[sft] step 20/20" in (run / "logs" / "warm_start.log").read_text()
    assert "UserWarning" in (run / "logs" / "warm_start.log").read_text()   # megatron-core's, kept
    assert "vllm" in (run / "logs" / "driver.log").read_text()             # the pool stage's engine logs
    data = run / "data"
    from megatron_denoise.data.io import read_table
    from megatron_denoise.prepare.tasks import questions_of

    assert read_table(data / "train.parquet").num_rows == 200 and read_table(data / "heldout.parquet").num_rows == 20
    assert not questions_of([data / "train.parquet"]) & questions_of([data / "heldout.parquet"])
    for export in ("final", "step_10"):
        assert (run / "warm_start" / "hf" / export / "config.json").is_file()
    sft = [json.loads(x) for x in (run / "warm_start" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [m["step"] for m in sft if "loss" in m] == list(range(1, 21))
    pool = read_table(data / "train.with_wrong_boxed.parquet")
    assert pool.num_rows == 16 and "wrong_answer_with_boxed" in pool.column_names
    summary = json.loads((data / "train.prepare" / "summary.json").read_text())
    assert summary["problems"] == 16 and "step_10" in json.dumps(summary)  # the weak model is the step-10 export
    # a second run finds everything in place and repeats nothing
    before = {p: p.stat().st_mtime_ns for p in [data / "train.parquet", data / "train.with_wrong_boxed.parquet",
                                                run / "warm_start" / "hf" / "final" / "config.json"]}
    r2 = _prepare(run)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "reusing the warm-start exports" in r2.stdout and "reusing the wrong-solution pool" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # other task settings in the same run folder are refused, naming the file
    from megatron_denoise.config.loader import load_config
    from megatron_denoise.prepare.stage import make_task_files

    cfg = load_config(REPO / "configs" / "testbed-denoise-grpo-cpu-1n1g.yaml",
                      [f"logging.output_dir={run}", f"prepare.task.train={TASK.replace('seed: 1', 'seed: 3')}"])
    with pytest.raises(FileExistsError, match="train.parquet exists and differs"):
        make_task_files(cfg, log=lambda _: None)
