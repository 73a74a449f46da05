"""Ray workers of a training run: one policy worker per rank (Megatron process groups inside) and
one rollout-engine replica per rollout-TP group, every process placed by megatron_denoise.placement
(colocated: each GPU shared by a policy rank and a slice of one replica). The driver holds no
model: it sends packed batches and receives metrics.

    group = PolicyGroup.create(cfg, hf_path)        # placement + world_size Ray actors
    fleet = RolloutFleet.create(cfg, hf_path, run_dir, group)   # world / rollout_tp replicas
    fleet.generate(requests, sampling)              # rows sharded over replicas by expected tokens
    group.compute_logprobs(batch) / group.train(batch, old) / group.refit(fleet)   # bucketed refit
    group.save(root, step, trainer_state) / group.load(path) / group.export_hf(out_dir, source_hf)

Every policy call fans out to all ranks (they take part in the collectives) and returns rank 0's
result. Actors are built in two steps: a cheap constructor (so that `Placement.wait_ready` can tell
"never scheduled" from "still loading"), then `setup()`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

from megatron_denoise import chaos
from megatron_denoise.config.schema import Config, PartialMode, RefitReceive


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
    from megatron_denoise.console import log_dir

    # quiet console: each worker writes its own <run>/logs/<worker>.log (redirect_worker_output);
    # --verbose: Ray forwards every worker line to the driver's console
    log_to_driver = log_dir() is None
    addr = ray_address()
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith(("MDN_", "VLLM_", "OMP_", "HF_", "TRITON_", "PYTHONPATH"))}}
    if cfg.trainer.malloc_arena_max:  # read by glibc when a worker process starts
        env["env_vars"]["MALLOC_ARENA_MAX"] = str(cfg.trainer.malloc_arena_max)
    if addr:
        ray.init(address=addr, runtime_env=env, log_to_driver=log_to_driver)
    else:
        # local: logical CPUs are scheduling tokens; each rank and the engine need one
        # MDN_RAY_TMPDIR: a private session folder (tests use it to find and stop a killed run's Ray)
        # address="local": always a fresh local instance; without it Ray attaches to any cluster a
        # `ray start` left on this machine (/tmp/ray/ray_current_cluster) and then refuses num_cpus
        # (engines that are not colocated take a CPU token each: 2 x world)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2 * cfg.cluster.world_size + 2), include_dashboard=False,
                 runtime_env=env, log_to_driver=log_to_driver, _temp_dir=os.environ.get("MDN_RAY_TMPDIR"))


def stop_ray_session(temp_dir: str, grace_s: float = 1.0, remove: bool = False) -> int:
    """Kill what a killed driver left behind: every process of the private local Ray session whose
    command line names `temp_dir` (its MDN_RAY_TMPDIR), by process group where it leads one; wait
    `grace_s`, then optionally remove the folder. Returns how many processes were signalled."""
    import shutil
    import signal
    import subprocess
    import time

    found = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
    pids = [p for p in map(int, found) if p != os.getpid()]   # never the caller, whatever its arguments
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(grace_s)
    if remove:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return len(pids)


class PolicyWorkerImpl:
    """One rank of the Megatron actor (runs inside a Ray actor process)."""

    def __init__(self, cfg_dict: dict, rank: int, world_size: int, hf_path: str) -> None:
        from megatron_denoise.console import redirect_worker_output

        redirect_worker_output(f"policy_rank{rank}")  # before anything imports and warns
        self._args = (cfg_dict, rank, world_size, hf_path)
        self.rank = rank
        self._store = None              # rank 0: the group's rendezvous store (open_rendezvous)
        self._refit_pools: dict = {}    # transport -> RefitBuffers kept across refits
        chaos.set_role(f"policy{rank}")

    def where(self) -> dict:
        from megatron_denoise.placement import where_am_i

        return where_am_i()

    def open_rendezvous(self) -> tuple[str, int]:
        """Rank 0: serve the group's rendezvous store on a port bound here and now; returns this
        node's IP and that port for the other ranks' setup."""
        import ray

        from megatron_denoise.megatron import parallel_state

        self._store = parallel_state.host_store(self._args[2])
        return ray.util.get_node_ip_address(), self._store.port

    def setup(self, master_addr: str, master_port: int) -> None:
        cfg_dict, rank, world_size, hf_path = self._args
        # Ray gives each rank's actor exactly one visible GPU (CUDA_VISIBLE_DEVICES), so the local
        # device index is always 0; a rank-derived LOCAL_RANK would select a device it cannot see
        # (RANK and WORLD_SIZE are what init_process_group reads beside the store; no MASTER_ADDR:
        # the rendezvous is the store rank 0 serves at master_addr:master_port)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        from megatron_denoise.convert.megatron_io import load_hf_into_actor
        from megatron_denoise.layout import ParallelLayout
        from megatron_denoise.megatron import parallel_state
        from megatron_denoise.megatron.actor import MegatronActor

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        self.cfg = config_from_dict(cfg_dict)
        layout = ParallelLayout.from_config(self.cfg.parallel, world_size)
        backend = self.cfg.cluster.backend
        store = self._store or parallel_state.join_store(master_addr, master_port, world_size)
        self.groups = parallel_state.initialize(layout, backend=backend, seed=self.cfg.trainer.seed, store=store)
        self.actor = MegatronActor(self.cfg, self.groups)
        load_hf_into_actor(self.actor, hf_path)  # checks the config against the folder; refreshes main params
        if self.cfg.algorithm.kl.coef > 0:  # the KL reference: the starting weights, frozen (a resume
            self.actor.snapshot_reference()  # loads its checkpoint after this, the reference stays)

    def empty_cache(self) -> None:
        """Return cached device memory at a phase boundary (GPU; nothing on CPU)."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def node_address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def compute_logprobs(self, packed) -> Any:
        from megatron_denoise.megatron.batching import ActorBatch

        chaos.point("logprob")
        logp, _ = self.actor.compute_logprobs(ActorBatch.from_packed(packed))
        return logp if self.rank == 0 else None

    def compute_ref_logprobs(self, packed) -> Any:
        from megatron_denoise.megatron.batching import ActorBatch

        logp = self.actor.compute_ref_logprobs(ActorBatch.from_packed(packed))
        return logp if self.rank == 0 else None

    def train(self, packed, old_logprobs, ref_logprobs=None, is_weights=None, return_logprobs=False) -> Any:
        """The update's metrics (rank 0; None elsewhere); with return_logprobs, (metrics, the
        log-probs of the update's forward pass [rows, W]) (MegatronActor.update)."""
        from megatron_denoise.megatron.batching import ActorBatch

        chaos.point("train")
        updates = self.actor.update(ActorBatch.from_packed(packed, old_logprobs=old_logprobs,
                                                           ref_logprobs=ref_logprobs, is_weights=is_weights),
                                    return_logprobs=return_logprobs)
        if self.rank != 0:
            return None
        # several updates (ppo_epochs x mini_batches): report their mean, and how many were skipped
        out = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        out["skipped"] = float(sum(u["skipped"] for u in updates))
        out["updates"] = float(len(updates))
        return (out, self.actor.last_logprobs) if return_logprobs else out

    def refit(self, targets: list, bucket_bytes: int, transport: str = "shm") -> dict:
        """Stream the weights (HF names) into `targets`, the engine processes this rank feeds (its
        colocated replica slice). Every rank iterates the gathered tensors (the gathers are
        collectives); a rank without targets drops each at once. Buckets of `bucket_bytes`, in one
        reused buffer (two with `rollout.refit_receive: views`), each refilled only after every target
        released the bucket in it (see rollout.refit.BucketStream). Returns this
        rank's figures (buckets, bytes, the engines' load seconds, measured peak extra memory)."""
        import ray

        from megatron_denoise.convert.megatron_io import actor_hf_weights
        from megatron_denoise.rollout.refit import PeakRSS, RefitBuffers, refit_buffers, stream_buckets

        stats = {"buckets": 0, "bytes": 0, "max_bucket_bytes": 0, "engine_seconds": 0.0,
                 "fill_seconds": 0.0, "push_seconds": 0.0}
        chaos.point("refit")
        timeout = float(self.cfg.trainer.call_timeout_s)
        # an engine that dies (or hangs) mid-refit must not leave this rank's peers waiting in a
        # gather: the first failure stops the pushes, the gathers run to the end, then it raises
        failed: list = []
        done: list = []
        with PeakRSS() as mem:
            if targets:
                try:
                    ray.get([t.refit_begin.remote() for t in targets], timeout=timeout)
                except Exception as e:  # noqa: BLE001 - raised after the gathers
                    failed.append(e)
            keep = lambda name: bool(targets) and not failed  # noqa: E731
            mark = time.perf_counter()      # fill: gathers, HF conversion, copies into the buffer
            pool = self._refit_pools.get(transport)
            if pool is None and self.cfg.rollout.refit_keep_buffers:
                pool = self._refit_pools[transport] = RefitBuffers(transport)
            for bucket in stream_buckets(actor_hf_weights(self.actor), bucket_bytes, keep=keep,
                                         transport=transport, buffers=refit_buffers(self.cfg.rollout), pool=pool):
                filled = time.perf_counter()
                stats["fill_seconds"] += filled - mark
                if failed:
                    mark = time.perf_counter()
                    continue
                ref = ray.put(bucket)
                try:
                    ray.get([t.refit_push.remote(ref) for t in targets], timeout=timeout)
                except Exception as e:  # noqa: BLE001
                    failed.append(e)
                mark = time.perf_counter()  # push: until the engines let this rank fill its next buffer
                stats["push_seconds"] += mark - filled
                stats["buckets"] += 1
                stats["bytes"] += bucket.nbytes
                stats["max_bucket_bytes"] = max(stats["max_bucket_bytes"], bucket.nbytes)
                del ref, bucket
            stats["fill_seconds"] += time.perf_counter() - mark
            if targets:
                try:
                    done = ray.get([t.refit_end.remote() for t in targets], timeout=timeout)
                except Exception as e:  # noqa: BLE001
                    failed.append(e)
        if failed:
            raise RuntimeError(f"policy rank {self.rank}: refit into its engine processes failed: "
                               f"{type(failed[0]).__name__}: {str(failed[0]).splitlines()[0][:300]}")
        stats["engine_seconds"] = max([d["seconds"] for d in done], default=0.0)
        stats["engine_wait_seconds"] = max([d["waited"] for d in done], default=0.0)
        stats["engine_tensors"] = [d["tensors"] for d in done]
        stats["peak_extra_bytes"] = mem.extra_bytes
        return stats

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

        for pool in self._refit_pools.values():   # the refit's /dev/shm files
            pool.cleanup()
        parallel_state.teardown(destroy_process_group=True)


