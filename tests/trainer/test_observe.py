"""Metrics log (JSONL, TensorBoard, offline-safe W&B) and the progress line (trainer/observe.py)."""
from __future__ import annotations

import io
import json
import math
import sys
import time
import types
import warnings

import numpy as np
import pytest

from megatron_denoise.trainer.observe import (
    METRICS_FILE,
    MetricsLogger,
    Progress,
    eta_seconds,
    format_duration,
    read_metrics,
)


def _strict_lines(path):
    """Parse each line as STRICT JSON (NaN/Infinity literals are rejected)."""
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return [json.loads(l, parse_constant=reject) for l in path.read_text().splitlines()]


def test_jsonl_content_and_round_trip(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, config_dict={"a": {"b": 1}}) as log:
        log.log(1, {"reward_mean": 0.5, "recovery_rate": math.nan, "rows": 16, "grad_norm": np.float32(2.5)})
        log.log(2, {"reward_mean": 0.75, "recovery_rate": 0.25, "rows": 16, "grad_norm": math.inf,
                    "step": 2.0})  # the trainer's own step key, equal to the step: accepted and dropped
    lines = _strict_lines(tmp_path / METRICS_FILE)
    assert lines == [
        {"step": 1, "reward_mean": 0.5, "recovery_rate": "nan", "rows": 16.0, "grad_norm": 2.5},
        {"step": 2, "reward_mean": 0.75, "recovery_rate": 0.25, "rows": 16.0, "grad_norm": "inf"},
    ]
    recs = read_metrics(tmp_path)  # the folder or the file
    assert [r["step"] for r in recs] == [1, 2]
    assert math.isnan(recs[0]["recovery_rate"]) and recs[1]["grad_norm"] == math.inf
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": {"b": 1}}


def test_bad_metrics_are_named(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    with pytest.raises(TypeError, match="'note'"):
        log.log(1, {"reward_mean": 1.0, "note": "hello"})
    with pytest.raises(ValueError, match="disagrees"):
        log.log(3, {"step": 4.0})
    with pytest.raises(TypeError, match="step must be an int"):
        log.log(1.5, {"x": 1.0})
    log.close()
    with pytest.raises(RuntimeError, match="after close"):
        log.log(2, {"x": 1.0})
    # a bad line in the middle of a file names file and line
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "x": 1}\n{oops\n{"step": 2, "x": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_resume_drops_steps_at_and_after_resume_step(tmp_path):
    # run 1 logs steps 1..5, then is killed -9 mid-write (no close, torn last line)
    log = MetricsLogger(tmp_path, tensorboard=False)
    for s in range(1, 6):
        log.log(s, {"loss": float(s)})
    log._jsonl.flush()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "loss": 6.')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]

    # the newest checkpoint covers steps 1..3: the resumed run logs from step 4 on
    with MetricsLogger(tmp_path, tensorboard=False, resume_from_step=4) as log2:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        for s in range(4, 7):
            log2.log(s, {"loss": 10.0 * s})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in recs] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 6  # no duplicate lines

    # a fresh run (no resume step) in the same folder starts an empty log
    with MetricsLogger(tmp_path, tensorboard=False) as log3:
        log3.log(1, {"loss": 7.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 7.0}]


def test_same_step_lines_are_merged_by_the_reader(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(10, {"reward_mean": 0.5})
        log.log(10, {"val/math500/avg@1": 0.3})
        log.log(11, {"reward_mean": 0.6})
    assert read_metrics(tmp_path) == [{"step": 10, "reward_mean": 0.5, "val/math500/avg@1": 0.3},
                                      {"step": 11, "reward_mean": 0.6}]


def test_tensorboard_events_readable_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, jsonl=False)
    for s in range(1, 6):
        log.log(s, {"reward_mean": 0.1 * s, "time/generate": 2.0})
    tb = tmp_path / "tensorboard"
    acc = EventAccumulator(str(tb))
    acc.Reload()  # before close: every step is on disk already (a kill -9 loses none)
    log.close()
    assert {"reward_mean", "time/generate"} <= set(acc.Tags()["scalars"])
    ev = acc.Scalars("reward_mean")
    assert [e.step for e in ev] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([e.value for e in ev], [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-6)

    # resume at step 4: the old steps 4, 5 are purged, the new values are what TensorBoard shows
    with MetricsLogger(tmp_path, jsonl=False, resume_from_step=4) as log2:
        for s in (4, 5, 6):
            log2.log(s, {"reward_mean": 1.0 + s})
    acc = EventAccumulator(str(tb))
    acc.Reload()
    ev = acc.Scalars("reward_mean")
    assert [e.step for e in ev] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([e.value for e in ev], [0.1, 0.2, 0.3, 5.0, 6.0, 7.0], rtol=1e-6)


def _fake_wandb(init):
    mod = types.ModuleType("wandb")
    mod.init = init
    return mod


def test_wandb_missing_warns_and_run_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="not importable"):
        log = MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_init_timeout=30)
    assert time.monotonic() - t0 < 5 and not log.wandb_active
    log.log(1, {"x": 1.0})
    log.close()
    assert read_metrics(tmp_path) == [{"step": 1, "x": 1.0}]


