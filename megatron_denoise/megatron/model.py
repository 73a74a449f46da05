"""megatron-core GPTModel from the typed ModelConfig: TransformerConfig + layer spec + model chunks.

One code path for GPU and CPU: the layer spec is Transformer Engine's on GPU and megatron's local
(pure torch) spec on CPU; parameters are fp32 with CPU initialisation on CPU. Families:

    llama      RMSNorm, SwiGLU, RoPE, no biases
    qwen2      + bias on the fused QKV projection
    qwen3      + RMSNorm on each query/key head (QK-norm), no QKV bias
    qwen3_moe  qwen3 attention + routed experts (router top-k, aux loss, EP; allgather/alltoall)

Hugging Face semantics that the converter checks against transformers' logits:
- rotary_interleaved=False (HF rotate_half), inv_freq = 1 / base^(arange(0, d, 2) / d),
  llama3 / linear RoPE scaling with HF's formulas;
- RMSNorm eps = model.norm_epsilon (also for QK-norm); kv_channels = model.head_dim;
- the embedding/output vocabulary is padded to a multiple of `make_vocab_size_divisible_by`
  (independent of TP so checkpoints reshard); logits columns >= vocab_size are padding and the
  log-prob code masks them out (`ActorModel.vocab_size` vs `.padded_vocab_size`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_denoise.config.schema import ModelConfig

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Vocabulary rounded up to a multiple of lcm(divisible_by, tp).

    With divisible_by a multiple of every TP size in use (128 covers 1..128 powers of two), the
    padded size does not depend on the layout, so a checkpoint saved at TP=2 loads at TP=1.
    """
    if vocab_size < 1 or divisible_by < 1:
        raise ValueError(f"vocab_size ({vocab_size}) and make_vocab_size_divisible_by ({divisible_by}) must be positive")
    multiple = divisible_by * tp // math.gcd(divisible_by, tp)
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass
class BuildOptions:
    """Settings of the actor model that are not part of the architecture."""

    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    use_transformer_engine: Optional[bool] = None  # None: TE on CUDA, local spec on CPU
    recompute: bool = False                         # full activation recomputation per layer
    moe_aux_loss_coeff: Optional[float] = None      # None: model.moe.aux_loss_coeff
    context_parallel_attention: Optional[str] = None  # None: TE on GPU; "cpu_allgather" on CPU
    segment_attention: bool = True                  # local spec, cp 1: packed attention per sequence, no [S, S] mask


def _rope_options(model: ModelConfig) -> dict:
    """GPTModel keyword arguments for RoPE scaling (HF semantics), or a clear error."""
    rs = model.rope_scaling
    kind = (rs.type or "").lower() or None
    if kind is None:
        return {}
    if kind == "linear":  # HF: position / factor
        return {"seq_len_interpolation_factor": float(rs.factor)}
    if kind == "llama3":
        return {"rope_scaling": True, "rope_scaling_factor": float(rs.factor)}
    raise NotImplementedError(
        f"model.rope_scaling.type={rs.type!r} is not supported by the megatron actor "
        f"(supported: null, linear, llama3)")


