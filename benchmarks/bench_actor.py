"""Time of one actor training step per parallel layout on a tiny model (CPU, gloo, fp32).

    python benchmarks/bench_actor.py [--steps 3] [--layouts tp1,tp2,pp2,...] [--max-procs 4]

Each layout runs in its own torchrun launch (this file re-executed with --worker); the parent
prints one table. For trend tracking, not asserted: on a 2-core machine the numbers mostly
measure collective and schedule overhead (and 4-process layouts oversubscribe the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "tp1": (1, {}, "dense"),
    "dp2": (2, {}, "dense"),
    "dp2_distopt": (2, {"distopt": True}, "dense"),
    "tp2": (2, {"tp": 2}, "dense"),
    "tp2_sp": (2, {"tp": 2, "sequence_parallel": True}, "dense"),
    "pp2": (2, {"pp": 2}, "dense"),
    "pp2_vpp2": (2, {"pp": 2, "vpp": 2}, "dense"),
    "cp2": (2, {"cp": 2}, "dense"),
    "moe_ep1": (1, {}, "moe"),
    "moe_ep2_alltoall": (2, {"ep": 2}, "moe"),
    "moe_ep2_allgather": (2, {"ep": 2, "dispatcher": "allgather"}, "moe"),
    "tp2_pp2": (4, {"tp": 2, "pp": 2, "sequence_parallel": True}, "dense"),
}


def worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from megatron_denoise.config.schema import Config, ModelConfig, MoEConfig
    from megatron_denoise.layout import ParallelLayout
    from megatron_denoise.megatron import parallel_state as ps
    from megatron_denoise.megatron.actor import MegatronActor
    from megatron_denoise.megatron.batching import ActorBatch

    lay = dict(spec["layout"])
    distopt = lay.pop("distopt", False)
    dispatcher = lay.pop("dispatcher", "alltoall")
    world = int(os.environ["WORLD_SIZE"])
    layout = ParallelLayout(world_size=world, etp=lay.get("tp", 1), **lay)
    groups = ps.initialize(layout, seed=1)
    cfg = Config()
    common = dict(num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                  kv_channels=32, vocab_size=1000, max_position_embeddings=1024, params_dtype="float32")
    if spec["model"] == "moe":
        cfg.model = ModelConfig(family="qwen3_moe", moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=128,
                                                                  token_dispatcher_type=dispatcher), **common)
    else:
        cfg.model = ModelConfig(family="qwen3", **common)
    cfg.parallel.use_distributed_optimizer = distopt
    cfg.trainer.micro_batch_tokens = 512
    cfg.optimizer.lr = 1e-4
    actor = MegatronActor(cfg, groups)
    g = torch.Generator().manual_seed(0)
    rows, width = 16, 192
    lens = torch.randint(64, width + 1, (rows,), generator=g)
    ids = torch.randint(0, 1000, (rows, width), generator=g)
    lm = torch.zeros(rows, width)
    for r in range(rows):
        lm[r, 32:int(lens[r])] = 1.0
    batch = ActorBatch(input_ids=ids, sequence_lengths=lens, loss_mask=lm, advantages=torch.randn(rows, generator=g))
    actor.train_step(batch)  # warm-up
    times = []
    for _ in range(spec["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        m = actor.train_step(batch)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    actor.compute_logprobs(batch)
    t_logp = time.perf_counter() - t0
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"step_s": min(times), "mean_s": sum(times) / len(times), "logprobs_s": t_logp,
                                      "micro_batches": m["num_micro_batches"], "tokens": int(lens.sum())}), flush=True)
    ps.teardown(destroy_process_group=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--max-procs", type=int, default=4)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    print(f"{'layout':<20} {'procs':>5} {'step (s)':>9} {'mean (s)':>9} {'logprobs (s)':>12} {'micro-batches':>13}")
    base = None
    for name in args.layouts.split(","):
        if name not in LAYOUTS:
            sys.exit(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
        nproc, lay, model = LAYOUTS[name]
        if nproc > args.max_procs:
            continue
        spec = json.dumps({"layout": lay, "model": model, "steps": args.steps})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), __file__, "--worker", spec]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{name:<20} {nproc:>5}  FAILED (rc={proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        if name == "tp1":
            base = r["step_s"]
        rel = f"  ({r['step_s'] / base:.2f}x tp1)" if base else ""
        print(f"{name:<20} {nproc:>5} {r['step_s']:>9.3f} {r['mean_s']:>9.3f} {r['logprobs_s']:>12.3f} "
              f"{int(r['micro_batches']):>13}{rel}", flush=True)


if __name__ == "__main__":
    main()
