"""Multi-process worker for the megatron actor tests: runs MANY checks per torchrun launch.

    python -m torch.distributed.run --nproc-per-node N mcore_worker.py SPEC.json OUT.json

SPEC: {"workdir": str, "checks": [{"name": str, "kind": str, "args": {...}}, ...]}. Each check
initialises its own layout (megatron's groups are torn down between checks) and returns a dict of
measurements (max abs differences, flags); rank 0 writes {name: result} to OUT.json. A check
that raises records {"error": traceback} instead, so the pytest side reports it by name.

Parity checks compare against a single-process reference written by the "reference" check (a
1-process launch): initial weights, log-probs, metrics, gradients and weights after one step,
all as megatron distributed checkpoints whose plain (full) tensors are compared key by key.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_denoise.config.schema import Config, ModelConfig, MoEConfig
from megatron_denoise.layout import ParallelLayout
from megatron_denoise.megatron import parallel_state as ps
from megatron_denoise.megatron.batching import ActorBatch

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------------------------------------
# the tiny setup shared by every check


def model_config(kind: str, dispatcher: str = "alltoall") -> ModelConfig:
    common = dict(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  kv_channels=32, vocab_size=300, max_position_embeddings=256, qk_layernorm=True,
                  params_dtype="float32", rotary_base=10000.0, norm_epsilon=1e-6)
    if kind == "dense":
        return ModelConfig(family="qwen3", num_layers=4, qkv_bias=True, tie_word_embeddings=False, **common)
    if kind == "tied":  # llama family: no biases, no QK-norm, tied input/output embeddings
        common = dict(common, qk_layernorm=False)
        return ModelConfig(family="llama", num_layers=4, qkv_bias=False, tie_word_embeddings=True, **common)
    if kind == "moe":
        return ModelConfig(family="qwen3_moe", num_layers=2, qkv_bias=False, tie_word_embeddings=False,
                           moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=64, aux_loss_coeff=0.0,
                                         token_dispatcher_type=dispatcher), **common)
    raise KeyError(kind)


def run_config(kind: str, *, dispatcher: str = "alltoall", distopt: bool = False, optimizer: str = "sgd") -> Config:
    cfg = Config()
    cfg.model = model_config(kind, dispatcher)
    cfg.trainer.micro_batch_tokens = 40
    cfg.optimizer.name = optimizer
    cfg.optimizer.lr = 0.1 if optimizer == "sgd" else 1e-3
    cfg.optimizer.weight_decay = 0.0 if optimizer == "sgd" else 0.01
    cfg.optimizer.clip_grad = 1.0
    cfg.optimizer.adam_eps = 1e-3  # large eps: Adam's first step then still scales with |grad|
    cfg.parallel.use_distributed_optimizer = distopt
    a = cfg.algorithm
    a.force_on_policy = False
    a.clip_low, a.clip_high, a.dual_clip = 0.2, 0.28, 3.0
    a.entropy_coeff = 0.01
    a.loss_agg = "token-mean"
    return cfg


def make_batch(seed: int = 0, rows: int = 6, width: int = 24, vocab: int = 300) -> ActorBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    lens = torch.tensor([24, 9, 17, 12, 20, 15][:rows])
    lm = torch.zeros(rows, width)
    for r in range(rows):
        lm[r, 5:int(lens[r])] = 1.0
    lm[2, 10] = 0.0  # a hole in one row's mask
    adv = torch.randn(rows, generator=g)
    return ActorBatch(input_ids=ids, sequence_lengths=lens, loss_mask=lm, advantages=adv)


def with_old_logprobs(batch: ActorBatch, logp: torch.Tensor, seed: int = 1) -> ActorBatch:
    """Old log-probs = current ones perturbed, so ratios differ from 1 and the clips bind."""
    g = torch.Generator().manual_seed(seed)
    noise = 0.3 * torch.randn(logp.shape, generator=g)
    return replace(batch, old_logprobs=(logp + noise) * batch.loss_mask)


def layout(world: int, **kw) -> ParallelLayout:
    etp = kw.pop("etp", None)
    tp = kw.get("tp", 1)
    return ParallelLayout(world_size=world, etp=etp if etp is not None else tp, **kw)


def make_actor(cfg: Config, lay: ParallelLayout, seed: int = 1, loss_impl: str = "torch", recompute: bool = False):
    from megatron_denoise.megatron.actor import ActorOptions, MegatronActor
    from megatron_denoise.megatron.model import BuildOptions

    groups = ps.initialize(lay, seed=seed)
    return MegatronActor(cfg, groups, ActorOptions(loss_impl=loss_impl, build=BuildOptions(recompute=recompute)))


# ------------------------------------------------------------------------------------------------
# full tensors through megatron's own resharding


def save_model_tensors(actor, path: Path, source: str = "param") -> None:
    """Model-only distributed checkpoint of the params (or of the captured grads)."""
    from megatron.core import dist_checkpointing

    from megatron_denoise.megatron.checkpoint import _model_sharded_state_dict

    backup = []
    if source == "grad":
        for m in actor.model:
            for p in m.parameters():
                backup.append((p, p.data.clone()))
                p.data.copy_(actor._captured_grads[p])
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_model_sharded_state_dict(actor), str(path))
    for p, d in backup:
        p.data.copy_(d)
    dist.barrier()


def plain(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    sd = dist_checkpointing.load_plain_tensors(str(path))
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def max_diff(a: dict, b: dict) -> dict:
    """Max abs difference over common keys, and the keys present on one side only."""
    common = sorted(set(a) & set(b))
    worst, worst_key = 0.0, None
    for k in common:
        if a[k].shape != b[k].shape:
            return {"max": float("inf"), "key": k, "shape_mismatch": [list(a[k].shape), list(b[k].shape)]}
        d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        if d > worst:
            worst, worst_key = d, k
    return {"max": worst, "key": worst_key, "n": len(common),
            "only_a": sorted(set(a) - set(b)), "only_b": sorted(set(b) - set(a))}


def capture_grads(actor) -> None:
    """Record every parameter's main_grad right before the optimizer step."""
    orig = actor.optimizer.step

    def step():
        actor._captured_grads = {p: p.main_grad.detach().clone() for m in actor.model for p in m.parameters()}
        return orig()

    actor.optimizer.step = step


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# ------------------------------------------------------------------------------------------------
# checks


