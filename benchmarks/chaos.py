"""Chaos harness: kill -9 the trainer's driver or one of its workers at seeded random points,
resume, and check that the resumed run IS the uninterrupted run.

    python benchmarks/chaos.py --kills 20 --seed 7            # heavy: run it on a quiet machine

One uninterrupted reference run of the e2e config (configs/tiny-denoise-grpo-cpu-1n2g-tp2.yaml:
a tiny random Llama, tp=2 on 2 gloo ranks, a colocated vLLM replica, 2 verifier workers; CPU,
fp32), then the kill points. A kill point is `role:phase:n[:delay]` (megatron_denoise/chaos.py):
the n-th time the process of `role` (driver, policy0, policy1, rollout, verifier) reaches `phase`
(generate, reward, train, refit, save, metrics / logprob / score), it is SIGKILLed for real.

Kill points are played in chains: an attempt runs with one kill point; when the kill ends the
attempt (driver, policy rank), the next attempt resumes (checkpoint.resume=auto) with the next
kill point; when the run survives it (rollout worker, verifier worker), or the point is never
reached, the chain is finished. Every finished chain is compared with the reference:

  - metrics.jsonl: every step present once, and every value of every step equal BIT FOR BIT to
    the reference's, except wall-clock figures (time/*, refit/engine_seconds, refit/peak_extra_mb)
    and the fault counters (faults/*, which must say what happened);
  - problems.jsonl: the same uids per step (nothing repeated, nothing skipped);
  - the final weights (the Hugging Face export): every tensor bit-identical;
  - every checkpoint left on disk loads its meta.json, and `latest` names a complete one; no
    `.tmp-*` save survives a later successful save.

Prints one line per kill point and a summary; exit code 0 when every chain matched.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_denoise.trainer.workers import stop_ray_session

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-denoise-grpo-cpu-1n2g-tp2.yaml"
EXIT_PREEMPTED = 75
# figures that measure wall time or memory, not the computation
VOLATILE_PREFIXES = ("time/", "faults/")
VOLATILE_KEYS = ("refit/engine_seconds", "refit/peak_extra_mb", "step_time_s")

# where each role's phases are reached, with the occurrence range that a 6-step attempt reaches
# early enough to leave steps for the next kill point of its chain
POINTS = {
    "driver": {"generate": 3, "reward": 3, "train": 3, "refit": 3, "save": 3, "metrics": 3},
    "policy0": {"logprob": 3, "train": 3, "refit": 3, "save": 3},
    "policy1": {"logprob": 3, "train": 3, "refit": 3, "save": 3},
    "rollout": {"generate": 3, "refit": 3},
    "verifier": {"score": 6},
}
# a kill in these phases gets a delay, so that it lands while the phase's work runs (the driver
# waits in ray.get while the ranks write the checkpoint; the rollout worker generates)
DELAYS = {("driver", "save"): (0.0, 1.5), ("driver", "generate"): (0.0, 1.0), ("driver", "train"): (0.0, 1.0),
          ("rollout", "generate"): (0.0, 0.5)}


def write_problems(path: Path, n: int = 12) -> None:
    """The e2e test's data: each problem's wrong-pool entry starts with the CORRECT boxed answer,
    so a denoise row's reward depends on its (seeded) rho draw and the curve is not trivial."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 7 + 2 * i
        rows.append({
            "data_source": "e2e",
            "prompt": [{"role": "user", "content": f"What is {a} + {b}? Put the answer in \\boxed{{}}."}],
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"index": i},
            "wrong_answer_with_boxed": [f"The answer is \\boxed{{{a + b}}}, since {a} plus {b} makes {a + b} when we "
                                        f"add the two numbers up step by step."],
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def kill_plan(count: int, seed: int) -> list[str]:
    """`count` kill points drawn by `seed` (role uniformly, then phase, occurrence, delay)."""
    rng = random.Random(f"megatron-denoise-chaos/{seed}")
    out = []
    for _ in range(count):
        role = rng.choice(sorted(POINTS))
        phase = rng.choice(sorted(POINTS[role]))
        n = rng.randint(1, POINTS[role][phase])
        spec = f"{role}:{phase}:{n}"
        lo, hi = DELAYS.get((role, phase), (0.0, 0.0))
        if hi > 0:
            spec += f":{rng.uniform(lo, hi):.2f}"
        out.append(spec)
    return out


def ray_tmp(run_dir: Path) -> str:
    """A short private Ray session folder per run (socket paths must stay under 107 bytes)."""
    return f"/tmp/mdnchaos-{os.getpid()}-{abs(hash(str(run_dir))) % 10**8}"


def stop_ray(run_dir: Path) -> None:
    """Kill what a killed driver left behind: the processes of its private Ray session."""
    stop_ray_session(ray_tmp(run_dir), grace_s=1.0, remove=True)


def launch(run_dir: Path, data: Path, steps: int, kill: str | None, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MDN_RAY_TMPDIR=ray_tmp(run_dir), PYTHONUNBUFFERED="1",
               MDN_CHAOS_DIR=str(run_dir))
    env.pop("RAY_ADDRESS", None)
    env.pop("MDN_CHAOS_KILL", None)
    if kill:
        env["MDN_CHAOS_KILL"] = kill
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "fired").unlink(missing_ok=True)
    args = [sys.executable, "-m", "megatron_denoise.launch.train", "--config", str(CONFIG),
            f"logging.output_dir={run_dir}", f"data.train_files=[{data}]", f"trainer.total_steps={steps}",
            "checkpoint.save_interval=1", "checkpoint.export_hf_at_end=true", "logging.progress=false",
            "logging.tensorboard=false", "denoise.rho.strategy=uniform", "denoise.rho.low=0.1",
            "denoise.rho.high=0.7", "checkpoint.keep_last=0", "checkpoint.resume=auto", *extra]
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    log.write(f"\n===== attempt: MDN_CHAOS_KILL={kill}\n".encode())
    log.flush()
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_attempt(run_dir: Path, data: Path, steps: int, kill: str | None, timeout: float, *extra: str) -> tuple[int, bool]:
    """Run to its end or its death; returns (exit code, whether the kill fired)."""
    proc = launch(run_dir, data, steps, kill, *extra)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -999
    stop_ray(run_dir)
    return rc, (run_dir / "fired").exists()


