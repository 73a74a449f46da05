"""slurm/train.sbatch on a real local Slurm, with a probe driver in place of the trainer.

What is checked here is the script's own contract, independently of the trainer: a 2-node
allocation (node1, node2: two slurmd on this machine) becomes one Ray cluster with exactly those
nodes, the driver gets RAY_ADDRESS, the config and the overrides; SIGTERM (`scancel --batch
--signal=TERM`, what `--signal=B:TERM@grace` sends before the time limit) reaches the driver,
exit 75 requeues the job, and the requeued run resumes where the first stopped; nothing the job
started survives it. The trainer itself runs under the same script in test_slurm_train.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest



pytestmark = [pytest.mark.slurm, pytest.mark.slow]
PROBE_DIR = Path(__file__).resolve().parent
REPO = PROBE_DIR.parents[1]
CONFIG = str(REPO / "configs" / "tiny-denoise-grpo-cpu-1n1g.yaml")


def _wait_file(path: Path, timeout: float, cluster, job) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        info = cluster.info(job)
        if info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job ended ({info['JobState']}) before {path.name} appeared\n" + cluster.diagnose(job),
                        pytrace=False)
        if time.monotonic() > deadline:
            diag = cluster.diagnose(job)
            cluster.cmd("scancel", job.id, check=False)
            pytest.fail(f"{path.name} did not appear within {timeout:.0f} s\n{diag}", pytrace=False)
        time.sleep(0.5)


def test_two_node_ray_cluster_sigterm_requeue_resume(slurm_cluster, job_env, tmp_path_factory):
    work = Path(slurm_cluster.run) / "probe-2n"
    out, ckpt = work / "probe.jsonl", work / "ckpt.json"
    env = dict(job_env, MDN_TRAIN_MODULE="mdn_slurm_probe", PYTHONPATH=str(PROBE_DIR))
    steps = 6
    job = slurm_cluster.sbatch("train.sbatch", [CONFIG, f"out={out}", f"steps={steps}", "step_seconds=2",
                                                f"ckpt={ckpt}"], work, env=env, nodes=2)
    # preempt once the driver is in its second step
    progress = out.with_suffix(".progress")
    _wait_file(progress, 240, slurm_cluster, job)
    deadline = time.monotonic() + 60
    while len(progress.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    slurm_cluster.cmd("scancel", "--batch", "--signal=TERM", job.id)
    info = slurm_cluster.wait(job, timeout=300)
    log = slurm_cluster.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.diagnose(job)
    assert info["Restarts"] == "1", slurm_cluster.diagnose(job)

    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["restart"] for r in runs] == [0, 1], log
    first, second = runs
    # the first run was stopped after finishing the step it was in, and said so with exit 75
    assert first["term_seen"] and first["exit_code"] == 75 and 1 <= first["end_step"] < steps, first
    assert "forwarding it to pid" in log and "requeueing job" in log, log
    # the requeued run resumed at the saved step and finished
    assert second["start_step"] == first["end_step"] and second["end_step"] == steps, second
    assert not second["term_seen"] and second["exit_code"] == 0
    for r in runs:
        assert r["config"] == CONFIG and r["overrides"][0] == f"out={out}"
        assert r["ray_address_env"] == f"127.0.0.2:{job_env['MDN_RAY_PORT']}" == r["gcs_address"]
        assert r["job_nodes"] == "2"
        assert r["ray_auth"] == ["token", 64]  # the job's own Ray token reached the driver
        # exactly the allocation's two nodes, each raylet started on its own Slurm node
        assert sorted(n["name"] for n in r["ray_nodes"]) == ["node1", "node2"], r["ray_nodes"]
        by_id = {n["id"]: n for n in r["ray_nodes"]}
        assert sorted(t["slurm_node"] for t in r["tasks"]) == ["node1", "node2"], r["tasks"]
        for t in r["tasks"]:
            assert by_id[t["ray_node_id"]]["name"] == t["slurm_node"], (t, r["ray_nodes"])
        assert {n["ip"] for n in r["ray_nodes"]} == {"127.0.0.2", "127.0.0.3"}  # loopback only
        assert all(n["cpus"] >= 1 for n in r["ray_nodes"])
    # generous: under load Ray's processes take a while to exit after the job's SIGTERM
    assert not slurm_cluster.wait_no_leftovers(job, timeout=120), "processes of the job survived it"


def test_container_without_pyxis_fails_clearly(slurm_cluster, job_env):
    """MDN_CONTAINER_IMAGE on a Slurm without pyxis: an error naming the missing plugin, at once."""
    work = Path(slurm_cluster.run) / "container"
    for script, args in [("train.sbatch", [CONFIG]), ("evaluate.sbatch", ["--help"])]:
        job = slurm_cluster.sbatch(script, args, work, env=dict(job_env, MDN_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3"))
        info = slurm_cluster.wait(job, timeout=60)
        log = slurm_cluster.output(job)
        assert info["JobState"] == "FAILED", slurm_cluster.diagnose(job)
        assert "pyxis" in log and "--container-image" in log, log
        assert "Ray:" not in log  # nothing was started


def test_train_script_usage_errors(slurm_cluster, job_env):
    """A missing config and a port inside Ray's worker range are reported before anything starts."""
    work = Path(slurm_cluster.run) / "usage"
    bad = [([str(work / "nope.yaml")], {}, "config " + str(work / "nope.yaml") + " not found"),
           ([CONFIG], {"MDN_RAY_PORT": "12345"}, "worker port range 10002-19999")]
    jobs = [(slurm_cluster.sbatch("train.sbatch", args, work, env=dict(job_env, **e)), msg) for args, e, msg in bad]
    for job, msg in jobs:
        info = slurm_cluster.wait(job, timeout=60)
        assert info["JobState"] == "FAILED", slurm_cluster.diagnose(job)
        assert msg in slurm_cluster.output(job), slurm_cluster.diagnose(job)