@check
def reference(workdir: str, model: str = "dense", dispatcher: str = "alltoall", optimizer: str = "sgd") -> dict:
    """Single-process run: initial weights, log-probs, one PPO step (grads, weights, metrics)."""
    from megatron_denoise.megatron.checkpoint import save_checkpoint

    ref = Path(workdir) / f"ref_{model}_{optimizer}"
    cfg = run_config(model, dispatcher=dispatcher, optimizer=optimizer)
    actor = make_actor(cfg, layout(1))
    save_checkpoint(actor, ref / "init", save_optimizer=False)
    batch = make_batch()
    logp, ent = actor.compute_logprobs(batch)
    batch = with_old_logprobs(batch, logp)
    capture_grads(actor)
    metrics = actor.train_step(batch)
    save_model_tensors(actor, ref / "grads", "grad")
    save_model_tensors(actor, ref / "after")
    torch.save({"logp": logp, "ent": ent, "metrics": metrics}, ref / "results.pt")
    return {"metrics": metrics, "finite": bool(torch.isfinite(logp).all())}


@check
def parity(workdir: str, model: str = "dense", dispatcher: str = "alltoall", distopt: bool = False,
           lay: dict | None = None, compare_grads: bool = True, optimizer: str = "sgd",
           loss_impl: str = "torch", recompute: bool = False) -> dict:
    """Same run as `reference` in another layout: log-probs, metrics, grads and weights after
    one step compared with the single-process reference."""
    from megatron_denoise.megatron.checkpoint import load_checkpoint

    ref = Path(workdir) / f"ref_{model}_{optimizer}"
    world = dist.get_world_size()
    cfg = run_config(model, dispatcher=dispatcher, distopt=distopt, optimizer=optimizer)
    actor = make_actor(cfg, layout(world, **(lay or {})), loss_impl=loss_impl, recompute=recompute)
    load_checkpoint(actor, ref / "init", load_optimizer=False, load_rng=False)
    expected = torch.load(ref / "results.pt", weights_only=False)
    batch = make_batch()
    logp, ent = actor.compute_logprobs(batch)
    out = {"logp": float((logp - expected["logp"]).abs().max()),
           "entropy": float((ent - expected["ent"]).abs().max())}
    batch = with_old_logprobs(batch, expected["logp"])
    capture_grads(actor)
    metrics = actor.train_step(batch)
    for k in ("loss", "pg_loss", "entropy", "clip_fraction", "dual_clip_fraction", "grad_norm", "loss_tokens"):
        out[f"metric_{k}"] = abs(metrics[k] - expected["metrics"][k])
    out["clip_fraction"] = metrics["clip_fraction"]
    import hashlib  # (python's hash() is salted per process: ranks would disagree)

    tag = f"{model}_{hashlib.md5(json.dumps(lay, sort_keys=True).encode()).hexdigest()[:8]}_{int(distopt)}_{dispatcher}_{optimizer}_{loss_impl}_{int(recompute)}"
    wd = Path(workdir) / f"run_{tag}"
    if compare_grads and not distopt:
        save_model_tensors(actor, wd / "grads", "grad")
        out["grads"] = max_diff(plain(wd / "grads"), plain(ref / "grads"))
    save_model_tensors(actor, wd / "after")
    out["after"] = max_diff(plain(wd / "after"), plain(ref / "after"))
    # the reference step itself moved the weights (so "after" parity is not vacuous)
    out["moved"] = max_diff(plain(ref / "after"), plain(ref / "init" / "step_00000000" / "dist"))["max"]
    out["logp"] = max_over_ranks(out["logp"])
    return out



