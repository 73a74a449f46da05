"""Declarative name tables: one per model family, from megatron-core names to Hugging Face names.

A ``Rule`` says: this megatron-core tensor is made of these Hugging Face tensors by this named
transform (``transforms.TRANSFORMS``) and is split over tensor-parallel ranks this way
(``sharding``). Templates hold ``{layer}`` (global layer index) and ``{expert}`` (global expert
index). ``NameTable`` expands the rules of a family for one ``ModelConfig`` and derives the
reverse direction (HF name -> megatron name and position) by inverting the same expansion, so the
mapping is written once.

Megatron names are the canonical ones of megatron-core's GPTModel built with the local layer
spec (``input_layernorm``, ``pre_mlp_layernorm``, ``experts.local_experts.E``) with GLOBAL layer
and expert indices; ``megatron_io.canonical_name`` maps the Transformer Engine spelling
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``, grouped experts
``experts.linear_fc1.weightE``) and local indices onto it.

HF shapes are declared with symbols: H hidden, V vocab, D head_dim, QD heads*D, KD groups*D,
F ffn, MF per-expert ffn, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_denoise.config.schema import ModelConfig
from megatron_denoise.convert.errors import ConfigMismatchError, UnknownArchitectureError
from megatron_denoise.convert.sharding import COLUMN, REPLICATED, ROW, VOCAB
from megatron_denoise.convert.transforms import TRANSFORMS

L = "decoder.layers.{layer}."
HL = "model.layers.{layer}."


@dataclass(frozen=True)
class Rule:
    mcore: str                       # megatron-core name template
    hf: tuple[str, ...]              # Hugging Face name templates, in the transform's order
    hf_shapes: tuple[tuple[str, ...], ...]  # symbolic shape of each HF tensor
    transform: str = "copy"          # key of transforms.TRANSFORMS
    shard: str = REPLICATED          # sharding kind over (expert) tensor-parallel ranks
    when: Optional[str] = None       # "untied": only when embeddings are not shared

    @property
    def scope(self) -> str:
        return "expert" if "{expert}" in self.mcore else "layer" if "{layer}" in self.mcore else "model"

    def __post_init__(self) -> None:
        t = TRANSFORMS[self.transform]
        assert len(self.hf) == t.arity == len(self.hf_shapes), self


def _r(mcore, hf, shapes, transform="copy", shard=REPLICATED, when=None) -> Rule:
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    shapes = (shapes,) if isinstance(shapes[0], str) else tuple(shapes)
    return Rule(mcore, hf, shapes, transform, shard, when)


EMBEDDINGS = (
    _r("embedding.word_embeddings.weight", "model.embed_tokens.weight", ("V", "H"), shard=VOCAB),
    _r("decoder.final_layernorm.weight", "model.norm.weight", ("H",)),
    _r("output_layer.weight", "lm_head.weight", ("V", "H"), shard=VOCAB, when="untied"),
)
ATTENTION = (
    _r(L + "input_layernorm.weight", HL + "input_layernorm.weight", ("H",)),
    _r(L + "self_attention.linear_qkv.weight",
       [HL + "self_attn.q_proj.weight", HL + "self_attn.k_proj.weight", HL + "self_attn.v_proj.weight"],
       [("QD", "H"), ("KD", "H"), ("KD", "H")], "qkv", COLUMN),
    _r(L + "self_attention.linear_proj.weight", HL + "self_attn.o_proj.weight", ("H", "QD"), shard=ROW),
)
QKV_BIAS = (
    _r(L + "self_attention.linear_qkv.bias",
       [HL + "self_attn.q_proj.bias", HL + "self_attn.k_proj.bias", HL + "self_attn.v_proj.bias"],
       [("QD",), ("KD",), ("KD",)], "qkv", COLUMN),
)
QK_NORM = (
    _r(L + "self_attention.q_layernorm.weight", HL + "self_attn.q_norm.weight", ("D",)),
    _r(L + "self_attention.k_layernorm.weight", HL + "self_attn.k_norm.weight", ("D",)),
)
DENSE_MLP = (
    _r(L + "pre_mlp_layernorm.weight", HL + "post_attention_layernorm.weight", ("H",)),
    _r(L + "mlp.linear_fc1.weight", [HL + "mlp.gate_proj.weight", HL + "mlp.up_proj.weight"],
       [("F", "H"), ("F", "H")], "gate_up", COLUMN),
    _r(L + "mlp.linear_fc2.weight", HL + "mlp.down_proj.weight", ("H", "F"), shard=ROW),
)
_EX = L + "mlp.experts.local_experts.{expert}."
_HEX = HL + "mlp.experts.{expert}."
MOE_MLP = (
    _r(L + "pre_mlp_layernorm.weight", HL + "post_attention_layernorm.weight", ("H",)),
    _r(L + "mlp.router.weight", HL + "mlp.gate.weight", ("E", "H")),
    _r(_EX + "linear_fc1.weight", [_HEX + "gate_proj.weight", _HEX + "up_proj.weight"],
       [("MF", "H"), ("MF", "H")], "gate_up", COLUMN),
    _r(_EX + "linear_fc2.weight", _HEX + "down_proj.weight", ("H", "MF"), shard=ROW),
)

# family -> (rules, required config flags). The flags are what the family's HF architecture
# implies; a ModelConfig that disagrees cannot be converted faithfully.
FAMILIES: dict[str, tuple[tuple[Rule, ...], dict[str, object]]] = {
    "llama": (EMBEDDINGS + ATTENTION + DENSE_MLP, {"qkv_bias": False, "qk_layernorm": False, "moe": False}),
    "qwen2": (EMBEDDINGS + ATTENTION + QKV_BIAS + DENSE_MLP, {"qkv_bias": True, "qk_layernorm": False, "moe": False}),
    "qwen3": (EMBEDDINGS + ATTENTION + QK_NORM + DENSE_MLP, {"qkv_bias": False, "qk_layernorm": True, "moe": False}),
    "qwen3_moe": (EMBEDDINGS + ATTENTION + QK_NORM + MOE_MLP, {"qkv_bias": False, "qk_layernorm": True, "moe": True}),
}


def check_family(cfg: ModelConfig) -> None:
    """The family exists and the config's structural flags are the ones it implies."""
    if cfg.family not in FAMILIES:
        raise UnknownArchitectureError(cfg.family, FAMILIES, source="model.family")
    _, flags = FAMILIES[cfg.family]
    got = {"qkv_bias": cfg.qkv_bias, "qk_layernorm": cfg.qk_layernorm, "moe": cfg.moe.num_experts > 0}
    bad = [f"model.{'moe.num_experts > 0' if k == 'moe' else k}: {got[k]} but family {cfg.family!r} needs {v}"
           for k, v in flags.items() if got[k] != v]
    if bad:
        raise ConfigMismatchError(bad, what=f"model config and family {cfg.family!r}")


