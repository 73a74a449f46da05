"""Observability of a run: the metrics log (JSONL, TensorBoard, optional W&B) and a progress line.

    logger = MetricsLogger(run_dir, config_dict=to_dict(cfg), resume_from_step=start_step)
    progress = Progress(total_steps=cfg.trainer.total_steps, start_step=start_step)
    for step in range(start_step, total + 1):
        ...
        logger.log(step, metrics)          # every metric of METHOD.md section 4 + time/*
        progress.update(step, metrics)
    logger.close(); progress.close()

Files in `output_dir`:
- `metrics.jsonl`: one JSON object per `log` call, `{"step": s, <metric>: <float>, ...}`, flushed
  at once (a kill -9 loses at most the line being written). Non-finite values are written as the
  strings "nan", "inf", "-inf" (strict JSON has no NaN; `read_metrics` turns them back into floats).
  NaN is meaningful here: `core.metrics` reports the recovery rate of a K = 0 run as NaN.
- `tensorboard/`: event files with one scalar per metric and step.
- `wandb/`: the W&B run folder when W&B is on (offline unless `wandb_mode="online"`).

Resume without duplicates: `resume_from_step=s` keeps the JSONL lines of steps < s (the steps the
checkpoint already covers) and drops the rest, which a killed run logged after its last
checkpoint and the resumed run is about to log again. TensorBoard gets a SessionLog START event at
step s, which makes TensorBoard's reader discard older events of steps >= s (the same mechanism as
torch's `SummaryWriter(purge_step=s)`). Without `resume_from_step` the run starts fresh and an
existing `metrics.jsonl` is emptied.

W&B must never block a run without network: it is imported lazily (absent -> one warning), its
mode is forced to offline unless online is asked for explicitly, `WANDB_SILENT` is set, and all of
its calls (init, log, finish) run on one daemon thread fed by a bounded queue: `init` gets
`wandb_init_timeout` seconds, after which W&B is switched off with a warning and the run goes on.

Nothing here imports torch; TensorBoard is written with tensorboard's own event writer. One
process writes a run's metrics: the driver (or rank 0), never every rank.
"""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
import warnings
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TextIO, Union

__all__ = [
    "METRICS_FILE",
    "MetricsLogger",
    "read_metrics",
    "Progress",
    "eta_seconds",
    "format_duration",
]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"

# Keys the progress line shows (names of core.metrics.step_metrics and the trainer's time split).
REWARD_KEY = "reward_mean"
RECOVERY_KEY = "recovery_rate"
STEP_TIME_KEY = "time/step"


# ---------------------------------------------------------------------------------------------
# JSONL encoding
# ---------------------------------------------------------------------------------------------