def _load_ref(actor, workdir: str, model: str = "dense", optimizer: str = "sgd") -> None:
    from megatron_denoise.megatron.checkpoint import load_checkpoint

    load_checkpoint(actor, Path(workdir) / f"ref_{model}_{optimizer}" / "init", load_optimizer=False, load_rng=False)


def _weights(actor) -> list:
    return [p.detach().clone() for m in actor.model for p in m.parameters()]


@check
def nan_guard(workdir: str, lay: dict | None = None) -> dict:
    """NaN advantages -> NaN loss and grads: the update is skipped, weights unchanged, reported;
    the next finite step updates normally."""
    cfg = run_config("dense")
    actor = make_actor(cfg, layout(dist.get_world_size(), **(lay or {})))
    _load_ref(actor, workdir)
    batch = make_batch()
    logp, _ = actor.compute_logprobs(batch)
    good = with_old_logprobs(batch, logp)
    adv = good.advantages.clone()
    adv[1] = float("nan")
    bad = replace(good, advantages=adv)
    before = _weights(actor)
    m_bad = actor.train_step(bad)
    after_bad = _weights(actor)
    unchanged = max(float((a - b).abs().max()) for a, b in zip(before, after_bad))
    m_good = actor.train_step(good)
    moved = max(float((a - b).abs().max()) for a, b in zip(after_bad, _weights(actor)))
    return {"skipped_bad": m_bad["skipped"], "loss_bad_is_nan": m_bad["loss"] != m_bad["loss"],
            "unchanged": max_over_ranks(unchanged), "skipped_steps": actor.skipped_steps,
            "skipped_good": m_good["skipped"], "moved_after_good": max_over_ranks(moved)}


