"""One full DenoiseRL-GRPO step and one GRPO step at a matched rollout budget, through the trainer's
own path (Ray policy worker + colocated vLLM replica + verifier pool + train_step), per model, in
one run; with per-phase times and the efficiency figures of issue 16.

    python benchmarks/bench_step.py [--models smollm2,testbed] [--set KEY=VALUE ...] [--baseline KEY=VALUE ...]
        [--repeats N] [--warmup 1|2] [--no-hf] [--json OUT]

Models: `smollm2` is the SmolLM2-135M config (configs/tiny-denoise-grpo-cpu-1n1g.yaml: 2 GSM8K
problems x (N=2 + K=2) rows, R=128); `testbed` is the main job's 1.1M-parameter Llama
(configs/testbed-denoise-grpo-cpu-1n1g.yaml: 32 arithmetic problems x (N=6 + K=2), R=64; random
weights from model.build, since this measures speed, not learning). GRPO runs the same problems
with N+K main rows and K=0 (same rows, same response cap R). Wrong-solution pools are synthetic
(a fixed wrong text per problem). `--set` applies config overrides to every model (e.g. the old
path: `--set trainer.micro_batch_tokens=512`). `--set rollout.ignore_eos=true` makes the two steps do
equal work: every row generates its whole budget (R, or R - p for a denoise row), so the
DenoiseRL/GRPO ratio is not swayed by where the sampled rows happened to stop.

Per model: two untimed warm-up steps (DenoiseRL, then GRPO; `--warmup 1`: the DenoiseRL one only), then
`--repeats` pairs of a GRPO and a DenoiseRL step (figures are means over the repeats). Printed:
- phases (driver wall time, PhaseTimer): generate, reward, old_logprob, train, refit (+ sleep/wake),
  other (fold, pack, advantages, mismatch); the in-worker time of generate / log-probs / train,
  so that the rest of each phase (Ray calls, batch transfer, ActorBatch) shows as "ray+batch";
- DenoiseRL/GRPO step-time ratio, tokens the R - p cap saved (prefix tokens not generated), the
  engine's prefix-cache hit rate (vLLM's num_cached_tokens over prompt tokens);
- actor MFU: 6*N*T (train) and 2*N*T (log-probs), N all matmul parameters (tied head once), plus
  causal attention 6*L*d*sum(n^2) / 2*L*d*sum(n^2), over a matmul rate measured IN the policy
  worker (same threads, fp32, the model's GEMM shapes at the micro-batch token count);
- generation efficiency: engine tokens/s vs its floor, the sum over decode steps of
  max(weight bytes / measured read bandwidth, 2*N*B_t / matmul rate at [B_t, H]) with B_t the rows
  still running at step t (plus the prefill at the matmul rate), measured IN the engine process;
- vLLM/transformers: `generate` of the same requests with transformers (batched, in the driver);
- refit share of the step, and where its time went (the sender filling buckets / waiting for the
  engine, the engine waiting for buckets).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "smollm2": REPO / "configs" / "tiny-denoise-grpo-cpu-1n1g.yaml",
    "testbed": REPO / "configs" / "testbed-denoise-grpo-cpu-1n1g.yaml",
}


# ---------------------------------------------------------------------------------------------
# probes run inside the Ray actors (pickled by value with __ray_call__)

def _policy_probe(worker):
    """Wrap the actor's compute_logprobs / update to record in-worker seconds and token counts."""
    import time as _t

    actor = worker.actor
    stats = worker.__dict__.setdefault("_bench", {"compute_logprobs": [], "update": []})
    for name in ("compute_logprobs", "update"):
        if getattr(actor, f"_bench_orig_{name}", None) is not None:
            continue
        orig = getattr(actor, name)
        setattr(actor, f"_bench_orig_{name}", orig)

        def wrapped(batch, *a, _o=orig, _n=name, **kw):
            t0 = _t.perf_counter()
            out = _o(batch, *a, **kw)
            lens = batch.sequence_lengths.double()
            stats[_n].append({"seconds": _t.perf_counter() - t0, "tokens": float(lens.sum()),
                              "sum_sq": float((lens ** 2).sum()), "rows": int(lens.numel()),
                              "loss_tokens": float(batch.loss_mask.sum()) if batch.loss_mask is not None else 0.0})
            return out

        setattr(actor, name, wrapped)
    return True


