"""Peak memory and time of the policy loss (forward + backward): naive full logits vs the fused CPU path.

    OMP_NUM_THREADS=2 python benchmarks/bench_loss_kernel.py                   # T=4096 H=1024 V=151936 fp32
    python benchmarks/bench_loss_kernel.py --tokens 1024 --impls naive,chunked  # quicker

Each implementation runs in its own child process (same inputs, same seed), one after the other,
and the parent prints them side by side with ratios against `naive`:
- naive: `kernels.reference_policy_loss` - full [T, V] fp32 logits, log-softmax, entropy and the
  core loss, autograd backward (what a plain PyTorch trainer does);
- chunked: `kernels.fused_policy_loss(impl="chunked")` - eager PyTorch, gradient in forward;
- chunked_compiled: the same with torch.compile on the per-chunk math (compile time is reported
  separately and excluded from the timed run: it is paid once per shape per process).
Peak memory = peak RSS during forward + backward minus RSS before it (inputs and weight already
resident), read from VmHWM after resetting it through /proc/self/clear_refs (tracemalloc does not
see torch tensors). The weight gradient [V, H] is produced by every implementation and is
included in every number. Timings on shared 2-core machines swing: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def child(args: argparse.Namespace) -> dict:
    import torch

    from megatron_denoise.kernels import fused_policy_loss, reference_policy_loss

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    T, H, V = args.tokens, args.hidden, args.vocab

    def inputs(t: int, seed: int):
        g.manual_seed(seed)
        hidden = (torch.randn(t, H, generator=g) * 0.5).to(dtype).requires_grad_(True)
        targets = torch.randint(0, V, (t,), generator=g)
        mask = (torch.rand(t, generator=g) > 0.2).float()
        adv = torch.randn(t, generator=g)
        seq_ids = torch.arange(t) * 8 // t
        return hidden, targets, mask, adv, seq_ids

    weight = (torch.randn(V, H, generator=g) * 0.02).to(dtype).requires_grad_(True)  # seed 0

    def step(hidden, targets, mask, adv, seq_ids):
        with torch.no_grad():  # old log-probs near the current ones so the clip binds sometimes
            old = torch.randn(hidden.shape[0], generator=g) * 0.1 - 12.0
        kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, return_entropy=True, loss_agg="token-mean",
                  global_num_tokens=float(mask.sum()), seq_ids=seq_ids)
        if args.impl == "naive":
            out = reference_policy_loss(hidden, weight, 0, targets, old, adv, mask, **kw)
        else:
            out = fused_policy_loss(hidden, weight, 0, targets, old, adv, mask, impl=args.impl,
                                    chunk_tokens=args.chunk_tokens, **kw)
        out.loss.backward()
        return out

    from megatron_denoise.kernels.chunked import default_chunk_tokens

    chunk = args.chunk_tokens or default_chunk_tokens(T, V)
    args.chunk_tokens = chunk
    # warm-up on a batch with the same chunk shapes as the timed one (full chunk + the remainder)
    warm_t = min(T, chunk + (T % chunk))
    t0 = time.perf_counter()
    step(*inputs(warm_t, 1))  # warm-up (compiles the chunk graphs for chunked_compiled)
    compile_s = time.perf_counter() - t0
    weight.grad = None
    batch = inputs(T, 2)
    rss0 = _status_kb("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    out = step(*batch)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") - rss0
    return dict(impl=args.impl, chunk=chunk, seconds=seconds, peak_mb=peak_kb / 1024, warmup_s=compile_s,
                loss=float(out.loss), clip_fraction=float(out.clip_fraction),
                grad_w_norm=float(weight.grad.float().norm()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--impls", default="naive,chunked,chunked_compiled")
    p.add_argument("--rounds", type=int, default=2,
                   help="run the implementations round-robin this many times; report the fastest run of each "
                        "(the load of a shared machine changes within minutes)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default: ~32 MiB logits block)")
    p.add_argument("--impl", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.impl:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    print(f"policy loss fwd+bwd, T={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}, entropy on, "
          f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    best: dict[str, dict] = {}
    for impl in [i for _ in range(args.rounds) for i in args.impls.split(",")]:
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype]
        if args.chunk_tokens:
            cmd += ["--chunk-tokens", str(args.chunk_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{impl}: FAILED (exit {proc.returncode}; killed by the OOM killer if -9)\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[0][7:])
        prev = best.get(impl)
        if prev is None or r["seconds"] < prev["seconds"]:
            best[impl] = dict(r, peak_mb=max(r["peak_mb"], prev["peak_mb"] if prev else 0.0))
        elif r["peak_mb"] > prev["peak_mb"]:
            prev["peak_mb"] = r["peak_mb"]
        print(f"  done {impl}: {r['seconds']:.1f} s, {r['peak_mb']:.0f} MB (chunk {r['chunk']} tokens)", flush=True)
    rows = list(best.values())
    base = best.get("naive")
    print(f"\nfastest of {args.rounds} round(s) per implementation; peak = largest seen")
    print(f"\n{'impl':<18}{'time s':>9}{'peak MB':>10}{'time/naive':>12}{'naive/peak':>12}{'loss':>14}"
          f"{'clipfrac':>10}{'warmup s':>10}")
    for r in rows:
        tr = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        mr = f"{base['peak_mb'] / max(r['peak_mb'], 1e-9):.1f}x" if base else "-"
        print(f"{r['impl']:<18}{r['seconds']:>9.1f}{r['peak_mb']:>10.0f}{tr:>12}{mr:>12}{r['loss']:>14.6f}"
              f"{r['clip_fraction']:>10.4f}{r['warmup_s']:>10.1f}")
    if base:
        for r in rows:
            if r is not base:
                ok_m = base["peak_mb"] / max(r["peak_mb"], 1e-9) >= 8
                ok_t = r["seconds"] <= base["seconds"]
                print(f"{r['impl']}: peak memory <= 1/8 of naive: {'yes' if ok_m else 'NO'}; "
                      f"time no worse than naive: {'yes' if ok_t else 'NO'}")


if __name__ == "__main__":
    main()