@check
def ckpt_save(workdir: str, lay: dict, tag: str) -> dict:
    """Load the reference weights, train one Adam step, save; record logits and log-probs."""
    from megatron_denoise.megatron.checkpoint import save_checkpoint

    cfg = run_config("dense", optimizer="adam")
    actor = make_actor(cfg, layout(dist.get_world_size(), **lay))
    _load_ref(actor, workdir, optimizer="adam")
    batch = make_batch()
    logp, _ = actor.compute_logprobs(batch)
    actor.train_step(with_old_logprobs(batch, logp))
    root = Path(workdir) / f"ckpt_{tag}"
    save_checkpoint(actor, root, data_cursor={"epoch": 0, "index": 7})
    logits = actor.logits(batch.input_ids)
    logp2, ent2 = actor.compute_logprobs(batch)
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "logp": logp2, "ent": ent2}, root / "expected.pt")
    dist.barrier()
    return {"saved": str(root), "latest": (root / "latest").read_text().strip()}


@check
def ckpt_load(workdir: str, lay: dict, tag: str) -> dict:
    """Load a checkpoint saved in another layout: identical logits and log-probs; data cursor."""
    from megatron_denoise.megatron.checkpoint import load_checkpoint

    cfg = run_config("dense", optimizer="adam")
    actor = make_actor(cfg, layout(dist.get_world_size(), **lay))
    root = Path(workdir) / f"ckpt_{tag}"
    meta = load_checkpoint(actor, root)
    exp = torch.load(root / "expected.pt", weights_only=False)
    batch = make_batch()
    logits = actor.logits(batch.input_ids) if actor.groups.layout.pp == 1 else None
    logp, ent = actor.compute_logprobs(batch)
    return {"logits": None if logits is None else max_over_ranks(float((logits - exp["logits"]).abs().max())),
            "logp": float((logp - exp["logp"]).abs().max()), "ent": float((ent - exp["ent"]).abs().max()),
            "step": meta["step"], "cursor": meta["data_cursor"],
            "logits_shape": None if logits is None else list(logits.shape)}


def _adam_cosine_config(distopt: bool) -> Config:
    cfg = run_config("dense", optimizer="adam", distopt=distopt)
    cfg.optimizer.scheduler, cfg.optimizer.warmup_steps, cfg.trainer.total_steps = "cosine", 1, 5
    return cfg


def _first_adam_step(cfg: Config, lay: ParallelLayout, workdir: str):
    """An Adam actor from the reference weights after its first step, and the batch it used."""
    batch = make_batch()
    actor = make_actor(cfg, lay)
    _load_ref(actor, workdir, optimizer="adam")
    logp, _ = actor.compute_logprobs(batch)
    b = with_old_logprobs(batch, logp)
    actor.train_step(b)
    return actor, b


@check
def ckpt_resume(workdir: str, lay: dict, distopt: bool = True) -> dict:
    """Same layout: step 1, save, steps 2-3 (run A); fresh actor, load, steps 2-3 (run B):
    identical weights and metrics (optimizer state, scheduler, step restored)."""
    from megatron_denoise.megatron.checkpoint import load_checkpoint, save_checkpoint

    cfg = _adam_cosine_config(distopt)
    world = dist.get_world_size()
    actor, b = _first_adam_step(cfg, layout(world, **lay), workdir)
    root = Path(workdir) / f"ckpt_resume_{int(distopt)}"
    save_checkpoint(actor, root)
    rng_saved = (torch.get_rng_state(), ps.get_rng_tracker_states())
    ma = [actor.train_step(b), actor.train_step(b)]
    wa = _weights(actor)
    ps.teardown()
    actor2 = make_actor(cfg, layout(world, **lay), seed=99)
    torch.manual_seed(12345)  # scramble: the checkpoint must restore both RNG states
    meta = load_checkpoint(actor2, root)
    rng_same = bool(torch.equal(torch.get_rng_state(), rng_saved[0])) and all(
        torch.equal(v, rng_saved[1][k]) for k, v in ps.get_rng_tracker_states().items())
    mb = [actor2.train_step(b), actor2.train_step(b)]
    wb = _weights(actor2)
    return {"weights": max_over_ranks(max(float((x - y).abs().max()) for x, y in zip(wa, wb))),
            "loss": max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb)),
            "grad_norm": max(abs(x["grad_norm"] - y["grad_norm"]) for x, y in zip(ma, mb)),
            "lr": [[x["lr"], y["lr"]] for x, y in zip(ma, mb)], "step": meta["step"], "actor_step": actor2.step, "rng_restored": rng_same}