def _llama3_inv_freq(model: ModelConfig) -> torch.Tensor:
    """HF's llama3 RoPE frequencies (transformers modeling_rope_utils._compute_llama3_parameters),
    with the config's low/high frequency factors and original context length (megatron hard-codes
    1, 4 and 8192)."""
    rs = model.rope_scaling
    dim = model.head_dim
    inv = 1.0 / (model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    old = float(rs.original_max_position_embeddings or 8192)
    low, high, factor = float(rs.low_freq_factor), float(rs.high_freq_factor), float(rs.factor)
    low_wl, high_wl = old / low, old / high
    wl = 2 * math.pi / inv
    out = torch.where(wl > low_wl, inv / factor, inv)
    smooth = (old / wl - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wl < high_wl) * ~(wl > low_wl)
    return torch.where(medium, smoothed, out)


def check_model_config(model: ModelConfig) -> None:
    """Errors naming the key for settings this actor cannot build."""
    if model.family not in FAMILIES:
        raise ValueError(f"model.family={model.family!r} is not one of {FAMILIES}")
    if model.params_dtype not in _DTYPES:
        raise ValueError(f"model.params_dtype={model.params_dtype!r} is not one of {sorted(_DTYPES)}")
    if model.family == "qwen3_moe" and model.moe.num_experts < 1:
        raise ValueError("model.family='qwen3_moe' needs model.moe.num_experts > 0")
    if model.moe.num_experts and model.moe.token_dispatcher_type not in ("allgather", "alltoall"):
        raise ValueError(f"model.moe.token_dispatcher_type={model.moe.token_dispatcher_type!r}: "
                         f"allgather | alltoall")
    if model.moe.num_experts and not model.moe.norm_topk_prob and not model.moe.router_pre_softmax:
        raise ValueError("model.moe.norm_topk_prob=false needs model.moe.router_pre_softmax=true "
                         "(a softmax after top-k always renormalises)")
    _rope_options(model)


def transformer_config(model: ModelConfig, layout: Any, opts: Optional[BuildOptions] = None) -> Any:
    """megatron TransformerConfig for `model` under `layout` (tp, pp, vpp, cp, ep, etp,
    sequence_parallel)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    opts = opts or BuildOptions()
    check_model_config(model)
    on_gpu = torch.cuda.is_available()
    dtype = _DTYPES[model.params_dtype] if on_gpu else torch.float32  # fp32 on CPU
    moe = model.moe
    is_moe = moe.num_experts > 0
    vpp = getattr(layout, "vpp", None)
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(model.qkv_bias),
        qk_layernorm=bool(model.qk_layernorm),
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=opts.init_method_std,
        # parallelism
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        context_parallel_size=getattr(layout, "cp", 1),
        expert_model_parallel_size=getattr(layout, "ep", 1),
        expert_tensor_parallel_size=getattr(layout, "etp", layout.tp),
        sequence_parallel=bool(layout.sequence_parallel and layout.tp > 1),
        # numerics
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        # fusions are CUDA kernels: off everywhere for identical numerics between the paths
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        # pipeline p2p on gloo: batched isend/irecv matches messages between the same two ranks in
        # posting order, so with pp=2 and VPP a forward activation and a backward gradient sent
        # together land in each other's buffers; the unbatched path puts the two directions on
        # different process groups. (torch.cuda.synchronize after batched p2p: GPU only.)
        batch_p2p_comm=on_gpu,
        batch_p2p_sync=on_gpu,
        # every micro-batch of a step has the same [rows, seq] shape (the packer pads the step's
        # rows to one length), which the allgather MoE dispatcher requires
        variable_seq_lengths=False,
        # pseudo-freeing sent activations (swapping their .data) saves GPU memory; on CPU it
        # buys nothing and an async gloo send may still read the tensor
        deallocate_pipeline_outputs=on_gpu,
        calculate_per_token_loss=True,
    )
    if opts.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if is_moe:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.router_topk,
            moe_ffn_hidden_size=moe.ffn_hidden_size or model.ffn_hidden_size,
            moe_aux_loss_coeff=moe.aux_loss_coeff if opts.moe_aux_loss_coeff is None else opts.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_token_dispatcher_type=moe.token_dispatcher_type,
            # softmax over the top-k logits == softmax over all then renormalise (norm_topk_prob)
            moe_router_pre_softmax=not moe.norm_topk_prob,
            moe_grouped_gemm=on_gpu,
            moe_permute_fusion=False,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(**kwargs)


def use_transformer_engine(opts: Optional[BuildOptions] = None) -> bool:
    opts = opts or BuildOptions()
    if opts.use_transformer_engine is not None:
        return opts.use_transformer_engine
    return torch.cuda.is_available()


def layer_spec(model: ModelConfig, config: Any, opts: Optional[BuildOptions] = None) -> Any:
    """The transformer layer ModuleSpec: Transformer Engine on GPU, local modules on CPU."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    opts = opts or BuildOptions()
    num_experts = model.moe.num_experts or None
    if use_transformer_engine(opts):
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=bool(num_experts), qk_layernorm=model.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=model.qk_layernorm,
            normalization="RMSNorm")
        if config.context_parallel_size > 1:
            from megatron_denoise.megatron.cp_attention import CPAllGatherAttention

            spec.submodules.self_attention.submodules.core_attention = CPAllGatherAttention
        elif opts.segment_attention:
            from megatron_denoise.megatron.packed_attention import SegmentAttention

            spec.submodules.self_attention.submodules.core_attention = SegmentAttention
    return spec


def stage_flags(pp_rank: int, pp: int, vp_stage: Optional[int], vpp: Optional[int]) -> tuple[bool, bool]:
    """(pre_process, post_process) of a model chunk: embedding on the first chunk of the first
    stage, output layer on the last chunk of the last stage."""
    first = pp_rank == 0 and (vp_stage is None or vp_stage == 0)
    last = pp_rank == pp - 1 and (vp_stage is None or vp_stage == (vpp or 1) - 1)
    return first, last


def build_model(model: ModelConfig, groups: Any, opts: Optional[BuildOptions] = None,
                max_sequence_length: Optional[int] = None) -> list:
    """The model chunks of this rank (one per virtual pipeline stage; one without VPP).

    `groups` is the ProcessGroups from parallel_state.initialize. Returns plain GPTModel modules
    (not yet wrapped in DDP); each has `.vocab_size` (true) and `.padded_vocab_size` attributes.
    """
    from megatron.core.models.gpt import GPTModel

    opts = opts or BuildOptions()
    layout = groups.layout
    config = transformer_config(model, layout, opts)
    spec = layer_spec(model, config, opts)
    vpp = layout.vpp if layout.vpp and layout.vpp > 1 else None
    padded = padded_vocab_size(model.vocab_size, opts.make_vocab_size_divisible_by, layout.tp)
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        pre, post = stage_flags(groups.pp_rank, layout.pp, vp_stage, vpp)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded,
            max_sequence_length=max_sequence_length or model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=bool(model.tie_word_embeddings),
            position_embedding_type="rope",
            rotary_base=model.rotary_base,
            pg_collection=groups.pg_collection,
            vp_stage=vp_stage,
            **_rope_options(model),
        )
        if (model.rope_scaling.type or "").lower() == "llama3":
            # megatron's llama3 scaling hard-codes low/high factors and the original length
            gpt.rotary_pos_emb.inv_freq = _llama3_inv_freq(model).to(gpt.rotary_pos_emb.inv_freq.device)
        gpt.vocab_size = model.vocab_size
        gpt.padded_vocab_size = padded
        gpt.vp_stage = vp_stage
        chunks.append(gpt)
    return chunks


def unwrap(module: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
