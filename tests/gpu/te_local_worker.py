"""One actor train step with the Transformer Engine layer spec and with megatron's local spec, on the
same weights and batch (run by tests/gpu/test_gpu_te_spec.py under torchrun, one process, one GPU):

    python -m torch.distributed.run --nproc-per-node 1 te_local_worker.py HF_DIR OUT.json

Both actors load the same Hugging Face folder (the converter maps TE's fused names, e.g.
linear_qkv.layer_norm_weight, and the local spec's input_layernorm.weight to the same HF tensor),
compute log-probs, then take one PPO step on the same batch with the same old log-probs (the local
actor's, perturbed so the clips bind), with the PyTorch loss (loss_impl=torch) so that only the
layer spec differs. The TE actor packs sequences as THD (cu_seqlens, no [S, S] mask), the local
one takes the block-diagonal mask. Writes {spec: {logp, loss, grad_norm, ...}} to OUT.json.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch


def make_batch(vocab: int, seed: int = 0):
    from megatron_denoise.megatron.batching import ActorBatch

    g = torch.Generator().manual_seed(seed)
    rows, width = 6, 40
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    lens = torch.tensor([40, 13, 27, 18, 33, 22])
    lm = torch.zeros(rows, width)
    for r in range(rows):
        lm[r, 6:int(lens[r])] = 1.0
    return ActorBatch(input_ids=ids, sequence_lengths=lens, loss_mask=lm, advantages=torch.randn(rows, generator=g))


def run(spec: str, hf_dir: str, old_logprobs):
    from megatron_denoise.config.schema import Config
    from megatron_denoise.convert.hf_config import model_config_from_hf, read_hf_config
    from megatron_denoise.convert.megatron_io import load_hf_into_actor
    from megatron_denoise.layout import ParallelLayout
    from megatron_denoise.megatron import parallel_state as ps
    from megatron_denoise.megatron.actor import ActorOptions, MegatronActor
    from megatron_denoise.megatron.model import BuildOptions

    cfg = Config()
    cfg.model = replace(model_config_from_hf(read_hf_config(hf_dir), hf_path=hf_dir), params_dtype="bfloat16")
    cfg.trainer.micro_batch_tokens = 64  # several packed micro-batches
    cfg.parallel.use_distributed_optimizer = False  # megatron: SGD only without it
    cfg.optimizer.name = "sgd"
    cfg.optimizer.lr = 0.1
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.clip_grad = 1.0e6  # > 0 so megatron computes the norm; never binds
    a = cfg.algorithm
    a.force_on_policy = False
    a.clip_low, a.clip_high, a.dual_clip = 0.2, 0.28, 3.0
    a.loss_agg = "token-mean"
    groups = ps.initialize(ParallelLayout(world_size=1), seed=1)
    # the local spec with megatron's masked attention (segment_attention false): the attention the
    # docstring names; the per-segment path is checked against the masked one on CPU
    # (tests/megatron/test_actor_dist.py::test_segment_attention_equals_the_masked_attention)
    build = BuildOptions(use_transformer_engine=(spec == "te"), segment_attention=False)
    actor = MegatronActor(cfg, groups, ActorOptions(loss_impl="torch", build=build))
    assert actor._use_thd() == (spec == "te")
    load_hf_into_actor(actor, hf_dir)
    batch = make_batch(cfg.model.vocab_size)
    logp, ent = actor.compute_logprobs(batch)
    if old_logprobs is None:  # the local actor's, perturbed: ratios != 1, the clips bind
        g = torch.Generator().manual_seed(1)
        old_logprobs = (logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=logp.dtype)) * batch.loss_mask
    metrics = actor.train_step(replace(batch, old_logprobs=old_logprobs.float()))
    out = {k: float(metrics[k]) for k in ("loss", "pg_loss", "grad_norm", "clip_fraction", "loss_tokens",
                                          "num_micro_batches")}
    out.update(logp=logp.tolist(), entropy=ent.tolist(), use_thd=actor._use_thd())
    return out, old_logprobs


def main() -> None:
    hf_dir, out_path = sys.argv[1], sys.argv[2]
    local, old = run("local", hf_dir, None)
    te, _ = run("te", hf_dir, old)
    import torch.distributed as dist

    with open(out_path, "w") as f:
        json.dump({"local": local, "te": te}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