@check
def ckpt_reshard(workdir: str, save_lay: dict, load_lay: dict, fmt: str, distopt: bool = True) -> dict:
    """Adam (+ distributed optimizer unless `distopt` is false): step 1 at `save_lay`, save, steps 2-3 there (run A); a fresh
    actor at `load_lay` loads the checkpoint and takes steps 2-3 (run B). With a reshardable
    optimizer format the two runs end with the same weights; without, the optimizer starts fresh
    (and the weights differ)."""
    from megatron_denoise.megatron.checkpoint import load_checkpoint, save_checkpoint

    cfg = _adam_cosine_config(distopt)
    cfg.checkpoint.optimizer_format = fmt
    world = dist.get_world_size()
    actor, b = _first_adam_step(cfg, layout(world, **save_lay), workdir)
    fmt = fmt if distopt else "regular"
    root = Path(workdir) / f"ckpt_reshard_{fmt}"
    save_checkpoint(actor, root)
    la = [actor.train_step(b)["lr"] for _ in range(2)]
    save_model_tensors(actor, Path(workdir) / f"reshard_{fmt}_a")
    ps.teardown()
    actor2 = make_actor(cfg, layout(world, **load_lay), seed=99)
    meta = load_checkpoint(actor2, root)
    lb = [actor2.train_step(b)["lr"] for _ in range(2)]
    save_model_tensors(actor2, Path(workdir) / f"reshard_{fmt}_b")
    return {"optimizer_loaded": meta["optimizer_loaded"], "lr": [la, lb],
            "after": max_diff(plain(Path(workdir) / f"reshard_{fmt}_a"), plain(Path(workdir) / f"reshard_{fmt}_b"))}


@check
def ckpt_crash(workdir: str) -> dict:
    """Save step 1, then kill -9 this process in the middle of saving step 2 (after the shards
    are written, before the checkpoint is published). Never returns."""
    import signal

    from megatron_denoise.megatron import checkpoint as ck

    cfg = run_config("dense", optimizer="adam")
    actor = make_actor(cfg, layout(dist.get_world_size()))
    _load_ref(actor, workdir, optimizer="adam")
    batch = make_batch()
    logp, _ = actor.compute_logprobs(batch)
    b = with_old_logprobs(batch, logp)
    actor.train_step(b)
    root = Path(workdir) / "ckpt_crash"
    ck.save_checkpoint(actor, root, data_cursor={"index": 1})
    exp_logp, _ = actor.compute_logprobs(batch)
    torch.save({"logp": exp_logp}, root / "expected_step1.pt")
    actor.train_step(b)
    ck._publish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    ck.save_checkpoint(actor, root, data_cursor={"index": 2})
    return {"error": "the save was expected to be killed"}


@check
def ckpt_after_crash(workdir: str, lay: dict) -> dict:
    """After the killed save: `latest` still names step 1, which loads (resharded) and gives the
    step-1 log-probs; the half-written folder is left aside."""
    from megatron_denoise.megatron.checkpoint import latest_checkpoint, load_checkpoint

    root = Path(workdir) / "ckpt_crash"
    cfg = run_config("dense", optimizer="adam")
    actor = make_actor(cfg, layout(dist.get_world_size(), **lay))
    latest = latest_checkpoint(root)
    meta = load_checkpoint(actor, root)
    logp, _ = actor.compute_logprobs(make_batch())
    exp = torch.load(root / "expected_step1.pt", weights_only=False)
    return {"latest": latest.name, "step": meta["step"], "cursor": meta["data_cursor"],
            "tmp_left": sorted(p.name for p in root.glob(".tmp-*")),
            "logp": float((logp - exp["logp"]).abs().max())}


