"""Set up a training run, resume it if possible, and loop `train_step` until done or stopped.

    run_training(cfg) -> exit code (0 done; EXIT_PREEMPTED after a SIGTERM/SIGINT checkpoint)

Order of things: validate (already done by the loader) -> run folder -> model folder -> tokenizer
and problems -> Ray: policy workers (one per rank) and the colocated rollout worker -> verifier
pool -> resume (weights, optimizer, RNG, data cursor, metrics step) -> steps -> final checkpoint,
Hugging Face export and plots.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from pathlib import Path
from typing import Optional

from megatron_denoise import chaos
from megatron_denoise.config.schema import Config
from megatron_denoise.trainer.faults import CallTimeout, RunAborted, WorkerDied
from megatron_denoise.trainer.signals import EXIT_PREEMPTED, GracefulStop


def _path(p: str) -> Path:
    """Absolute: Ray workers on other nodes do not share the driver's working directory."""
    return Path(os.path.expanduser(str(p))).resolve()


def resolve_model_path(cfg: Config) -> str:
    """The HF folder to start from, built first when the config says how (model.build)."""
    from megatron_denoise.prepare.models import ensure_model

    return ensure_model(cfg.model)


class Run:
    """Everything a run holds, created in order and closed in reverse."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = _path(cfg.logging.output_dir)
        self.ckpt_dir = _path(cfg.checkpoint.dir)
        self.closers: list = []

    def close(self) -> None:
        while self.closers:
            fn = self.closers.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep closing the rest
                print(f"[megatron-denoise] while shutting down: {e!r}", file=sys.stderr)


def run_training(cfg: Config, config_path: Optional[Path] = None, overrides: tuple = ()) -> int:
    from transformers import AutoTokenizer

    from megatron_denoise.core.fold import hf_decoder
    from megatron_denoise.reward.pool import VerifierPool
    from megatron_denoise.trainer.observe import MetricsLogger, Progress
    from megatron_denoise.trainer.problems import ProblemStream, PromptCache, load_eval_sets
    from megatron_denoise.trainer.step import StepContext, train_step
    from megatron_denoise.trainer.workers import PolicyGroup, RolloutWorker, init_ray

    stop = GracefulStop()
    run = Run(cfg)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        hf_path = resolve_model_path(cfg)
        tokenizer = AutoTokenizer.from_pretrained(hf_path)
        from megatron_denoise.convert.check import check_model_folder

        check_model_folder(hf_path, tokenizer)  # before any worker: missing/truncated shards, architecture, vocab
        problems = ProblemStream.from_config(cfg, tokenizer)
        from megatron_denoise.trainer.problems import check_pools

        no_pool = check_pools(cfg, problems.problems)  # K > 0 with no pool anywhere: said before Ray starts
        if no_pool:
            print(f"[megatron-denoise] {no_pool}", flush=True)
        print(f"[megatron-denoise] {problems.describe()}", flush=True)
        random.seed(cfg.trainer.seed)

        init_ray(cfg, str(run.run_dir))
        from megatron_denoise.config.validate import async_placement_error
        from megatron_denoise.placement import use_gpus

        bad = async_placement_error(cfg.rollout.async_, cfg.rollout.colocate, use_gpus(cfg))  # device auto: now known
        if bad:
            raise ValueError(bad)
        stop.install()  # after ray.init, which installs its own SIGTERM handler in the driver
        policy = PolicyGroup.create(cfg, hf_path)
        run.closers.append(policy.shutdown)
        engine = RolloutWorker.create(cfg, hf_path, str(run.run_dir), policy)
        run.closers.append(engine.close)
        scorer = VerifierPool(num_workers=cfg.reward.num_workers, deadline_s=cfg.reward.deadline_s,
                              max_answer_chars=cfg.reward.max_answer_chars)
        run.closers.append(scorer.close)

        # resume: weights + optimizer + RNG in the actor; data cursor and metrics step here
        start = 0
        from megatron_denoise.megatron.checkpoint import resolve_resume

        resume_from = resolve_resume(cfg.checkpoint.resume, run.ckpt_dir)
        # the online pool / rho controller (denoise.pool_source, denoise.rho.strategy adaptive)
        from megatron_denoise.core.prefix_state import DenoiseState

        denoise_state = DenoiseState.for_config(cfg.denoise)
        if resume_from is not None:
            meta = policy.load(str(resume_from))
            start = int(meta["step"])
            if meta.get("optimizer_note"):  # printed by rank 0 into its worker log: say it here too
                print(f"[megatron-denoise] {meta['optimizer_note']}", flush=True)
            problems.load_state_dict(meta["data_cursor"]["problems"])
            saved = meta["data_cursor"].get("denoise")
            if (saved is None) != (denoise_state is None):
                raise ValueError(f"{resume_from}: the checkpoint {'has no' if saved is None else 'has a'} denoise "
                                 f"state (online pool / rho controller) but this run's denoise.pool_source "
                                 f"({cfg.denoise.pool_source}) and denoise.rho.strategy ({cfg.denoise.rho.strategy}) "
                                 f"{'need' if saved is None else 'keep'} {'one' if saved is None else 'none'}")
            if denoise_state is not None:
                denoise_state.load_state_dict(saved)
            policy.refit(engine)  # the engine must generate with the resumed weights
            print(f"[megatron-denoise] resumed from {resume_from} at step {start}", flush=True)

        config_dict = dataclasses.asdict(cfg)
        logger = MetricsLogger.from_config(cfg.logging, config_dict=config_dict,
                                           resume_from_step=start + 1 if resume_from else None, run_name=cfg.name)
        run.closers.append(logger.close)
        progress = Progress(cfg.trainer.total_steps, start_step=start + 1, enabled=cfg.logging.progress)
        run.closers.append(progress.close)
        ctx = StepContext(cfg=cfg, policy=policy, engine=engine, scorer=scorer, problems=problems,
                          tokenizer=tokenizer, prompt_ids=problems.prompt_ids, decode=hf_decoder(tokenizer),
                          pad_id=tokenizer.pad_token_id or 0, denoise_state=denoise_state)
        # rollout.async: each step's rows, generated now or one step ahead (the in-flight batch is
        # saved with the checkpoint and consumed first on resume)
        from megatron_denoise.trainer.step import rollout_schedule

        rollouts = rollout_schedule(ctx, version=start)
        if resume_from is not None:
            rollouts.load_state_dict(meta["data_cursor"], start)
        validates = cfg.trainer.test_freq > 0 or cfg.trainer.val_before_train
        eval_sets = load_eval_sets(cfg, tokenizer) if validates else {}
        # its own prompt cache: held-out uids may equal training uids (same data_source, index)
        eval_prompt_ids = PromptCache(tokenizer)
        held_out: dict[int, float] = {}  # step -> val/overall, for the before/after summary
        if eval_sets and cfg.trainer.val_before_train and resume_from is None:
            before = _validate(cfg, engine, tokenizer, eval_sets, scorer, eval_prompt_ids, 0)
            held_out[0] = before["val/overall"]
            logger.log(0, before)

        def save(step: int) -> str:
            state = {"problems": problems.state_dict(), "step": step}
            state.update(rollouts.state_dict())  # one_step: the next step's finished rows
            if denoise_state is not None:  # only then: the paper's checkpoints are unchanged
                state["denoise"] = denoise_state.state_dict()
            chaos.point("save")  # (the harness gives it a delay: the kill lands while the ranks write)
            return policy.save(str(run.ckpt_dir), step, state, cfg.checkpoint.keep_last)

        # which problems each step trained on (a resumed run must repeat none and skip none)
        seen_log = _StepLog(run.run_dir / "problems.jsonl", keep_below=start + 1)
        run.closers.append(seen_log.close)

        step = start
        last_saved = start if resume_from is not None else None
        while step < cfg.trainer.total_steps and not stop:
            metrics = train_step(ctx, step)
            step += 1
            # the problems drawn for the rows this step trained on (one_step drew them a step earlier)
            seen_log.write(step, {"uids": list(rollouts.last.uids)})
            metrics["problems_seen"] = float(rollouts.last.seen)
            # every test_freq steps, and after the last step (the after-training figure)
            if eval_sets and ((cfg.trainer.test_freq and step % cfg.trainer.test_freq == 0)
                              or step == cfg.trainer.total_steps):
                metrics.update(_validate(cfg, engine, tokenizer, eval_sets, scorer, eval_prompt_ids, step))
                held_out[step] = metrics["val/overall"]
            logger.log(step, metrics)
            chaos.point("metrics")  # the step's metrics line is written, its checkpoint is not
            progress.update(step, metrics)
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                save(step)
                last_saved = step
        if last_saved != step:  # at exit (done or stopped)
            save(step)
        if stop:
            print(f"[megatron-denoise] stopped by {stop.requested} after step {step}; checkpoint in "
                  f"{run.ckpt_dir}; exit {EXIT_PREEMPTED} (resume with checkpoint.resume=auto)", flush=True)
            return EXIT_PREEMPTED

        outputs = {"checkpoints": str(run.ckpt_dir), "metrics": str(run.run_dir / "metrics.jsonl"),
                   "tensorboard": str(run.run_dir / "tensorboard")}
        if cfg.checkpoint.export_hf_at_end:
            hf_out = run.run_dir / "hf_export"
            policy.export_hf(str(hf_out), hf_path)
            outputs["hf_export"] = str(hf_out)
        from megatron_denoise.trainer.plot import plot_run

        plot_run(run.run_dir)
        outputs["plots"] = str(run.run_dir / "plots")
        record = dict(outputs)
        if held_out:  # val/overall by step (0 = before the first update)
            record["held_out"] = {str(k): v for k, v in sorted(held_out.items())}
        (run.run_dir / "outputs.json").write_text(json.dumps(record, indent=1) + "\n")
        if 0 in held_out and len(held_out) > 1:
            last = max(held_out)
            print(f"[megatron-denoise] held-out accuracy (val/overall): before RL {held_out[0]:.3f} -> after "
                  f"{last} steps {held_out[last]:.3f}", flush=True)
        print("[megatron-denoise] done. Written:", flush=True)
        for k, v in outputs.items():
            print(f"  {k:12s} {v}", flush=True)
        return 0
    except (WorkerDied, CallTimeout) as e:
        # a dead policy rank (or a worker that stopped answering) ends the run, saying where to resume
        from megatron_denoise.megatron.checkpoint import latest_checkpoint

        try:
            last = latest_checkpoint(run.ckpt_dir)
        except OSError:
            last = None
        msg = (f"{str(e).rstrip('.')}. The run stops; last complete checkpoint: {last or 'none'} "
               f"(resume with checkpoint.resume=auto)")
        print(f"[megatron-denoise] ERROR: {msg}", file=sys.stderr, flush=True)
        raise RunAborted(msg) from e
    finally:
        run.close()
        stop.restore()


class _StepLog:
    """A JSONL file of per-step records; on resume, records of steps >= keep_below are dropped."""

    def __init__(self, path: Path, keep_below: int) -> None:
        from megatron_denoise.trainer.observe import truncate_jsonl

        truncate_jsonl(path, keep_below)
        self.fh = open(path, "a")

    def write(self, step: int, record: dict) -> None:
        self.fh.write(json.dumps({"step": step, **record}) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _validate(cfg: Config, engine, tokenizer, eval_sets, scorer, prompt_ids, step: int) -> dict:
    from megatron_denoise.trainer.evaluate import evaluate

    res = evaluate(engine, tokenizer, eval_sets, cfg.eval, scorer=scorer, max_tokens=cfg.data.max_response_length,
                   seed=cfg.rollout.seed, prompt_ids=prompt_ids)
    from megatron_denoise.console import log_dir

    if log_dir() is None:  # --verbose (or no filtered console): the table
        print(res.markdown(), flush=True)
    else:  # one line on the console; the table goes to logs/driver.log (and eval/step_<n>.json below)
        sets = ", ".join(f"{name} AVG@{r.k} {100 * r.avg_at_k:.1f}% (pass@{r.k} {100 * r.pass_at_k:.1f}%)"
                         for name, r in res.sets.items())
        print(f"[megatron-denoise] validation after step {step}: {sets}; overall {100 * res.overall:.1f}%", flush=True)
        print(res.markdown(), file=sys.stderr, flush=True)
    # per-problem scores of every validation (the science benchmark buckets them by difficulty)
    out = _path(cfg.logging.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_{step}.json").write_text(json.dumps(res.to_dict(), allow_nan=False) + "\n")
    return res.metrics()
