"""A real Slurm on this machine for the tests of slurm/*.sbatch.

One session-scoped cluster: slurm/local/install.sh (Debian packages), slurm/local/up.sh (private
munged + slurmctld + two slurmd node names, node1 and node2, on 127.0.0.1 in a /tmp folder), and
slurm/local/down.sh at the end, which stops exactly the daemons up.sh started (recorded PIDs).
Jobs are the real scripts submitted with sbatch; every wait has a deadline after which the job is
cancelled and its output is shown.

Without root or apt the tests skip, except under CI (CI=true), where that is a failure: CI must
run them.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
LOCAL = SLURM_DIR / "local"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _unavailable(msg: str):
    if IN_CI:
        pytest.fail(f"Slurm tests cannot run: {msg} (CI=true: these tests must run in CI)", pytrace=False)
    pytest.skip(f"Slurm tests need a local Slurm: {msg}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Job:
    id: str
    workdir: Path
    output: Path


@dataclass
class SlurmCluster:
    run: Path
    env: dict = field(default_factory=dict)

    # ---- client commands (always against this cluster)
    def cmd(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        p = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def sbatch(self, script: str, args: list[str], workdir: Path, env: dict | None = None,
               nodes: int = 1, time_limit: str = "10", extra: list[str] | None = None) -> Job:
        """Submit slurm/<script> as a user would; the job's output goes to workdir."""
        workdir.mkdir(parents=True, exist_ok=True)
        # as from a login shell: nothing of a Ray session this test process may have joined
        # (ray.init leaves RAY_AUTH_MODE behind; the script makes its own token unless it is set)
        job_env = {k: v for k, v in self.env.items() if not k.startswith("RAY_")}
        job_env.update(env or {})
        # Our tests use short time limits: keep the TERM-before-limit grace shorter than them.
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--time={time_limit}", f"--chdir={workdir}",
               "--signal=B:TERM@20", *(extra or []), str(SLURM_DIR / script), *args]
        p = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed: {p.stderr.strip()}")
        jid = p.stdout.strip().split(";")[0]
        name = re.search(r"#SBATCH --job-name=(\S+)", (SLURM_DIR / script).read_text()).group(1)
        return Job(jid, workdir, workdir / f"slurm-{name}-{jid}.out")

    def info(self, job: Job) -> dict:
        out = self.cmd("scontrol", "show", "job", "-o", job.id)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def state(self, job: Job) -> str:
        return self.info(job)["JobState"]

    def output(self, job: Job) -> str:
        return job.output.read_text(errors="replace") if job.output.exists() else "(no output file yet)"

    def diagnose(self, job: Job) -> str:
        log = (self.run / "log" / "slurmctld.log")
        ctld = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        try:
            info = self.cmd("scontrol", "show", "job", job.id, check=False)
        except Exception as e:  # noqa: BLE001 - diagnostics only
            info = repr(e)
        return (f"--- job {job.id} output ({job.output}):\n{self.output(job)[-6000:]}\n"
                f"--- scontrol show job:\n{info}\n--- slurmctld.log (tail):\n{ctld}")

    def wait(self, job: Job, timeout: float, until=None, kick_requeued: bool = True) -> dict:
        """Poll until the job reaches a final state (or `until(info)` holds); cancel it on timeout.

        kick_requeued: a requeued job waits for its old credential to expire (cred_expire=10 s
        here) before it may start; `StartTime=now+3` lets it start sooner. Not at once: slurmd
        revokes the old credential when the first run ends, with one-second resolution, and a
        restart within that second is refused ("Job credential revoked": the job FAILS; seen once
        in a CI run).
        """
        deadline = time.monotonic() + timeout
        kicked = set()
        while True:
            info = self.info(job)
            if until is not None and until(info):
                return info
            if info["JobState"] in FINAL_STATES and until is None:
                return info
            if info["JobState"] in FINAL_STATES:
                pytest.fail(f"job {job.id} ended ({info['JobState']}) before the awaited condition\n"
                            + self.diagnose(job), pytrace=False)
            restarts = info.get("Restarts", "0")
            if kick_requeued and info["JobState"] == "PENDING" and restarts != "0" and restarts not in kicked:
                self.cmd("scontrol", "update", f"JobId={job.id}", "StartTime=now+3", check=False)
                kicked.add(restarts)
            if time.monotonic() > deadline:
                diag = self.diagnose(job)
                self.cmd("scancel", job.id, check=False)
                pytest.fail(f"job {job.id} still {info['JobState']} after {timeout:.0f} s: cancelled\n{diag}",
                            pytrace=False)
            time.sleep(1)

    def leftover_processes(self, job: Job) -> list[str]:
        """Processes still carrying this job's SLURM_JOB_ID: Ray or trainer processes that escaped."""
        needle = f"SLURM_JOB_ID={job.id}\0".encode()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if needle in (d / "environ").read_bytes():
                    cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{d.name}: {cmdline[:200]}")
            except OSError:
                continue
        return found

    def wait_no_leftovers(self, job: Job, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftover_processes(job)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def _sweep_stale_clusters(env: dict) -> None:
    """Clean up after an earlier session that was killed before its teardown: its daemons died with
    it, but slurmstepd and job processes may linger. A cluster whose slurmctld still runs belongs
    to a live session and is left alone."""
    for run in Path("/tmp").glob("mdn-slurm-*"):
        ctld = run / "pids" / "slurmctld.pid"
        if not (run / "slurm.conf").exists() or (ctld.exists() and _alive(ctld)):
            continue
        subprocess.run(["bash", str(LOCAL / "down.sh"), str(run)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    if sys.platform != "linux":
        _unavailable("Linux only")
    if os.geteuid() != 0:
        _unavailable("needs root (apt-get install of slurmctld/slurmd/munge; slurmd runs jobs as the submitter)")
    p = subprocess.run(["bash", str(LOCAL / "install.sh")], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        _unavailable(f"slurm/local/install.sh failed ({p.returncode}): {(p.stdout + p.stderr).strip()[-2000:]}")
    env = dict(os.environ, PATH=f"/usr/sbin:/usr/bin:/sbin:/bin:{os.environ.get('PATH', '')}")
    _sweep_stale_clusters(env)
    # /tmp (not pytest's 0700 tmp folder): the munge user must reach its socket folder.
    run = Path(tempfile.mkdtemp(prefix="mdn-slurm-", dir="/tmp"))
    p = subprocess.run(["bash", str(LOCAL / "up.sh"), str(run), "2"], env=env, capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        subprocess.run(["bash", str(LOCAL / "down.sh"), str(run)], env=env, capture_output=True, timeout=120)
        pytest.fail(f"slurm/local/up.sh failed ({p.returncode}):\n{p.stdout}\n{p.stderr}", pytrace=False)
    env["SLURM_CONF"] = str(run / "slurm.conf")
    cluster = SlurmCluster(run=run, env=env)
    # SIGTERM (e.g. from `timeout`) would end pytest without teardown and leave the jobs' processes
    # behind: turn it into KeyboardInterrupt, after which pytest runs the teardown below.
    old_term = signal.getsignal(signal.SIGTERM)

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _term)
    try:
        yield cluster
    finally:
        subprocess.run(["bash", str(LOCAL / "down.sh"), str(run)], env=env, capture_output=True, timeout=180)
        if not os.environ.get("MDN_SLURM_KEEP"):
            shutil.rmtree(run, ignore_errors=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, old_term)


@pytest.fixture(scope="session")
def job_env(slurm_cluster):
    """What every job gets: this venv, and a Ray that stays on loopback with ports of its own.

    Ray rewrites 127.0.0.1/localhost to the machine's outward address; other 127.0.0.0/8
    addresses are left alone, so the head advertises 127.0.0.2 and the worker node 127.0.0.3.
    """
    # one temp dir per node as on real nodes (else each node's log monitor streams every node's
    # worker logs); short, as Ray's unix socket paths must stay < 108 bytes
    ray_tmp = slurm_cluster.run / "ray-%n"
    return {
        "MDN_VENV": sys.prefix,
        "MDN_RAY_HEAD_IP": "127.0.0.2",
        "MDN_RAY_NODE_IP": "127.0.0.3",
        "MDN_RAY_PORT": str(free_port("127.0.0.2")),
        "MDN_RAY_TMPDIR": str(ray_tmp),
        "MDN_RAY_TIMEOUT": "150",
        # the head's other fixed ports (client server 10001, dashboard 8265) may be taken on a
        # shared machine; the object store stays small next to the model processes
        "MDN_RAY_HEAD_ARGS": f"--ray-client-server-port={free_port()} --dashboard-port={free_port()}",
        "MDN_RAY_ARGS": "--object-store-memory=300000000",
        "OMP_NUM_THREADS": "1",
    }