@check
def split_invariance(workdir: str, budget: int = 1000) -> dict:
    """Global token normalisation: one micro-batch instead of three gives the same step."""
    cfg = run_config("dense")
    cfg.trainer.micro_batch_tokens = budget
    actor = make_actor(cfg, layout(dist.get_world_size()))
    _load_ref(actor, workdir)
    ref = Path(workdir) / "ref_dense_sgd"
    expected = torch.load(ref / "results.pt", weights_only=False)
    m = actor.train_step(with_old_logprobs(make_batch(), expected["logp"]))
    save_model_tensors(actor, Path(workdir) / f"split_{budget}")
    return {"num_micro_batches": m["num_micro_batches"], "ref_micro_batches": expected["metrics"]["num_micro_batches"],
            "loss": abs(m["loss"] - expected["metrics"]["loss"]),
            "after": max_diff(plain(Path(workdir) / f"split_{budget}"), plain(ref / "after"))}


@check
def attention_paths(workdir: str, model: str = "dense", lay: dict | None = None) -> dict:
    """trainer.segment_attention: SegmentAttention (SDPA per packed sequence, no mask) vs megatron's
    local attention with the [S, S] block-diagonal mask, from the same weights: log-probs,
    entropies, one PPO step's loss, gradients and weights (GQA: 4 heads, 2 groups; packed rows
    with tail padding)."""
    res = {}
    for seg in (False, True):
        cfg = run_config(model)
        cfg.trainer.segment_attention = seg
        actor = make_actor(cfg, layout(dist.get_world_size(), **(lay or {})))
        _load_ref(actor, workdir, model)
        batch = make_batch()
        logp, ent = actor.compute_logprobs(batch)
        batch = with_old_logprobs(batch, logp)
        capture_grads(actor)
        m = actor.train_step(batch)
        grads = [actor._captured_grads[p] for mm in actor.model for p in mm.parameters()]
        res[seg] = (logp, ent, m, grads, [w.clone() for w in _weights(actor)],
                    bool(actor._needs_mask()), type(actor.chunks[0].decoder.layers[0].self_attention.core_attention).__name__)
        ps.teardown()
    a, b = res[False], res[True]
    return {"logp": float((a[0] - b[0]).abs().max()), "ent": float((a[1] - b[1]).abs().max()),
            "loss": abs(a[2]["loss"] - b[2]["loss"]), "micro_batches": a[2]["num_micro_batches"],
            "grad": max(float((x - y).abs().max()) for x, y in zip(a[3], b[3])),
            "weights": max(float((x - y).abs().max()) for x, y in zip(a[4], b[4])),
            "mask_path": [a[5], a[6]], "segment_path": [b[5], b[6]]}


@check
def train_logprobs(workdir: str, lay: dict | None = None, loss_impl: str = "fused") -> dict:
    """update(return_logprobs=True) (trainer.logprobs_from_train): the log-probs of the update's own
    forward pass vs compute_logprobs with the same weights just before it, and the update itself
    vs a plain update from the same weights; each with the output layer on the loss tokens only
    (trainer.loss_tokens_only, the default) and on every token."""
    lay_ = layout(dist.get_world_size(), **(lay or {}))
    res = {}
    for only in (True, False):
        cfg = run_config("dense")
        cfg.algorithm.force_on_policy = True
        cfg.trainer.loss_tokens_only = only
        actor = make_actor(cfg, lay_, loss_impl=loss_impl)
        _load_ref(actor, workdir)
        batch = make_batch()
        before, _ = actor.compute_logprobs(batch)
        m = actor.update(batch, return_logprobs=True)[0]
        res[only] = (before, actor.last_logprobs, m, [w.clone() for w in _weights(actor)])
        ps.teardown()
    cfg = run_config("dense")
    cfg.algorithm.force_on_policy = True
    plain_actor = make_actor(cfg, lay_, loss_impl=loss_impl)
    _load_ref(plain_actor, workdir)
    m_plain = plain_actor.update(batch)[0]
    w_plain = _weights(plain_actor)
    lm = batch.loss_mask.bool()
    out = {}
    for only, tag in ((True, "only"), (False, "every")):
        before, fused, m, w = res[only]
        out[tag] = {"max_diff_all": float((fused - before).abs().max()),
                    "max_diff_loss_tokens": float((fused - before)[lm].abs().max()),
                    "nonzero": int((fused != 0).sum()), "nonzero_all": int((before != 0).sum()),
                    "nonzero_loss_tokens": int(((before != 0) & lm).sum()),
                    "zero_outside_loss": bool((fused[~lm] == 0).all())}
    out["plain_vs_only"] = {"loss": abs(res[True][2]["loss"] - m_plain["loss"]),
                            "weights": max(float((a - b).abs().max()) for a, b in zip(res[True][3], w_plain))}
    out["only_vs_every"] = {"loss": abs(res[True][2]["loss"] - res[False][2]["loss"]),
                            "weights": max(float((a - b).abs().max()) for a, b in zip(res[True][3], res[False][3]))}
    return out


