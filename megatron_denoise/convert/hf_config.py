"""Hugging Face config.json <-> the typed ``ModelConfig`` (and generation_config.json).

``model_config_from_hf`` reads a config dict (no transformers import); ``hf_config_from_model``
builds one through transformers' own config class so that the exported config.json has exactly
the spelling the installed transformers (and vLLM) expects. ``check_same_model`` compares a run's
ModelConfig with a checkpoint's config and lists every disagreement.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any, Optional

from megatron_denoise.config.schema import ModelConfig, MoEConfig, RopeScalingConfig
from megatron_denoise.convert.errors import (ConfigMismatchError, UnknownArchitectureError,
                                             UnsupportedConfigError)

# HF architecture -> (family, model_type)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "qwen3_moe"),
}
FAMILY_TO_ARCH = {fam: arch for arch, (fam, _) in ARCHITECTURES.items()}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_hf_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    with open(path) as fh:
        return json.load(fh)


def family_of(hf: dict[str, Any], source: str = "config.json") -> str:
    archs = hf.get("architectures") or []
    if not archs:
        raise UnknownArchitectureError(f"<none> (model_type={hf.get('model_type')!r})", ARCHITECTURES, source)
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise UnknownArchitectureError(arch, ARCHITECTURES, source)
    return ARCHITECTURES[arch][0]


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScalingConfig]:
    """transformers >= 5 writes rope_parameters {rope_theta, rope_type, ...}; older files have
    rope_theta and rope_scaling at the top level. Both are accepted."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return float(theta), RopeScalingConfig()
    return float(theta), RopeScalingConfig(
        type=kind, factor=float(scaling.get("factor", 1.0)),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)))


def model_config_from_hf(hf: dict[str, Any], hf_path: Optional[str] = None,
                         source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face config dict. Raises on architectures and options that the
    megatron model cannot represent, naming the key."""
    family = family_of(hf, source)
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf.get('hidden_act')!r} (only silu/SwiGLU)")
    if family in ("llama", "qwen3", "qwen3_moe") and hf.get("attention_bias", False):
        unsupported.append("attention_bias=true (bias on o_proj is not supported)")
    if family == "llama" and hf.get("mlp_bias", False):
        unsupported.append("mlp_bias=true")
    if hf.get("use_sliding_window", False):
        unsupported.append("use_sliding_window=true")
    if family == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            unsupported.append("mlp_only_layers / decoder_sparse_step != 1 (every layer must be MoE)")
        if hf.get("shared_expert_intermediate_size"):
            unsupported.append("shared experts")
    if unsupported:
        raise UnsupportedConfigError(f"{source}: unsupported option(s): " + "; ".join(unsupported))
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    moe = MoEConfig()
    if family == "qwen3_moe":
        norm_topk = bool(hf.get("norm_topk_prob", False))
        moe = MoEConfig(num_experts=hf.get("num_experts") or hf["num_local_experts"], router_topk=hf["num_experts_per_tok"],
                        ffn_hidden_size=hf["moe_intermediate_size"],
                        aux_loss_coeff=float(hf.get("router_aux_loss_coef", 1e-3)),
                        # softmax over all experts then top-k; renormalising the top-k equals
                        # megatron's top-k-then-softmax (pre_softmax False)
                        router_pre_softmax=not norm_topk, norm_topk_prob=norm_topk)
    dtype = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    return ModelConfig(
        family=family, hf_path=hf_path, tokenizer_path=hf_path,
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
        rotary_base=theta, rope_scaling=scaling, norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=family == "qwen2", qk_layernorm=family in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), moe=moe,
        params_dtype=_DTYPES.get(str(dtype).replace("torch.", ""), "bfloat16"))


def hf_config_from_model(cfg: ModelConfig, base: Optional[dict[str, Any]] = None,
                         dtype: Optional[str] = None) -> dict[str, Any]:
    """config.json contents for ``cfg``. ``base`` (the source model's config.json) contributes
    the fields the ModelConfig does not hold (token ids, initializer range, ...)."""
    from transformers import CONFIG_MAPPING  # lazy: the export path needs transformers anyway

    if cfg.family not in FAMILY_TO_ARCH:
        raise UnknownArchitectureError(cfg.family, FAMILY_TO_ARCH, source="model.family")
    arch = FAMILY_TO_ARCH[cfg.family]
    model_type = ARCHITECTURES[arch][1]
    kw: dict[str, Any] = {k: v for k, v in (base or {}).items()
                          if k not in ("rope_parameters", "rope_scaling", "rope_theta", "architectures",
                                       "transformers_version", "torch_dtype", "model_type",
                                       "num_local_experts")}  # alias of num_experts, set below
    kw.update(
        architectures=[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon, tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu", rope_theta=cfg.rotary_base, dtype=dtype or cfg.params_dtype)
    rs = cfg.rope_scaling
    if rs.type:
        scaling = {"rope_type": rs.type, "factor": rs.factor}
        if rs.original_max_position_embeddings is not None:
            scaling["original_max_position_embeddings"] = rs.original_max_position_embeddings
        if rs.type == "llama3":
            scaling.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
        kw["rope_scaling"] = scaling
    if cfg.family == "qwen3_moe":
        kw.update(num_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.router_topk,
                  moe_intermediate_size=cfg.moe.ffn_hidden_size or cfg.ffn_hidden_size,
                  norm_topk_prob=cfg.moe.norm_topk_prob, router_aux_loss_coef=cfg.moe.aux_loss_coeff,
                  decoder_sparse_step=1, mlp_only_layers=[])
    if cfg.family == "qwen2":
        kw.setdefault("use_sliding_window", False)
    out = CONFIG_MAPPING[model_type](**kw).to_dict()
    out["architectures"] = [arch]
    return out


def generation_config_from(hf: dict[str, Any], base: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """generation_config.json: the source's if given, else the token ids of config.json."""
    if base:
        return dict(base)
    out = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    return out


# Fields that change the tensors (or their meaning): a run config and a checkpoint must agree.
_COMPARED = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "num_query_groups", "head_dim", "vocab_size", "qkv_bias", "qk_layernorm",
             "tie_word_embeddings")
_COMPARED_MOE = ("num_experts", "router_topk", "ffn_hidden_size")


def check_same_model(run: ModelConfig, ckpt: ModelConfig, run_name: str = "run config",
                     ckpt_name: str = "checkpoint config.json") -> None:
    """Raise ConfigMismatchError listing every structural field where the two disagree."""
    problems = []
    for k in _COMPARED:
        a, b = getattr(run, k), getattr(ckpt, k)
        if a != b:
            problems.append(f"model.{k}: {run_name} has {a}, {ckpt_name} has {b}")
    for k in _COMPARED_MOE:
        a, b = getattr(run.moe, k), getattr(ckpt.moe, k)
        if k == "ffn_hidden_size" and not (run.moe.num_experts or ckpt.moe.num_experts):
            continue
        if a != b:
            problems.append(f"model.moe.{k}: {run_name} has {a}, {ckpt_name} has {b}")
    if problems:
        raise ConfigMismatchError(problems, what=f"{run_name} and {ckpt_name}")


def with_path(cfg: ModelConfig, hf_path: str) -> ModelConfig:
    return replace(cfg, hf_path=hf_path, tokenizer_path=cfg.tokenizer_path or hf_path)
