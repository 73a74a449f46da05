"""The acceptance run of slurm/train.sbatch with the real trainer on a real local Slurm.

One job on a 2-node allocation (node1 + node2, two slurmd on this machine) trains the tiny tp=2
config with one rank per node: Ray comes up on both nodes, and each Ray node offers one CPU
(MDN_RAY_NUM_CPUS=1) while each rank needs one, so the two ranks can only be placed one per node.
After the first step is logged, `scancel --batch --signal=TERM` (what `--signal=B:TERM@grace` sends
before the time limit) stops it: the trainer finishes its step, checkpoints and exits 75; the
script requeues the job and the requeued run resumes from that checkpoint and finishes step 3.
So the first run trains at least 2 steps and leaves a checkpoint, and the whole job completes.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny-denoise-grpo-cpu-1n2g-tp2.yaml"
RUN_PY = REPO / "megatron_denoise" / "trainer" / "run.py"


def trainer_missing() -> str | None:
    """Why the trainer cannot run yet (None when every module it imports exists)."""
    if not RUN_PY.exists():
        return "megatron_denoise/trainer/run.py (the trainer) does not exist yet"
    mods = {n.module for n in ast.walk(ast.parse(RUN_PY.read_text()))
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("megatron_denoise")}
    missing = sorted(m for m in mods if importlib.util.find_spec(m) is None)
    if missing:
        return f"the trainer (megatron_denoise/trainer/run.py) imports modules that do not exist yet: {missing}"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(trainer_missing() is not None, reason=str(trainer_missing()))]


def _steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def _actors_on(ray_tmp: Path, class_name: str) -> int:
    """Ray workers of this node that hosted an actor of class_name: Ray writes ':actor_name:<class>'
    into each actor's worker log, under the node's own temp dir (MDN_RAY_TMPDIR=.../ray-%n)."""
    marker = f":actor_name:{class_name}"
    return sum(marker in f.read_text(errors="replace")
               for f in ray_tmp.glob("session_2*/logs/worker-*.out"))


def test_train_two_nodes_sigterm_checkpoint_requeue_resume(slurm_cluster, job_env):
    from megatron_denoise.megatron.checkpoint import latest_checkpoint

    work = Path(slurm_cluster.run) / "train-2n"
    run_dir = work / "run"
    total = 3
    env = dict(job_env, MDN_RAY_NUM_CPUS="1")
    job = slurm_cluster.sbatch("train.sbatch", [str(CONFIG), "cluster.num_nodes=2", "cluster.gpus_per_node=1",
                                                f"trainer.total_steps={total}", "checkpoint.save_interval=0",
                                                f"logging.output_dir={run_dir}"],
                               work, env=env, nodes=2, time_limit="15")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 420
    while not _steps(metrics):
        info = slurm_cluster.info(job)
        if info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job ended ({info['JobState']}) before step 1 was logged\n" + slurm_cluster.diagnose(job),
                        pytrace=False)
        if time.monotonic() > deadline:
            diag = slurm_cluster.diagnose(job)
            slurm_cluster.cmd("scancel", job.id, check=False)
            pytest.fail(f"step 1 not logged within 420 s: cancelled\n{diag}", pytrace=False)
        time.sleep(0.5)
    slurm_cluster.cmd("scancel", "--batch", "--signal=TERM", job.id)
    info = slurm_cluster.wait(job, timeout=480)
    log = slurm_cluster.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.diagnose(job)
    assert info["Restarts"] == "1", slurm_cluster.diagnose(job)

    # both runs brought up Ray on both nodes, and each node hosted one policy rank per run
    assert log.count("Ray cluster complete: 2/2 nodes alive") == 2, log[-4000:]
    ranks = {n: _actors_on(Path(job_env["MDN_RAY_TMPDIR"].replace("%n", n)), "PolicyWorkerImpl")
             for n in ("node1", "node2")}
    assert ranks == {"node1": 2, "node2": 2}, f"policy ranks per node over both runs: {ranks}"
    # run 1: SIGTERM -> the current step finished -> checkpoint -> exit 75 -> requeue
    assert "SIGTERM received: forwarding it to pid" in log and "trainer exited with 75" in log, log[-4000:]
    assert "requeueing job" in log
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", log)
    assert stopped, log[-4000:]
    stop_step = int(stopped.group(1))
    assert 2 <= stop_step <= total  # the signal came after step 1, and the step in flight was finished
    # run 2: resumed from that checkpoint, trained to the end, finished normally
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
    assert resumed and int(resumed.group(2)) == stop_step, log[-4000:]
    assert "trainer exited with 0" in log[resumed.end():]
    assert _steps(metrics)[-1] == total and sorted(set(_steps(metrics))) == list(range(1, total + 1))
    last = latest_checkpoint(run_dir / "checkpoints")
    assert last is not None and json.loads((last / "meta.json").read_text())["step"] == total
    assert not slurm_cluster.wait_no_leftovers(job), "processes of the job survived it"