def test_wandb_hanging_init_does_not_block(tmp_path, monkeypatch):
    # e.g. online mode on a machine without network: init waits forever on a socket
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(lambda **kw: time.sleep(60)))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="did not finish within"):
        log = MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_init_timeout=0.5)
    log.log(1, {"x": 1.0})
    log.close()
    assert time.monotonic() - t0 < 5
    assert not log.wandb_active and read_metrics(tmp_path) == [{"step": 1, "x": 1.0}]


class _RecordingRun:
    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_wandb_mode_forced_and_calls_forwarded(tmp_path, monkeypatch, mode):
    import os
    seen = {}
    run = _RecordingRun()

    def init(**kw):
        seen.update(kw, env_mode=os.environ.get("WANDB_MODE"), env_silent=os.environ.get("WANDB_SILENT"))
        return run

    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(init))
    monkeypatch.setenv("WANDB_MODE", "online" if mode == "offline" else "offline")  # the config wins
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_mode=mode,
                            wandb_project="proj", config_dict={"lr": 1e-6})
        assert log.wandb_active
        log.log(1, {"x": 1.0})
        log.log(2, {"x": 2.0})
        log.close()
    assert seen["mode"] == mode and seen["env_mode"] == mode and seen["env_silent"] == "true"
    assert seen["project"] == "proj" and seen["config"] == {"lr": 1e-6}
    assert seen["dir"] == str(tmp_path / "wandb")
    assert run.logged == [(1, {"x": 1.0}), (2, {"x": 2.0})] and run.finished
    # a resumed run continues the same W&B run id
    run_id = seen["id"]
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(init))
    MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_mode=mode, resume_from_step=3).close()
    assert seen["id"] == run_id


def test_wandb_bad_mode_is_named(tmp_path):
    with pytest.raises(ValueError, match="wandb_mode"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_mode="cloud")


def test_eta_and_duration():
    assert math.isnan(eta_seconds(0, 10, 5.0))
    assert eta_seconds(2, 8, 10.0) == 40.0  # 5 s/step x 8 steps left
    assert eta_seconds(4, 0, 10.0) == 0.0
    assert format_duration(7.4) == "7s"
    assert format_duration(245) == "4m05s"
    assert format_duration(3723) == "1h02m03s"
    assert format_duration(math.nan) == "?"


def test_progress_plain_lines_with_eta():
    now = [100.0]
    out = io.StringIO()  # not a TTY: plain lines
    p = Progress(total_steps=10, start_step=4, stream=out, clock=lambda: now[0])
    now[0] += 12.0
    p.update(4, {"reward_mean": 0.4167, "recovery_rate": 0.25, "time/step": 12.0})
    now[0] += 8.0
    p.update(5, {"reward_mean": 0.5, "recovery_rate": math.nan})
    p.close()
    assert out.getvalue().splitlines() == [
        # 12 s for 1 step, 6 steps left -> 72 s
        "step 4/10 | reward 0.417 | recovery 0.250 | 12.0 s/step | ETA 1m12s",
        # 20 s for 2 steps, 5 left -> 50 s; no time/step metric: the mean pace is shown
        "step 5/10 | reward 0.500 | recovery - | 10.0 s/step | ETA 50s",
    ]
    quiet = io.StringIO()
    q = Progress(total_steps=3, stream=quiet, enabled=False)
    q.update(1, {"reward_mean": 1.0})
    assert quiet.getvalue() == ""


def test_progress_rich_bar_renders():
    out = io.StringIO()
    p = Progress(total_steps=3, stream=out, use_rich=True)
    for s in (1, 2, 3):
        p.update(s, {"reward_mean": 0.25 * s, "recovery_rate": 0.5})
    p.close()
    text = out.getvalue()
    assert "3/3" in text and "reward 0.750" in text and "recovery 0.500" in text


# ---------------------------------------------------------------------------------------------
# plot.py and launch/plot.py
# ---------------------------------------------------------------------------------------------