def _to_float(key: str, value: Any) -> float:
    """A metric value as a Python float (ints, bools, numpy and 0-d torch scalars are accepted)."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}")
    if isinstance(value, Real):
        return float(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if item is not None:
        try:
            return float(item())
        except (TypeError, ValueError) as e:
            raise TypeError(f"metric {key!r}: cannot convert {type(value).__name__} to float ({e})") from None
    raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}")


def _encode(x: float) -> Union[float, str]:
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _decode(key: str, v: Any, where: str) -> float:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: metric {key!r} has non-numeric value {v!r}")
    return float(v)


def _parse_line(line: str, where: str) -> dict[str, float]:
    obj = json.loads(line)
    if not isinstance(obj, dict) or "step" not in obj:
        raise ValueError(f"{where}: not a metrics object with a 'step' key")
    step = obj.pop("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: 'step' must be an integer, got {step!r}")
    out: dict[str, float] = {"step": step}
    for k, v in obj.items():
        out[k] = _decode(k, v, where)
    return out


def read_metrics(path: Union[str, Path]) -> list[dict[str, float]]:
    """The records of a metrics.jsonl (or of the run folder holding one), one dict per step.

    Lines of the same step (e.g. training metrics and, logged separately, validation metrics) are
    merged, later keys winning; records come back sorted by step. A torn last line (the process
    was killed while writing it) is skipped with a warning; a bad line elsewhere raises ValueError
    naming the file and line number.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    by_step: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            rec = _parse_line(line, where)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{where}: skipping a torn last line (interrupted write)")
                continue
            raise ValueError(f"{where}: invalid JSON") from None
        by_step.setdefault(int(rec["step"]), {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def truncate_jsonl(path: Path, keep_below: Optional[int]) -> tuple[int, int]:
    """Rewrite a per-step JSONL file (any records with an integer "step") keeping only lines of
    steps < keep_below (all lines dropped when None): what a resumed run does to the logs of the
    steps it will redo (metrics.jsonl, problems.jsonl).

    Returns (kept, dropped) line counts. A torn line (a killed writer) is dropped; a record without
    an integer step raises ValueError naming file and line. The rewrite goes through a temporary
    file and an atomic rename, so a crash here leaves either the old or the new file.
    """
    if not path.exists():
        return 0, 0
    kept_lines: list[str] = []
    dropped = 0
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # torn line of a killed run
            continue
        step = obj.get("step") if isinstance(obj, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{path}:{i + 1}: not a record with an integer 'step'")
        if keep_below is not None and step < keep_below:
            kept_lines.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in kept_lines), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept_lines), dropped


# ---------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------

class _TensorBoardSink:
    """Scalars into a TensorBoard event file, with tensorboard's writer (no torch needed)."""

    def __init__(self, logdir: Path, resume_from_step: Optional[int]):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir), max_queue_size=64, flush_secs=10)
        if resume_from_step is not None:
            # TensorBoard's EventAccumulator purges earlier events with step >= this one.
            log = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(resume_from_step),
                                                   session_log=log))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        values = [self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        ev = self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                   summary=self._summary_pb2.Summary(value=values))
        self._writer.add_event(ev)
        # Steps take seconds or more: flushing each one costs nothing and a kill -9 loses no step.
        self._writer.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# ---------------------------------------------------------------------------------------------
# Weights & Biases (offline-safe)
# ---------------------------------------------------------------------------------------------

_WANDB_MODES = ("offline", "online", "disabled")


class _WandbSink:
    """W&B on a daemon thread: the training loop only ever puts items on a bounded queue.

    `ok` tells whether the sink is live; it turns False (with a warning) when wandb is missing, its
    init fails or times out, or a later call raises. Logged items are dropped (and counted) rather
    than waited for when the queue is full.
    """

    def __init__(self, run_dir: Path, project: str, mode: str, config: Optional[Mapping[str, Any]],
                 name: Optional[str], init_timeout: float, resume: bool):
        if mode not in _WANDB_MODES:
            raise ValueError(f"logging.wandb_mode: {mode!r} is not one of {'|'.join(_WANDB_MODES)}")
        self.ok = False
        self.dropped = 0
        self._queue: "queue.Queue[tuple[str, Any]]" = queue.Queue(maxsize=1024)
        self._run = None
        self._warned = False
        self._init_error: Optional[str] = None
        if mode == "disabled":
            return
        # Environment first: wandb reads these at import and init time. Online only when asked.
        os.environ["WANDB_MODE"] = mode
        os.environ["WANDB_SILENT"] = "true"
        os.environ.setdefault("WANDB_CONSOLE", "off")
        wandb_dir = run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(wandb_dir))
        # A stable run id in the run folder, so a resumed run continues the same W&B run.
        id_file = run_dir / WANDB_RUN_ID_FILE
        if resume and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = f"{int(time.time())}-{os.getpid()}"
            id_file.write_text(run_id + "\n")

        ready = threading.Event()
        init_kwargs = dict(project=project, mode=mode, dir=str(wandb_dir), name=name, id=run_id,
                           resume="allow", config=dict(config or {}))
        self._thread = threading.Thread(target=self._worker, args=(init_kwargs, ready),
                                        name="wandb-sink", daemon=True)
        self._thread.start()
        if not ready.wait(init_timeout):
            self._warned = True
            self._warn(f"wandb.init did not finish within {init_timeout:g} s; continuing without W&B")
            return
        if self._init_error is not None:
            self._warned = True
            self._warn(self._init_error)
            return
        self.ok = True

    def _warn(self, msg: str) -> None:
        warnings.warn(f"W&B: {msg}", RuntimeWarning, stacklevel=3)

    def _worker(self, init_kwargs: dict, ready: threading.Event) -> None:
        try:
            import wandb  # lazy: optional dependency
        except Exception as e:  # ImportError, or a broken install
            self._init_error = f"wandb is not importable ({type(e).__name__}: {e}); continuing without W&B"
            ready.set()
            return
        try:
            self._run = wandb.init(**init_kwargs)
        except Exception as e:
            self._init_error = f"wandb.init failed ({type(e).__name__}: {e}); continuing without W&B"
            ready.set()
            return
        ready.set()
        while True:
            op, arg = self._queue.get()
            try:
                if op == "log":
                    step, metrics = arg
                    self._run.log(dict(metrics), step=step)
                elif op == "finish":
                    self._run.finish()
                    return
            except Exception as e:  # never let W&B take the run down
                self.ok = False
                self._init_error = f"{op} failed ({type(e).__name__}: {e})"
                return
            finally:
                if op == "finish":
                    arg.set()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.ok:
            if self._init_error is not None and not self._warned:
                self._warned = True
                self._warn(f"{self._init_error}; W&B logging stopped")
            return
        try:
            self._queue.put_nowait(("log", (int(step), dict(metrics))))
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float) -> None:
        if not self.ok:
            return
        self.ok = False
        done = threading.Event()
        try:
            self._queue.put(("finish", done), timeout=timeout)
        except queue.Full:
            self._warn("queue full at close; W&B run not finished cleanly")
            return
        if not done.wait(timeout):
            self._warn(f"wandb finish did not return within {timeout:.0f} s; the offline run folder "
                       f"can be uploaded later with `wandb sync`")


