"""End to end: the real trainer (Ray, 2 Megatron ranks at tp=2 on gloo, colocated vLLM, verifier
pool) on a tiny random Llama, checked against a recorded golden curve, and interrupted twice
(kill -9, then SIGTERM) and resumed, against the uninterrupted run.

The data makes rewards informative without a trained model: each problem's wrong-pool entry ends
starts with the CORRECT boxed answer (complete after about 32% of its tokens), and
rho ~ uniform(0.1, 0.7), so a denoise row's reward is 1 exactly when its prefix includes the box (the random model never writes one). Rewards then
depend only on the seeded rho draws, and advantages, losses and gradients are non-trivial.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.megatron, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny-denoise-grpo-cpu-1n2g-tp2.yaml"
GOLDEN = Path(__file__).parent / "golden" / "tiny-denoise-grpo-cpu-1n2g-tp2.json"
EXIT_PREEMPTED = 75
STEPS = 6


def write_problems(path: Path, n: int = 12) -> None:
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


def ray_tmp(run_dir: Path) -> str:
    """A SHORT private Ray session folder: Ray's socket paths must stay under 107 bytes, which
    pytest's tmp paths (plus Ray's session_<date>_<pid>/sockets/plasma_store) exceed."""
    return f"/tmp/mdnray-{os.getpid()}-{run_dir.name[:4]}"


def launch(run_dir: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MDN_RAY_TMPDIR=ray_tmp(run_dir), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "megatron_denoise.launch.train", "--config", str(CONFIG),
            f"logging.output_dir={run_dir}", f"data.train_files=[{data}]", f"trainer.total_steps={STEPS}",
            "checkpoint.save_interval=1", "checkpoint.export_hf_at_end=false", "logging.progress=false",
            "logging.tensorboard=false", "denoise.rho.strategy=uniform", "denoise.rho.low=0.1",
            "denoise.rho.high=0.7", "checkpoint.keep_last=0", *extra]
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_ray(run_dir: Path) -> None:
    """Kill what a killed driver left behind: processes of its private Ray session."""
    from megatron_denoise.trainer.workers import stop_ray_session

    stop_ray_session(ray_tmp(run_dir), grace_s=2.0)


def metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    p = run_dir / "metrics.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            out[int(d["step"])] = d
    return out


def problems(run_dir: Path) -> dict[int, list]:
    p = run_dir / "problems.jsonl"
    return {d["step"]: d["uids"] for d in map(json.loads, p.read_text().splitlines())} if p.exists() else {}


def wait(proc: subprocess.Popen, run_dir: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stop_ray(run_dir)
        log = (run_dir.parent / f"{run_dir.name}.log").read_text()[-4000:]
        pytest.fail(f"trainer did not finish within {timeout} s; log tail:\n{log}")


def wait_for(cond, proc: subprocess.Popen, run_dir: Path, timeout: float) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            log = (run_dir.parent / f"{run_dir.name}.log").read_text()[-4000:]
            pytest.fail(f"trainer exited ({proc.returncode}) before the expected point; log tail:\n{log}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            stop_ray(run_dir)
            pytest.fail("timed out waiting for the trainer")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    write_problems(d / "problems.jsonl")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def refit_files() -> set[str]:
    """The policy ranks' refit buffers in /dev/shm on this host (rollout.refit.RefitBuffers)."""
    from megatron_denoise.rollout.refit import SHM_PREFIX, host_tag
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"{SHM_PREFIX}{host_tag()}@")}


SHM_BEFORE: set[str] = set()


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    run = workdir / "full"
    SHM_BEFORE.update(refit_files())
    proc = launch(run, workdir / "problems.jsonl")
    rc = wait(proc, run, 1200)
    log = (workdir / "full.log").read_text()
    assert rc == 0, log[-4000:]
    return run


