"""The main job's RL steps at an earlier commit and at this checkout, side by side in one run.

    python benchmarks/bench_vs_commit.py                       # issue 16's commit, SmolLM2 main job
    python benchmarks/bench_vs_commit.py --old 42f71e3 --config configs/tiny-denoise-grpo-cpu-1n1g.yaml \\
        --steps 4 --skip 1 --rounds 1 [key=value ...]

Issue 16 measured the README's main job of its day (configs/tiny-denoise-grpo-cpu-1n1g.yaml,
SmolLM2-135M, the trainer's embedded default at 42f71e3) and asks for steps at least 3x faster.
Only part of the old path is still selectable by configuration (bench_step.py's --baseline), so
this runs the old code itself: the commit is exported with `git archive` into
runs/bench_vs_commit/<sha>/tree (outside git; nothing in the repository changes) and gets its own
virtual environment from its own launch/install.sh (same pins as here; the pip cache makes it a
few minutes once). Each run is that tree's `python -m megatron_denoise.launch.train` on the config
of the same name in its own tree, with `logging.output_dir` and `trainer.total_steps` set and the
given key=value overrides, so each commit runs its main job as its own defaults make it (data
preparation included, not timed). Runs alternate old, new per round; the figures are the means of
each run's metrics.jsonl over the steps after `--skip` (step 1 warms the engine and allocator).
The config's shape (rows, response cap, model) is printed for both trees: compare like with like.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISSUE_16_COMMIT = "42f71e3"   # the commit whose main job issue 16 measured (its "~55 s" step)
SHAPE_KEYS = ("model.hf_path", "data.problems_per_step", "data.max_response_length", "denoise.n_main",
              "denoise.k_denoise", "trainer.micro_batch_tokens", "rollout.engine")
LENGTH_KEY = "continuation_length_mean"


def export_tree(sha: str, root: Path) -> Path:
    """`git archive` of `sha` into root/tree (once); returns the tree."""
    tree = root / "tree"
    stamp = root / "exported"
    if stamp.exists():
        return tree
    tree.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as fh:
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha], stdout=fh, check=True)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(tree, filter="data")
    stamp.write_text(sha + "\n")
    return tree


def venv_python(tree: Path, venv: Path) -> Path:
    """The tree's own install script into `venv` (idempotent: it checks its stamp)."""
    env = dict(os.environ, VENV=str(venv))
    proc = subprocess.run(["bash", str(tree / "launch" / "install.sh")], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"install of {tree} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return venv / "bin" / "python"


def config_shape(python: Path, tree: Path, config: Path) -> dict:
    """The shape keys of the config as that tree's own loader resolves it."""
    code = ("import json, sys\n"
            "from megatron_denoise.config.loader import load_config\n"
            "cfg = load_config(sys.argv[1])\n"
            "out = {}\n"
            "for key in sys.argv[2:]:\n"
            "    obj = cfg\n"
            "    for part in key.split('.'):\n"
            "        obj = getattr(obj, part, None)\n"
            "    out[key] = str(getattr(obj, 'value', obj))\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([str(python), "-c", code, str(config), *SHAPE_KEYS], cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def embedded_default(tree: Path) -> str | None:
    """The config file name a tree's `launch/train.py` runs without --config (its DEFAULT_CONFIG)."""
    m = re.search(r'DEFAULT_CONFIG\s*=\s*REPO\s*/\s*"configs"\s*/\s*"([^"]+)"', (tree / "launch" / "train.py").read_text())
    return m.group(1) if m else None


def run(label: str, python: Path, tree: Path, config: Path, args, out: Path) -> dict:
    """One main job in `tree`. Where the config is the tree's embedded default it runs without
    --config, as its README's main command did (at 42f71e3 only that path prepared the pool)."""
    over = [f"logging.output_dir={out}", f"trainer.total_steps={args.steps}", *args.overrides]
    cmd = [str(python), "-m", "megatron_denoise.launch.train"]
    if embedded_default(tree) != config.name:
        cmd += ["--config", str(config)]
    t0 = time.time()
    proc = subprocess.run([*cmd, *over], cwd=tree, capture_output=True, text=True)
    (out.parent / f"{out.name}.console.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{label} run failed ({proc.returncode}), console in {out.parent / (out.name + '.console.txt')}:\n"
                 f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time/step" in r and int(r["step"]) > args.skip]
    if not rows:
        sys.exit(f"{label}: no step after --skip {args.skip} in {out / 'metrics.jsonl'}")
    keys = sorted({k for r in rows for k in r if k.startswith("time/") or k == LENGTH_KEY})
    res = {k: statistics.mean(float(r[k]) for r in rows) for k in keys if all(k in r for r in rows)}
    res["steps"] = [float(r["time/step"]) for r in rows]
    res["wall_s"] = time.time() - t0
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=ISSUE_16_COMMIT, help="the earlier commit (default: issue 16's)")
    ap.add_argument("--config", default="configs/tiny-denoise-grpo-cpu-1n1g.yaml",
                    help="config path relative to each tree (each commit runs its own file of this name)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip", type=int, default=1, help="leading steps left out of the means")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = ap.parse_args(argv)
    if args.steps <= args.skip:
        sys.exit(f"--steps {args.steps} must exceed --skip {args.skip}")

    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.old], capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    root = REPO / "runs" / "bench_vs_commit" / sha[:12]
    old_tree = export_tree(sha, root)
    old_py = venv_python(old_tree, root / "venv")
    new_py = venv_python(REPO, Path(os.environ.get("VENV", REPO / ".venv")))
    sides = {f"old {sha[:7]}": (old_py, old_tree), f"new {head}": (new_py, REPO)}

    for label, (py, tree) in sides.items():
        print(f"{label}: {config_shape(py, tree, tree / args.config)}", flush=True)

    results: dict[str, list[dict]] = {label: [] for label in sides}
    work = Path(tempfile.mkdtemp(prefix="bench_vs_commit."))
    for rnd in range(args.rounds):
        for i, (label, (py, tree)) in enumerate(sides.items()):
            res = run(label, py, tree, tree / args.config, args, work / f"r{rnd}_{i}")
            results[label].append(res)
            print(f"round {rnd} {label}: steps {', '.join(f'{s:.1f}' for s in res['steps'])} s "
                  f"(run wall {res['wall_s']:.0f} s)", flush=True)

    def mean(label: str, key: str) -> float:
        vals = [r[key] for r in results[label] if key in r]
        return statistics.mean(vals) if vals else float("nan")

    (old_label, new_label) = sides
    keys = sorted(set(results[old_label][0]) & set(results[new_label][0]) - {"steps", "wall_s"})
    print(f"\nmeans over steps > {args.skip}, {args.rounds} round(s) ({args.config}):")
    print(f"{'':28s} {old_label:>14s} {new_label:>14s} {'old/new':>8s}")
    for key in ["time/step"] + [k for k in keys if k != "time/step"]:
        o, n = mean(old_label, key), mean(new_label, key)
        ratio = o / n if n else float("nan")
        print(f"{key:28s} {o:14.2f} {n:14.2f} {ratio:8.2f}")
    only = sorted((set(results[old_label][0]) ^ set(results[new_label][0])) - {"steps", "wall_s"})
    if only:
        print(f"(keys logged by one side only: {', '.join(only)})")
    speedup = mean(old_label, "time/step") / mean(new_label, "time/step")
    print(f"\nmain job step: {speedup:.2f}x faster at {head} than at {sha[:7]}")
    print(f"runs kept in {work}")
    if args.json:
        Path(args.json).write_text(json.dumps({"old": sha, "new": head, "results": results, "speedup": speedup}, indent=1))


if __name__ == "__main__":
    main()
