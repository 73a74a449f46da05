"""PNG curves of a run's metrics.jsonl: reward, main vs denoise accuracy, recovery rate, lengths,
entropy, loss, clip fraction, grad norm, fallbacks, DAPO counts, the step-time breakdown and
validation accuracy.

    python -m megatron_denoise.launch.plot RUN_DIR     ->  RUN_DIR/plots/*.png (+ overview.png)

Metric names are those of `core.metrics.step_metrics` (reward_mean, main_accuracy, ...), of the
actor's train step (loss, pg_loss, entropy, clip_fraction, grad_norm), of
`core.advantages.DynamicSampler.stats` (dapo/*), the trainer's `time/<phase>` split and the
validation's `val/<set>/avg@k` (`trainer.evaluate.EvalResult.metrics`).
A panel whose metrics are absent (e.g. entropy not logged) or all NaN (the recovery rate of a
K = 0 run) is skipped with a note instead of failing; the overview then has one panel fewer.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
state, no display needed), so this also runs inside a training process or a headless node.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_denoise.trainer.observe import read_metrics

__all__ = ["Series", "Panel", "PANELS", "PlotResult", "plot_run", "plot_records"]

TIME_PHASES = ("generate", "reward", "old_logprob", "train", "refit")


@dataclass(frozen=True)
class Series:
    """One curve: the first of `keys` present in the metrics is plotted under `label`."""

    keys: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class Panel:
    name: str  # file name stem
    title: str
    ylabel: str
    series: tuple[Series, ...]
    stacked: bool = False  # stacked areas (parts of a whole), e.g. the step-time split
    total: Optional[Series] = None  # drawn as a line over a stacked panel (e.g. time/step)
    pattern: Optional[str] = None  # dynamic panel: every metric whose name fully matches this regex;
    # the curve's label is the regex's first group


PANELS: tuple[Panel, ...] = (
    Panel("reward", "Reward", "mean reward", (
        Series(("reward_mean",), "reward (all rows)"),
        Series(("accuracy",), "accuracy (all rows)"))),
    Panel("accuracy", "Main vs denoise accuracy", "accuracy", (
        Series(("main_accuracy",), "main rows"),
        Series(("denoise_accuracy",), "denoise rows (p > 0)"))),
    Panel("recovery_rate", "Recovery rate (accuracy of denoise rows)", "recovery rate", (
        Series(("recovery_rate",), "recovery rate"),)),
    Panel("lengths", "Lengths", "tokens", (
        Series(("continuation_length_mean",), "continuation (mean)"),
        Series(("folded_length_mean",), "folded = prefix + continuation (mean)"),
        Series(("prefix_length_mean",), "prefix p (mean, denoise rows)"))),
    Panel("entropy", "Policy entropy", "entropy (nats/token)", (
        Series(("entropy", "actor/entropy", "train/entropy"), "entropy"),)),
    Panel("loss", "Loss", "loss", (
        Series(("loss",), "loss"),
        Series(("pg_loss",), "policy-gradient loss"))),
    Panel("clip_fraction", "Clipped tokens", "fraction of loss tokens", (
        Series(("clip_fraction",), "clip"),
        Series(("dual_clip_fraction",), "dual clip"))),
    Panel("grad_norm", "Gradient norm (before clipping)", "grad norm", (
        Series(("grad_norm",), "grad norm"),)),
    Panel("fallbacks", "Denoise slots without a prefix", "count per step", (
        Series(("fallback_count", "fallbacks"), "fallback rows"),
        Series(("problems_without_pool",), "problems without a pool"))),
    Panel("dapo", "DAPO dynamic sampling", "count per step", (
        Series(("dapo/kept",), "kept problems"),
        Series(("dapo/dropped_all_wrong",), "dropped: all wrong"),
        Series(("dapo/dropped_all_correct",), "dropped: all correct"),
        Series(("dapo/gen_batches",), "generation batches"))),
    Panel("step_time", "Step time breakdown", "seconds", tuple(
        Series((f"time/{p}",), p) for p in TIME_PHASES),
        stacked=True, total=Series(("time/step",), "step (total)")),
    # evaluate.EvalResult.metrics(): val/<set>/avg@<k> and val/overall (mean of the sets)
    Panel("validation", "Validation AVG@k", "accuracy", (), pattern=r"val/(.+/avg@\d+|overall)"),
)


@dataclass
class PlotResult:
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _column(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold `key`."""
    xs, ys = [], []
    for r in records:
        if key in r:
            xs.append(float(r["step"]))
            ys.append(float(r[key]))
    return xs, ys


