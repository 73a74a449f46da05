"""Peak memory and time of ONE Megatron actor training step, fused loss vs torch loss (issue 15).

    python benchmarks/bench_actor_memory.py [--vocab 151936] [--tokens 4096] [--hidden 256] [--layers 2]

A real `MegatronActor.train_step` (megatron-core schedule, gloo, one process, fp32 on CPU) on one
micro-batch of `--tokens` packed tokens with a Qwen3-sized vocabulary, once per loss
implementation, each in its own process (this file re-executed with --worker), in one run:

    none   the same step with a trivial loss on the hidden states (no output layer at all): the
           memory and time of everything that is NOT the loss
    fused  algorithm.loss_impl=fused (megatron_denoise.kernels: never holds [T, V] logits)
    torch  algorithm.loss_impl=torch (shard logits, vocab-parallel log-softmax: [T, V] fp32)

Peak memory is the process's peak resident set during the step (Linux VmHWM, reset just before
it through /proc/self/clear_refs) minus the resident set before it; the loss part is that minus
the `none` step's. Time is the fastest of --steps steps after a warm-up step. The model is kept
small (hidden 256, 2 layers) so that the vocabulary dominates, as it does per token in a real
policy. Not a test: run it alone on a quiet machine. The torch step needs ~19 GB at the defaults
(it is skipped, saying so, when the machine does not have that much available).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _kib(field: str) -> int:
    src = "/proc/meminfo" if field == "MemAvailable" else "/proc/self/status"
    return int(re.search(rf"{field}:\s+(\d+)", Path(src).read_text()).group(1))


def worker(spec: dict) -> None:
    import torch

    from megatron_denoise.config.schema import Config, ModelConfig
    from megatron_denoise.layout import ParallelLayout
    from megatron_denoise.megatron import actor as actor_mod
    from megatron_denoise.megatron import parallel_state as ps
    from megatron_denoise.megatron.actor import MegatronActor
    from megatron_denoise.megatron.batching import ActorBatch

    impl = spec["impl"]
    groups = ps.initialize(ParallelLayout(world_size=1), seed=1)
    cfg = Config()
    h = spec["hidden"]
    cfg.model = ModelConfig(family="qwen3", num_layers=spec["layers"], hidden_size=h, ffn_hidden_size=2 * h,
                            num_attention_heads=4, num_query_groups=2, kv_channels=h // 4,
                            vocab_size=spec["vocab"], max_position_embeddings=spec["tokens"] + 8,
                            params_dtype="float32")
    cfg.trainer.micro_batch_tokens = spec["tokens"]
    cfg.optimizer.name, cfg.optimizer.lr, cfg.parallel.use_distributed_optimizer = "sgd", 1e-4, False
    cfg.algorithm.loss_impl = "torch" if impl == "torch" else "fused"
    cfg.algorithm.force_on_policy = False  # the PPO path: ratios, clipping, entropy
    cfg.algorithm.entropy_coeff = 0.01
    if impl == "none":
        def trivial(hidden, *a, **k):  # the step without any output-layer work
            loss = (hidden.float() ** 2).mean() * 1e-6
            return loss, None, None, {}

        actor_mod.policy_loss_from_hidden = trivial
    actor = MegatronActor(cfg, groups)
    g = torch.Generator().manual_seed(0)
    rows = 4
    width = spec["tokens"] // rows
    ids = torch.randint(0, spec["vocab"], (rows, width), generator=g)
    lm = torch.zeros(rows, width)
    lm[:, width // 8:] = 1.0
    lens = torch.full((rows,), width)
    batch = ActorBatch(input_ids=ids, sequence_lengths=lens, loss_mask=lm, advantages=torch.randn(rows, generator=g),
                       old_logprobs=-5.0 * lm)
    actor.train_step(batch)  # warm-up: optimizer state, allocator
    times, peaks = [], []
    for _ in range(spec["steps"]):
        before = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        t0 = time.perf_counter()
        m = actor.train_step(batch)
        times.append(time.perf_counter() - t0)
        peaks.append(_kib("VmHWM") - before)
    print("RESULT " + json.dumps({"step_s": min(times), "peak_mib": max(peaks) / 1024,
                                  "micro_batches": m["num_micro_batches"], "loss_tokens": m["loss_tokens"],
                                  "fused": m.get("loss_impl_fused")}), flush=True)
    ps.teardown(destroy_process_group=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--impls", default="none,fused,torch")
    ap.add_argument("--force", action="store_true", help="run the torch step even if it may not fit in memory")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    print(f"actor train step: vocab {args.vocab}, {args.tokens} tokens in one micro-batch, hidden {args.hidden}, "
          f"{args.layers} layers, fp32, CPU (gloo, 1 process)")
    print(f"{'loss':<6} {'step (s)':>9} {'step peak (MiB)':>16} {'loss part (MiB)':>16}")
    res = {}
    for impl in args.impls.split(","):
        # the torch path holds ~7-8 fp32 [T, V] temporaries (measured: 4.5 GB at 1024 tokens, 9.3 GB at 2048)
        need_gb = args.tokens * args.vocab * 32 / 1e9
        avail_gb = _kib("MemAvailable") / 1e6 if Path("/proc/meminfo").exists() else float("inf")
        if impl == "torch" and need_gb > 0.9 * avail_gb and not args.force:
            print(f"{impl:<6} SKIPPED: needs ~{need_gb:.1f} GB, {avail_gb:.1f} GB available (--force, or fewer --tokens)")
            continue
        spec = json.dumps({"impl": impl, "vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden,
                           "layers": args.layers, "steps": args.steps})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
               str(free_port()), __file__, "--worker", spec]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{impl:<6} FAILED (rc={proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}", flush=True)
            continue
        r = res[impl] = json.loads(line[len("RESULT "):])
        base = res.get("none", {}).get("peak_mib")
        part = f"{r['peak_mib'] - base:>16.0f}" if base is not None and impl != "none" else f"{'-':>16}"
        print(f"{impl:<6} {r['step_s']:>9.2f} {r['peak_mib']:>16.0f} {part}", flush=True)
    if {"none", "fused", "torch"} <= set(res):
        base = res["none"]["peak_mib"]
        lf, lt = res["fused"]["peak_mib"] - base, res["torch"]["peak_mib"] - base
        print(f"torch / fused: loss-part peak memory {lt / max(lf, 1.0):.1f}x, step peak memory "
              f"{res['torch']['peak_mib'] / res['fused']['peak_mib']:.1f}x, step time "
              f"{res['torch']['step_s'] / res['fused']['step_s']:.2f}x (> 1: fused faster)")


if __name__ == "__main__":
    main()