def latest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (`latest` names step_<N>), 0 if none."""
    marker = run_dir / "checkpoints" / "latest"
    return int(marker.read_text().strip().split("_")[1]) if marker.exists() else 0


def curve(m: dict[int, dict], steps) -> list[tuple[float, float, float]]:
    # on-policy (ratio 1) with equal-length rows the token-mean loss is -mean(A) = 0 by
    # construction; the gradient norm carries the log-probs and advantages, so it is compared too
    return [(m[s]["loss"], m[s]["reward_mean"], m[s]["grad_norm"]) for s in steps]


def test_golden_curve_tp2(uninterrupted):
    m = metrics(uninterrupted)
    assert sorted(m) == list(range(1, STEPS + 1))
    got = curve(m, range(1, 5))
    # recorded by tests/trainer/golden/make_golden.py (never by this test), with its provenance
    golden = json.loads(GOLDEN.read_text())
    assert {"command", "commit", "seeds", "versions"} <= set(golden["provenance"])
    want = [tuple(x) for x in golden["loss_reward_gradnorm"]]
    assert len(want) == 4
    # tolerances, not equality: the golden file may come from another machine, whose CPU kernels
    # (oneDNN/MKL paths chosen by the instruction set) sum in another order
    for s, (g, w) in enumerate(zip(got, want), start=1):
        assert g[1] == pytest.approx(w[1], abs=1e-6), f"step {s} reward {g[1]} != golden {w[1]}"
        assert g[0] == pytest.approx(w[0], abs=1e-4), f"step {s} loss {g[0]} != golden {w[0]}"
        assert g[2] == pytest.approx(w[2], rel=1e-3), f"step {s} grad norm {g[2]} != golden {w[2]}"
    # the curve is not trivial: some denoise rows recover, so advantages and gradients are non-zero
    assert all(gn > 0 for _, _, gn in got) and any(r > 0 for _, r, _ in got)
    for s in m.values():  # METHOD.md section 4 metrics and the phase split, every step
        for k in ("recovery_rate", "main_accuracy", "denoise_accuracy", "fallback_count",
                  "continuation_length_mean", "time/generate", "time/reward", "time/train", "time/refit",
                  "time/refit_fill", "time/refit_push", "time/refit_engine_wait"):
            assert k in s, k
        assert s["loss_impl_fused"] == 1.0  # the tiny config trains through the fused loss (the default)
        # where the refit went: the sender's fill and wait, and the engine's wait, are parts of it
        assert 0 < s["time/refit_fill"] <= s["time/refit"] and s["time/refit_push"] <= s["time/refit"]
        assert s["time/refit_engine_wait"] <= s["refit/engine_seconds"] <= s["time/refit"]
    assert latest_step(uninterrupted) == STEPS
    # the policy ranks kept their refit buffers (/dev/shm files) between steps and deleted them when
    # the run shut down
    assert not refit_files() - SHM_BEFORE


def test_kill9_then_sigterm_resume_matches_uninterrupted(uninterrupted, workdir):
    run = workdir / "interrupted"
    data = workdir / "problems.jsonl"

    # 1. kill -9 once step 3's checkpoint is complete
    proc = launch(run, data)
    wait_for(lambda: latest_step(run) >= 3, proc, run, 900)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stop_ray(run)
    resumed_at = latest_step(run)
    assert 3 <= resumed_at < STEPS

    # 2. resume; SIGTERM after it logged one more step: it checkpoints and exits with 75
    proc = launch(run, data)
    wait_for(lambda: max(metrics(run), default=0) > resumed_at, proc, run, 900)
    os.kill(proc.pid, signal.SIGTERM)  # the driver only (as Slurm's batch script forwards it); Ray's
    rc = wait(proc, run, 600)           # processes share its process group and must live on
    assert rc == EXIT_PREEMPTED, (run.parent / "interrupted.log").read_text()[-4000:]
    stopped_at = latest_step(run)
    assert stopped_at == max(metrics(run)), "the SIGTERM checkpoint is the last logged step"
    stop_ray(run)

    # 3. resume to the end
    rc = wait(launch(run, data), run, 900)
    assert rc == 0, (run.parent / "interrupted.log").read_text()[-4000:]

    full, part = metrics(uninterrupted), metrics(run)
    assert sorted(part) == list(range(1, STEPS + 1))
    # bit for bit, every figure but wall times: on CPU, fp32, at the same layout, the resumed run
    # is the uninterrupted run (weights, Adam state, RNG, data cursor and per-row seeds restored;
    # the engine samples each row from its own seed, so a fresh engine gives the same rows)
    for s in range(1, STEPS + 1):
        keys = {k for k in set(full[s]) | set(part[s])
                if not k.startswith(("time/", "faults/")) and k not in ("step_time_s", "refit/engine_seconds",
                                                                          "refit/peak_extra_mb")}
        assert {k: part[s].get(k) for k in keys} == {k: full[s].get(k) for k in keys}, s
    assert problems(run) == problems(uninterrupted)  # none repeated, none skipped


def is_nan(x) -> bool:
    return x == "nan"  # the metrics JSONL writes NaN (a mean over no denoise rows) as the string "nan"


def test_plain_grpo_k0_and_validation_in_the_loop(uninterrupted, workdir):
    """K = 0 is plain GRPO through the same loop: N main rows per problem, no prefixes, no
    fallbacks, and the main rows are the K > 0 run's main rows (same weights at step 1, same
    per-slot seeds). Validation runs every test_freq steps on a data file named by its stem."""
    run = workdir / "grpo"
    evalset = workdir / "e2e_eval.jsonl"
    write_problems(evalset, n=3)
    rc = wait(launch(run, workdir / "problems.jsonl", "denoise.k_denoise=0", "trainer.total_steps=2",
                     "trainer.test_freq=2", f"data.val_files=[{evalset}]", "eval.k={e2e_eval: 2}"), run, 900)
    assert rc == 0, (run.parent / "grpo.log").read_text()[-4000:]
    m, full = metrics(run), metrics(uninterrupted)
    assert sorted(m) == [1, 2]
    for s in (1, 2):
        assert (m[s]["rows"], m[s]["problems"], m[s]["fallback_count"]) == (4.0, 2.0, 0.0)
        assert m[s]["problems_without_pool"] == 0.0
        assert is_nan(m[s]["denoise_accuracy"]) and is_nan(m[s]["prefix_length_mean"])
        assert m[s]["main_continuation_length_mean"] == m[s]["continuation_length_mean"]
    assert problems(run)[1] == problems(uninterrupted)[1]
    assert m[1]["main_continuation_length_mean"] == full[1]["main_continuation_length_mean"]
    assert m[1]["main_accuracy"] == full[1]["main_accuracy"]
    # validation at step 2 only: AVG@2 over 3 problems, 6 samples generated
    assert not any(k.startswith("val/") for k in m[1])
    v = m[2]
    assert 0.0 <= v["val/e2e_eval/avg@2"] <= v["val/e2e_eval/pass@2"] <= 1.0
    assert v["val/e2e_eval/response_tokens"] > 0 and v["time/eval"] > 0
    assert v["val/overall"] == v["val/e2e_eval/avg@2"]


def test_dapo_dynamic_sampling_in_the_loop(workdir):
    """DAPO dynamic sampling through the real loop: groups whose rows are all wrong (no denoise
    prefix reached the box, rho < ~0.32) are dropped and more problems are drawn until B groups
    survive; the counts add up with the problems the step drew, and only mixed groups train."""
    run = workdir / "dapo"
    B = 2
    rc = wait(launch(run, workdir / "problems.jsonl", "algorithm.dynamic_sampling.enabled=true",
                     "trainer.total_steps=3", "denoise.rho.low=0.05", "denoise.rho.high=0.5"), run, 900)
    assert rc == 0, (run.parent / "dapo.log").read_text()[-4000:]
    m, drawn = metrics(run), problems(run)
    assert sorted(m) == [1, 2, 3]
    for s in (1, 2, 3):
        d = m[s]
        assert d["dapo/kept"] == B and d["problems"] == B and d["rows"] == B * 4
        assert d["dapo/dropped"] == d["dapo/dropped_all_wrong"] + d["dapo/dropped_all_correct"]
        assert d["dapo/dropped_all_correct"] == 0  # the random model's main rows never box
        assert len(drawn[s]) == d["dapo/gen_batches"] * B == d["dapo/kept"] + d["dapo/dropped"] + d["dapo/surplus"]
        assert d["main_accuracy"] == 0 and d["recovery_rate"] > 0  # every kept group has a recovery
    # with these rho draws some groups are all wrong (deterministic: seeded draws)
    assert sum(d["dapo/dropped"] for d in m.values()) > 0
    assert any(d["dapo/gen_batches"] > 1 for d in m.values())
