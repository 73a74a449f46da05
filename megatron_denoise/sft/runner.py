"""Run the warm-start: processes, the Megatron actor, the loop, checkpoints and exports (the edge).

    prepared = prepare(cfg)               # model folder, tokenizer, examples, plan (no megatron)
    run(cfg, world_size)                  # -> exit code

Processes. World size 1 runs in this process (gloo on CPU). World size W > 1 starts W processes
with torch.multiprocessing (spawn): the parent resolves the model folder and reads and tokenises
the data ONCE, then hands the token rows to every rank; it holds no model and imports no megatron,
and a rank's exception comes back to it with the rank's traceback. Spawn, not fork: a forked child
of a process that already ran torch ops can deadlock in OpenMP, and spawn behaves the same on
every OS. Started by torchrun instead (RANK / WORLD_SIZE / MASTER_ADDR in the environment, e.g.
one rank per GPU on a cluster), every process is one rank and prepares the data itself.

Every rank builds megatron's groups for the layout (parallel_state.initialize), the actor
(MegatronActor with the warm-start's Config view, sft.config.actor_config), loads the HF weights
(convert.megatron_io.load_hf_into_actor), then: resume (checkpoint.resume: auto takes the newest
complete checkpoint: weights, optimizer, scheduler, RNG, and the data cursor) -> steps
(actor.sft_step on the cursor's next sft.rows_per_step rows) -> checkpoints every
checkpoint.save_interval steps and at exit, Hugging Face exports at sft.export_hf_steps into
<output_dir>/hf/step_<n>/ and the final one into <output_dir>/hf/final/. Rank 0 writes
metrics.jsonl (trainer.observe.MetricsLogger) and one console line per step. SIGTERM/SIGINT finish
the step, save, and exit with EXIT_PREEMPTED (75).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_denoise import collectives as coll
from megatron_denoise.config.schema import OptimizerName, SFTConfig
from megatron_denoise.sft.config import actor_config, micro_batch_tokens
from megatron_denoise.sft.data import SFTPlan, load_examples, make_batch, plan


def _path(p: str) -> Path:
    return Path(os.path.expanduser(str(p))).resolve()


@dataclass
class Prepared:
    """What every rank needs besides the config: plain values (pickled to spawned ranks)."""

    hf_path: str
    examples: list
    val_examples: list
    plan: SFTPlan
    pad_id: int
    report: str


def resolve_model(cfg: SFTConfig) -> str:
    """model.hf_path; the offline demo models (tiny-*, smollm2-*) are built on first use."""
    from megatron_denoise.trainer.run import resolve_model_path

    return resolve_model_path(actor_config(cfg, 1))


def load_tokenizer(hf_path: str, cfg: SFTConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.expanduser(cfg.model.tokenizer_path or hf_path))


def prepare(cfg: SFTConfig) -> Prepared:
    hf_path = resolve_model(cfg)
    tok = load_tokenizer(hf_path, cfg)
    from megatron_denoise.convert.check import check_model_folder

    check_model_folder(hf_path, tok)  # missing/truncated shards, architecture, tokenizer vs vocabulary
    s = cfg.sft
    examples, report = load_examples(s.train_files, s, tok)
    summary = report.summary()
    val: list = []
    if s.val_files:
        val, vrep = load_examples(s.val_files, s, tok, label="sft.val_files")
        summary += "\nheld-out: " + vrep.summary()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Prepared(hf_path=hf_path, examples=examples, val_examples=val, plan=plan(s, len(examples), examples),
                    pad_id=int(pad), report=summary)


def _under_torchrun() -> bool:
    """Started by torchrun (torch.distributed.run sets TORCHELASTIC_RUN_ID for its workers)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def run(cfg: SFTConfig, world_size: int) -> int:
    """Train; returns the exit code (0 done, EXIT_PREEMPTED after a signal)."""
    if _under_torchrun():
        ws = int(os.environ["WORLD_SIZE"])
        if ws != world_size:
            raise ValueError(f"torchrun started {ws} processes but the config's world size is {world_size} "
                             f"(cluster.num_nodes x cluster.gpus_per_node, or --world-size)")
        return train_rank(cfg, prepare(cfg), int(os.environ["RANK"]), ws)
    from megatron_denoise.megatron import parallel_state

    prepared = prepare(cfg)
    print(f"[sft] data: {prepared.report}", flush=True)
    # the rendezvous store is served from here, on a port bound once (a probed port could be taken
    # before the ranks bind it); the ranks join it
    store = parallel_state.host_store(world_size)
    if world_size == 1:
        env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return train_rank(cfg, prepared, 0, 1, store=store)
        finally:  # a later run in this process (tests, notebooks) starts from a clean environment
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    import torch.multiprocessing as mp

    from megatron_denoise.trainer.signals import EXIT_PREEMPTED

    ctx = mp.start_processes(_spawned, args=(cfg, prepared, world_size, store.port), nprocs=world_size,
                             join=False, start_method="spawn")

    def forward(signum, frame) -> None:
        # the ranks finish their step, save and exit 75 (a terminal's Ctrl-C reaches them directly
        # too: they get SIGTERM from here, so a second SIGINT never turns into KeyboardInterrupt)
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # a rank's exception is re-raised here with that rank's traceback
        while not ctx.join():
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code == EXIT_PREEMPTED:
            return EXIT_PREEMPTED
        raise
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return 0