class EngineReplicaImpl:
    """One tensor-parallel rank of one rollout-engine replica, inside a Ray actor placed by
    megatron_denoise.placement. TP > 1: the replica's ranks form their own torch.distributed group
    (vLLM's external_launcher executor) and every rank receives the same calls."""

    def __init__(self, model_path: str, rollout_cfg_dict: dict, max_model_len: int, run_dir: str,
                 dtype: Optional[str], replica: int, tp_rank: int, tp_size: int, master_addr: Optional[str],
                 master_port: int) -> None:
        from megatron_denoise.console import redirect_worker_output

        redirect_worker_output(f"rollout_{replica}_{tp_rank}")  # before vLLM is imported
        self._args = (model_path, rollout_cfg_dict, max_model_len, run_dir, dtype)
        self.replica, self.tp_rank, self.tp_size = replica, tp_rank, tp_size
        self._rendezvous = (master_addr, master_port)
        self.engine = None
        self.rc = None
        chaos.set_role("rollout")
        self._refit = None

    def where(self) -> dict:
        from megatron_denoise.placement import where_am_i

        return {**where_am_i(), "replica": self.replica, "tp_rank": self.tp_rank}

    def setup(self) -> None:
        from megatron_denoise.config.schema import RolloutConfig
        from megatron_denoise.rollout.engine import make_engine

        model_path, rollout_cfg_dict, max_model_len, run_dir, dtype = self._args
        rc = self.rc = RolloutConfig(**rollout_cfg_dict)
        opts = {}
        if rc.engine == "vllm":
            opts["in_process"] = True  # the replica is its own process already; a streamed refit needs it
            if self.tp_size > 1:
                addr, port = self._rendezvous
                os.environ.update(RANK=str(self.tp_rank), WORLD_SIZE=str(self.tp_size), LOCAL_RANK="0",
                                  MASTER_ADDR=str(addr), MASTER_PORT=str(port))
                opts["external_launcher"] = True
        self.engine = make_engine(model_path, rc, max_model_len=max_model_len, run_dir=run_dir, dtype=dtype, **opts)

    def generate(self, requests, sampling):
        chaos.point("generate")
        return self.engine.generate(requests, sampling)

    def update_weights(self, named) -> float:
        return self.engine.update_weights(named)

    # streamed refit: begin (the load starts in a thread, reading pushed buckets), push x n, end
    def refit_begin(self) -> None:
        import threading

        from megatron_denoise.rollout.refit import BucketStream

        chaos.point("refit")
        if self._refit is not None:
            raise RuntimeError(f"replica {self.replica}: a refit is already under way")
        # the transformers oracle engine keeps every tensor until the end: it needs copies
        stream = BucketStream(self.rc.refit_receive if hasattr(self.engine, "refit_stream") else RefitReceive.COPY)
        state = {"stream": stream, "seconds": 0.0, "error": None, "buffered": None}

        def load():
            try:
                if hasattr(self.engine, "refit_stream"):
                    state["seconds"] = self.engine.refit_stream(stream)
                else:  # transformers oracle engine: strict full-state copy at the end
                    state["buffered"] = list(stream)
            except BaseException as e:  # noqa: BLE001 - reported by refit_end
                state["error"] = e
                stream.fail(e)    # pushers raise instead of waiting for a release
                for _ in stream:  # drain, so that no push blocks on the queue
                    pass

        state["thread"] = threading.Thread(target=load, name=f"refit-replica-{self.replica}", daemon=True)
        state["thread"].start()
        self._refit = state

    def refit_push(self, bucket) -> None:
        self._refit["stream"].push(bucket)

    def refit_end(self) -> dict:
        state, self._refit = self._refit, None
        state["stream"].close()
        state["thread"].join()
        if state["error"] is not None:
            raise RuntimeError(f"replica {self.replica} tp-rank {self.tp_rank}: refit failed: {state['error']!r}")
        if state["buffered"] is not None:
            state["seconds"] = self.engine.update_weights(state["buffered"])
        st = state["stream"]
        return {"seconds": state["seconds"], "buckets": st.buckets, "bytes": st.bytes, "tensors": st.tensors,
                "waited": st.waited}

    def sleep(self, level: Optional[int] = None) -> None:
        if level is None or self.engine.__class__.__name__ != "VLLMEngine":
            self.engine.sleep()
        else:
            self.engine.sleep(level)
        self._empty_cache()

    def wake_up(self, tags: Optional[list] = None) -> None:
        if self.engine.__class__.__name__ == "VLLMEngine":
            self.engine.wake_up(tags)
        elif tags is None or "kv_cache" in tags:
            self.engine.wake_up()

    def memory_log(self) -> list:
        return list(getattr(self.engine, "memory_log", []))

    @staticmethod
    def _empty_cache() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def log_where(where: dict) -> None:
    """One line per placed process: which GPU share it holds (on a cluster: the placement picture)."""
    for slot, w in where.items():
        print(f"[megatron-denoise] placed {slot.name}: node {w['node_id'][:12]}, placement group {slot.group} "
              f"bundle {slot.bundle}, CUDA_VISIBLE_DEVICES={w['CUDA_VISIBLE_DEVICES']}, "
              f"GPU share {w['resources'].get('GPU', 0.0):g}", flush=True)


