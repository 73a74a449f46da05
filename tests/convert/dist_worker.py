"""Multi-process conversion checks, run under torchrun by test_convert_dist.py.

One launch runs many cases (megatron-core import and process start cost ~15 s each, so checks
are grouped). Each case re-initialises megatron's groups for its layout. Results are collected
per check and written by rank 0 as JSON: {check name: {"ok": bool, "detail": str}}.

Case kinds:
  parity  HF -> megatron in `layout`: logits vs transformers (atol), HF -> megatron -> HF bit-exact,
          megatron(random init) -> HF -> megatron bit-exact.
  ckpt    HF -> distributed checkpoint saved in `save` layout -> exported to HF in `load` layout:
          every tensor bit-exact with the source, config equivalent.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

from megatron_denoise.convert.hf_config import model_config_from_hf, read_hf_config
from megatron_denoise.convert.hf_io import HFReader
from megatron_denoise.convert.megatron_io import load_hf_into_megatron, megatron_to_hf, shard_info
from megatron_denoise.convert.pipeline import (build_and_load, export_dist_checkpoint_to_hf, export_models_to_hf,
                                               import_hf_to_dist_checkpoint)
from megatron_denoise.layout import ParallelLayout
from megatron_denoise.megatron import parallel_state
from megatron_denoise.megatron.model import build_model, unwrap


def layout_of(d: dict) -> ParallelLayout:
    tp = d.get("tp", 1)
    return ParallelLayout(world_size=dist.get_world_size(), tp=tp, pp=d.get("pp", 1), vpp=d.get("vpp"),
                          ep=d.get("ep", 1), etp=d.get("etp", tp), sequence_parallel=d.get("sp", False))


def _global(group, i: int) -> int:
    return dist.get_global_rank(group, i)


def forward_logits(models, groups, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full logits [b, s, vocab] on every rank, running the pipeline stages by hand (fp32, eval).
    Stage order with VPP: chunk 0 of stages 0..pp-1, then chunk 1, ..."""
    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)  # True = masked (future)
    pp, rank = groups.layout.pp, groups.pp_rank
    out = None
    with torch.no_grad():
        for v, chunk in enumerate(models):
            m = unwrap(chunk).eval()
            for stage in range(pp):
                if stage != rank:
                    continue
                first = stage == 0 and v == 0
                if not first:
                    prev = _global(groups.pp, (stage - 1) % pp)
                    buf = torch.empty(s, b, m.config.hidden_size)
                    dist.recv(buf, src=prev)
                    m.set_input_tensor(buf)
                y = m(ids, pos, mask)
                last = stage == pp - 1 and v == len(models) - 1
                if last:
                    out = y
                else:
                    dist.send(y.contiguous(), dst=_global(groups.pp, (stage + 1) % pp))
    if pp > 1:
        buf = out if out is not None else torch.empty(b, s, models[-1].padded_vocab_size // groups.layout.tp)
        dist.broadcast(buf, group=groups.pp, group_src=pp - 1)
        out = buf
    if groups.layout.tp > 1:
        parts = [torch.empty_like(out) for _ in range(groups.layout.tp)]
        dist.all_gather(parts, out.contiguous(), group=groups.tp)
        out = torch.cat(parts, dim=-1)
    return out[..., :vocab]


def hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def compare_to_folder(named, folder: str) -> tuple[bool, str]:
    """Every tensor equal (bit-exact) to the folder's, and the same set of names."""
    reader = HFReader(folder)
    got = dict(named)
    want = reader.names()
    if set(got) != want:
        return False, f"names differ: missing {sorted(want - set(got))[:5]}, extra {sorted(set(got) - want)[:5]}"
    bad = [k for k in got if not torch.equal(got[k], reader.get(k))]
    return (not bad), (f"{len(bad)} tensors differ, e.g. {bad[:5]}" if bad else f"{len(got)} tensors bit-exact")


def model_params_equal(a, b, cfg, groups) -> tuple[bool, str]:
    """Parameters of two model-chunk lists equal bit for bit, except the padded vocabulary rows
    (megatron pads the vocabulary; those rows are not part of the HF model and come back zero)."""
    from megatron_denoise.convert.megatron_io import local_parameters

    sh = shard_info(groups)
    pa, pb = local_parameters(a, cfg, sh), local_parameters(b, cfg, sh)
    if set(pa) != set(pb):
        return False, "parameter names differ"
    bad = []
    for k in pa:
        x, y = pa[k], pb[k]
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            per = x.shape[0]
            start = groups.tp_rank * per
            keep = max(0, min(per, cfg.vocab_size - start))
            x, y = x[:keep], y[:keep]
        if not torch.equal(x, y):
            bad.append(k)
    return (not bad), (f"{len(bad)} differ, e.g. {bad[:4]}" if bad else f"{len(pa)} params bit-exact")


def all_ok(ok: bool) -> bool:
    t = torch.tensor([1 if ok else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def shared_tmp(tag: str) -> str:
    """A fresh folder name agreed on by all ranks."""
    obj = [tempfile.mkdtemp(prefix=f"mdn-{tag}-", dir=os.environ.get("MDN_TEST_TMP"))] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def run_parity(case: dict, results: dict) -> None:
    name, path = case["name"], case["hf"]
    groups = parallel_state.initialize(layout_of(case["layout"]), seed=1234)
    models, cfg, report = build_and_load(path, groups)
    lay = groups.layout
    if lay.tp * lay.pp * lay.ep > 1:
        # each rank read only its slices (less than the whole folder; with tp2 about half), and the
        # ranks together read all of it (replicated tensors more than once)
        reader = HFReader(path)
        total = sum(reader.get(n).numel() * 4 for n in reader.names())
        mine = torch.tensor([report.bytes_read])
        both = mine.clone()
        dist.all_reduce(both)
        record(results, f"{name}/reads_only_its_shard", mine.item() < (0.6 if lay.tp > 1 else 0.9) * total and both.item() >= total,
               f"this rank read {mine.item()} of {total} bytes, all ranks {both.item()}")
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))  # divisible by tp (sequence parallel)
    ref = hf_logits(path, ids)
    got = forward_logits(models, groups, ids, cfg.vocab_size)
    err = (got - ref).abs().max().item()
    record(results, f"{name}/logits", err <= case.get("atol", 1e-5), f"max |megatron - transformers| = {err:.3g}")
    if case.get("logits_only"):
        return
    ok, detail = compare_to_folder(megatron_to_hf(models, cfg, groups), path)
    record(results, f"{name}/hf_megatron_hf", ok, detail)
    # megatron -> HF -> megatron, from megatron's own random initialisation
    fresh = build_model(cfg, groups)
    out = shared_tmp("m2h")
    export_models_to_hf(fresh, cfg, groups, os.path.join(out, "hf"), source_hf=path)
    back = build_model(cfg, groups)
    load_hf_into_megatron(back, os.path.join(out, "hf"), cfg, shard_info(groups))
    ok, detail = model_params_equal(fresh, back, cfg, groups)
    record(results, f"{name}/megatron_hf_megatron", ok, detail)


def run_ckpt(case: dict, results: dict) -> None:
    name, path = case["name"], case["hf"]
    tmp = shared_tmp("ckpt")
    ckpt = os.path.join(tmp, "ckpt")
    groups = parallel_state.initialize(layout_of(case["save"]), seed=1)
    import_hf_to_dist_checkpoint(path, ckpt, groups)
    groups = parallel_state.initialize(layout_of(case["load"]), seed=2)
    out = os.path.join(tmp, "hf")
    export_dist_checkpoint_to_hf(ckpt, out, groups)
    ok, detail = compare_to_folder(((k, HFReader(out).get(k)) for k in HFReader(out).names()), path)
    src, exp = model_config_from_hf(read_hf_config(path)), model_config_from_hf(read_hf_config(out))
    same_cfg = src == exp
    record(results, f"{name}/ckpt_roundtrip", ok and same_cfg,
           detail + ("" if same_cfg else f"; config differs: {src} vs {exp}"))


def run_actor(case: dict, results: dict) -> None:
    """What training writes and what refit reads: a MegatronActor (DDP-wrapped chunks, distributed
    optimizer) filled from HF, its weights as HF pairs (the refit source), and its atomic
    checkpoint (model + optimizer, step_N/dist under a root with `latest`) exported to HF in
    another layout."""
    from dataclasses import replace

    from megatron_denoise.config.schema import Config, ParallelConfig
    from megatron_denoise.convert.megatron_io import actor_hf_weights, load_hf_into_actor
    from megatron_denoise.megatron.actor import MegatronActor
    from megatron_denoise.megatron.checkpoint import save_checkpoint

    name, path = case["name"], case["hf"]
    model_cfg = model_config_from_hf(read_hf_config(path), hf_path=path)
    lay = case["layout"]
    cfg = replace(Config(), model=model_cfg, parallel=ParallelConfig(
        tensor_model_parallel_size=lay.get("tp", 1), pipeline_model_parallel_size=lay.get("pp", 1),
        sequence_parallel=lay.get("sp", False), use_distributed_optimizer=True))
    groups = parallel_state.initialize(layout_of(lay), seed=3)
    actor = MegatronActor(cfg, groups)
    load_hf_into_actor(actor, path)
    torch.manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        err = (actor.logits(ids) - hf_logits(path, ids)).abs().max().item()
    record(results, f"{name}/actor_logits", err <= 1e-5, f"max |actor - transformers| = {err:.3g}")
    ok, detail = compare_to_folder(actor_hf_weights(actor), path)
    record(results, f"{name}/actor_hf_weights", ok, detail)
    root = shared_tmp("actor")
    save_checkpoint(actor, os.path.join(root, "ckpts"), step=3)
    groups = parallel_state.initialize(layout_of(case["load"]), seed=4)
    out = os.path.join(root, "hf")
    export_dist_checkpoint_to_hf(os.path.join(root, "ckpts"), out, groups, cfg=model_cfg, source_hf=path)
    ok, detail = compare_to_folder(((k, HFReader(out).get(k)) for k in HFReader(out).names()), path)
    record(results, f"{name}/actor_ckpt_to_hf", ok, detail)


def record(results: dict, key: str, ok: bool, detail: str) -> None:
    ok = all_ok(ok)
    results[key] = {"ok": ok, "detail": detail}
    if dist.get_rank() == 0:
        print(f"[check] {key}: {'OK' if ok else 'FAIL'} {detail}", flush=True)


def main() -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints the stacks of a hang
    spec = json.load(open(sys.argv[1]))
    parallel_state.init_distributed("gloo")
    results: dict = {}
    import time

    for case in spec["cases"]:
        t0 = time.time()
        try:
            {"parity": run_parity, "ckpt": run_ckpt, "actor": run_actor}[case["kind"]](case, results)
        except Exception:  # report and go on: the other checks are still informative
            results[f"{case['name']}/error"] = {"ok": False, "detail": traceback.format_exc()}
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        if dist.get_rank() == 0:
            print(f"[time] {case['name']}: {time.time() - t0:.1f} s", flush=True)
    if dist.get_rank() == 0:
        with open(spec["out"], "w") as fh:
            json.dump(results, fh, indent=1)
    parallel_state.teardown(destroy_process_group=True)


if __name__ == "__main__":  # the checkpoint writer spawns a helper that re-imports this script
    main()