def _spawned(rank: int, cfg: SFTConfig, prepared: Prepared, world_size: int, port: int) -> None:
    from megatron_denoise.megatron import parallel_state

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    code = train_rank(cfg, prepared, rank, world_size,
                      store=parallel_state.join_store("127.0.0.1", port, world_size))
    if code:
        sys.exit(code)


# ------------------------------------------------------------------------------------------------
# one rank


def _line(step: int, total: int, m: dict, dt: float) -> str:
    return (f"[sft] step {step}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad_norm {m['grad_norm']:.3f}"
            f" | {m['tokens'] / max(dt, 1e-9):.0f} tok/s | {dt:.2f} s/step" + (" | SKIPPED (NaN/Inf)" if m["skipped"] else ""))


def validation_loss(actor: Any, examples: list, rows: int, pad_id: int) -> float:
    """Mean NLL per solution token of `examples` (forward only, through compute_logprobs)."""
    total, count = 0.0, 0.0
    for i in range(0, len(examples), rows):
        batch = make_batch(examples, range(i, min(i + rows, len(examples))), pad_id)
        logp, _ = actor.compute_logprobs(batch)
        total += float(-(logp.double() * batch.loss_mask.double()).sum())
        count += float(batch.loss_mask.sum())
    return total / max(count, 1.0)


def train_rank(cfg: SFTConfig, prepared: Prepared, rank: int, world_size: int, store: Any = None) -> int:
    """One rank's training; `store`: its rendezvous (parallel_state.host_store/join_store), None
    under torchrun."""
    import torch
    import torch.distributed as dist

    from megatron_denoise.convert.megatron_io import load_hf_into_actor
    from megatron_denoise.convert.pipeline import export_models_to_hf
    from megatron_denoise.data.cursor import DataCursor
    from megatron_denoise.layout import ParallelLayout
    from megatron_denoise.megatron import parallel_state
    from megatron_denoise.megatron.actor import ActorOptions, MegatronActor
    from megatron_denoise.megatron.checkpoint import load_checkpoint, save_checkpoint
    from megatron_denoise.trainer.observe import MetricsLogger
    from megatron_denoise.trainer.signals import EXIT_PREEMPTED, GracefulStop

    # the cores shared by this node's ranks, unless OMP_NUM_THREADS says otherwise
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // world_size)))
    s, pl = cfg.sft, prepared.plan
    total = pl.total_steps
    run_dir, ckpt_dir = _path(cfg.logging.output_dir), _path(cfg.checkpoint.dir)
    layout = ParallelLayout.from_config(cfg.parallel, world_size)
    stop = GracefulStop().install()
    logger = None
    groups = parallel_state.initialize(layout, backend=cfg.cluster.backend, seed=s.seed, store=store)
    try:
        actor = MegatronActor(actor_config(cfg, total), groups, ActorOptions(total_steps_for_schedule=total))
        load_hf_into_actor(actor, prepared.hf_path)
        cursor = DataCursor(len(prepared.examples), seed=s.seed, shuffle=s.shuffle)
        from megatron_denoise.megatron.checkpoint import resolve_resume

        start, resumed = 0, resolve_resume(cfg.checkpoint.resume, ckpt_dir)
        if resumed is not None:
            if cfg.optimizer.name == OptimizerName.SGD:
                # megatron-core 0.16.1 builds no state-init function for SGD, and its loader needs one
                raise NotImplementedError(f"resuming {resumed} with optimizer.name=sgd: megatron-core cannot load "
                                          f"SGD optimizer state; use optimizer.name=adam or checkpoint.resume=none")
            meta = load_checkpoint(actor, resumed)
            start = int(meta["step"])
            cursor.load_state_dict(meta["data_cursor"]["cursor"])
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"[sft] layout {layout.describe()}; {total} steps of {s.rows_per_step} rows over "
                  f"{len(prepared.examples)} rows" + (f"; resumed from {resumed} at step {start}" if resumed else ""),
                  flush=True)
            logger = MetricsLogger.from_config(cfg.logging, config_dict=dataclasses.asdict(cfg),
                                               resume_from_step=start + 1 if resumed else None, run_name=cfg.name)

        def save(step: int) -> None:
            save_checkpoint(actor, ckpt_dir, step=step, keep_last=cfg.checkpoint.keep_last or None,
                            data_cursor={"cursor": cursor.state_dict(), "step": step, "rows": len(prepared.examples)})

        def export(name: str) -> str:
            out = run_dir / "hf" / name
            export_models_to_hf(actor.chunks, cfg.model, groups, str(out), prepared.hf_path, overwrite=True)
            return str(out)

        step, last_saved = start, (start if resumed else None)
        t_loop, tokens_seen = time.perf_counter(), 0.0
        while step < total:
            t0 = time.perf_counter()
            batch = make_batch(prepared.examples, cursor.next_indices(s.rows_per_step), prepared.pad_id)
            m = actor.sft_step(batch)
            step += 1
            dt = time.perf_counter() - t0
            tokens_seen += m["tokens"]
            m.update(tokens_per_s=m["tokens"] / max(dt, 1e-9), epoch=cursor.seen / cursor.num_items)
            if prepared.val_examples and ((s.val_freq and step % s.val_freq == 0) or step == total):
                m["val/loss"] = validation_loss(actor, prepared.val_examples, s.rows_per_step, prepared.pad_id)
            if logger is not None:
                logger.log(step, m)
                print(_line(step, total, m, dt) + (f" | val/loss {m['val/loss']:.4f}" if "val/loss" in m else ""),
                      flush=True)
            if step in s.export_hf_steps:
                export(f"step_{step}")
            flag = torch.tensor([1.0 if stop else 0.0])
            coll.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            if s.stop_after is not None and step - start >= s.stop_after and step < total:
                flag.fill_(1.0)
                stop.requested = stop.requested or "sft.stop_after"
            if (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) or flag.item() > 0:
                save(step)
                last_saved = step
            if flag.item() > 0:
                if rank == 0:
                    print(f"[sft] stopped after step {step} ({stop.requested}); checkpoint in {ckpt_dir}; "
                          f"exit {EXIT_PREEMPTED} (checkpoint.resume=auto continues)", flush=True)
                return EXIT_PREEMPTED
        if last_saved != step:
            save(step)
        outputs = {"checkpoints": str(ckpt_dir), "metrics": str(run_dir / "metrics.jsonl")}
        if cfg.checkpoint.export_hf_at_end:
            outputs["hf_final"] = export("final")
        for n in sorted(s.export_hf_steps):
            outputs[f"hf_step_{n}"] = str(run_dir / "hf" / f"step_{n}")
        if rank == 0:
            dt = time.perf_counter() - t_loop
            if step > start:
                print(f"[sft] {step - start} steps in {dt:.1f} s: {tokens_seen / max(dt, 1e-9):.0f} tok/s", flush=True)
            (run_dir / "outputs.json").write_text(json.dumps(outputs, indent=1) + "\n")
            print("[sft] done. Written:", flush=True)
            for k, v in outputs.items():
                print(f"  {k:12s} {v}", flush=True)
        return 0
    finally:
        if logger is not None:
            logger.close()
        stop.restore()
        parallel_state.teardown(destroy_process_group=True)