class PolicyGroup:
    """Fans calls out to every rank's worker; returns rank 0's answer."""

    def __init__(self, workers: list, placement: Any, bucket_bytes: int = 256 << 20,
                 call_timeout_s: float = 3600.0) -> None:
        self.workers = workers
        self.placement = placement
        self.bucket_bytes = bucket_bytes
        self.call_timeout_s = float(call_timeout_s)
        self.last_refit: dict = {}
        self._submit_lock = threading.Lock()

    @property
    def placement_group(self) -> Any:
        return self.placement.pgs[0]

    @classmethod
    def create(cls, cfg: Config, hf_path: str) -> "PolicyGroup":
        import ray

        from megatron_denoise.placement import Placement, plan_from_config

        world = cfg.cluster.world_size
        plan = plan_from_config(cfg)
        placement = Placement.create(plan, timeout_s=cfg.rollout.placement_timeout_s)
        try:
            remote = ray.remote(PolicyWorkerImpl)
            cfg_dict = dataclasses.asdict(cfg)
            workers = [remote.options(**placement.options(plan.policy[r])).remote(cfg_dict, r, world, hf_path)
                       for r in range(world)]
            # scheduled and started within the timeout (or a named error), then the models are built
            where = placement.wait_ready({plan.policy[r]: w.where.remote() for r, w in enumerate(workers)})
            log_where(where)
        except BaseException:
            placement.remove()
            raise
        group = cls(workers, placement, bucket_bytes=int(cfg.rollout.refit_bucket_mb) << 20,
                    call_timeout_s=cfg.trainer.call_timeout_s)
        # rank 0 serves the rendezvous on its own node (not the driver's), on a port it holds
        master_addr, master_port = group._wait([workers[0].open_rendezvous.remote()], "open_rendezvous")[0]
        group.call("setup", master_addr, master_port)
        return group

    def call(self, method: str, *args, **kwargs) -> Any:
        return self.call_all(method, *args, **kwargs)[0]

    def call_all(self, method: str, *args, **kwargs) -> list:
        return self._wait(self._submit(lambda r, w: getattr(w, method).remote(*args, **kwargs)), method)

    def _submit(self, make: Callable[[int, Any], Any]) -> list:
        """make(rank, worker) -> ref for every rank, under the group's lock: calls from two threads
        (with rollout.async one_step, a replica that dies during the background generation is
        recovered, and so refit, from that thread while the trainer's thread trains) reach every
        rank in the same order. Each rank runs one call at a time, so different orders would enter
        the ranks' collectives in different orders and hang."""
        with self._submit_lock:
            return [make(r, w) for r, w in enumerate(self.workers)]

    def _wait(self, refs: list, call: str, timeout_s: Optional[float] = None) -> list:
        """Every rank's answer, in rank order; a dead rank raises WorkerDied naming it (also when
        a surviving rank reports the broken collective first), a silent one CallTimeout."""
        from megatron_denoise.trainer.faults import WorkerDied, wait_all

        names = [f"policy rank {r}" for r in range(len(refs))]
        try:
            return wait_all(refs, names, call, self.call_timeout_s if timeout_s is None else timeout_s)
        except WorkerDied:
            raise
        except Exception as e:
            dead = self.dead_ranks(refs)
            if dead:
                raise WorkerDied(names[dead[0]], call, e) from e
            raise

    def dead_ranks(self, refs: list, grace_s: float = 10.0) -> list[int]:
        """Ranks whose call `refs` ended in the actor's death, given `grace_s` to show it."""
        import ray

        from megatron_denoise.trainer.faults import _dead

        ray.wait(list(refs), num_returns=len(refs), timeout=grace_s)
        dead = []
        for r, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0.1)
            except Exception as e:  # noqa: BLE001
                if _dead(e):
                    dead.append(r)
        return dead

    def compute_logprobs(self, batch) -> Any:
        return self.call("compute_logprobs", batch)

    def compute_ref_logprobs(self, batch) -> Any:
        return self.call("compute_ref_logprobs", batch)

    # train(..., return_logprobs=True) -> (metrics, log-probs of the update's forward pass): the
    # trainer's mismatch metrics take them instead of a separate old-log-prob forward (trainer.step)
    trains_with_logprobs = True

    def train(self, batch, old_logprobs, ref_logprobs=None, is_weights=None, return_logprobs=False) -> Any:
        return self.call("train", batch, old_logprobs, ref_logprobs, is_weights, return_logprobs)

    def empty_cache(self) -> None:
        self.call_all("empty_cache")

    def refit_targets(self, fleet: "RolloutFleet") -> list[list]:
        """Engine processes fed by each policy rank: colocated, the replica slice on the rank's own
        GPU (bundle); otherwise engine process i is fed by rank i % world."""
        plan = self.placement.plan
        targets: list[list] = [[] for _ in self.workers]
        where = {(s.group, s.bundle): r for r, s in enumerate(plan.policy)}
        flat = [(s, h) for slots, hs in zip(plan.replicas, fleet.replicas) for s, h in zip(slots, hs)]
        for i, (slot, handle) in enumerate(flat):
            r = where.get((slot.group, slot.bundle)) if plan.colocate else None
            targets[i % len(self.workers) if r is None else r].append(handle)
        return targets

    def refit(self, engine: "RolloutFleet", _retry: bool = True) -> dict:
        """Bucketed refit of every replica; returns the step's refit figures (also in last_refit).
        An engine process that died is re-created and the refit done again (once)."""
        if not isinstance(engine, RolloutFleet):  # a plain engine (tests): the old full push
            raise TypeError(f"PolicyGroup.refit needs a RolloutFleet, got {type(engine).__name__}")
        targets = self.refit_targets(engine)
        # colocated: the replica shares the rank's node (and GPU): a reused shared buffer (CUDA IPC
        # on GPU); otherwise Ray's object store
        transport = "shm" if self.placement.plan.colocate else "object"
        try:
            per_rank = self._wait(self._submit(lambda r, w: w.refit.remote(targets[r], self.bucket_bytes, transport)),
                                  "refit")
        except Exception:
            if not (_retry and engine.restart_dead()):
                raise
            return self.refit(engine, _retry=False)
        self.last_refit = {
            "refit/buckets": float(max(p["buckets"] for p in per_rank)),
            "refit/mb_sent": sum(p["bytes"] for p in per_rank) / 2**20,
            "refit/max_bucket_mb": max(p["max_bucket_bytes"] for p in per_rank) / 2**20,
            "refit/engine_seconds": max(p["engine_seconds"] for p in per_rank),
            # where the refit's time went: the senders filling buffers and waiting for the engines,
            # the engines' loaders waiting for buckets (the rest of engine_seconds is the load)
            # (time/*: wall times, which differ between identical runs)
            "time/refit_fill": max(p["fill_seconds"] for p in per_rank),
            "time/refit_push": max(p["push_seconds"] for p in per_rank),
            "time/refit_engine_wait": max(p["engine_wait_seconds"] for p in per_rank),
            "refit/peak_extra_mb": max(p["peak_extra_bytes"] for p in per_rank) / 2**20,
        }
        return self.last_refit

    def save(self, root: str, step: int, trainer_state: dict, keep_last: int) -> str:
        return self.call("save", root, step, trainer_state, keep_last)

    def load(self, path: str) -> dict:
        return self.call("load", path)

    def export_hf(self, out_dir: str, source_hf: Optional[str]) -> Optional[dict]:
        return self.call("export_hf", out_dir, source_hf)

    def shutdown(self) -> None:
        import ray

        try:  # a rank whose peer died may hang or fail in its teardown: bounded, then killed
            self._wait(self._submit(lambda r, w: w.shutdown.remote()), "shutdown", timeout_s=30.0)
        except Exception as e:  # noqa: BLE001 - cleanup: the ranks are killed below either way
            print(f"[megatron-denoise] policy shutdown: {str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)
        finally:
            for w in self.workers:
                ray.kill(w)
            self.placement.remove()


class RolloutFleet:
    """Driver-side handle of every engine replica, with the RolloutEngine protocol's methods:
    a step's rows are sharded over the replicas (balanced by expected tokens, a problem's rows
    together) and come back in request order; sleep / wake_up go to every replica."""

    def __init__(self, replicas: list[list], slots: tuple = (), call_timeout_s: float = 3600.0) -> None:
        self.replicas = replicas          # [replica][tp_rank] -> actor handle
        self.slots = slots
        self.last_shards: list[list[int]] = []
        self.call_timeout_s = float(call_timeout_s)
        # run-long counts of recovered faults (the trainer logs them per step as faults/*)
        self.faults = {"rollout_restarts": 0, "generate_retries": 0}
        self._spawn = None    # replica index -> its new actor handles (set by create)
        self.policy = None    # refits a re-created replica (set by create)

    def _names(self) -> list[str]:
        return [f"rollout replica {j} tp-rank {t}" for j, rep in enumerate(self.replicas) for t in range(len(rep))]

    def _wait(self, refs: list, names: list[str], call: str, timeout_s: Optional[float] = None) -> list:
        from megatron_denoise.trainer.faults import wait_all

        return wait_all(refs, names, call, self.call_timeout_s if timeout_s is None else timeout_s)

    def dead_replicas(self, grace_s: float = 10.0) -> list[int]:
        """Replicas with a process that is gone (a cheap call to each, given `grace_s`)."""
        import ray

        from megatron_denoise.trainer.faults import _dead

        refs = [(j, h.where.remote()) for j, rep in enumerate(self.replicas) for h in rep]
        ray.wait([r for _, r in refs], num_returns=len(refs), timeout=grace_s)
        dead = set()
        for j, ref in refs:
            try:
                ray.get(ref, timeout=0.1)
            except Exception as e:  # noqa: BLE001
                if _dead(e):
                    dead.add(j)
        return sorted(dead)

    def restart_dead(self) -> bool:
        """Re-create every replica with a dead process (its surviving TP ranks too: they meet the
        new ones in a fresh rendezvous) in the same placement slots; False if none was dead or the
        fleet cannot re-create. The new replicas hold the model folder's weights until refitted."""
        import ray

        dead = self.dead_replicas() if self._spawn is not None else []
        if not dead:
            return False
        for j in dead:
            print(f"[megatron-denoise] rollout replica {j} died: re-creating it", flush=True)
            for h in self.replicas[j]:
                ray.kill(h)
            self.replicas[j] = self._spawn(j)
            self.faults["rollout_restarts"] += 1
        return True

    def recover(self) -> bool:
        """restart_dead, then refit the new replicas from the policy (the current weights)."""
        if not self.restart_dead():
            return False
        self.policy.refit(self)
        return True

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    def handles(self) -> list:
        return [h for rep in self.replicas for h in rep]

    @classmethod
    def create(cls, cfg: Config, model_path: str, run_dir: str, policy: PolicyGroup) -> "RolloutFleet":
        import ray

        placement = policy.placement
        plan = placement.plan
        max_len = cfg.data.max_prompt_length + cfg.data.max_response_length
        if cfg.denoise.partial_mode == PartialMode.NONE:
            max_len += cfg.data.max_response_length  # a prefix of up to R tokens plus R more
        dtype = cfg.rollout.dtype or cfg.model.params_dtype
        rc = dataclasses.asdict(cfg.rollout)
        if not rc["cpu_threads"]:  # each engine process: its colocated policy rank's share (PolicyWorkerImpl.setup)
            rc["cpu_threads"] = max(1, (os.cpu_count() or 1) // cfg.cluster.world_size)
        remote = ray.remote(EngineReplicaImpl)

        def start(j: int) -> list:
            slots = plan.replicas[j]
            addr, port = (placement.rendezvous(slots[0].group, slots[0].bundle) if len(slots) > 1
                          else (None, 0))  # one rank: no rendezvous
            return [remote.options(**placement.options(s)).remote(
                model_path, rc, max_len, run_dir, dtype, j, s.tp_rank, len(slots), addr, port) for s in slots]

        def ready(fleet: "RolloutFleet", js: list[int]) -> None:
            log_where(placement.wait_ready({s: h.where.remote() for j in js
                                            for s, h in zip(plan.replicas[j], fleet.replicas[j])}))
            fleet._wait([h.setup.remote() for j in js for h in fleet.replicas[j]],
                        [f"rollout replica {j} tp-rank {t}" for j in js for t in range(len(fleet.replicas[j]))],
                        "setup")

        fleet = cls([start(j) for j in range(len(plan.replicas))], plan.replicas,
                    call_timeout_s=cfg.trainer.call_timeout_s)
        try:
            ready(fleet, list(range(fleet.num_replicas)))
        except BaseException:
            for h in fleet.handles():
                ray.kill(h)
            raise

        def spawn(j: int) -> list:
            fleet.replicas[j] = start(j)
            ready(fleet, [j])
            return fleet.replicas[j]

        fleet._spawn, fleet.policy = spawn, policy
        return fleet

    def where(self) -> list[list[dict]]:
        flat = self._wait([h.where.remote() for h in self.handles()], self._names(), "where")
        it = iter(flat)
        return [[next(it) for _ in rep] for rep in self.replicas]

    def generate(self, requests, sampling):
        """Completions in request order. A replica that dies is re-created, refitted from the
        policy and the call retried once (counted in faults)."""
        from megatron_denoise.trainer.faults import WorkerDied

        try:
            return self._generate(requests, sampling)
        except WorkerDied:
            if not self.recover():
                raise
        self.faults["generate_retries"] += 1
        return self._generate(requests, sampling)

    def _generate(self, requests, sampling):
        from megatron_denoise.rollout.engine import shard_rows

        requests = list(requests)
        shards = shard_rows(requests, self.num_replicas)
        self.last_shards = shards
        refs = []
        self._busy = []
        for j, (rep, idx) in enumerate(zip(self.replicas, shards)):
            if not idx:
                continue
            self._busy.append(j)
            rows = [requests[i] for i in idx]
            calls = [h.generate.remote(rows, sampling) for h in rep]  # every TP rank gets the same call
            refs.append((idx, calls[0], calls[1:]))
        out: list = [None] * len(requests)
        names = {j: [f"rollout replica {j} tp-rank {t}" for t in range(len(rep))]
                 for j, rep in enumerate(self.replicas)}
        flat = [(j, c) for j, (_, first, rest) in zip(self._busy, refs) for c in [first, *rest]]
        values = self._wait([c for _, c in flat], [names[j][k] for k, (j, _) in
                                                   zip(_tp_index(flat), flat)], "generate")
        pos = 0
        for idx, first, rest in refs:
            for i, comp in zip(idx, values[pos]):
                out[i] = comp
            pos += 1 + len(rest)
        return out

    def update_weights(self, named, bucket_bytes: Optional[int] = None, transport: str = "object",
                       buffers: int = 2) -> float:
        """Push (name, tensor) pairs from the driver (tests, tools) to every engine process, with
        the trainer's protocol: buckets of bucket_bytes in `buffers` reused buffers (each bucket
        says how many, so any `rollout.refit_receive` of the replicas is safe)."""
        import ray

        from megatron_denoise.rollout.refit import DEFAULT_BUCKET_BYTES, stream_buckets

        hs, names = self.handles(), self._names()
        self._wait([h.refit_begin.remote() for h in hs], names, "refit_begin")
        try:
            for bucket in stream_buckets(named, bucket_bytes or DEFAULT_BUCKET_BYTES, transport=transport,
                                         buffers=buffers):
                ref = ray.put(bucket)
                self._wait([h.refit_push.remote(ref) for h in hs], names, "refit_push")
        finally:
            done = self._wait([h.refit_end.remote() for h in hs], names, "refit_end")
        return max(d["seconds"] for d in done)

    def _all(self, method: str, *args) -> list:
        """Call every engine process; a dead replica is re-created and refitted, then the call is
        made again (once)."""
        from megatron_denoise.trainer.faults import WorkerDied

        try:
            return self._wait([getattr(h, method).remote(*args) for h in self.handles()], self._names(), method)
        except WorkerDied:
            if not self.recover():
                raise
        return self._wait([getattr(h, method).remote(*args) for h in self.handles()], self._names(), method)

    def sleep(self, level: Optional[int] = None) -> None:
        self._all("sleep", level)

    def wake_up(self, tags: Optional[list] = None) -> None:
        self._all("wake_up", tags)

    def memory_log(self) -> list:
        return self._wait([self.replicas[0][0].memory_log.remote()], self._names()[:1], "memory_log")[0]

    def close(self) -> None:
        import ray

        try:
            self._wait([h.close.remote() for h in self.handles()], self._names(), "close", timeout_s=60.0)
        finally:
            for h in self.handles():
                ray.kill(h)


RolloutWorker = RolloutFleet  # the trainer's older name


def _tp_index(flat: list) -> list[int]:
    """The TP rank of each (replica, call) pair of a generate fan-out (calls listed rank 0 first)."""
    out, last, k = [], None, 0
    for j, _ in flat:
        k = k + 1 if j == last else 0
        out.append(k)
        last = j
    return out
