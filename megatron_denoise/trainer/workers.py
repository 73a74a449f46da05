"""Ray workers of a training run: one policy worker per rank (Megatron process groups inside) and
a rollout worker holding the engine, placed in the same placement-group bundles (colocation).
The driver holds no model: it sends packed batches and receives metrics.

    group = PolicyGroup.create(cfg, hf_path)        # world_size Ray actors, torch.distributed inside
    group.compute_logprobs(batch) / group.train(batch, old) / group.refit(engine_worker)
    group.save(root, step, trainer_state) / group.load(path) / group.export_hf(out_dir, source_hf)

Every call fans out to all ranks (they take part in the collectives) and returns rank 0's result.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any, Optional

from megatron_denoise.config.schema import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def config_from_dict(d: dict) -> Config:
    from megatron_denoise.config.loader import build_dataclass

    errors: list[str] = []
    cfg = build_dataclass(Config, d, "", errors)
    if errors:
        raise ValueError("; ".join(errors))
    return cfg


def ray_address() -> Optional[str]:
    """Join the cluster the Slurm scripts started (RAY_ADDRESS set), else start Ray locally."""
    return os.environ.get("RAY_ADDRESS") or None


def init_ray(cfg: Config, run_dir: str) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = ray_address()
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith(("MDN_", "VLLM_", "OMP_", "HF_", "TRITON_", "PYTHONPATH"))}}
    if addr:
        ray.init(address=addr, runtime_env=env, log_to_driver=True)
    else:
        # local: logical CPUs are scheduling tokens; each rank and the engine need one
        # MDN_RAY_TMPDIR: a private session folder (tests use it to find and stop a killed run's Ray)
        # address="local": always a fresh local instance; without it Ray attaches to any cluster a
        # `ray start` left on this machine (/tmp/ray/ray_current_cluster) and then refuses num_cpus
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.cluster.world_size + 2), include_dashboard=False,
                 runtime_env=env, log_to_driver=True, _temp_dir=os.environ.get("MDN_RAY_TMPDIR"))


class PolicyWorkerImpl:
    """One rank of the Megatron actor (runs inside a Ray actor process)."""

    def __init__(self, cfg_dict: dict, rank: int, world_size: int, master_addr: str, master_port: int,
                 hf_path: str) -> None:
        # Ray gives each rank's actor exactly one visible GPU (CUDA_VISIBLE_DEVICES), so the local
        # device index is always 0; a rank-derived LOCAL_RANK would select a device it cannot see
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        from megatron_denoise.convert.megatron_io import load_hf_into_actor
        from megatron_denoise.layout import ParallelLayout
        from megatron_denoise.megatron import parallel_state
        from megatron_denoise.megatron.actor import MegatronActor

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        self.cfg = config_from_dict(cfg_dict)
        self.rank = rank
        layout = ParallelLayout.from_config(self.cfg.parallel, world_size)
        backend = self.cfg.cluster.backend
        self.groups = parallel_state.initialize(layout, backend=backend, seed=self.cfg.trainer.seed)
        self.actor = MegatronActor(self.cfg, self.groups)
        load_hf_into_actor(self.actor, hf_path)  # checks the config against the folder; refreshes main params
        if self.cfg.algorithm.kl.coef > 0:  # the KL reference: the starting weights, frozen (a resume
            self.actor.snapshot_reference()  # loads its checkpoint after this, the reference stays)

    def node_address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def compute_logprobs(self, packed) -> Any:
        from megatron_denoise.megatron.batching import ActorBatch

        logp, _ = self.actor.compute_logprobs(ActorBatch.from_packed(packed))
        return logp if self.rank == 0 else None

    def compute_ref_logprobs(self, packed) -> Any:
        from megatron_denoise.megatron.batching import ActorBatch

        logp = self.actor.compute_ref_logprobs(ActorBatch.from_packed(packed))
        return logp if self.rank == 0 else None

    def train(self, packed, old_logprobs, ref_logprobs=None, is_weights=None) -> Optional[dict]:
        from megatron_denoise.megatron.batching import ActorBatch

        updates = self.actor.update(ActorBatch.from_packed(packed, old_logprobs=old_logprobs,
                                                           ref_logprobs=ref_logprobs, is_weights=is_weights))
        if self.rank != 0:
            return None
        # several updates (ppo_epochs x mini_batches): report their mean, and how many were skipped
        out = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        out["skipped"] = float(sum(u["skipped"] for u in updates))
        out["updates"] = float(len(updates))
        return out

    def refit(self, engine_worker) -> Optional[float]:
        """Gather the weights in Hugging Face names (all ranks take part) and push them from rank 0
        into the rollout engine. Returns the engine's load seconds (rank 0)."""
        import ray

        from megatron_denoise.convert.megatron_io import actor_hf_weights

        # clone: megatron keeps parameters as views into one contiguous buffer, and pickling a view
        # (Ray's transfer) serialises its WHOLE storage — for SmolLM2 that was 272 x 540 MB
        named = [(n, t.detach().clone()) for n, t in actor_hf_weights(self.actor)]
        if self.rank != 0:
            return None
        return ray.get(engine_worker.update_weights.remote(named))

    def save(self, root: str, step: int, trainer_state: dict, keep_last: int) -> str:
        from megatron_denoise.megatron.checkpoint import save_checkpoint

        return str(save_checkpoint(self.actor, root, step=step, data_cursor=trainer_state,
                                   keep_last=keep_last or None))

    def load(self, path: str) -> dict:
        from megatron_denoise.megatron.checkpoint import load_checkpoint

        return load_checkpoint(self.actor, path)

    def export_hf(self, out_dir: str, source_hf: Optional[str]) -> Optional[dict]:
        from megatron_denoise.convert.pipeline import export_models_to_hf

        summary = export_models_to_hf(self.actor.chunks, self.cfg.model, self.groups, out_dir, source_hf,
                                      overwrite=True)
        return dataclasses.asdict(summary) if summary is not None else None

    def shutdown(self) -> None:
        from megatron_denoise.megatron import parallel_state

        parallel_state.teardown(destroy_process_group=True)