def _synthetic_run(run_dir, steps=20, reward_slope=0.02, k0=False):
    with MetricsLogger(run_dir, tensorboard=False) as log:
        for s in range(1, steps + 1):
            m = {"reward_mean": 0.2 + reward_slope * s, "accuracy": 0.1 + reward_slope * s,
                 "main_accuracy": 0.3 + 0.01 * s, "denoise_accuracy": math.nan if k0 else 0.1 + 0.02 * s,
                 "recovery_rate": math.nan if k0 else 0.1 + 0.02 * s,
                 "continuation_length_mean": 300.0 - 5 * s, "folded_length_mean": 340.0 - 5 * s,
                 "prefix_length_mean": 40.0, "loss": 0.05 / s, "pg_loss": 0.04 / s,
                 "time/generate": 6.0, "time/reward": 0.5, "time/train": 3.0, "time/refit": 0.4,
                 "time/step": 10.5}
            if s % 2 == 0:
                m["time/old_logprob"] = 0.6  # a phase that is absent on some steps
            log.log(s, m)
            if s % 10 == 0:
                log.log(s, {"val/math500/avg@1": 0.25 + 0.01 * s, "val/overall": 0.2 + 0.01 * s,
                            "val/math500/response_tokens": 900.0})  # not an accuracy: not drawn


def _rgb(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int32)


def test_plot_command_writes_curves(tmp_path, capsys):
    from megatron_denoise.launch.plot import main
    from megatron_denoise.trainer.plot import PANELS, plot_run

    run = tmp_path / "run"
    _synthetic_run(run)
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    plots = run / "plots"
    names = {"reward", "accuracy", "recovery_rate", "lengths", "loss", "step_time", "validation", "overview"}
    assert {p.stem for p in plots.glob("*.png")} == names
    assert "skipped entropy.png" in out and "wrote " + str(plots / "reward.png") in out
    for n in names - {"overview"}:
        img = _rgb(plots / f"{n}.png")
        assert img.shape == (400, 640, 3), n  # figsize 6.4 x 4.0 in at 100 dpi
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, n  # not a blank canvas
    assert _rgb(plots / "overview.png").shape == (960, 1536, 3)  # 3 x 3 grid of 7 panels

    # validation: exactly the AVG@k curves and the overall mean (the 900-token curve would
    # stretch the axis to 900 and squash the accuracies into one line at the bottom)
    from megatron_denoise.trainer.plot import _resolve
    recs = read_metrics(run)
    val = next(p for p in PANELS if p.name == "validation")
    assert [(s.label, k) for s, k in _resolve(recs, val)] == [("math500/avg@1", "val/math500/avg@1"),
                                                              ("overall", "val/overall")]

    # the first curve is drawn in matplotlib's first colour (#1f77b4)
    blue = np.all(np.abs(_rgb(plots / "reward.png") - [31, 119, 180]) < 30, axis=-1)
    assert blue.sum() > 200
    # different metrics give different pictures
    assert not np.array_equal(_rgb(plots / "reward.png"), _rgb(plots / "recovery_rate.png"))
    # the picture follows the data: a flat reward changes reward.png and leaves lengths.png as is
    run2 = tmp_path / "run2"
    _synthetic_run(run2, reward_slope=0.0)
    plot_run(run2, panels=[p for p in PANELS if p.name in ("reward", "lengths")], overview=False)
    assert not np.array_equal(_rgb(plots / "reward.png"), _rgb(run2 / "plots" / "reward.png"))
    assert np.array_equal(_rgb(plots / "lengths.png"), _rgb(run2 / "plots" / "lengths.png"))


def test_plot_skips_missing_and_all_nan_metrics(tmp_path, capsys):
    from megatron_denoise.launch.plot import main
    from megatron_denoise.trainer.plot import plot_run

    run = tmp_path / "k0"
    _synthetic_run(run, steps=5, k0=True)  # K = 0: recovery rate and denoise accuracy are NaN
    res = plot_run(run)
    stems = {p.stem for p in res.written}
    assert "recovery_rate" not in stems and "entropy" not in stems and "accuracy" in stems
    assert any("recovery_rate.png" in n and "no finite values" in n for n in res.notes)
    assert any(n.startswith("accuracy.png") and "denoise_accuracy" in n for n in res.notes)
    # no metrics file: a clear error and exit code 2
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no metrics file" in capsys.readouterr().err


def test_truncate_jsonl_keeps_any_records_by_step(tmp_path):
    """problems.jsonl (uid lists, not metrics) goes through the same resume truncation."""
    from megatron_denoise.trainer.observe import truncate_jsonl

    p = tmp_path / "problems.jsonl"
    p.write_text('{"step": 1, "uids": ["a", "b"]}\n{"step": 2, "uids": ["c"]}\n{"step": 3, "uids": ["d"]}\n{"st')
    assert truncate_jsonl(p, 3) == (2, 2)  # step 3 and the torn tail dropped
    assert p.read_text() == '{"step": 1, "uids": ["a", "b"]}\n{"step": 2, "uids": ["c"]}\n'
    p.write_text('{"step": 1}\n["not", "a", "record"]\n')
    with pytest.raises(ValueError, match=r"problems\.jsonl:2: not a record with an integer 'step'"):
        truncate_jsonl(p, 5)
    assert p.read_text() == '{"step": 1}\n["not", "a", "record"]\n'  # nothing lost on error