def log_tail(run_dir: Path, n: int = 3000) -> str:
    p = run_dir.parent / f"{run_dir.name}.log"
    return p.read_text(errors="replace")[-n:] if p.exists() else ""


def read_metrics(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if int(d["step"]) in out:
            raise AssertionError(f"{run_dir}/metrics.jsonl: step {d['step']} twice")
        out[int(d["step"])] = d
    return out


def read_problems(run_dir: Path) -> dict[int, list]:
    return {d["step"]: d["uids"] for d in map(json.loads, (run_dir / "problems.jsonl").read_text().splitlines())}


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run_dir / "hf_export").glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise AssertionError(f"{run_dir}/hf_export holds no safetensors")
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def compare(ref: Path, run: Path, steps: int) -> list[str]:
    """Every difference between a chain's result and the reference (empty: bit-identical)."""
    import torch

    bad: list[str] = []
    m_ref, m_run = read_metrics(ref), read_metrics(run)
    if sorted(m_run) != list(range(1, steps + 1)):
        bad.append(f"metrics steps {sorted(m_run)}")
    for s in sorted(set(m_ref) & set(m_run)):
        a, b = m_ref[s], m_run[s]
        keys = {k for k in set(a) | set(b) if not k.startswith(VOLATILE_PREFIXES) and k not in VOLATILE_KEYS}
        for k in sorted(keys):
            if not _same(a.get(k), b.get(k)):
                bad.append(f"step {s} {k}: {b.get(k)!r} != reference {a.get(k)!r}")
    if read_problems(run) != read_problems(ref):
        bad.append(f"problems.jsonl differs: {read_problems(run)} vs {read_problems(ref)}")
    w_ref, w_run = final_weights(ref), final_weights(run)
    if sorted(w_ref) != sorted(w_run):
        bad.append("final weights: different tensor names")
    else:
        diff = [k for k in w_ref if not (w_ref[k].dtype == w_run[k].dtype and torch.equal(w_ref[k], w_run[k]))]
        if diff:
            bad.append(f"final weights differ in {len(diff)} tensors, e.g. {diff[:3]}")
    bad += check_checkpoints(run / "checkpoints")
    return bad