def _resolve(records: Sequence[dict], panel: Panel) -> list[tuple[Series, str]]:
    """The series of `panel` that have at least one finite value, with the key found."""
    if panel.pattern is not None:
        rx = re.compile(panel.pattern)
        keys = sorted({k for r in records for k in r if rx.fullmatch(k)})
        series = [Series((k,), rx.fullmatch(k).group(1)) for k in keys]
    else:
        series = list(panel.series)
    found = []
    for s in series:
        for key in s.keys:
            _, ys = _column(records, key)
            if any(math.isfinite(y) for y in ys):
                found.append((s, key))
                break
    return found


def _draw(ax, records: Sequence[dict], panel: Panel, found: list[tuple[Series, str]]) -> None:
    if panel.stacked:
        # Parts of a whole: align every phase on the union of steps (a phase absent at a step,
        # e.g. old_logprob under force_on_policy, counts 0 there).
        steps = sorted({float(r["step"]) for r in records if any(k in r for _, k in found)})
        layers = []
        for _, key in found:
            by_step = dict(zip(*_column(records, key)))
            layers.append([by_step.get(x, 0.0) if math.isfinite(by_step.get(x, 0.0)) else 0.0 for x in steps])
        ax.stackplot(steps, *layers, labels=[s.label for s, _ in found], alpha=0.85)
        if panel.total is not None:
            for key in panel.total.keys:
                xs, ys = _column(records, key)
                if xs:
                    ax.plot(xs, ys, color="black", linewidth=1.2, linestyle="--", label=panel.total.label)
                    break
    else:
        for s, key in found:
            xs, ys = _column(records, key)
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.5, label=s.label)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_records(records: Sequence[dict], out_dir: Union[str, Path], *, panels: Sequence[Panel] = PANELS,
                 size: tuple[float, float] = (6.4, 4.0), dpi: int = 100, overview: bool = True) -> PlotResult:
    """One PNG per panel with data (size x dpi pixels), plus `overview.png` with all of them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = PlotResult()
    drawable = []
    for panel in panels:
        found = _resolve(records, panel)
        wanted = [s.keys[0] for s in panel.series]
        drawn = {s for s, _ in found}
        missing = [s.keys[0] for s in panel.series if s not in drawn]
        if not found:
            what = f"metrics matching {panel.pattern}" if panel.pattern else ", ".join(wanted)
            result.notes.append(f"skipped {panel.name}.png: no finite values of {what}")
            continue
        if missing:
            result.notes.append(f"{panel.name}.png: no values of {', '.join(missing)} (not drawn)")
        drawable.append((panel, found))
        fig = Figure(figsize=size, dpi=dpi)
        FigureCanvasAgg(fig)
        _draw(fig.add_subplot(1, 1, 1), records, panel, found)
        fig.tight_layout()
        path = out / f"{panel.name}.png"
        fig.savefig(path, dpi=dpi)
        result.written.append(path)

    if overview and drawable:
        cols = min(3, len(drawable))
        rows = -(-len(drawable) // cols)
        fig = Figure(figsize=(size[0] * cols * 0.8, size[1] * rows * 0.8), dpi=dpi)
        FigureCanvasAgg(fig)
        for i, (panel, found) in enumerate(drawable):
            _draw(fig.add_subplot(rows, cols, i + 1), records, panel, found)
        fig.tight_layout()
        path = out / "overview.png"
        fig.savefig(path, dpi=dpi)
        result.written.append(path)
    return result


def plot_run(run_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None, **kwargs) -> PlotResult:
    """Plot `run_dir/metrics.jsonl` into `out_dir` (default `run_dir/plots`)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl holds no steps yet")
    return plot_records(records, out_dir if out_dir is not None else run_dir / "plots", **kwargs)
