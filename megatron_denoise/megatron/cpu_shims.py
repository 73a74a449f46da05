"""Every CUDA-only workaround megatron-core 0.16.1 needs on a CPU torch build, in one place.

megatron-core assumes a GPU in a handful of spots even when every tensor lives on the CPU. Each
shim below is a small named function that patches exactly one such spot, documented with the
place it was hit (0.16.1 line numbers). They are applied only when no GPU is present
(`apply_cpu_shims()` is a no-op with CUDA) and every patch is reversible, so that the test suite
can remove one shim and show that megatron-core still needs it.

Patches are of four kinds:
- module attribute replacements (a megatron function swapped for a CPU-correct twin);
- stand-ins for `torch.cuda.*` entry points that would raise "Torch not compiled with CUDA" on a
  CPU build (current_device, streams, events, synchronize). Replacing them changes only calls
  that would otherwise crash;
- the `torch` global of a few named megatron modules replaced by a view whose tensor factories
  map device="cuda" to the CPU (hard-coded allocations);
- `Tensor.type()` reporting CUDA type names only while three optimizer functions run, and
  `Tensor.cuda()` returning the tensor itself only while the tied-embedding setup runs.

The shims (SHIMS, in order): rng_tracker, cuda_current_device, cuda_streams, cuda_device_strings,
cp_rope_positions, moe_router_gemm, moe_split_sizes, sequence_parallel_norm,
gloo_uneven_collectives, tied_embedding_sync, optimizer_type_checks, distopt_load. tests/megatron/test_actor_dist.py
removes each one in turn and checks that the megatron call it covers fails without it.

Nothing here is imported by the pure algorithm layers; megatron is imported lazily inside the
shim functions.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

# ------------------------------------------------------------------------------------------------
# patch bookkeeping


@dataclass
class _Patch:
    target: Any
    attr: str
    original: Any


@dataclass
class Shim:
    name: str
    doc: str
    install: Callable[[], list]  # returns the list of _Patch it made
    patches: list = field(default_factory=list)

    @property
    def applied(self) -> bool:
        return bool(self.patches)


def _set(target: Any, attr: str, value: Any) -> _Patch:
    """Replace `target.attr` with `value` and remember the original."""
    original = target.__dict__[attr] if isinstance(target, type) else getattr(target, attr)
    setattr(target, attr, value)
    return _Patch(target, attr, original)


def _mod(name: str):
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------------
# 1. RNG tracker on the CPU generator


class CpuRNGStatesTracker:
    """Drop-in for megatron's CudaRNGStatesTracker that forks the CPU default generator.

    megatron's tracker (tensor_parallel/random.py:230-277) calls torch.cuda.get_rng_state /
    set_rng_state; attention forks the tracker around dropout even when dropout is 0, so the
    tracker is on the forward path of every model. States are CPU ByteTensors from
    torch.get_rng_state().
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = kwargs.get("is_inference_rng_tracker", False)
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name


def shim_rng_tracker() -> list:
    """Make megatron's global RNG tracker a CpuRNGStatesTracker (random.py:_CUDA_RNG_STATE_TRACKER)
    and the cuda-state helpers read/write the CPU generator (random.py:41-110, used by
    checkpoint RNG capture `_get_all_rng_states`)."""
    random = _mod("megatron.core.tensor_parallel.random")
    patches = [_set(random, "CudaRNGStatesTracker", CpuRNGStatesTracker)]
    patches.append(_set(random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()))
    patches.append(_set(random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)))
    # force the next get_cuda_rng_tracker() to build the (now CPU) tracker class
    patches.append(_set(random, "_CUDA_RNG_STATE_TRACKER", None))
    patches.append(_set(random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False))
    return patches


# ------------------------------------------------------------------------------------------------
# 2. torch.cuda.current_device / 4. streams, events, synchronize


class _NullStream:
    """A CUDA stream stand-in: every operation is already ordered on the CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NullEvent":
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


class _NullEvent:
    """A CUDA event stand-in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


_NULL_STREAM = _NullStream()


def shim_cuda_current_device() -> list:
    """`torch.cuda.current_device()` returns the CPU device: megatron allocates buffers with
    `device=torch.cuda.current_device()` (router.py:169-198, experts.py:184, optimizer.py:1141,
    p2p_communication.py:190-321, async_utils.py:165, rotary_pos_embedding.py:162...)."""
    return [_set(torch.cuda, "current_device", lambda: torch.device("cpu"))]