def dry_run(cfg: SFTConfig, world_size: int) -> str:
    """Layout and plan (rows, tokens, steps) without starting a process group or a model. The data
    is read when the model's tokenizer is already on disk (token counts need it)."""
    from megatron_denoise.layout import ParallelLayout

    layout = ParallelLayout.from_config(cfg.parallel, world_size)
    m, s = cfg.model, cfg.sft
    lines = [f"config OK: {cfg.name} (warm-start)",
             f"model: {m.family} layers={m.num_layers} hidden={m.hidden_size} heads={m.num_attention_heads}/"
             f"{m.num_query_groups} vocab={m.vocab_size} dtype={m.params_dtype} from {m.hf_path}",
             f"layout: {layout.describe()}",
             f"optimizer: {cfg.optimizer.name} lr={cfg.optimizer.lr} {cfg.optimizer.scheduler} "
             f"warmup={cfg.optimizer.warmup_steps} clip={cfg.optimizer.clip_grad}",
             "plan:"]
    hf = _path(m.tokenizer_path or m.hf_path)
    p: Optional[SFTPlan] = None
    if (hf / "tokenizer_config.json").is_file() or (hf / "tokenizer.json").is_file():
        try:
            tok = load_tokenizer(str(hf), cfg)
            ex, report = load_examples(s.train_files, s, tok)
            p = plan(s, len(ex), ex)
            lines.append(f"  data: {report.summary()}")
        except (OSError, ValueError) as e:
            lines.append(f"  data: not read ({str(e).splitlines()[0]})")
    else:
        lines.append(f"  data: not read (no tokenizer at {hf} yet)")
    if p is None and s.total_steps is not None:
        p = SFTPlan(rows=0, rows_per_step=s.rows_per_step, total_steps=s.total_steps, epochs=float("nan"))
    if p is not None:
        lines += [f"  {x}" for x in p.describe()]
    lines += [f"  rows_per_dp_rank: {s.rows_per_step / layout.dp:g}",
              f"  micro_batch_tokens: {micro_batch_tokens(s)} (max_seq_length {s.max_seq_length})",
              f"  export_hf_steps: {sorted(s.export_hf_steps)} + final",
              f"  checkpoints: every {cfg.checkpoint.save_interval} steps into {cfg.checkpoint.dir}",
              f"  output: {cfg.logging.output_dir}"]
    return "\n".join(lines)
