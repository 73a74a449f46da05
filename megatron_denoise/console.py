"""What a run's console shows, and where everything else goes (issue 17).

By default the console carries the project's own lines (the phases, one line per step, the
held-out results, where the outputs went) and progress bars for the long phases. Everything the
libraries underneath write (vLLM's CPU backend, Ray, megatron-core deprecations, torch
FutureWarnings, C-level prints) goes to per-process log files in the run folder:

    <run>/logs/driver.log           the launcher's process: Python warnings, every logger, fd 1/2
                                    (the pool stage's in-process vLLM, Ray's driver, the verifier
                                    workers it starts)
    <run>/logs/warm_start.log       the warm-start subprocess, whole
    <run>/logs/<worker>.log         each Ray worker (policy_rank<r>, rollout_<replica>_<tp>)

`--verbose` (MDN_VERBOSE=1) changes nothing: every line reaches the console as before, Ray
forwards its workers' output to the driver.

How: `quiet_console(run_dir)` points the process's file descriptors 1 and 2 (and sys.stderr) at
driver.log and gives sys.stdout a private duplicate of the original stdout, so `print` reaches the
person and every other writer (libraries, C code, child processes) the log. Progress bars write
to `bar_stream()` (the original stderr). On exit (or an error) the original streams come back
before the interpreter prints any traceback, so errors are always seen. Worker processes call
`redirect_worker_output(name)` first thing; it reads MDN_LOG_DIR, which the driver exports (and
Ray's runtime env passes on, like every MDN_* variable).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional, TextIO

VERBOSE_ENV = "MDN_VERBOSE"
LOG_DIR_ENV = "MDN_LOG_DIR"
_bars: Optional[TextIO] = None  # the console's stderr while quiet_console is active


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "False")


def log_dir() -> Optional[Path]:
    """The run's log folder when output is being filtered (None: verbose, or no run set up)."""
    d = os.environ.get(LOG_DIR_ENV)
    return Path(d) if d and not is_verbose() else None


def bar_stream() -> TextIO:
    """Where progress bars go: the person's stderr, also while fd 2 points at the log."""
    return _bars if _bars is not None else sys.stderr


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "worker"


def _route_python_logging(stream: TextIO) -> logging.Handler:
    """Every logger and every warning of this process into `stream` (INFO and above)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return handler


@contextlib.contextmanager
def quiet_console(run_dir: str | os.PathLike, verbose: bool = False, name: str = "driver") -> Iterator[Optional[Path]]:
    """Filter third-party output of this process (and of the processes it starts) into
    <run_dir>/logs/<name>.log for the duration; yields the log file (None when verbose)."""
    keys = (VERBOSE_ENV, LOG_DIR_ENV, "VLLM_CONFIGURE_LOGGING", "TRANSFORMERS_VERBOSITY")
    saved_env = {k: os.environ.get(k) for k in keys}  # put back on exit (a test, a notebook goes on)
    try:
        yield from _quiet_console(run_dir, verbose, name)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet_console(run_dir: str | os.PathLike, verbose: bool, name: str) -> Iterator[Optional[Path]]:
    global _bars
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        yield None
        return
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ[LOG_DIR_ENV] = str(logs.resolve())
    # vLLM's own handler would print to the console's stdout; without it its loggers propagate
    # to the root logger, which writes to the log file
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    path = logs / f"{name}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = (os.dup(1), os.dup(2))
    saved_py = (sys.stdout, sys.stderr)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console_out = io.TextIOWrapper(os.fdopen(os.dup(saved_fds[0]), "wb", buffering=0), line_buffering=True,
                                   encoding=getattr(saved_py[0], "encoding", None) or "utf-8", errors="replace")
    console_err = io.TextIOWrapper(os.fdopen(os.dup(saved_fds[1]), "wb", buffering=0), line_buffering=True,
                                   encoding=getattr(saved_py[1], "encoding", None) or "utf-8", errors="replace")
    # a terminal stays a terminal for rich/tqdm (isatty of the duplicated descriptor)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    log_stream = io.TextIOWrapper(os.fdopen(os.dup(2), "wb", buffering=0), line_buffering=True,
                                  encoding="utf-8", errors="replace")
    sys.stdout, sys.stderr = console_out, log_stream
    _bars = console_err
    handler = _route_python_logging(log_stream)
    old_showwarning = warnings.showwarning
    try:
        yield path
    finally:
        for s in (console_out, console_err, log_stream):
            with contextlib.suppress(Exception):
                s.flush()
        logging.getLogger().removeHandler(handler)
        logging.captureWarnings(False)
        warnings.showwarning = old_showwarning
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        sys.stdout, sys.stderr = saved_py
        _bars = None
        for s in (console_out, console_err, log_stream):
            with contextlib.suppress(Exception):
                s.close()


def redirect_worker_output(name: str) -> Optional[Path]:
    """In a worker process (a Ray actor): fd 1 and 2 -> <MDN_LOG_DIR>/<name>.log, appended, and
    every Python logger and warning with them. Nothing when verbose or when no log folder is
    set (a worker started outside a run). Returns the log file."""
    d = log_dir()
    if d is None:
        return None
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{safe_name(name)}.log"
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    _route_python_logging(sys.stderr)
    return path
