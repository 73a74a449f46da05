"""The run config's `prepare:` section, carried out in order before training:

    task        generate train.parquet, then heldout.parquet disjoint from it (prepare.task)
    warm_start  supervised warm-start of the from-scratch policy (launch/sft.py, its own config),
                exporting Hugging Face folders at the weak model's step and at the end
    pool        the weak model's wrong-solution pool for the training problems (prepare/pool.py)

Each step is skipped when its output is complete, so a re-run (or a resumed run) repeats nothing.
Task files are regenerated and compared byte for byte: files made with other settings are refused.
The warm-start exports and the pool are reused as found (like checkpoints, they belong to their run
folder): after changing prepare.warm_start or prepare.pool, use a new logging.output_dir.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from megatron_denoise.config.schema import Config

REPO = Path(__file__).resolve().parents[2]
TRAIN_FILE = "train.parquet"
HELDOUT_FILE = "heldout.parquet"


def _abs(p: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(p))).resolve()


def task_files(cfg: Config) -> tuple[Path, Path]:
    """(train, held-out) task files of the run: in prepare.task.output_dir, else <run folder>/data."""
    out = _abs(cfg.prepare.task.output_dir or Path(cfg.logging.output_dir) / "data")
    return out / TRAIN_FILE, out / HELDOUT_FILE


def warm_start_dir(cfg: Config) -> Path:
    return _abs(cfg.logging.output_dir) / "warm_start"


def find_config(path: str) -> Path:
    """A config path as given, else relative to the repository (the default run's configs)."""
    p = Path(os.path.expanduser(path))
    if p.is_file():
        return p.resolve()
    q = REPO / path
    if q.is_file():
        return q
    raise FileNotFoundError(f"prepare.warm_start.config: {path} does not exist (also looked in {REPO})")


def make_task_files(cfg: Config, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Write train.parquet and heldout.parquet (held-out problems disjoint from the training ones).
    Regeneration is cheap and deterministic: an existing file must be byte-identical to what the
    settings give, otherwise the run folder belongs to other settings and is refused."""
    import tempfile

    from megatron_denoise.prepare.tasks import write_task_file

    t = cfg.prepare.task
    train, heldout = task_files(cfg)
    train.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=train.parent) as tmp:
        fresh_train = Path(tmp) / TRAIN_FILE
        fresh_held = Path(tmp) / HELDOUT_FILE
        write_task_file(fresh_train, t.train, cfg.data.prompt, split="train", key="prepare.task.train")
        write_task_file(fresh_held, t.heldout, cfg.data.prompt, split="heldout", exclude_files=[fresh_train],
                        key="prepare.task.heldout")
        for fresh, final in ((fresh_train, train), (fresh_held, heldout)):
            if final.exists():
                if final.read_bytes() != fresh.read_bytes():
                    raise FileExistsError(f"{final} exists and differs from what prepare.task gives now (other "
                                          f"settings or prompt?): use another logging.output_dir or remove it")
            else:
                os.replace(fresh, final)
    log(f"[megatron-denoise] task files: {train} ({t.train.count} problems), {heldout} ({t.heldout.count}, disjoint)")
    return train, heldout


def warm_start_exports(cfg: Config) -> tuple[Path, Optional[Path]]:
    """(final export, weak-step export or None) folders of the warm-start stage."""
    hf = warm_start_dir(cfg) / "hf"
    ws = cfg.prepare.warm_start
    return hf / "final", (hf / f"step_{ws.weak_step}" if ws.weak_step is not None else None)


def run_warm_start(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """Supervised warm-start in its own process (megatron's process groups and global state stay
    out of the driver): `python -m megatron_denoise.launch.sft --config ... key=value ...`."""
    ws = cfg.prepare.warm_start
    final, weak = warm_start_exports(cfg)
    if (final / "config.json").is_file() and (weak is None or (weak / "config.json").is_file()):
        log(f"[megatron-denoise] reusing the warm-start exports in {final.parent}")
        return final
    out = warm_start_dir(cfg)
    overrides = [f"logging.output_dir={out}", f"checkpoint.dir={out / 'checkpoints'}"]
    if cfg.prepare.task.enabled:
        train, heldout = task_files(cfg)
        overrides += [f"sft.train_files=[{train}]", f"sft.val_files=[{heldout}]"]
    if ws.weak_step is not None:
        overrides.append(f"sft.export_hf_steps=[{ws.weak_step}]")
    overrides += list(ws.overrides)
    cmd = [sys.executable, "-m", "megatron_denoise.launch.sft", "--config", str(find_config(ws.config)), *overrides]
    log(f"[megatron-denoise] warm-start: {' '.join(cmd[1:])}")
    rc = _run_child(cmd, "warm_start", log)
    missing = [str(p) for p in (final, weak) if p is not None and not (p / "config.json").is_file()]
    if rc != 0 or missing:
        raise SystemExit(f"the warm-start stage failed (exit {rc}; missing exports: {', '.join(missing) or 'none'}; "
                         f"prepare.warm_start.weak_step must be a step the warm-start reaches); its run folder is {out}")
    return final


_STEP = re.compile(rb"\[sft\] step (\d+)/(\d+) ")


def _run_child(cmd: list[str], name: str, log: Callable[[str], None]) -> int:
    """Run the warm-start. Verbose (or outside a quiet console): its output as it comes. Otherwise
    its whole output goes to <run>/logs/<name>.log and the console shows a progress bar over its
    `[sft] step n/N` lines; on failure the log's last lines are shown with the file's name."""
    import time

    from megatron_denoise import console

    logs = console.log_dir()
    if logs is None:
        return subprocess.call(cmd)
    path = logs / f"{name}.log"
    log(f"[megatron-denoise] warm-start output: {path}")
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", desc="warm-start", file=console.bar_stream(), dynamic_ncols=True)
    with open(path, "ab") as out, open(path, "rb") as tail:
        tail.seek(0, os.SEEK_END)
        proc = subprocess.Popen([*cmd, "--verbose"], stdout=out, stderr=subprocess.STDOUT)
        seen, pending = 0, b""
        if True:
            while True:
                rc = proc.poll()
                pending += tail.read()
                done, _, pending = pending.rpartition(b"\n")  # whole lines only
                for m in _STEP.finditer(done):
                    step, total = int(m.group(1)), int(m.group(2))
                    if bar.total != total:
                        bar.total = total
                    bar.update(step - seen)
                    seen = step
                if rc is not None:
                    break
                time.sleep(0.5)
    bar.close()
    if rc != 0:
        lines = path.read_bytes().decode("utf-8", "replace").splitlines()[-25:]
        log(f"[megatron-denoise] the warm-start exited with code {rc}; the last lines of {path}:\n  "
            + "\n  ".join(lines))
    return rc


def build_pool(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """The weak model's wrong-solution pool for the training problems, at data.train_files[0]."""
    from megatron_denoise.prepare.pool import PrepareSettings, output_paths, prepare_pool, resolve_input

    p = cfg.prepare.pool
    if not cfg.data.train_files:
        raise ValueError("prepare.pool.enabled needs data.train_files[0]: the pool file the run trains on")
    target = _abs(cfg.data.train_files[0])
    if target.exists():
        log(f"[megatron-denoise] reusing the wrong-solution pool {target}")
        return target
    if p.source is not None:
        source = resolve_input(p.source, target.parent, cfg.data.prompt)
    elif cfg.prepare.task.enabled:
        source = task_files(cfg)[0]
    else:
        raise ValueError("prepare.pool.source is not set and prepare.task is off: no problems to build a pool for")
    expected, _ = output_paths(Path(source), target.parent)
    if expected != target:
        raise ValueError(f"data.train_files[0] ({target}) is not where the pool of {source} goes ({expected})")
    model = p.weak_model
    if model is None and cfg.prepare.warm_start.config and cfg.prepare.warm_start.weak_step is not None:
        model = str(warm_start_exports(cfg)[1])
    if model is None:
        from megatron_denoise.prepare.models import smollm2_path

        model = smollm2_path()
    settings = PrepareSettings(n=p.n, temperature=p.temperature, top_p=p.top_p,
                               max_tokens=p.max_tokens or cfg.data.max_response_length, seed=p.seed, dedup=p.dedup,
                               drop_truncated=p.drop_truncated, max_problems=p.max_problems or cfg.data.max_problems,
                               chunk_size=p.chunk_size, engine=cfg.rollout.engine,
                               verifier_workers=cfg.reward.num_workers)
    log(f"[megatron-denoise] wrong-solution pool: weak model {model}, {settings.n} samples per problem")
    summary = prepare_pool(source, model, settings, output_dir=target.parent, progress=cfg.logging.progress, log=log)
    log(f"[megatron-denoise] pool: weak-model accuracy {summary['accuracy']:.3f}, problems with a wrong boxed "
        f"answer {summary['share_with_wrong_boxed']:.3f}")
    return target


def prepare_run(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Every enabled preparation step, in order."""
    if cfg.prepare.task.enabled:
        make_task_files(cfg, log)
    if cfg.prepare.warm_start.config:
        run_warm_start(cfg, log)
    if cfg.prepare.pool.enabled:
        build_pool(cfg, log)
