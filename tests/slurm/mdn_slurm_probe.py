"""A Ray driver that slurm/train.sbatch runs in place of the trainer (MDN_TRAIN_MODULE=mdn_slurm_probe).

It checks what the script promises a driver, independently of the trainer:
- RAY_ADDRESS is exported and ``ray.init(address="auto")`` joins the job's cluster, whose alive
  nodes are exactly the allocation's nodes; one task pinned to each node reports the Slurm node
  (SLURMD_NODENAME) its raylet was started on, so a node that joined from the wrong place shows.
- ``--config`` and key=value overrides arrive unchanged.
- The preemption contract the trainer implements: on SIGTERM finish the current step, save a
  checkpoint, exit 75; a requeued run resumes from it. Here a "step" is a sleep and the checkpoint
  is a JSON file, so that the script's requeue path is tested in seconds.

    python -m mdn_slurm_probe --config CFG out=FILE [steps=N] [step_seconds=S] [ckpt=FILE]

Every run appends one JSON record to ``out``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

TERM_EXIT = int(os.environ.get("MDN_TERM_EXIT_CODE", "75"))


def node_report() -> dict:
    """Where this Ray worker process runs: its Slurm node (inherited from the raylet) and Ray node."""
    import ray

    return {
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "ray_node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    kv = dict(o.split("=", 1) for o in args.overrides)
    out = Path(kv["out"])
    steps, step_seconds = int(kv.get("steps", "0")), float(kv.get("step_seconds", "1"))
    ckpt = Path(kv["ckpt"]) if "ckpt" in kv else None

    term = {"seen": False}
    signal.signal(signal.SIGTERM, lambda *_: term.update(seen=True))

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    alive = [n for n in ray.nodes() if n["Alive"]]
    probe = ray.remote(num_cpus=0)(node_report)
    reports = ray.get([
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in alive
    ])
    record = {
        "config": args.config,
        "overrides": args.overrides,
        "ray_address_env": os.environ.get("RAY_ADDRESS"),
        "ray_auth": [os.environ.get("RAY_AUTH_MODE"), len(os.environ.get("RAY_AUTH_TOKEN", ""))],
        "gcs_address": ray.get_runtime_context().gcs_address,
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "job_nodes": os.environ.get("SLURM_JOB_NUM_NODES"),
        "ray_nodes": [{"name": n["NodeName"], "ip": n["NodeManagerAddress"], "id": n["NodeID"],
                       "cpus": n["Resources"].get("CPU", 0)} for n in alive],
        "tasks": reports,
    }
    ray.shutdown()
    signal.signal(signal.SIGTERM, lambda *_: term.update(seen=True))  # in case Ray replaced it

    start = json.loads(ckpt.read_text())["step"] if ckpt and ckpt.exists() else 0
    record["start_step"] = start
    step, exit_code = start, 0
    while step < steps:
        with out.with_suffix(".progress").open("a") as f:  # the test waits for this before signalling
            f.write(f"{record['restart']} {step}\n")
        time.sleep(step_seconds)  # the step's work; a SIGTERM during it lets the step finish
        step += 1
        if term["seen"]:
            exit_code = TERM_EXIT
            break
    if ckpt:
        ckpt.write_text(json.dumps({"step": step}))
    record.update(end_step=step, term_seen=term["seen"], exit_code=exit_code)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