def _policy_stats(worker):
    stats = worker.__dict__.get("_bench", {"compute_logprobs": [], "update": []})
    out = {k: list(v) for k, v in stats.items()}
    for v in stats.values():
        v.clear()  # in place: the wrappers hold this dict
    return out


def _matmul_rate(shapes, seconds=0.6):
    """FLOP/s of torch.mm over `shapes` [(m, k, n), ...] (fp32, this process' threads), FLOP-weighted."""
    import time as _t

    import torch

    total_flop, total_s = 0.0, 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(2):
            torch.mm(a, b)
        reps, t0 = 0, _t.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            dt = _t.perf_counter() - t0
            if dt > seconds / len(shapes) and reps >= 3:
                break
        total_flop += 2.0 * m * k * n * reps
        total_s += dt
    return total_flop / total_s


def _read_bandwidth(nbytes=256 << 20):
    """Bytes/s of streaming a tensor larger than the caches (sum over fp32)."""
    import time as _t

    import torch

    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = _t.perf_counter()
        x.sum()
        best = min(best, _t.perf_counter() - t0)
    return nbytes / best


def _policy_rates(worker, shapes):
    import torch

    return {"matmul_flops": _matmul_rate(shapes), "threads": torch.get_num_threads()}


def _engine_probe(replica):
    """Wrap the vLLM LLM.generate of a replica to record seconds, prompt / cached tokens and lengths."""
    import time as _t

    llm = replica.engine.llm
    stats = replica.__dict__.setdefault("_bench", [])
    if getattr(llm, "_bench_orig_generate", None) is None:
        orig = llm.generate
        llm._bench_orig_generate = orig

        def gen(prompts, *a, **kw):
            t0 = _t.perf_counter()
            outs = orig(prompts, *a, **kw)
            stats.append({"seconds": _t.perf_counter() - t0,
                          "prompt_lengths": [len(o.prompt_token_ids) for o in outs],
                          "cached": [int(o.num_cached_tokens or 0) for o in outs],
                          "lengths": [len(o.outputs[0].token_ids) for o in outs]})
            return outs

        llm.generate = gen
    return True


def _engine_stats(replica):
    stats = replica.__dict__.get("_bench", [])
    out = list(stats)
    stats.clear()  # in place: the wrapper holds this list
    return out


