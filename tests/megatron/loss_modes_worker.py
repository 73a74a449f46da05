"""torchrun worker of tests/megatron/test_loss_modes_layouts.py: every loss mode at every layout.

Reuses mcore_worker's harness (spec/out JSON, tiny models, full tensors through distributed
checkpoints) and adds two checks:

    lm_reference  1 process: initial weights, log-probs, and for every VARIANT the loss, metrics
                  and every gradient of one step (the optimizer step itself is skipped, so all
                  variants see the same weights)
    lm_parity     N processes, one layout and one loss implementation: the same, compared with
                  the reference (max abs differences), plus what the layout exercised (empty
                  micro-batches, CP ranks holding no token of a sequence)
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import mcore_worker as mw  # noqa: E402

from megatron_denoise.megatron.batching import ActorBatch  # noqa: E402

BUDGET = 49  # micro_batch_tokens: uneven bins over DP2 (2 vs 1: an empty micro-batch), CP ranks
             # holding no token of a short sequence, 3 micro-batches -> 4 at PP2+VPP2
LENS = [24, 9, 17, 12, 20, 15, 5]


def lm_batch(seed: int = 0, vocab: int = 300) -> ActorBatch:
    g = torch.Generator().manual_seed(seed)
    rows, w = len(LENS), max(LENS)
    ids = torch.randint(0, vocab, (rows, w), generator=g)
    lm = torch.zeros(rows, w)
    for r, n in enumerate(LENS):
        lm[r, 3:n] = 1.0
    lm[2, 10] = 0.0  # a hole in one row's mask
    adv = torch.randn(rows, generator=g)
    return ActorBatch(input_ids=ids, sequence_lengths=torch.tensor(LENS), loss_mask=lm, advantages=adv)


def with_extras(batch: ActorBatch, logp: torch.Tensor, variant: str) -> ActorBatch:
    """Old log-probs off the current ones (clips bind); reference log-probs and IS weights for the
    variants that use them. Deterministic, so every process builds the same batch."""
    g = torch.Generator().manual_seed(7)
    old = (logp + 0.3 * torch.randn(logp.shape, generator=g)) * batch.loss_mask
    ref = (logp + 0.2 * torch.randn(logp.shape, generator=g)) * batch.loss_mask
    isw = (0.5 + torch.rand(logp.shape, generator=g)) * batch.loss_mask
    b = replace(batch, old_logprobs=old)
    if variant.startswith("kl"):
        b = replace(b, ref_logprobs=ref)
    if variant == "tis":
        b = replace(b, is_weights=isw)
    return b


def algo_for(cfg, variant: str):
    a = cfg.algorithm
    if variant in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        return replace(a, loss_agg=variant, loss_norm_tokens=30)
    if variant == "kl_k3":
        return replace(a, kl=replace(a.kl, coef=0.1, type="k3"))
    if variant == "kl_k1":
        return replace(a, loss_agg="seq-mean-token-mean", kl=replace(a.kl, coef=0.1, type="k1"))
    if variant == "gspo":
        return replace(a, policy_loss="gspo", dual_clip=None)
    if variant == "cispo":
        return replace(a, policy_loss="cispo")
    if variant == "tis":
        return replace(a, loss_agg="seq-mean-token-sum")
    raise KeyError(variant)


def _config(model: str):
    cfg = mw.run_config(model)
    cfg.trainer.micro_batch_tokens = BUDGET
    return cfg


def _no_optimizer_step(actor) -> None:
    """Capture every main_grad and skip the update (weights stay the reference's)."""
    def step():
        actor._captured_grads = {p: p.main_grad.detach().clone() for m in actor.model for p in m.parameters()}
        return True, 0.0, None

    actor.optimizer.step = step


def _watch_plan(actor, seen: dict) -> None:
    orig = actor._plan

    def plan(batch):
        mbs = orig(batch)
        seen["empty"] = max(seen.get("empty", 0), sum(1 for mb in mbs if not mb.rows))
        missing = 0
        for mb in mbs:
            present = set(int(s) for s in mb.segment.tolist() if s >= 0)
            missing += len(mb.rows) - len(present)
        seen["cp_missing"] = max(seen.get("cp_missing", 0), missing)
        return mbs

    actor._plan = plan


LOSS_METRICS = ("loss", "pg_loss", "clip_fraction", "dual_clip_fraction", "entropy", "kl", "loss_tokens")


@mw.check
def lm_reference(workdir: str, model: str, variants: list) -> dict:
    from megatron_denoise.megatron.checkpoint import save_checkpoint

    ref = Path(workdir) / f"lm_ref_{model}"
    cfg = _config(model)
    actor = mw.make_actor(cfg, mw.layout(1), loss_impl="torch")
    save_checkpoint(actor, ref / "init", save_optimizer=False)
    batch = lm_batch()
    logp, ent = actor.compute_logprobs(batch)
    _no_optimizer_step(actor)
    out = {}
    for v in variants:
        m = actor.train_step(with_extras(batch, logp, v), algo_for(cfg, v))
        mw.save_model_tensors(actor, ref / f"grads_{v}", "grad")
        out[v] = {k: m[k] for k in LOSS_METRICS if k in m}
    torch.save({"logp": logp, "ent": ent, "metrics": out}, ref / "results.pt")
    return {"metrics": out, "finite": bool(torch.isfinite(logp).all())}


@mw.check
def lm_parity(workdir: str, model: str, lay: dict, impl: str, variants: list) -> dict:
    from megatron_denoise.megatron.checkpoint import load_checkpoint
    from megatron_denoise.megatron.logprobs import LOSS_IMPL_CALLS

    ref = Path(workdir) / f"lm_ref_{model}"
    cfg = _config(model)
    cfg.algorithm.loss_impl = impl  # through the config (ActorOptions.loss_impl stays None)
    world = dist.get_world_size()
    actor = mw.make_actor(cfg, mw.layout(world, **lay), loss_impl=None)
    load_checkpoint(actor, ref / "init", load_optimizer=False, load_rng=False)
    exp = torch.load(ref / "results.pt", weights_only=False)
    batch = lm_batch()
    logp, ent = actor.compute_logprobs(batch)
    out = {"logp": mw.max_over_ranks(float((logp - exp["logp"]).abs().max())),
           "entropy": float((ent - exp["ent"]).abs().max()), "impl": str(actor.loss_impl)}
    _no_optimizer_step(actor)
    seen: dict = {}
    _watch_plan(actor, seen)
    calls0 = dict(LOSS_IMPL_CALLS)
    tag = f"{model}_{impl}_" + "_".join(f"{k}{v}" for k, v in sorted(lay.items()))
    for v in variants:
        m = actor.train_step(with_extras(batch, exp["logp"], v), algo_for(cfg, v))
        want = exp["metrics"][v]
        r = {f"metric_{k}": abs(m[k] - want[k]) for k in want}
        r["loss_impl_fused"] = m["loss_impl_fused"]
        wd = Path(workdir) / f"lm_{tag}_{v}"
        mw.save_model_tensors(actor, wd, "grad")
        r["grads"] = mw.max_diff(mw.plain(wd), mw.plain(ref / f"grads_{v}"))
        out[v] = r
    calls = torch.tensor([LOSS_IMPL_CALLS[k] - calls0[k] for k in ("fused", "torch")], dtype=torch.float64)
    dist.all_reduce(calls)
    out["calls"] = {"fused": float(calls[0]), "torch": float(calls[1])}
    t = torch.tensor([seen.get("empty", 0), seen.get("cp_missing", 0)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    out["empty_micro_batches"], out["cp_missing_sequences"] = float(t[0]), float(t[1])
    return out


@mw.check
def lm_reference_policy(workdir: str, lay: dict) -> dict:
    """The KL reference: a frozen copy of the starting weights in the actor's layout. After a
    real optimizer step its log-probs are still the starting ones (== the single-process
    reference run's), the trained weights come back bit for bit, and the next step's KL metric
    is the token mean of k3(log p_trained - log p_start) computed from those two tensors."""
    from megatron_denoise.megatron.checkpoint import load_checkpoint

    ref = Path(workdir) / "lm_ref_dense"
    cfg = _config("dense")
    cfg.algorithm.kl.coef, cfg.algorithm.kl.type = 0.1, "k3"
    actor = mw.make_actor(cfg, mw.layout(dist.get_world_size(), **lay), loss_impl=None)
    load_checkpoint(actor, ref / "init", load_optimizer=False, load_rng=False)
    exp = torch.load(ref / "results.pt", weights_only=False)
    actor.snapshot_reference()
    batch = lm_batch()
    logp0, _ = actor.compute_logprobs(batch)
    b = replace(with_extras(batch, logp0, "token-mean"), ref_logprobs=actor.compute_ref_logprobs(batch))
    m1 = actor.train_step(b)
    logp1, _ = actor.compute_logprobs(batch)
    ref1 = actor.compute_ref_logprobs(batch)
    logp1_again, _ = actor.compute_logprobs(batch)
    m2 = actor.train_step(replace(b, ref_logprobs=ref1))
    mask = batch.loss_mask
    # k3(log q) with log q = logp1 - ref, over the loss tokens (the step's log-probs are logp1)
    lq = (logp1 - ref1).double()
    hand = float(((torch.exp(-lq) + lq - 1.0) * mask).sum() / mask.sum())
    return {"ref_vs_start": float((ref1 - logp0).abs().max()), "start_vs_single": float((logp0 - exp["logp"]).abs().max()),
            "restored": float((logp1_again - logp1).abs().max()), "moved": float((logp1 - logp0).abs().max()),
            "kl_step1": m1["kl"], "kl_step2": m2["kl"], "kl_hand": hand, "impl": str(actor.loss_impl)}


if __name__ == "__main__":
    mw.main()