def check_checkpoints(root: Path) -> list[str]:
    """No half-written or unreadable checkpoint: `latest` names a complete folder, every step_*
    folder has a readable meta.json with its step and every rank's RNG file, no .tmp-* is left
    (the last save of a finished run removes them)."""
    bad = []
    latest = root / "latest"
    if not latest.exists():
        return [f"{root}: no latest"]
    name = latest.read_text().strip()
    if not (root / name / "meta.json").is_file():
        bad.append(f"{latest} names {name}, which is not complete")
    for d in sorted(root.glob("step_*")):
        try:
            meta = json.loads((d / "meta.json").read_text())
            assert meta["step"] == int(d.name.split("_")[1])
            world = int(meta["layout"]["world_size"])
            assert all((d / "rng" / f"rank_{r:05d}.pt").is_file() for r in range(world))
            assert (d / "dist" / ".metadata").is_file()
        except Exception as e:  # noqa: BLE001
            bad.append(f"{d}: unreadable or incomplete ({type(e).__name__}: {e})")
    left = sorted(p.name for p in root.glob(".tmp-*"))
    if left:
        bad.append(f"{root}: save folders left behind: {left}")
    return bad


@dataclass
class Chain:
    run_dir: Path
    kills: list = field(default_factory=list)   # (spec, fired, exit code, seconds)


def play(plan: list[str], work: Path, data: Path, steps: int, timeout: float, log=print) -> list[Chain]:
    """Play the kill points in chains (see the module docstring); returns the finished chains."""
    chains: list[Chain] = []
    chain = None
    for i, spec in enumerate(plan):
        if chain is None:
            chain = Chain(work / f"chain{len(chains):02d}")
            if chain.run_dir.exists():
                shutil.rmtree(chain.run_dir)
            chains.append(chain)
        t0 = time.time()
        rc, fired = run_attempt(chain.run_dir, data, steps, spec, timeout)
        chain.kills.append((spec, fired, rc, time.time() - t0))
        log(f"[chaos] kill {i + 1}/{len(plan)} {spec:24s} fired={fired!s:5s} exit={rc:4d} "
            f"({time.time() - t0:.0f} s) -> {chain.run_dir.name}", flush=True)
        if rc == -999:
            raise RuntimeError(f"attempt with {spec} did not finish within {timeout} s:\n{log_tail(chain.run_dir)}")
        if rc == 0:
            chain = None      # survived (or not reached): this chain is complete
        elif not fired:
            raise RuntimeError(f"attempt with {spec} failed without being killed (exit {rc}):\n"
                               f"{log_tail(chain.run_dir)}")
    if chain is not None:     # the last kill ended an attempt: resume to the end
        t0 = time.time()
        rc, _ = run_attempt(chain.run_dir, data, steps, None, timeout)
        log(f"[chaos] final resume of {chain.run_dir.name}: exit {rc} ({time.time() - t0:.0f} s)", flush=True)
        if rc != 0:
            raise RuntimeError(f"final resume failed (exit {rc}):\n{log_tail(chain.run_dir)}")
    return chains


def reference(work: Path, data: Path, steps: int, timeout: float) -> Path:
    ref = work / "reference"
    if (ref / "outputs.json").exists():
        return ref
    if ref.exists():
        shutil.rmtree(ref)
    rc, _ = run_attempt(ref, data, steps, None, timeout)
    if rc != 0:
        raise RuntimeError(f"reference run failed (exit {rc}):\n{log_tail(ref)}")
    return ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workdir", default="runs/chaos")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per attempt")
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "problems.jsonl"
    write_problems(data)
    t0 = time.time()
    plan = kill_plan(args.kills, args.seed)
    print(f"[chaos] seed {args.seed}, {args.kills} kill points, {args.steps} steps per run: {plan}", flush=True)
    ref = reference(work, data, args.steps, args.timeout)
    print(f"[chaos] reference run done ({time.time() - t0:.0f} s)", flush=True)
    chains = play(plan, work, data, args.steps, args.timeout)
    failures = 0
    fired = sum(f for c in chains for _, f, _, _ in c.kills)
    for c in chains:
        bad = compare(ref, c.run_dir, args.steps)
        faults = {}
        for d in read_metrics(c.run_dir).values():
            for k, v in d.items():
                if k.startswith("faults/") and v:
                    faults[k] = faults.get(k, 0) + v
        status = "BIT-IDENTICAL" if not bad else "DIFFERS"
        failures += bool(bad)
        print(f"[chaos] {c.run_dir.name}: {[s for s, *_ in c.kills]} -> {status}; faults counted {faults}", flush=True)
        for b in bad[:10]:
            print(f"    {b}", flush=True)
    print(f"[chaos] summary: seed {args.seed}, {len(plan)} kill points ({fired} fired), {len(chains)} chains, "
          f"{len(chains) - failures} bit-identical to the uninterrupted run, {failures} differ; "
          f"{time.time() - t0:.0f} s", flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