def _engine_rates(replica, hidden, ffn, qkv, vocab, batches):
    import torch

    rates = {b: _matmul_rate([(b, hidden, qkv), (b, hidden, 2 * ffn), (b, ffn, hidden), (b, hidden, vocab)], 0.4)
             for b in batches}
    return {"matmul_flops_by_batch": rates, "read_bytes_per_s": _read_bandwidth(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------

class FixedProblems:
    """The same B problems every step (GRPO and DenoiseRL see identical prompts)."""

    def __init__(self, problems):
        self.problems = problems

    def next_problems(self, n):
        if n > len(self.problems):
            raise ValueError(f"asked for {n} problems, have {len(self.problems)}")
        return list(self.problems[:n])


def _problems(name, cfg, tokenizer, run_dir):
    from megatron_denoise.data import load_problems

    B = cfg.data.problems_per_step
    if name == "testbed":
        from megatron_denoise.config.schema import TaskConfig
        from megatron_denoise.prepare.tasks import write_task_file

        path = Path(run_dir) / "bench_tasks.parquet"
        tp = write_task_file(path, TaskConfig(kind="arith", seed=7, count=B, min_steps=2, max_steps=4, max_operand=9))
        probs, _ = load_problems([str(path)], cfg.data, tokenizer=tokenizer)
        wrong = [p.solution.replace("\\boxed{" + str(p.answer) + "}", "\\boxed{" + str(p.answer + 1) + "}") for p in tp]
    else:
        probs, _ = load_problems(["gsm8k"], cfg.data, tokenizer=tokenizer)
        probs = probs[:B]
        wrong = ["Let's compute step by step. First we add the numbers and get 42, then we divide by 3 "
                 "to get 14, so the final answer is \\boxed{14}."] * B
    if len(probs) < B:
        raise RuntimeError(f"{name}: only {len(probs)} problems")
    return [dataclasses.replace(p, wrong_pool=(w,)) for p, w in zip(probs[:B], wrong)]


def _model_numbers(cfg):
    m = cfg.model
    d_attn = m.num_attention_heads * m.kv_channels
    d_kv = m.num_query_groups * m.kv_channels
    per_layer = m.hidden_size * (d_attn + 2 * d_kv) + d_attn * m.hidden_size + 3 * m.hidden_size * m.ffn_hidden_size
    n_matmul = m.num_layers * per_layer + m.vocab_size * m.hidden_size  # LM head (tied: counted once)
    return {"n_matmul": float(n_matmul), "head": float(m.vocab_size * m.hidden_size), "layers": m.num_layers,
            "d_attn": d_attn, "hidden": m.hidden_size, "ffn": m.ffn_hidden_size, "qkv": d_attn + 2 * d_kv, "vocab": m.vocab_size,
            "weight_bytes": 4.0 * (n_matmul + 2 * m.num_layers * m.hidden_size)}


def _gen_floor(calls, mn, rates):
    """Floor seconds of the engine for the recorded generate calls (see the module docstring)."""
    by_b = rates["matmul_flops_by_batch"]
    keys = sorted(int(k) for k in by_b)

    def rate(b):
        k = min(keys, key=lambda x: abs(x - b))
        return by_b[k] if k in by_b else by_b[str(k)]

    bw_step = mn["weight_bytes"] / rates["read_bytes_per_s"]
    floor = 0.0
    for c in calls:
        prefill = sum(p - h for p, h in zip(c["prompt_lengths"], c["cached"]))
        floor += 2 * mn["n_matmul"] * prefill / rate(max(keys))
        lengths = sorted(c["lengths"])
        for t in range(max(lengths, default=0)):
            b = sum(1 for n in lengths if n > t)
            floor += max(bw_step, 2 * mn["n_matmul"] * b / rate(b))
    return floor


def run_model(name, args, overrides, with_hf=True):
    import ray
    import torch

    from transformers import AutoTokenizer

    from megatron_denoise.config.loader import load_config
    from megatron_denoise.core.fold import hf_decoder
    from megatron_denoise.prepare.models import ensure_model
    from megatron_denoise.reward.pool import VerifierPool
    from megatron_denoise.trainer.problems import PromptCache
    from megatron_denoise.trainer.step import StepContext, train_step
    from megatron_denoise.trainer.workers import PolicyGroup, RolloutFleet, init_ray

    run_dir = Path(args.run_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    ov = [f"logging.output_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", "logging.tensorboard=false",
          "trainer.val_before_train=false", "trainer.test_freq=0"]
    if name == "testbed":
        ov += ["model.hf_path=${oc.env:MDN_CACHE,'~/.cache/megatron_denoise'}/testbed-llama-1m",
               "model.build.source=random"]
    cfg = load_config(MODELS[name], overrides=ov + list(overrides))
    n, k = cfg.denoise.n_main, cfg.denoise.k_denoise
    cfg_denoise = cfg
    cfg_grpo = dataclasses.replace(cfg, denoise=dataclasses.replace(cfg.denoise, n_main=n + k, k_denoise=0))
    hf_path = ensure_model(cfg.model)
    tok = AutoTokenizer.from_pretrained(hf_path)
    problems = _problems(name, cfg, tok, run_dir)
    mn = _model_numbers(cfg)

    t0 = time.perf_counter()
    init_ray(cfg, str(run_dir))
    policy = PolicyGroup.create(cfg, hf_path)
    fleet = RolloutFleet.create(cfg, hf_path, str(run_dir), policy)
    scorer = VerifierPool(num_workers=cfg.reward.num_workers, deadline_s=cfg.reward.deadline_s,
                          max_answer_chars=cfg.reward.max_answer_chars)
    setup_s = time.perf_counter() - t0
    worker, replica = policy.workers[0], fleet.replicas[0][0]
    ray.get([worker.__ray_call__.remote(_policy_probe), replica.__ray_call__.remote(_engine_probe)])

    captured = {}
    orig_generate = fleet.generate

    def generate(requests, sampling):
        captured["requests"], captured["sampling"] = list(requests), sampling
        return orig_generate(requests, sampling)

    fleet.generate = generate
    prompt_ids = PromptCache(tok)
    ctx = StepContext(cfg=cfg, policy=policy, engine=fleet, scorer=scorer, problems=FixedProblems(problems),
                      tokenizer=tok, prompt_ids=prompt_ids, decode=hf_decoder(tok), pad_id=tok.pad_token_id or 0)
    result = {"model": name, "config": str(MODELS[name].relative_to(REPO)), "overrides": list(overrides),
              "setup_s": setup_s, "n_matmul_params": mn["n_matmul"], "steps": {},
              "loss_tokens_only": bool(cfg.trainer.loss_tokens_only)}
    try:
        step = 0
        # warm-up: the first-call costs of every phase, and of the actor's second train step, which in
        # one process (profile_actor's batch) took 12.7-13.3 s against 10.5-11.9 s for the steps after it
        for c in [cfg_denoise, cfg_grpo][:args.warmup]:
            ctx.cfg = c
            train_step(ctx, step)
            step += 1
        ray.get([worker.__ray_call__.remote(_policy_stats), replica.__ray_call__.remote(_engine_stats)])
        order = [("grpo", cfg_grpo), ("denoise", cfg_denoise)] * args.repeats
        for label, c in order:
            ctx.cfg = c
            metrics = train_step(ctx, step)
            step += 1
            pst, est = ray.get([worker.__ray_call__.remote(_policy_stats), replica.__ray_call__.remote(_engine_stats)])
            reqs = captured["requests"]
            rec = {"metrics": {k: v for k, v in metrics.items() if k.startswith(("time/", "refit/"))},
                   "policy": pst, "engine": est,
                   "rows": len(reqs), "prefix_tokens": sum(r.prefix_length for r in reqs),
                   "max_tokens_sum": sum(r.max_tokens for r in reqs)}
            result["steps"].setdefault(label, []).append(rec)
            if label == "denoise":
                result["requests"], result["sampling"] = reqs, captured["sampling"]
        # efficiency references measured in the worker and engine processes
        mb_tokens = int(cfg.trainer.micro_batch_tokens)
        biggest = max(est_rec["policy"]["update"][0]["tokens"] for est_rec in result["steps"]["denoise"])
        m_rows = int(min(mb_tokens, max(biggest, 1)))
        shapes = [(m_rows, mn["hidden"], mn["qkv"]), (m_rows, mn["d_attn"], mn["hidden"]),
                  (m_rows, mn["hidden"], 2 * mn["ffn"]), (m_rows, mn["ffn"], mn["hidden"]),
                  (m_rows, mn["hidden"], mn["vocab"])]
        result["policy_rates"] = ray.get(worker.__ray_call__.remote(_policy_rates, shapes))
        result["policy_rates"]["shapes"] = shapes
        rows = len(result["requests"])
        batches = sorted({1, 2, 4, 8, 16, 32, 64, rows} & set(range(1, rows + 1)))
        result["engine_rates"] = ray.get(replica.__ray_call__.remote(
            _engine_rates, mn["hidden"], mn["ffn"], mn["qkv"], mn["vocab"], batches))
    finally:
        scorer.close()
        fleet.close()
        policy.shutdown()
        ray.shutdown()

    # transformers on the DenoiseRL step's requests, in the driver (2 threads, batched)
    if with_hf and not args.no_hf:
        from megatron_denoise.rollout.hf_engine import HFEngine

        torch.set_num_threads(os.cpu_count() or 1)
        reqs = result["requests"]
        hf = HFEngine(hf_path, dtype="float32", batch_size=len(reqs))
        hf.generate(reqs[:2], result["sampling"])
        t0 = time.perf_counter()
        out = hf.generate(reqs, result["sampling"])
        dt = time.perf_counter() - t0
        hf.close()
        result["hf"] = {"seconds": dt, "tokens": sum(len(c.token_ids) for c in out)}
    result.pop("requests")
    result.pop("sampling")
    result["summary"] = summarise(result, mn)
    return result


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(res, mn):
    s = {}
    rate = res["policy_rates"]["matmul_flops"]
    for label, recs in res["steps"].items():
        m = {}
        for key in ("generate", "reward", "old_logprob", "train", "refit", "sleep", "wake", "step"):
            m[key] = _mean(r["metrics"].get(f"time/{key}", 0.0) for r in recs)
        m["other"] = m["step"] - sum(m[k] for k in ("generate", "reward", "old_logprob", "train", "refit", "sleep", "wake"))
        lp = [c for r in recs for c in r["policy"]["compute_logprobs"]]
        up = [c for r in recs for c in r["policy"]["update"]]
        gen = [c for r in recs for c in r["engine"]]
        m["gen_inner"] = _mean(sum(c["seconds"] for c in r["engine"]) for r in recs)
        m["logprob_inner"] = _mean(sum(c["seconds"] for c in r["policy"]["compute_logprobs"]) for r in recs)
        m["train_inner"] = _mean(sum(c["seconds"] for c in r["policy"]["update"]) for r in recs)
        m["ray_batch"] = (m["generate"] - m["gen_inner"]) + (m["old_logprob"] - m["logprob_inner"]) + (m["train"] - m["train_inner"])
        # trainer.loss_tokens_only: the update's output layer runs on the loss tokens only
        head_tokens = "loss_tokens" if res.get("loss_tokens_only") else "tokens"
        tr_flop = sum(6 * (mn["n_matmul"] - mn["head"]) * c["tokens"] + 6 * mn["head"] * c[head_tokens]
                      + 6 * mn["layers"] * mn["d_attn"] * c["sum_sq"] for c in up)
        lp_flop = sum(2 * mn["n_matmul"] * c["tokens"] + 2 * mn["layers"] * mn["d_attn"] * c["sum_sq"] for c in lp)
        m["train_tokens"] = _mean(c["tokens"] for c in up)
        m["loss_tokens"] = _mean(c["loss_tokens"] for c in up)
        m["train_mfu"] = tr_flop / sum(c["seconds"] for c in up) / rate if up else float("nan")
        m["logprob_mfu"] = lp_flop / sum(c["seconds"] for c in lp) / rate if lp else float("nan")
        gen_tokens = sum(sum(c["lengths"]) for c in gen)
        gen_s = sum(c["seconds"] for c in gen)
        m["gen_tokens"] = gen_tokens / len(recs)
        m["gen_tokens_per_s"] = gen_tokens / gen_s if gen_s else float("nan")
        floor_s = _gen_floor(gen, mn, res["engine_rates"])
        m["gen_floor_tokens_per_s"] = gen_tokens / floor_s if floor_s else float("nan")
        m["gen_vs_floor"] = floor_s / gen_s if gen_s else float("nan")
        prompt = sum(sum(c["prompt_lengths"]) for c in gen)
        m["prefix_cache_hit"] = sum(sum(c["cached"]) for c in gen) / prompt if prompt else 0.0
        m["prefix_tokens_not_generated"] = _mean(r["prefix_tokens"] or 0 for r in recs)
        m["refit_share"] = m["refit"] / m["step"]
        for key in ("refit_fill", "refit_push", "refit_engine_wait"):   # where the refit's time went
            m[key] = _mean(r["metrics"].get(f"time/{key}", float("nan")) for r in recs)
        s[label] = m
    s["denoise_over_grpo"] = s["denoise"]["step"] / s["grpo"]["step"]
    # the rows' lengths are sampled, so the two steps may not train as many tokens: per trained token
    s["denoise_over_grpo_per_token"] = ((s["denoise"]["step"] / s["denoise"]["train_tokens"])
                                        / (s["grpo"]["step"] / s["grpo"]["train_tokens"]))
    if "hf" in res:
        s["hf_tokens_per_s"] = res["hf"]["tokens"] / res["hf"]["seconds"]
        s["vllm_over_hf"] = s["denoise"]["gen_tokens_per_s"] / s["hf_tokens_per_s"]
    return s


def print_report(res):
    s = res["summary"]
    print(f"\n=== {res['model']} ({res['config']}; {res['n_matmul_params'] / 1e6:.2f}M matmul params; "
          f"overrides {res['overrides'] or 'none'}; setup {res['setup_s']:.1f} s) ===")
    cols = ["step", "generate", "reward", "old_logprob", "train", "refit", "sleep", "wake", "other", "ray_batch"]
    print(f"{'seconds':<9}" + "".join(f"{c:>12}" for c in cols))
    for label in ("grpo", "denoise"):
        print(f"{label:<9}" + "".join(f"{s[label][c]:12.2f}" for c in cols))
    d = s["denoise"]
    print(f"DenoiseRL/GRPO step ratio {s['denoise_over_grpo']:.3f} ({s['denoise_over_grpo_per_token']:.3f} per trained "
          f"token: {s['denoise']['train_tokens']:.0f} vs {s['grpo']['train_tokens']:.0f}); prefix tokens not generated (R - p cap) "
          f"{d['prefix_tokens_not_generated']:.0f}; prefix-cache hit rate denoise {d['prefix_cache_hit']:.1%}, "
          f"grpo {s['grpo']['prefix_cache_hit']:.1%}")
    pr = res["policy_rates"]
    for label in ("grpo", "denoise"):
        m = s[label]
        lp = (f"log-probs {m['logprob_inner']:.2f} s -> MFU {m['logprob_mfu']:.1%}" if m["logprob_inner"] > 0
              else "no separate log-prob forward")
        print(f"actor {label}: train {m['train_tokens']:.0f} tokens ({m['loss_tokens']:.0f} loss) in {m['train_inner']:.2f} s "
              f"-> MFU {m['train_mfu']:.1%}; {lp} (matmul rate {pr['matmul_flops'] / 1e9:.1f} GFLOP/s, {pr['threads']} threads)")
    er = res["engine_rates"]
    for label in ("grpo", "denoise"):
        m = s[label]
        print(f"engine {label}: {m['gen_tokens']:.0f} tokens in {m['gen_inner']:.2f} s = {m['gen_tokens_per_s']:.1f} tok/s; "
              f"floor {m['gen_floor_tokens_per_s']:.1f} tok/s -> {m['gen_vs_floor']:.1%} of floor "
              f"(read {er['read_bytes_per_s'] / 1e9:.1f} GB/s, {er['threads']} threads)")
    if "hf_tokens_per_s" in s:
        print(f"vLLM/transformers {s['vllm_over_hf']:.2f}x (transformers {s['hf_tokens_per_s']:.1f} tok/s, "
              f"{res['hf']['tokens']} tokens in {res['hf']['seconds']:.1f} s)")
    print(f"refit share of step: grpo {s['grpo']['refit_share']:.1%}, denoise {d['refit_share']:.1%}")
    for label in ("grpo", "denoise"):
        m = s[label]
        print(f"refit {label}: {m['refit']:.2f} s; the sender filled buckets {m['refit_fill']:.2f} s and waited for "
              f"the engine {m['refit_push']:.2f} s; the engine waited for buckets {m['refit_engine_wait']:.2f} s")


def print_before_after(name, b, a):
    print(f"\n--- {name}: before (baseline overrides) -> after ---")
    for label in ("grpo", "denoise"):
        for key in ("step", "generate", "old_logprob", "train", "refit", "other"):
            x, y = b[label][key], a[label][key]
            print(f"{label:<8} {key:<12} {x:8.2f} s -> {y:8.2f} s" + (f"  ({x / y:.2f}x)" if y > 0 else ""))
    for key in ("train_mfu", "logprob_mfu", "gen_vs_floor", "refit_share"):
        x, y = (f"{v:8.1%}" if v == v else "     n/a" for v in (b["denoise"][key], a["denoise"][key]))
        print(f"denoise  {key:<12} {x}   -> {y}")
    print(f"DenoiseRL/GRPO {b['denoise_over_grpo']:.3f} -> {a['denoise_over_grpo']:.3f}"
          + (f"; vLLM/transformers {b['vllm_over_hf']:.2f}x -> {a['vllm_over_hf']:.2f}x" if "vllm_over_hf" in a else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,testbed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (every model)")
    ap.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides selecting the old path: each model runs with them first, then without")
    ap.add_argument("--repeats", type=int, default=1, help="GRPO + DenoiseRL step pairs after the warm-up")
    ap.add_argument("--warmup", type=int, choices=(1, 2), default=2,
                    help="untimed steps first: 2 = a DenoiseRL and a GRPO step (1 = the DenoiseRL step only)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--run-dir", default=os.path.join(tempfile.gettempdir(), "mdn_bench_step"))
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    for name in args.models.split(","):
        pair = {}
        if args.baseline:  # the old path first, then the current one, in the same run
            pair["before"] = run_model(name, args, list(args.set) + list(args.baseline), with_hf=False)
        pair["after"] = run_model(name, args, args.set)
        if "before" in pair:
            b, a = pair["before"], pair["after"]
            if "hf" in a:  # transformers does not change with the baseline: measured once, in the "after" run
                b["hf"] = a["hf"]
                b["summary"]["hf_tokens_per_s"] = a["summary"]["hf_tokens_per_s"]
                b["summary"]["vllm_over_hf"] = b["summary"]["denoise"]["gen_tokens_per_s"] / a["summary"]["hf_tokens_per_s"]
            print_report(b)
            results.append(b)
        print_report(pair["after"])
        results.append(pair["after"])
        if "before" in pair:
            print_before_after(name, pair["before"]["summary"], pair["after"]["summary"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
