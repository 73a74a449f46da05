"""Does DenoiseRL beat GRPO? Arms x seeds on the science testbed, at a matched rollout budget.

    python benchmarks/science/run.py --arms grpo,denoise --seeds 3 [--eval-set FILE ...] [--out DIR] \\
        [--config configs/testbed-denoise-grpo-cpu-1n1g.yaml] [--steps N] [--rows 8] [--k 4] [key=value ...]

1. Preparation once, shared by every arm and seed (`train --prepare-only`): the task files, the
   supervised warm-start, the weak model's pool. Every arm starts from the same warm-start export
   and trains on the same problems with the same pool.
2. The warm-start itself is evaluated on every eval set (the "before RL" row).
3. Each arm x seed trains `--steps` steps (seed s sets trainer/data/rollout/denoise seeds), with the
   eval sets as validation files: every final policy is scored with AVG@k on every set after its
   last step (per problem, in <run>/eval/step_<n>.json), and its Hugging Face export is kept in
   <run>/hf_export, so other splits can be scored later with launch/evaluate.py --sets FILE.
4. report.md (mean +- std over seeds of the final accuracy per set and per difficulty bucket,
   recovery rate, tokens generated, wall time) and PNG curves with one line per arm (mean over
   seeds, band = min..max), written to --out; results.json holds every number the report uses.

The arms (benchmarks/science/arms.py): grpo, denoise (the paper's method), denoise-k2/-k4,
rho0.2/0.5/0.8, rho-uniform, shift, none, dapo, grpo-dapo; beyond the paper (issue 18):
denoise-adaptive, denoise-online, denoise-mixed, denoise-correct and their control denoise-p64. `--eval-set` defaults to the task's
held-out split. A finished run (outputs.json present) is not run again: re-running the command
after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from arms import arm_overrides  # noqa: E402

CURVES = [("reward_mean", "reward (training rows)"), ("main_accuracy", "main-row accuracy"),
          ("denoise_accuracy", "denoise-row accuracy"), ("recovery_rate", "recovery rate"),
          ("continuation_length_mean", "response length (tokens)"), ("entropy", "entropy"),
          ("val/overall", "held-out AVG@k")]


def _run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in `log`; raise with the log's tail on failure."""
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}\nlast lines of {log}:\n{tail}")
    return time.time() - t0


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".parquet", ".jsonl", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _buckets(path: str) -> list[str] | None:
    from megatron_denoise.data.io import read_table
    from megatron_denoise.prepare.tasks import difficulty_buckets

    return difficulty_buckets(read_table(path))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _fmt(xs: list[float], pct: bool = True) -> str:
    m, sd = _mean_std(xs)
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if pct else f"{m:.3g} ± {sd:.2g}"


def _metrics(run: Path) -> list[dict]:
    rows = []
    with open(run / "metrics.jsonl") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _eval_scores(result: dict, eval_sets: list[str]) -> dict:
    """{set stem: {"avg": AVG@k, "buckets": {bucket: mean of per-problem scores}}}."""
    out = {}
    for path in eval_sets:
        stem = _stem(path)
        r = result["sets"][stem]
        per = r["per_problem"]
        b = _buckets(path)
        by: dict[str, list[float]] = {}
        if b is not None and len(b) == len(per):
            for bucket, score in zip(b, per):
                by.setdefault(bucket, []).append(score)
        out[stem] = {"avg": r["avg_at_k"], "k": r["k"], "buckets": {k: sum(v) / len(v) for k, v in sorted(by.items())}}
    return out


def _final_eval(run: Path) -> dict:
    steps = sorted((int(p.stem.split("_")[1]), p) for p in (run / "eval").glob("step_*.json"))
    return json.loads(steps[-1][1].read_text())