def shim_cuda_streams() -> list:
    """Streams, events and synchronize become no-ops: the MoE alltoall dispatcher's DtoH side
    stream (token_dispatcher.py:445, 871-874), pipeline p2p (p2p_communication.py:398) and the
    checkpoint writer (async_utils.py:212, filesystem_async.py:230) use them."""
    return [
        _set(torch.cuda, "Stream", _NullStream),
        _set(torch.cuda, "Event", _NullEvent),
        _set(torch.cuda, "current_stream", lambda *a, **k: _NULL_STREAM),
        _set(torch.cuda, "default_stream", lambda *a, **k: _NULL_STREAM),
        _set(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        _set(torch.cuda, "synchronize", lambda *a, **k: None),
    ]


# ------------------------------------------------------------------------------------------------
# 3. hard-coded device="cuda"


class _CpuDeviceTorch:
    """A view of the `torch` module whose tensor factories map device="cuda" to the CPU.

    Installed as the `torch` global of one megatron module only, so that code such as
    `torch.zeros([], dtype=torch.int, device="cuda")` (schedules.py:596, 983, 2138) allocates on
    the CPU while every other attribute is the real torch.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
                  "empty_like", "full_like", "rand", "randn", "eye", "as_tensor")

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name in self._FACTORIES:
            def factory(*args: Any, **kwargs: Any) -> Any:
                dev = kwargs.get("device")
                if dev is not None and str(dev).startswith("cuda"):
                    kwargs["device"] = "cpu"
                kwargs.pop("pin_memory", None)  # needs an accelerator; nothing to pin for on CPU
                return attr(*args, **kwargs)
            return factory
        return attr


# megatron modules that allocate with a hard-coded device="cuda" on paths the actor runs
_CUDA_STRING_MODULES = (
    "megatron.core.pipeline_parallel.schedules",      # 596, 983, 2138 total_num_tokens
    "megatron.core.optimizer.optimizer",              # 473-485, 907 found_inf / _scale
    "megatron.core.optimizer.clip_grads",             # 90, 103, 115, 174, 207
    "megatron.core.optimizer.grad_scaler",            # 15, 88-94 (fp16 only)
    "megatron.core.transformer.utils",                # 35, 40 default causal / sliding masks
    "megatron.core.transformer.moe.moe_utils",        # 998 aux-loss tracker
    "megatron.core.distributed.param_and_grad_buffer",  # 768
    "megatron.core.utils",                            # 1207 l2 norm
    "megatron.core.rerun_state_machine",              # 261, 265
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # 204
    "megatron.core.dist_checkpointing.exchange_utils",  # 104, 110, 326
)


def shim_cuda_device_strings() -> list:
    """Tensors allocated with a hard-coded device="cuda" (schedules.py:596, 983, 2138;
    optimizer.py:907; clip_grads.py:90-207; transformer/utils.py:35 default causal mask;
    state_dict_saver.py:204; ...): give exactly those megatron modules a `torch` whose factories
    map cuda -> cpu and drop pin_memory (`_CpuDeviceTorch`)."""
    return [_set(_mod(name), "torch", _CpuDeviceTorch(torch)) for name in _CUDA_STRING_MODULES]


def _cp_rank_positions(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
    """rope_utils.get_pos_emb_on_this_cp_rank on the CPU: keep chunks r and 2cp-1-r of 2cp."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    cp_idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, cp_idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def shim_cp_rope_positions() -> list:
    """RoPE under context parallelism selects this rank's positions with an index tensor made
    by `torch.tensor(..., pin_memory=True).cuda()` (rope_utils.py:62-64, called from
    rotary_pos_embedding.py:204): the same selection on the embedding's device."""
    ru = _mod("megatron.core.models.common.embeddings.rope_utils")
    rp = _mod("megatron.core.models.common.embeddings.rotary_pos_embedding")
    patches = [_set(ru, "get_pos_emb_on_this_cp_rank", _cp_rank_positions)]
    if "get_pos_emb_on_this_cp_rank" in rp.__dict__:
        patches.append(_set(rp, "get_pos_emb_on_this_cp_rank", _cp_rank_positions))
    return patches


# ------------------------------------------------------------------------------------------------
# 5. MoE without Transformer Engine


def shim_moe_router_gemm() -> list:
    """moe_utils.py references `te_general_gemm` (1192, 1225) that is only defined when Transformer
    Engine imports: without TE the router's fp32 gemm raises NameError. Define it as None, which
    selects the torch.mm fallback."""
    moe_utils = _mod("megatron.core.transformer.moe.moe_utils")
    if "te_general_gemm" in moe_utils.__dict__:
        return []
    moe_utils.te_general_gemm = None
    return [_Patch(moe_utils, "te_general_gemm", _MISSING)]


def _cpu_move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """Like moe_utils.maybe_move_tensor_to_cpu, but also converts CPU tensors to numpy when
    asked: the alltoall dispatcher expects split sizes as host arrays afterwards."""
    if torch.is_tensor(tensor):
        tensor = tensor.to("cpu")
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def shim_moe_split_sizes() -> list:
    """token_dispatcher.maybe_move_tensor_to_cpu (moe_utils.py:1078, called at
    token_dispatcher.py:876-892) only converts CUDA tensors; on the CPU the alltoall split sizes
    stay tensors and the all-to-all rejects them."""
    td = _mod("megatron.core.transformer.moe.token_dispatcher")
    return [_set(td, "maybe_move_tensor_to_cpu", _cpu_move_to_cpu)]


# ------------------------------------------------------------------------------------------------
# 6. local norm under sequence parallelism


def shim_sequence_parallel_norm() -> list:
    """WrappedTorchNorm (transformer/torch_norm.py:32) asserts that sequence parallelism is off;
    MoE with TP>1 requires it. Build the norm with the flag cleared and tag its parameters
    `.sequence_parallel = True` so finalize_model_grads all-reduces their grads over TP (each TP
    rank saw only its sequence slice)."""
    tn = _mod("megatron.core.transformer.torch_norm")
    cls = tn.WrappedTorchNorm
    original_new = cls.__dict__["__new__"]

    def __new__(klass, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        if not config.sequence_parallel:
            return original_new(klass, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        config.sequence_parallel = False
        try:
            norm = original_new(klass, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    return [_set(cls, "__new__", staticmethod(__new__))]


# ------------------------------------------------------------------------------------------------
# 7. uneven all_gather / reduce_scatter on gloo


def shim_gloo_uneven_collectives() -> list:
    """gloo rejects all_gather/reduce_scatter with pieces of different sizes
    (tensor_parallel/mappings.py:150, 193), which the alltoall dispatcher issues with TP x EP.
    Pad every piece to the largest, run the even collective, and cut the padding off."""
    mp = _mod("megatron.core.tensor_parallel.mappings")
    orig_gather = mp._gather_along_first_dim
    orig_rs = mp._reduce_scatter_along_first_dim

    def uneven(sizes: Optional[list]) -> bool:
        return sizes is not None and len(set(int(s) for s in sizes)) > 1

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if not uneven(output_split_sizes):
            return orig_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        m = max(sizes)
        padded = input_.new_zeros((m,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = orig_gather(padded.contiguous(), group, None, False)  # [world*m, ...]
        pieces = [out[i * m: i * m + s] for i, s in enumerate(sizes)]
        return torch.cat(pieces, dim=0)

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if not uneven(input_split_sizes):
            return orig_rs(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        m = max(sizes)
        rank = torch.distributed.get_rank(group)
        pieces = torch.split(input_, sizes, dim=0)
        padded = input_.new_zeros((m * len(sizes),) + tuple(input_.shape[1:]))
        for i, piece in enumerate(pieces):
            padded[i * m: i * m + piece.shape[0]] = piece
        out = orig_rs(padded, group, None, False)  # [m, ...]
        return out[: sizes[rank]].contiguous()

    return [_set(mp, "_gather_along_first_dim", gather),
            _set(mp, "_reduce_scatter_along_first_dim", reduce_scatter)]


# ------------------------------------------------------------------------------------------------
# 8. Tensor.type() string checks in the optimizer


_REAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any):
    """Tensor.type() that reports 'torch.cuda.XTensor' for CPU tensors (only while a wrapped
    optimizer function runs); with arguments it is the real Tensor.type."""
    if dtype is not None or kw:
        return _REAL_TENSOR_TYPE(self, dtype, non_blocking, **kw)
    name = _REAL_TENSOR_TYPE(self)
    if name.startswith("torch.") and not name.startswith("torch.cuda."):
        name = "torch.cuda." + name[len("torch."):]
    return name


def _with_cuda_type_names(fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        torch.Tensor.type = _cuda_type_name
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = _REAL_TENSOR_TYPE
    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", "wrapper")
    return wrapper


def shim_optimizer_type_checks() -> list:
    """The optimizers sort parameters by `Tensor.type()` strings that only exist on CUDA
    (distrib_optimizer.py:361, 420, 582 in _build_model_and_main_param_groups; optimizer.py:671,
    690 in Float16OptimizerWithFloat16Params.__init__; clip_grads.py:167 in
    clip_grad_by_total_norm_fp32). While exactly those functions run, Tensor.type() reports the
    CUDA name of the same dtype."""
    do = _mod("megatron.core.optimizer.distrib_optimizer")
    op = _mod("megatron.core.optimizer.optimizer")
    cg = _mod("megatron.core.optimizer.clip_grads")
    patches = []
    build = do.DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]
    kind = type(build) if isinstance(build, (staticmethod, classmethod)) else None
    wrapped = _with_cuda_type_names(build.__func__ if kind else build)
    patches.append(_set(do.DistributedOptimizer, "_build_model_and_main_param_groups",
                        kind(wrapped) if kind else wrapped))
    init = op.Float16OptimizerWithFloat16Params.__dict__["__init__"]
    patches.append(_set(op.Float16OptimizerWithFloat16Params, "__init__", _with_cuda_type_names(init)))
    clip = _with_cuda_type_names(cg.clip_grad_by_total_norm_fp32)
    patches.append(_set(cg, "clip_grad_by_total_norm_fp32", clip))
    for mod in (op, do):
        if "clip_grad_by_total_norm_fp32" in mod.__dict__:
            patches.append(_set(mod, "clip_grad_by_total_norm_fp32", clip))
    return patches


# ------------------------------------------------------------------------------------------------
# tied embeddings across pipeline stages


def shim_tied_embedding_sync() -> list:
    """With tied input/output embeddings and pp > 1, the last stage's copy of the embedding is
    synchronised at construction by `weight.data = weight.data.cuda()` and an all-reduce over the
    embedding group (language_module.py:244). While exactly that method runs, Tensor.cuda() returns
    the CPU tensor itself."""
    lm = _mod("megatron.core.models.common.language_module.language_module")
    cls = lm.LanguageModule
    original = cls.__dict__["setup_embeddings_and_output_layer"]

    def setup_embeddings_and_output_layer(self, *args: Any, **kwargs: Any) -> Any:
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = real_cuda

    return [_set(cls, "setup_embeddings_and_output_layer", setup_embeddings_and_output_layer)]


# ------------------------------------------------------------------------------------------------
# 9. loading a distributed-optimizer checkpoint


def shim_distopt_load() -> list:
    """Resuming the distributed optimizer without Transformer Engine / Apex (torch Adam):
    - DistributedOptimizer.state_dict (distrib_optimizer.py:641) reads one shared Adam `step` from
      the inner state and asserts there is exactly one value; a fresh optimizer (about to load a
      checkpoint) has no state yet: initialise it (init_state_fn) with `step` 0 first;
    - load_state_dict copies into leaf main params that require grad: run it under no_grad, then
      give each parameter its own `step` tensor (torch AdamW would otherwise increment one shared
      step once per parameter, and the second step after resume diverges);
    - the fully-reshardable format's loader (distrib_optimizer.py:2116 ->
      _set_main_param_and_optimizer_states, 940) copies every per-parameter state key, but
      supplies none for torch AdamW's per-parameter `step` (TE/Apex Adam has no such key): the
      copy skips `step`, which load_state_dict above then sets from the saved param groups."""
    do = _mod("megatron.core.optimizer.distrib_optimizer")
    cls = do.DistributedOptimizer
    orig_state_dict = cls.__dict__["state_dict"]
    orig_load = cls.__dict__["load_state_dict"]

    def state_dict(self):
        inner = self.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if params and all(len(inner.state.get(p, {})) == 0 for p in params):
            if self.init_state_fn is not None:
                self.init_state_fn(inner, self.config)
            for p in params:
                inner.state[p]["step"] = torch.tensor(0.0)
        return orig_state_dict(self)

    def load_state_dict(self, state_dict):
        groups = state_dict.get("optimizer", {}).get("param_groups", [])
        steps = {float(g["step"]) for g in groups if "step" in g}
        with torch.no_grad():
            orig_load(self, state_dict)
        if len(steps) != 1:
            return
        # the saved iteration, as one tensor per parameter (the per-parameter state loaded above
        # may carry the fresh optimizer's placeholder step)
        step = steps.pop()
        inner = self.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p)
                if st is not None and len(st):
                    st["step"] = torch.tensor(step)

    orig_set = cls.__dict__["_set_main_param_and_optimizer_states"]

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[group_index]["params"][group_order]
        st = self.optimizer.state.get(main)
        if "step" in tensors or st is None or "step" not in st:
            return orig_set(self, model_param, tensors)
        step = st.pop("step")
        try:
            return orig_set(self, model_param, tensors)
        finally:
            st["step"] = step

    return [_set(cls, "state_dict", state_dict), _set(cls, "load_state_dict", load_state_dict),
            _set(cls, "_set_main_param_and_optimizer_states", set_main_param_and_optimizer_states)]


# ------------------------------------------------------------------------------------------------
# registry

_MISSING = object()

SHIMS: dict[str, Shim] = {
    s.name: s
    for s in (
        Shim("rng_tracker", shim_rng_tracker.__doc__ or "", shim_rng_tracker),
        Shim("cuda_current_device", shim_cuda_current_device.__doc__ or "", shim_cuda_current_device),
        Shim("cuda_streams", shim_cuda_streams.__doc__ or "", shim_cuda_streams),
        Shim("cuda_device_strings", shim_cuda_device_strings.__doc__ or "", shim_cuda_device_strings),
        Shim("cp_rope_positions", shim_cp_rope_positions.__doc__ or "", shim_cp_rope_positions),
        Shim("moe_router_gemm", shim_moe_router_gemm.__doc__ or "", shim_moe_router_gemm),
        Shim("moe_split_sizes", shim_moe_split_sizes.__doc__ or "", shim_moe_split_sizes),
        Shim("sequence_parallel_norm", shim_sequence_parallel_norm.__doc__ or "", shim_sequence_parallel_norm),
        Shim("gloo_uneven_collectives", shim_gloo_uneven_collectives.__doc__ or "", shim_gloo_uneven_collectives),
        Shim("tied_embedding_sync", shim_tied_embedding_sync.__doc__ or "", shim_tied_embedding_sync),
        Shim("optimizer_type_checks", shim_optimizer_type_checks.__doc__ or "", shim_optimizer_type_checks),
        Shim("distopt_load", shim_distopt_load.__doc__ or "", shim_distopt_load),
    )
}


# shims held off by `without_shim` (tests): apply_cpu_shims skips them while listed
_HELD_OFF: set[str] = set()


def needs_cpu_shims() -> bool:
    """True when megatron must run without CUDA."""
    return not torch.cuda.is_available()


def apply_cpu_shims(exclude: tuple[str, ...] = (), force: bool = False) -> list[str]:
    """Apply every shim not yet applied (idempotent) when no GPU is present.

    Returns the names of all shims currently applied. `exclude` leaves named shims off (tests
    use it to show a shim is still needed); `force` applies them even with CUDA (never needed
    in practice).
    """
    unknown = set(exclude) - set(SHIMS)
    if unknown:
        raise KeyError(f"unknown cpu shim(s) {sorted(unknown)}; known: {sorted(SHIMS)}")
    if needs_cpu_shims() or force:
        for name, shim in SHIMS.items():
            if name not in exclude and name not in _HELD_OFF and not shim.applied:
                shim.patches = shim.install()
                if not shim.patches:  # nothing to patch (already fine): remember it ran
                    shim.patches = [_Patch(None, "", None)]
    return applied_shims()


def applied_shims() -> list[str]:
    return [name for name, shim in SHIMS.items() if shim.applied]


def remove_cpu_shim(name: str) -> None:
    """Undo one shim (tests only): restore every attribute it replaced."""
    shim = SHIMS[name]
    for p in reversed(shim.patches):
        if p.target is None:
            continue
        if p.original is _MISSING:
            delattr(p.target, p.attr)
        else:
            setattr(p.target, p.attr, p.original)
    shim.patches = []


@contextlib.contextmanager
def without_shim(name: str):
    """Run a block with one shim removed, re-applying it afterwards."""
    was = SHIMS[name].applied
    remove_cpu_shim(name)
    _HELD_OFF.add(name)
    try:
        yield
    finally:
        _HELD_OFF.discard(name)
        if was:
            shim = SHIMS[name]
            shim.patches = shim.install() or [_Patch(None, "", None)]
