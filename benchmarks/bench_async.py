"""rollout.async one_step vs off: the same short training run twice, per-step wall time side by side.

    python benchmarks/bench_async.py --shared runs/science/shared --steps 12
    python benchmarks/bench_async.py --shared DIR --config configs/testbed-denoise-grpo-cpu-1n1g.yaml key=value ...

--shared is a finished preparation of the testbed (what `train --prepare-only` or the science
benchmark leaves: data/train.with_wrong_boxed.parquet and warm_start/hf/final), so no run
repeats the task, warm-start and pool stages. No validation, no checkpoints, no export: the
figures are the steps themselves. The first `--skip` steps (engine warm-up; one_step's first
step generates synchronously) are left out of the means. Alternating order over `--rounds`
rounds evens out a shared machine's load drift; still, prefer a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("time/step", "time/generate", "time/reward", "time/old_logprob", "time/train", "time/refit",
        "time/generate_wait")


def run(mode: str, args, out: Path) -> dict:
    shared = Path(args.shared).resolve()
    over = [f"logging.output_dir={out}", f"model.hf_path={shared / 'warm_start' / 'hf' / 'final'}",
            f"data.train_files=[{shared / 'data' / 'train.with_wrong_boxed.parquet'}]",
            "prepare.task.enabled=false", "prepare.warm_start.config=null", "prepare.pool.enabled=false",
            "trainer.val_before_train=false", "trainer.test_freq=0", f"trainer.total_steps={args.steps}",
            "checkpoint.save_interval=0", "checkpoint.export_hf_at_end=false", "checkpoint.resume=none",
            "logging.progress=false", "logging.tensorboard=false", f"rollout.async={mode}", *args.overrides]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "megatron_denoise.launch.train", "--config", str(args.config), *over],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if int(r["step"]) > args.skip]
    res = {k: statistics.mean(float(r[k]) for r in rows) for k in KEYS if all(k in r for r in rows)}
    res["steps_measured"] = len(rows)
    res["wall_s"] = time.time() - t0
    res["staleness"] = statistics.mean(float(r.get("async/staleness_steps", 0.0)) for r in rows)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "testbed-denoise-grpo-cpu-1n1g.yaml"))
    ap.add_argument("--shared", required=True, help="a finished testbed preparation (data/, warm_start/hf/final)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="leading steps left out of the means")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = ap.parse_args(argv)
    results: dict = {"off": [], "one_step": []}
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        for i in range(args.rounds):
            order = ("off", "one_step") if i % 2 == 0 else ("one_step", "off")
            for mode in order:
                r = run(mode, args, Path(tmp) / f"{mode}-{i}")
                results[mode].append(r)
                print(f"round {i + 1} {mode:8s} " + "  ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in r.items()
                                                            if k.startswith("time/")), flush=True)
    mean = {m: statistics.mean(r["time/step"] for r in rs) for m, rs in results.items()}
    print(f"\nper-step wall time over steps {args.skip + 1}..{args.steps} (mean of {args.rounds} round(s)): "
          f"off {mean['off']:.2f} s, one_step {mean['one_step']:.2f} s -> one_step / off = "
          f"{mean['one_step'] / mean['off']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "mean_step_s": mean,
                                               "command": " ".join(sys.argv)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