class RolloutWorkerImpl:
    """The rollout engine inside a Ray actor (colocated with rank 0's bundle)."""

    def __init__(self, model_path: str, rollout_cfg_dict: dict, max_model_len: int, run_dir: str,
                 dtype: Optional[str]) -> None:
        from megatron_denoise.config.schema import RolloutConfig
        from megatron_denoise.rollout.engine import make_engine

        rc = RolloutConfig(**rollout_cfg_dict)
        self.engine = make_engine(model_path, rc, max_model_len=max_model_len, run_dir=run_dir, dtype=dtype)

    def generate(self, requests, sampling):
        return self.engine.generate(requests, sampling)

    def update_weights(self, named) -> float:
        return self.engine.update_weights(named)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def close(self) -> None:
        self.engine.close()


def _on_gpu(cfg: Config) -> bool:
    if cfg.cluster.device == "cpu":
        return False
    if cfg.cluster.device == "cuda":
        return True
    import torch

    return torch.cuda.is_available()


class PolicyGroup:
    """Fans calls out to every rank's worker; returns rank 0's answer."""

    def __init__(self, workers: list, placement_group: Any) -> None:
        self.workers = workers
        self.placement_group = placement_group

    @classmethod
    def create(cls, cfg: Config, hf_path: str) -> "PolicyGroup":
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = cfg.cluster.world_size
        gpu = _on_gpu(cfg)
        bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
        pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        ray.get(pg.ready())
        remote = ray.remote(PolicyWorkerImpl)
        cfg_dict = dataclasses.asdict(cfg)
        master_port = _free_port()
        master_addr = ray.util.get_node_ip_address() if world == 1 else None
        workers = []
        for rank in range(world):
            strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank)
            if rank == 0 and master_addr is None:
                # rank 0's node hosts the rendezvous: ask a probe task placed in bundle 0
                probe = ray.remote(num_cpus=0, scheduling_strategy=strategy)(lambda: ray.util.get_node_ip_address())
                master_addr = ray.get(probe.remote())
            w = remote.options(num_cpus=1, num_gpus=1 if gpu else 0, scheduling_strategy=strategy).remote(
                cfg_dict, rank, world, master_addr, master_port, hf_path)
            workers.append(w)
        group = cls(workers, pg)
        group.call("node_address")  # wait until every rank has built its model
        return group

    def call(self, method: str, *args) -> Any:
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers])[0]

    def compute_logprobs(self, batch) -> Any:
        return self.call("compute_logprobs", batch)

    def compute_ref_logprobs(self, batch) -> Any:
        return self.call("compute_ref_logprobs", batch)

    def train(self, batch, old_logprobs, ref_logprobs=None, is_weights=None) -> dict:
        return self.call("train", batch, old_logprobs, ref_logprobs, is_weights)

    def refit(self, engine: "RolloutWorker") -> float:
        return self.call("refit", engine.handle)

    def save(self, root: str, step: int, trainer_state: dict, keep_last: int) -> str:
        return self.call("save", root, step, trainer_state, keep_last)

    def load(self, path: str) -> dict:
        return self.call("load", path)

    def export_hf(self, out_dir: str, source_hf: Optional[str]) -> Optional[dict]:
        return self.call("export_hf", out_dir, source_hf)

    def shutdown(self) -> None:
        import ray

        try:
            self.call("shutdown")
        finally:
            for w in self.workers:
                ray.kill(w)


class RolloutWorker:
    """Driver-side handle of the engine worker, with the RolloutEngine protocol's methods."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @classmethod
    def create(cls, cfg: Config, model_path: str, run_dir: str, policy: Optional[PolicyGroup]) -> "RolloutWorker":
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts: dict = {"num_cpus": 0}
        if policy is not None and cfg.rollout.colocate:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=policy.placement_group, placement_group_bundle_index=0)
            if _on_gpu(cfg):
                opts["num_gpus"] = 0.01  # shares rank 0's device; memory via gpu_memory_utilization
        max_len = cfg.data.max_prompt_length + cfg.data.max_response_length
        if cfg.denoise.partial_mode == "none":
            max_len += cfg.data.max_response_length  # a prefix of up to R tokens plus R more
        dtype = cfg.rollout.dtype or cfg.model.params_dtype
        handle = ray.remote(RolloutWorkerImpl).options(**opts).remote(
            model_path, dataclasses.asdict(cfg.rollout), max_len, run_dir, dtype)
        return cls(handle)

    def generate(self, requests, sampling):
        import ray

        return ray.get(self.handle.generate.remote(list(requests), sampling))

    def update_weights(self, named) -> float:
        import ray

        return ray.get(self.handle.update_weights.remote(list(named)))

    def sleep(self) -> None:
        import ray

        ray.get(self.handle.sleep.remote())

    def wake_up(self) -> None:
        import ray

        ray.get(self.handle.wake_up.remote())

    def close(self) -> None:
        import ray

        try:
            ray.get(self.handle.close.remote())
        finally:
            ray.kill(self.handle)