def summarise_run(run: Path, eval_sets: list[str]) -> dict:
    rows = [r for r in _metrics(run) if "rows" in r]  # training steps (step 0 is validation only)
    generated = sum(r["rows"] * r["continuation_length_mean"] for r in rows)
    # the denoise rows' pass rate: recovery_rate (wrong prefixes) or correct_prefix_pass_rate (correct ones)
    rec = [r.get("recovery_rate", r.get("correct_prefix_pass_rate")) for r in rows]
    rec = [x for x in rec if isinstance(x, float) and not math.isnan(x)]

    def mean_of(key):  # a per-step figure averaged over the steps that have it (NaN: none)
        xs = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        return sum(xs) / len(xs) if xs else float("nan")
    last = rows[-10:]
    return {
        "final": _eval_scores(_final_eval(run), eval_sets),
        "tokens_generated": generated,
        "recovery_rate": sum(rec) / len(rec) if rec else float("nan"),
        "fallbacks_per_step": mean_of("fallback_count"),
        "online_share": mean_of("online_share"),       # issue 18 arms only (NaN otherwise)
        "rho_mean": mean_of("rho_mean"),
        "train_accuracy_first10": sum(r["accuracy"] for r in rows[:10]) / max(1, len(rows[:10])),
        "train_accuracy_last10": sum(r["accuracy"] for r in last) / max(1, len(last)),
        "step_seconds": sum(r.get("time/step", 0.0) for r in rows) / max(1, len(rows)),
        "run_minutes": (float((run / "science_seconds.txt").read_text()) / 60
                        if (run / "science_seconds.txt").is_file() else float("nan")),
        "curves": {k: [(int(r["step"]), r[k]) for r in _metrics(run) if isinstance(r.get(k), (int, float))]
                   for k, _ in CURVES},
    }


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, title in CURVES:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        drawn = False
        for arm, seeds in results["arms"].items():
            series = [dict(s["curves"].get(key, [])) for s in seeds.values()]
            steps = sorted(set().union(*[set(s) for s in series])) if series else []
            steps = [t for t in steps if all(t in s and not math.isnan(s[t]) for s in series)]
            if not steps:
                continue
            vals = [[s[t] for s in series] for t in steps]
            w = 1 if key == "val/overall" else 5  # moving average over 5 steps for per-step curves
            sm = lambda xs: [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]  # noqa: E731
            mean = sm([sum(v) / len(v) for v in vals])
            lo, hi = sm([min(v) for v in vals]), sm([max(v) for v in vals])
            line, = ax.plot(steps, mean, label=f"{arm} (n={len(series)})", marker="o" if w == 1 else None)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        if key == "val/overall":  # the warm-start's held-out accuracy, before any RL step
            before = sum(b["avg"] for b in results["baseline"].values()) / len(results["baseline"])
            ax.axhline(before, color="gray", linestyle="--", label="warm-start (before RL)")
            ax.legend()
        ax.set_title(title + (" (5-step moving average)" if key != "val/overall" else ""))
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
        p = out / f"{key.replace('/', '_')}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def report(results: dict, out: Path, pngs: list[Path]) -> str:
    sets = results["eval_sets"]
    lines = [f"# Science benchmark: {', '.join(results['arms'])} x {results['seeds']} seeds", "",
             f"Command: `{results['command']}`", "",
             f"Testbed: {results['config']}; {results['steps']} RL steps of {results['problems_per_step']} problems x "
             f"{results['rows']} rows from one warm-start; eval AVG@k at temperature {results['eval_temperature']}, "
             f"top_p {results['eval_top_p']}. Mean ± std over seeds (percent).", ""]
    head = "| arm | " + " | ".join(f"{_stem(s)} AVG@{results['baseline'][_stem(s)]['k']}" for s in sets) + \
           " | train acc. first 10 → last 10 steps | recovery rate | tokens generated | s/step |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    base = results["baseline"]
    lines.append("| warm-start (before RL) | " + " | ".join(f"{100 * base[_stem(s)]['avg']:.1f}" for s in sets)
                 + " | | | | |")
    for arm, seeds in results["arms"].items():
        runs = list(seeds.values())
        cells = [_fmt([r["final"][_stem(s)]["avg"] for r in runs]) for s in sets]
        first = _fmt([r["train_accuracy_first10"] for r in runs])
        last = _fmt([r["train_accuracy_last10"] for r in runs])
        rec = [r["recovery_rate"] for r in runs if not math.isnan(r["recovery_rate"])]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {first} → {last} | "
                     f"{_fmt(rec) if rec else '—'} | {_fmt([r['tokens_generated'] for r in runs], pct=False)} | "
                     f"{_mean_std([r['step_seconds'] for r in runs])[0]:.1f} |")
    rhos = {arm: [r.get("rho_mean", float("nan")) for r in seeds.values()] for arm, seeds in results["arms"].items()}
    if any(not math.isnan(x) for v in rhos.values() for x in v):  # issue 18 arms: where the prefixes came from
        lines += ["", "Prefix sources (per step, mean over steps and seeds; the recovery-rate column is the correct-"
                  "prefix pass rate for denoise-correct):", "",
                  "| arm | fallback rows / step | share of prefixes from the online pool | mean rho drawn |",
                  "|---|---|---|---|"]
        for arm, seeds in results["arms"].items():
            runs = list(seeds.values())
            cell = lambda k: (lambda xs: f"{_mean_std(xs)[0]:.3g}" if xs else "—")(  # noqa: E731
                [r.get(k, float("nan")) for r in runs if not math.isnan(r.get(k, float("nan")))])
            lines.append(f"| {arm} | {cell('fallbacks_per_step')} | {cell('online_share')} | {cell('rho_mean')} |")
    for s in sets:
        stem = _stem(s)
        buckets = sorted(base[stem]["buckets"])
        if not buckets:
            continue
        lines += ["", f"Per difficulty bucket, {stem} (AVG@k, percent):", "",
                  "| arm | " + " | ".join(buckets) + " |", "|" + "---|" * (len(buckets) + 1),
                  "| warm-start | " + " | ".join(f"{100 * base[stem]['buckets'][b]:.1f}" for b in buckets) + " |"]
        for arm, seeds in results["arms"].items():
            runs = list(seeds.values())
            lines.append(f"| {arm} | " + " | ".join(_fmt([r["final"][stem]["buckets"].get(b, float('nan')) for r in runs])
                                                    for b in buckets) + " |")
    lines += ["", "Per seed (final AVG@k on each set):", ""]
    for arm, seeds in results["arms"].items():
        for seed, r in seeds.items():
            lines.append(f"- {arm} seed {seed}: " + ", ".join(f"{_stem(s)} {100 * r['final'][_stem(s)]['avg']:.1f}"
                                                             for s in sets))
    timed = [r["run_minutes"] for seeds in results["arms"].values() for r in seeds.values()
             if not math.isnan(r["run_minutes"])]
    untimed = sum(len(seeds) for seeds in results["arms"].values()) - len(timed)
    lines += ["", f"Wall time of this invocation: {results['wall_minutes']:.1f} min (preparation "
              f"{results['prepare_minutes']:.1f} min; runs made earlier are reused). The runs' own times add up to "
              f"{sum(timed):.1f} min" + (f" ({untimed} runs made before run times were recorded not counted)"
                                          if untimed else "") + ".", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="grpo,denoise", help="comma-separated arm names (arms.py)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..n per arm")
    ap.add_argument("--eval-set", action="append", default=None, help="eval file (repeatable; default: held-out split)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "science")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "testbed-denoise-grpo-cpu-1n1g.yaml")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the config's)")
    ap.add_argument("--rows", type=int, default=8, help="rows per problem, every arm (N + K)")
    ap.add_argument("--k", type=int, default=4, help="AVG@k samples per eval problem")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args(argv)
    args.config = args.config.resolve()  # the runs are started from the repository root
    t_start = time.time()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        arm_overrides(a, args.rows)  # unknown arm names fail before anything runs
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    from megatron_denoise.config.loader import load_config

    shared = out / "shared"
    base_over = list(args.overrides) + ([f"trainer.total_steps={args.steps}"] if args.steps else [])
    cfg = load_config(args.config, base_over + [f"logging.output_dir={shared}"])
    print(f"[science] preparation (task, warm-start, pool) in {shared}", flush=True)
    _run([py, "-m", "megatron_denoise.launch.train", "--config", str(args.config), "--prepare-only",
          *base_over, f"logging.output_dir={shared}"], out / "logs" / "prepare.log")
    prepare_minutes = (time.time() - t_start) / 60
    from megatron_denoise.prepare.stage import task_files, warm_start_exports

    warm = warm_start_exports(cfg)[0]
    train_file = Path(os.path.expanduser(cfg.data.train_files[0])).resolve()
    eval_sets = [str(Path(p).resolve()) for p in (args.eval_set or [str(task_files(cfg)[1])])]
    k_map = "{" + ", ".join(f"{_stem(s)}: {args.k}" for s in eval_sets) + "}"

    # before RL: the warm-start on every eval set
    baseline_dir = out / "baseline"
    if not (baseline_dir / "eval_results.json").is_file():
        print(f"[science] evaluating the warm-start {warm}", flush=True)
        _run([py, "-m", "megatron_denoise.launch.evaluate", "--model", str(warm), "--config", str(args.config),
              "--sets", *eval_sets, "--k", str(args.k), "--output", str(baseline_dir), *base_over,
              f"logging.output_dir={shared}"], out / "logs" / "baseline.log")
    baseline = _eval_scores(json.loads((baseline_dir / "eval_results.json").read_text()), eval_sets)

    results: dict = {"arms": {}, "eval_sets": eval_sets, "seeds": args.seeds, "rows": args.rows,
                     "steps": cfg.trainer.total_steps, "problems_per_step": cfg.data.problems_per_step,
                     "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
                     "eval_temperature": cfg.eval.temperature, "eval_top_p": cfg.eval.top_p, "baseline": baseline,
                     "command": "python benchmarks/science/run.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for seed in range(1, args.seeds + 1):
        for arm in arms:
            run = out / arm / f"seed_{seed}"
            if not (run / "outputs.json").is_file():
                print(f"[science] {arm} seed {seed} -> {run}", flush=True)
                over = [f"logging.output_dir={run}", f"model.hf_path={warm}", f"data.train_files=[{train_file}]",
                        "prepare.task.enabled=false", "prepare.warm_start.config=null", "prepare.pool.enabled=false",
                        f"data.val_files=[{', '.join(eval_sets)}]",
                        f"eval.k={k_map}", "trainer.val_before_train=false", "checkpoint.resume=auto",
                        f"trainer.seed={seed}", f"data.seed={seed}", f"rollout.seed={seed}", f"denoise.seed={seed}",
                        *arm_overrides(arm, args.rows)]
                secs = _run([py, "-m", "megatron_denoise.launch.train", "--config", str(args.config), *base_over, *over],
                            out / "logs" / f"{arm}-seed{seed}.log")
                (run / "science_seconds.txt").write_text(f"{secs:.1f}\n")  # a re-run of the command reports it
                print(f"[science]   done in {secs / 60:.1f} min", flush=True)
            results["arms"].setdefault(arm, {})[seed] = summarise_run(run, eval_sets)
    results["prepare_minutes"] = prepare_minutes
    results["wall_minutes"] = (time.time() - t_start) / 60
    pngs = plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results, out, pngs))
    print(f"[science] report: {out / 'report.md'}; curves: {', '.join(p.name for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