@check
def update_ppo(workdir: str, lay: dict | None = None) -> dict:
    """update(): PPO path recomputes old log-probs with the actor (first mini-batch has ratio 1),
    then ppo_epochs x mini_batches optimizer steps."""
    cfg = run_config("dense")
    cfg.algorithm.mini_batches, cfg.algorithm.ppo_epochs = 2, 2
    actor = make_actor(cfg, layout(dist.get_world_size(), **(lay or {})))
    _load_ref(actor, workdir)
    ms = actor.update(make_batch())
    return {"steps": len(ms), "actor_step": actor.step, "ratio_first": ms[0]["ratio_mean"],
            "clip_first": ms[0]["clip_fraction"], "ratio_last": ms[-1]["ratio_mean"],
            "skipped": sum(m["skipped"] for m in ms)}


@check
def moe_aux_loss(workdir: str, coeff: float = 0.1) -> dict:
    """The router's load-balancing loss reaches the gradients (and only through the MoE layers'
    inputs): same reported policy loss, different router and attention gradients."""
    cfg = run_config("moe")
    cfg.model.moe.aux_loss_coeff = coeff
    actor = make_actor(cfg, layout(dist.get_world_size()))
    _load_ref(actor, workdir, model="moe")
    ref = Path(workdir) / "ref_moe_sgd"
    expected = torch.load(ref / "results.pt", weights_only=False)
    capture_grads(actor)
    m = actor.train_step(with_old_logprobs(make_batch(), expected["logp"]))
    save_model_tensors(actor, Path(workdir) / "aux_grads", "grad")
    got, want = plain(Path(workdir) / "aux_grads"), plain(ref / "grads")
    diff = {k: float((got[k] - want[k]).abs().max()) for k in want}
    router = [k for k in diff if "router" in k]
    return {"loss": abs(m["loss"] - expected["metrics"]["loss"]), "router_grad_diff": max(diff[k] for k in router),
            "output_grad_diff": diff["output_layer.weight"]}


@check
def moe_aux_duplicates(workdir: str, coeff: float = 0.1, copies: int = 3) -> dict:
    """The load-balancing loss enters the update as the MEAN over micro-batches (megatron's own
    scaling without per-token loss): a batch of `copies` identical rows, one per micro-batch, must
    give the gradients of the single row, for the policy loss (global token mean) and the
    auxiliary loss alike."""
    cfg = run_config("moe")
    cfg.model.moe.aux_loss_coeff = coeff
    cfg.algorithm.force_on_policy = True
    b = make_batch()
    one = ActorBatch(input_ids=b.input_ids[:1], sequence_lengths=b.sequence_lengths[:1],
                     loss_mask=b.loss_mask[:1], advantages=b.advantages[:1])
    many = ActorBatch(input_ids=one.input_ids.repeat(copies, 1), sequence_lengths=one.sequence_lengths.repeat(copies),
                      loss_mask=one.loss_mask.repeat(copies, 1), advantages=one.advantages.repeat(copies))
    cfg.trainer.micro_batch_tokens = int(one.sequence_lengths[0])  # one row per micro-batch
    actor = make_actor(cfg, layout(dist.get_world_size()))
    capture_grads(actor)
    names = {p: n for m in actor.model for n, p in m.named_parameters()}
    grads, micro = [], []
    for batch in (one, many):
        _load_ref(actor, workdir, model="moe")
        micro.append(actor.train_step(batch)["num_micro_batches"])
        grads.append({names[p]: g for p, g in actor._captured_grads.items()})
    diff = {k: float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0]}
    router = [k for k in diff if "router" in k]
    return {"micro_batches": micro, "max_diff": max(diff.values()), "router_diff": max(diff[k] for k in router),
            "router_grad": max(float(grads[0][k].abs().max()) for k in router)}


