"""Learning, shown: a short warm-start + DenoiseRL-GRPO run on the testbed raises the training
accuracy, and the task generator's files are deterministic.

The run is the README's main job (configs/testbed-denoise-grpo-cpu-1n1g.yaml) scaled down: an
easier task (1-2 steps, operands up to 5), a shorter warm-start, no validation or export. Every
stage is the real one (task generation, warm-start through the Megatron actor, the weak model's
pool from an early warm-start checkpoint through vLLM, Ray + the actor + vLLM + the verifier pool),
seeded, on CPU in fp32.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The stated margin: mean training accuracy over the LAST steps exceeds the FIRST steps' by this.
MARGIN = 0.15
WINDOW = 4


def test_make_task_same_flags_same_bytes_other_seed_disjoint(tmp_path):
    from megatron_denoise.launch import make_task
    from megatron_denoise.prepare.tasks import questions_of

    flags = ["--kind", "mix", "--count", "300", "--max-steps", "3", "--distractors", "1"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert make_task.main(["--output", str(tmp_path / f"{name}.parquet"), "--seed", str(seed), *flags]) == 0
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "c.parquet").read_bytes()
    assert make_task.main(["--output", str(tmp_path / "d.parquet"), "--seed", "2", "--exclude",
                           str(tmp_path / "a.parquet"), *flags]) == 0
    a, d = questions_of([tmp_path / "a.parquet"]), questions_of([tmp_path / "d.parquet"])
    assert len(a) == len(d) == 300 and not a & d


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.megatron
def test_warm_start_then_denoise_grpo_raises_training_accuracy(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, MDN_RAY_TMPDIR=str(Path("/tmp") / f"mdnray-learns-{os.getpid()}"))
    task = "{kind: arith, min_steps: 1, max_steps: 2, max_operand: 5"
    cmd = [sys.executable, "-m", "megatron_denoise.launch.train",
           "--config", str(REPO / "configs" / "testbed-denoise-grpo-cpu-1n1g.yaml"),
           f"logging.output_dir={run}", "logging.progress=false", "logging.tensorboard=false",
           f"prepare.task.train={task}, seed: 1, count: 1000}}", f"prepare.task.heldout={task}, seed: 2, count: 20}}",
           "prepare.warm_start.weak_step=60", "prepare.warm_start.overrides=[sft.total_steps=150, sft.val_freq=0]",
           "data.max_problems=96", "prepare.pool.n=2",
           "trainer.total_steps=16", "trainer.test_freq=0", "trainer.val_before_train=false",
           "checkpoint.save_interval=0", "checkpoint.export_hf_at_end=false"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    acc = [s["accuracy"] for s in steps if "accuracy" in s]
    assert len(acc) == 16
    first, last = sum(acc[:WINDOW]) / WINDOW, sum(acc[-WINDOW:]) / WINDOW
    assert last >= first + MARGIN, (acc, first, last)
    # the pool came from the weak checkpoint and the denoise rows used it
    assert all(s["fallback_count"] < s["rows"] for s in steps if "rows" in s)