@dataclass(frozen=True)
class Entry:
    """One row of an expanded table: a concrete megatron tensor and its HF tensors."""
    mcore: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    rule: Rule
    layer: Optional[int] = None
    expert: Optional[int] = None


class NameTable:
    """The family's rules expanded over layers and experts for one config; both directions."""

    def __init__(self, cfg: ModelConfig):
        check_family(cfg)
        self.cfg = cfg
        rules, _ = FAMILIES[cfg.family]
        sym = _symbols(cfg)
        self.entries: list[Entry] = []
        for rule in rules:
            if rule.when == "untied" and cfg.tie_word_embeddings:
                continue
            shapes = tuple(tuple(sym[s] for s in shp) for shp in rule.hf_shapes)
            layers = range(cfg.num_layers) if rule.scope != "model" else [None]
            experts = range(cfg.moe.num_experts) if rule.scope == "expert" else [None]
            for layer in layers:
                for expert in experts:
                    fmt = {"layer": layer, "expert": expert}
                    self.entries.append(Entry(rule.mcore.format(**fmt), tuple(h.format(**fmt) for h in rule.hf),
                                              shapes, rule, layer, expert))
        self.by_mcore: dict[str, Entry] = {e.mcore: e for e in self.entries}
        # The inversion: each HF name points back at the entry and its position in entry.hf.
        self.by_hf: dict[str, tuple[Entry, int]] = {}
        for e in self.entries:
            for i, h in enumerate(e.hf):
                assert h not in self.by_hf, f"HF name {h} used twice in the {cfg.family} table"
                self.by_hf[h] = (e, i)
        assert len(self.by_mcore) == len(self.entries)

    def hf_names(self) -> list[str]:
        return [h for e in self.entries for h in e.hf]

    def hf_shape(self, name: str) -> tuple[int, ...]:
        e, i = self.by_hf[name]
        return e.hf_shapes[i]

    def mcore_for_hf(self, name: str) -> str:
        return self.by_hf[name][0].mcore


def _symbols(cfg: ModelConfig) -> dict[str, int]:
    d = cfg.head_dim
    return {"H": cfg.hidden_size, "V": cfg.vocab_size, "D": d, "QD": cfg.num_attention_heads * d,
            "KD": cfg.num_query_groups * d, "F": cfg.ffn_hidden_size,
            "MF": cfg.moe.ffn_hidden_size or cfg.ffn_hidden_size, "E": cfg.moe.num_experts}