# --- shims: each must still be needed (removing it breaks the megatron call it covers) -------


def _scenario(name: str, workdir: str, lay: dict) -> None:
    world = dist.get_world_size()
    if name == "rng_tracker":
        ps.initialize(layout(world, **lay), seed=3)
    elif name in ("cuda_device_strings", "cuda_current_device", "cp_rope_positions"):
        actor = make_actor(run_config("dense"), layout(world, **lay))
        b = make_batch()
        logp, _ = actor.compute_logprobs(b)
        actor.train_step(with_old_logprobs(b, logp))
    elif name in ("cuda_streams", "moe_router_gemm", "moe_split_sizes", "gloo_uneven_collectives"):
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # cached on the class by earlier builds
        actor = make_actor(run_config("moe", dispatcher="alltoall"), layout(world, **lay))
        b = make_batch()
        logp, _ = actor.compute_logprobs(b)
        actor.train_step(with_old_logprobs(b, logp))
    elif name == "distopt_load":
        r = ckpt_resume(workdir, lay, distopt=True)
        if r["weights"] > 1e-6 or r["loss"] > 1e-6:
            raise AssertionError(f"resumed run diverged from the uninterrupted one: {r}")
    elif name == "tied_embedding_sync":
        make_actor(run_config("tied"), layout(world, **lay))
    elif name == "sequence_parallel_norm":
        make_actor(run_config("dense"), layout(world, **lay))
    elif name == "optimizer_type_checks":
        actor = make_actor(run_config("dense", optimizer="adam", distopt=True), layout(world, **lay))
        b = make_batch()
        logp, _ = actor.compute_logprobs(b)
        actor.train_step(with_old_logprobs(b, logp))
    else:
        raise KeyError(name)


@check
def shim_needed(workdir: str, shim: str, lay: dict | None = None) -> dict:
    """Run the megatron path a shim covers without it (must fail) and with it (must work)."""
    from megatron_denoise.megatron import cpu_shims

    lay = lay or {}
    out = {}
    with cpu_shims.without_shim(shim):
        try:
            _scenario(shim, workdir, lay)
            out["without"] = None
        except Exception as e:  # the failure megatron hits without the shim
            out["without"] = f"{type(e).__name__}: {e}"[:400]
        finally:
            if ps.is_initialized():
                ps.teardown()
    try:
        _scenario(shim, workdir, lay)
        out["with"] = None
    except Exception:
        out["with"] = traceback.format_exc()[-1500:]
    out["applied"] = cpu_shims.applied_shims()
    return out


# ------------------------------------------------------------------------------------------------


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    # torchrun starts each rank in its own process group; the launcher kills these groups after
    # the run (a rank killed by -9 leaves its checkpoint writer's multiprocessing manager behind)
    groups_file = out_path.with_suffix(f".pgid.{os.environ.get('RANK', '0')}")
    groups_file.write_text(str(os.getpgrp()))
    ps.init_distributed("gloo", timeout_minutes=3)
    results = {}
    for item in spec["checks"]:
        name = item["name"]
        try:
            results[name] = CHECKS[item["kind"]](workdir=spec["workdir"], **item.get("args", {}))
        except Exception:  # recorded by name; the pytest side fails with the traceback
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr, flush=True)
        finally:
            if ps.is_initialized():
                ps.teardown()
        if dist.get_rank() == 0:  # write after every check: a later crash keeps earlier results
            out_path.write_text(json.dumps(results, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