# ---------------------------------------------------------------------------------------------
# The logger
# ---------------------------------------------------------------------------------------------

class MetricsLogger:
    """Writes each step's metrics to JSONL, TensorBoard and (optionally) W&B.

    resume_from_step: the first step the (resumed) run will log; metrics.jsonl lines of steps >=
        it are dropped on open and TensorBoard is told to purge them. None: a fresh run.
    config_dict: the resolved configuration, written to `config.json` next to the metrics and
        sent to W&B.
    """

    def __init__(self, output_dir: Union[str, Path], *, jsonl: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "megatron-denoise", wandb_mode: str = "offline",
                 config_dict: Optional[Mapping[str, Any]] = None, resume_from_step: Optional[int] = None,
                 run_name: Optional[str] = None, wandb_init_timeout: float = 60.0,
                 wandb_close_timeout: float = 30.0):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resume_from_step = resume_from_step
        self._closed = False
        self._wandb_close_timeout = wandb_close_timeout
        if config_dict is not None:
            tmp = self.output_dir / "config.json.tmp"
            tmp.write_text(json.dumps(config_dict, indent=2, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, self.output_dir / "config.json")

        self._jsonl: Optional[TextIO] = None
        self.jsonl_path = self.output_dir / METRICS_FILE
        if jsonl:
            kept, dropped = truncate_jsonl(self.jsonl_path, resume_from_step)
            if dropped and resume_from_step is not None:
                print(f"[metrics] resume at step {resume_from_step}: kept {kept} logged steps, "
                      f"dropped {dropped} line(s) of steps >= {resume_from_step}", file=sys.stderr)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

        self._tb: Optional[_TensorBoardSink] = None
        if tensorboard:
            try:
                self._tb = _TensorBoardSink(self.output_dir / TENSORBOARD_DIR, resume_from_step)
            except ImportError as e:
                warnings.warn(f"tensorboard is not importable ({e}); TensorBoard logging is off", RuntimeWarning)

        self._wandb: Optional[_WandbSink] = None
        if wandb:
            self._wandb = _WandbSink(self.output_dir, wandb_project, wandb_mode, config_dict, run_name,
                                     wandb_init_timeout, resume=resume_from_step is not None)

    @classmethod
    def from_config(cls, logging_cfg, config_dict: Optional[Mapping[str, Any]] = None,
                    resume_from_step: Optional[int] = None, run_name: Optional[str] = None) -> "MetricsLogger":
        """From a `LoggingConfig` (megatron_denoise/config/schema.py)."""
        return cls(logging_cfg.output_dir, jsonl=logging_cfg.jsonl, tensorboard=logging_cfg.tensorboard,
                   wandb=logging_cfg.wandb, wandb_project=logging_cfg.wandb_project,
                   wandb_mode=logging_cfg.wandb_mode, config_dict=config_dict,
                   resume_from_step=resume_from_step, run_name=run_name)

    @property
    def wandb_active(self) -> bool:
        return self._wandb is not None and self._wandb.ok

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (name -> number) for `step`; the JSONL line is flushed before returning."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log after close()")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
        if "step" in metrics:
            # The trainer's step dict may carry its own step number; it must agree with `step`.
            if _to_float("step", metrics["step"]) != step:
                raise ValueError(f"metrics['step'] = {metrics['step']!r} disagrees with step={step}")
            metrics = {k: v for k, v in metrics.items() if k != "step"}
        values = {str(k): _to_float(str(k), v) for k, v in metrics.items()}
        if self._jsonl is not None:
            rec: dict[str, Any] = {"step": step}
            rec.update({k: _encode(v) for k, v in values.items()})
            self._jsonl.write(json.dumps(rec, allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.log(step, values)
        if self._wandb is not None:
            self._wandb.log(step, values)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.flush()
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close(self._wandb_close_timeout)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

def eta_seconds(steps_done: int, steps_left: int, elapsed: float) -> float:
    """Remaining time at the mean pace of the steps done in this process (NaN before the first)."""
    if steps_done <= 0:
        return math.nan
    return elapsed / steps_done * max(steps_left, 0)


def format_duration(seconds: float) -> str:
    """`1h02m03s`, `4m05s`, `7s`; `?` for NaN/inf."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


class Progress:
    """Step progress with reward, recovery rate, step time and ETA.

    On a terminal: a rich progress bar. Otherwise (CI logs, Slurm output files): one plain line per
    step, e.g. `step 3/10 | reward 0.417 | recovery 0.250 | 12.3 s/step | ETA 1m26s`.
    The ETA uses the mean wall time of the steps this process ran (the first step of a resumed
    run is not charged for the steps before it).
    """

    def __init__(self, total_steps: int, start_step: int = 1, *, enabled: bool = True,
                 stream: Optional[TextIO] = None, use_rich: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._t0 = clock()
        self._done = 0
        self._rich = None
        if not enabled:
            return
        if use_rich is None:
            use_rich = bool(getattr(self._stream, "isatty", lambda: False)())
        if use_rich:
            try:
                self._start_rich()
            except ImportError:
                self._rich = None

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        console = Console(file=self._stream)
        self._rich = RichProgress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                                  TextColumn("{task.fields[info]}"), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=console, transient=False)
        self._rich.start()
        self._task = self._rich.add_task("train", total=self.total_steps,
                                         completed=max(self.start_step - 1, 0), info="")

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        """The status text of `step` (also used as the rich bar's info field)."""
        elapsed = self._clock() - self._t0
        eta = eta_seconds(self._done, self.total_steps - step, elapsed)
        step_time = metrics.get(STEP_TIME_KEY)
        if step_time is None and self._done:
            step_time = elapsed / self._done
        skipped = metrics.get("skipped") or 0.0
        note = (f" | {skipped:.0f} update(s) skipped: loss or grad norm not finite (trainer.nan_guard)"
                if skipped > 0 else "")
        return (f"step {step}/{self.total_steps} | reward {_fmt(metrics.get(REWARD_KEY))} | "
                f"recovery {_fmt(metrics.get(RECOVERY_KEY))} | {_fmt(step_time, '.1f')} s/step{note} | "
                f"ETA {format_duration(eta)}")

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Call once after each finished step."""
        if not self.enabled:
            return
        self._done += 1
        text = self.line(step, metrics)
        if self._rich is not None:
            info = text.split(" | ", 1)[1].rsplit(" | ETA", 1)[0]
            self._rich.update(self._task, completed=step, info=info)
        else:
            print(text, file=self._stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
