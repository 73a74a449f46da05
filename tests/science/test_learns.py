"""Learning, at test size: a short supervised warm-start and a few RL steps through the main job's
own entry point raise the training accuracy; and the task files are deterministic (same flags,
same bytes; other seeds and --exclude, disjoint problems).

The learning run is the main job's pipeline (task -> warm-start through the Megatron actor -> RL
with vLLM and Ray) shrunk to fit the default test run: 120 one-step sums and differences of digits,
a 200-step warm-start and GRPO (K = 0; no pool stage) for RL_STEPS steps at Adam 1e-4. What RL can
learn in 30 steps is the answer format rather than arithmetic: only 30% of the warm-start's
solutions end in \\boxed{} (`boxed_fraction: 0.3`; the rest say "The answer is N.", which the
verifier scores 0), so the warm-started policy boxes about a third of its answers, and rewarded
boxed answers teach it to box. The test asserts both the rise and that mechanism (no_box_fraction
falls). Fixed seeds make the run deterministic on CPU; the margin is stated below with the rise it
was set against. Arithmetic skill itself, over seeds, is measured by benchmarks/science/run.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RL_STEPS = 30
WINDOW = 5      # steps averaged at each end
# Training accuracy, mean of the last 5 steps minus the mean of the first 5, must exceed MARGIN
# (and the no-box share must fall by as much). Measured with these settings before the test existed
# (/tmp run of the same command, 14:20 UTC 2026-12-03): accuracy 0.134 -> 0.360 (+0.23), no-box
# share 0.71 -> 0.30; the README's "Learning, shown" section carries the figures.
MARGIN = 0.10


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.megatron
def test_short_warm_start_then_grpo_raises_training_accuracy(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_denoise.launch.train",
           "--config", str(REPO / "configs" / "testbed-denoise-grpo-cpu-1n1g.yaml"),
           f"logging.output_dir={run}",
           "prepare.task.train={kind: arith, min_steps: 1, max_steps: 1, max_operand: 9, seed: 1, count: 120, "
           "boxed_fraction: 0.3}",
           "prepare.task.heldout={kind: dial, min_steps: 1, max_steps: 1, seed: 2, count: 4}",
           "prepare.warm_start.overrides=[sft.total_steps=200, sft.val_freq=0]", "prepare.warm_start.weak_step=null",
           "prepare.pool.enabled=false", 'data.train_files=["${prepare.task.output_dir}/train.parquet"]',
           "denoise.n_main=8", "denoise.k_denoise=0", "data.problems_per_step=16", "optimizer.lr=1.0e-4",
           f"trainer.total_steps={RL_STEPS}", "trainer.test_freq=0", "trainer.val_before_train=false",
           "checkpoint.save_interval=0", "checkpoint.export_hf_at_end=false"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in rows if "accuracy" in m]
    assert [m["step"] for m in steps] == list(range(1, RL_STEPS + 1))
    acc = [m["accuracy"] for m in steps]
    no_box = [m["no_box_fraction"] for m in steps]
    rise = _mean(acc[-WINDOW:]) - _mean(acc[:WINDOW])
    assert rise > MARGIN, f"training accuracy per step {[round(a, 3) for a in acc]}: rise {rise:.3f} <= {MARGIN}"
    # what RL learnt: to box its answers
    assert _mean(no_box[-WINDOW:]) < _mean(no_box[:WINDOW]) - MARGIN, [round(x, 3) for x in no_box]


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
