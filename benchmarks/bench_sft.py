"""Time of one warm-start step (MegatronActor.sft_step) on the testbed's tiny Llama, per packed
micro-batch budget and loss implementation, with where the time goes (CPU, gloo, fp32, 1 process).

    python benchmarks/bench_sft.py [--rows 64] [--steps 5] [--budgets 128,256,512,1024,2048]
                                   [--impls fused,torch] [--threads N] [--model-yaml configs/models/testbed-llama.yaml]

Rows come from the task generator (arith, 2-4 steps, operands <= 9: ~67 tokens a row with the
byte tokenizer); the model is built with random weights from the model YAML (its model.build).
Prints wall and CPU seconds per step, tokens/s, and the actor's phases (_plan: packing and masks,
_run_schedule: forward+backward, _apply_update: NaN guard + optimizer). For trend tracking, never
asserted: on a shared 2-core machine compare CPU seconds (wall time depends on the load).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budgets", default="128,256,512,1024,2048")
    ap.add_argument("--impls", default="fused,torch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--model-yaml", default=str(REPO / "configs" / "models" / "testbed-llama.yaml"))
    args = ap.parse_args(argv)

    import torch

    from megatron_denoise.config.loader import load_config
    from megatron_denoise.config.schema import SFTConfig, TaskConfig
    from megatron_denoise.prepare.tasks import write_task_file
    from megatron_denoise.sft import runner
    from megatron_denoise.sft.data import make_batch

    work = Path(tempfile.mkdtemp(prefix="bench_sft."))
    data = work / "train.parquet"
    write_task_file(data, TaskConfig(kind="arith", seed=1, count=args.rows * (args.steps + 1), min_steps=2,
                                     max_steps=4, max_operand=9))
    (work / "run.yaml").write_text(f"defaults: [{args.model_yaml}]\nmodel: {{hf_path: {work / 'model'}}}\n")
    base = ["cluster.gpus_per_node=1", "cluster.backend=gloo", f"sft.train_files=[{data}]", "sft.total_steps=1000",
            "sft.max_seq_length=192", f"sft.rows_per_step={args.rows}", f"logging.output_dir={work / 'out'}"]
    cfg = load_config(work / "run.yaml", base, root=SFTConfig)
    prep = runner.prepare(cfg)
    batches = [make_batch(prep.examples, range(i * args.rows, (i + 1) * args.rows), prep.pad_id)
               for i in range(args.steps + 1)]
    tokens = sum(int(b.sequence_lengths.sum()) for b in batches[1:]) / args.steps
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    from megatron_denoise.convert.megatron_io import load_hf_into_actor
    from megatron_denoise.layout import ParallelLayout
    from megatron_denoise.megatron import parallel_state
    from megatron_denoise.megatron.actor import ActorOptions, MegatronActor
    from megatron_denoise.sft.config import actor_config

    print(f"model {args.model_yaml}: {sum(len(e.tokens) for e in prep.examples) / len(prep.examples):.1f} tokens "
          f"a row, {args.rows} rows ({tokens:.0f} tokens) a step, {torch.get_num_threads()} thread(s)")
    print(f"{'budget':>7} {'impl':>6} {'wall s':>7} {'cpu s':>7} {'tok/s':>7} {'mbs':>4} {'plan':>6} {'fwd+bwd':>8} "
          f"{'update':>7}  (seconds per step)")
    for budget in [int(x) for x in args.budgets.split(",")]:
        for impl in args.impls.split(","):
            c = load_config(work / "run.yaml", base + [f"sft.micro_batch_tokens={budget}", f"sft.loss_impl={impl}"],
                            root=SFTConfig)
            groups = parallel_state.initialize(ParallelLayout.from_config(c.parallel, 1), backend="gloo", seed=1)
            actor = MegatronActor(actor_config(c, 1000), groups, ActorOptions(total_steps_for_schedule=1000))
            load_hf_into_actor(actor, prep.hf_path)
            phases: dict = {}
            for name in ("_plan", "_run_schedule", "_apply_update"):
                fn = getattr(actor, name)

                def timed(*a, _fn=fn, _name=name, **k):
                    t = time.perf_counter()
                    try:
                        return _fn(*a, **k)
                    finally:
                        phases[_name] = phases.get(_name, 0.0) + time.perf_counter() - t
                setattr(actor, name, timed)
            actor.sft_step(batches[0])  # warm-up
            phases.clear()
            w0, c0 = time.perf_counter(), time.process_time()
            for b in batches[1:]:
                m = actor.sft_step(b)
            wall, cpu = (time.perf_counter() - w0) / args.steps, (time.process_time() - c0) / args.steps
            print(f"{budget:>7} {impl:>6} {wall:7.3f} {cpu:7.3f} {tokens / wall:7.0f} {int(m['num_micro_batches']):>4} "
                  f"{phases['_plan'] / args.steps:6.3f} {phases['_run_schedule'] / args.steps:8.3f} "
                  f"{phases['_apply_update'] / args.steps:7.3f}", flush=True)
            parallel_state.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
