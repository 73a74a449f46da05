"""torch.profiler of the Megatron actor's log-prob and train phases on a batch shaped like one step of
a config (one process, gloo, the config's micro-batch budget), with the matmul rate of the same
process for an MFU. Prints the top operators by self CPU time and writes Chrome traces.

    python benchmarks/profile_actor.py [--config configs/tiny-denoise-grpo-cpu-1n1g.yaml] \\
        [--rows 8] [--prompt 130] [--response 100] [--set KEY=VALUE ...] [--trace-dir DIR] [--no-profile]

The weights are the config's model folder (model.build makes it on first use); token ids random.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny-denoise-grpo-cpu-1n1g.yaml"))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=130)
    ap.add_argument("--response", type=int, default=100)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", HF_HUB_OFFLINE="1")
    import torch

    from megatron_denoise.config.loader import load_config
    from megatron_denoise.convert.megatron_io import load_hf_into_actor
    from megatron_denoise.layout import ParallelLayout
    from megatron_denoise.megatron import parallel_state as ps
    from megatron_denoise.megatron.actor import MegatronActor
    from megatron_denoise.megatron.batching import ActorBatch
    from megatron_denoise.prepare.models import ensure_model

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_step import _matmul_rate, _model_numbers

    cfg = load_config(args.config, overrides=list(args.set) + ["logging.output_dir=/tmp/mdn_profile_actor"])
    hf = ensure_model(cfg.model)
    groups = ps.initialize(ParallelLayout.from_config(cfg.parallel, 1), backend="gloo", seed=1)
    actor = MegatronActor(cfg, groups)
    load_hf_into_actor(actor, hf)
    mn = _model_numbers(cfg)
    g = torch.Generator().manual_seed(0)
    rows, P, R = args.rows, args.prompt, args.response
    W = P + R
    ids = torch.randint(0, cfg.model.vocab_size, (rows, W), generator=g)
    lens = torch.tensor([P + R - (7 * i) % max(R // 2, 1) for i in range(rows)])
    lm = torch.zeros(rows, W)
    for i in range(rows):
        lm[i, P:int(lens[i])] = 1.0
    batch = ActorBatch(input_ids=ids, sequence_lengths=lens, loss_mask=lm,
                       advantages=torch.randn(rows, generator=g), old_logprobs=None)
    old, _ = actor.compute_logprobs(batch)  # warm-up
    batch.old_logprobs = old * lm
    actor.train_step(batch)
    T = float(lens.sum())
    sq = float((lens.double() ** 2).sum())
    lp_flop = 2 * mn["n_matmul"] * T + 2 * mn["layers"] * mn["d_attn"] * sq
    tr_flop = 3 * lp_flop
    if cfg.trainer.loss_tokens_only:  # the update's output layer runs on the loss tokens only
        tr_flop -= 6 * mn["head"] * (T - float(lm.sum()))
    m = int(min(int(cfg.trainer.micro_batch_tokens), T))
    rate = _matmul_rate([(m, mn["hidden"], mn["qkv"]), (m, mn["d_attn"], mn["hidden"]), (m, mn["hidden"], 2 * mn["ffn"]),
                         (m, mn["ffn"], mn["hidden"]), (m, mn["hidden"], mn["vocab"])])
    t_lp, t_tr = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        actor.compute_logprobs(batch)
        t_lp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        met = actor.train_step(batch)
        t_tr.append(time.perf_counter() - t0)
    lp, tr = min(t_lp), min(t_tr)
    print(f"{cfg.name}: {rows} rows, {T:.0f} tokens, {int(lm.sum())} loss tokens, micro-batches "
          f"{met['num_micro_batches']:.0f} (budget {cfg.trainer.micro_batch_tokens}), threads {torch.get_num_threads()}, "
          f"overrides {args.set or 'none'}")
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s at [{m}, ...] shapes")
    print(f"log-probs {lp:.2f} s -> MFU {lp_flop / lp / rate:.1%}; train step {tr:.2f} s -> MFU {tr_flop / tr / rate:.1%}")
    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    for name, fn in (("logprobs", lambda: actor.compute_logprobs(batch)), ("train", lambda: actor.train_step(batch))):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            fn()
        print(f"\n--- {name}: top {args.top} operators by self CPU time ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        if args.trace_dir:
            Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.trace_dir) / f"{cfg.name}-{name}.json"))
    ps.teardown(destroy_process_group=True)


if __name__ == "__main__":
    main()
