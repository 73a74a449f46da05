"""The parallel layout as a pure, validated value (no process groups).

    world_size = tp * pp * cp * dp            (dense part of the model)
    world_size = etp * ep * edp * pp          (experts: the same ranks, folded differently)

Building process groups from a layout is a separate step
(`megatron_denoise.megatron.parallel_state.initialize`). Validation against a model and a data
shape (`check_layout`) returns every problem at once, each naming the keys and the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_denoise.config.schema import Config, ModelConfig, ParallelConfig

# dotted config keys, used in every message so a user can grep their YAML
TP = "parallel.tensor_model_parallel_size"
PP = "parallel.pipeline_model_parallel_size"
VPP = "parallel.virtual_pipeline_model_parallel_size"
EP = "parallel.expert_model_parallel_size"
ETP = "parallel.expert_tensor_parallel_size"
CP = "parallel.context_parallel_size"
SP = "parallel.sequence_parallel"


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sequence_parallel: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense part (derived)."""
        return self.world_size // self.model_parallel_size

    @property
    def edp(self) -> int:
        """Data-parallel size of the experts (derived)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def from_config(cls, par: ParallelConfig, world_size: int) -> "ParallelLayout":
        tp = par.tensor_model_parallel_size
        return cls(
            world_size=world_size,
            tp=tp,
            pp=par.pipeline_model_parallel_size,
            vpp=par.virtual_pipeline_model_parallel_size,
            cp=par.context_parallel_size,
            ep=par.expert_model_parallel_size,
            etp=par.expert_tensor_parallel_size if par.expert_tensor_parallel_size is not None else tp,
            # Megatron turns sequence parallelism off at tp == 1 (there is nothing to split).
            sequence_parallel=bool(par.sequence_parallel and tp > 1),
        )

    def describe(self) -> str:
        v = f" vpp={self.vpp}" if self.vpp else ""
        return (f"world={self.world_size} = tp {self.tp} x pp {self.pp} x cp {self.cp} x dp {self.dp}{v}; "
                f"experts: ep {self.ep} x etp {self.etp} x edp {self.edp}; "
                f"sequence_parallel={self.sequence_parallel}")


def _positive(errors: list[str], key: str, value) -> bool:
    if value is None or not isinstance(value, int) or isinstance(value, bool) or value < 1:
        errors.append(f"{key} ({value!r}) must be a positive integer")
        return False
    return True


def check_layout(par: ParallelConfig, world_size: int, model: Optional[ModelConfig] = None,
                 seq_length: Optional[int] = None) -> list[str]:
    """Every inconsistency between the parallel sizes, the world size, the model and the sequence
    length, as messages naming the keys and numbers. Empty list: the layout is valid."""
    errors: list[str] = []
    ok = all([
        _positive(errors, "world_size", world_size),
        _positive(errors, TP, par.tensor_model_parallel_size),
        _positive(errors, PP, par.pipeline_model_parallel_size),
        _positive(errors, CP, par.context_parallel_size),
        _positive(errors, EP, par.expert_model_parallel_size),
    ])
    if par.virtual_pipeline_model_parallel_size is not None:
        ok &= _positive(errors, VPP, par.virtual_pipeline_model_parallel_size)
    if par.expert_tensor_parallel_size is not None:
        ok &= _positive(errors, ETP, par.expert_tensor_parallel_size)
    if not ok:
        return errors
    lay = ParallelLayout.from_config(par, world_size)
    if world_size % lay.model_parallel_size:
        errors.append(
            f"world size ({world_size}) must be divisible by {TP} x {PP} x {CP} "
            f"({lay.tp} x {lay.pp} x {lay.cp} = {lay.model_parallel_size}) so that dp is a whole number")
    elif world_size % (lay.etp * lay.ep * lay.pp):
        errors.append(
            f"world size ({world_size}) must be divisible by {ETP} x {EP} x {PP} "
            f"({lay.etp} x {lay.ep} x {lay.pp} = {lay.etp * lay.ep * lay.pp})")
    if lay.vpp is not None and lay.vpp > 1 and lay.pp < 2:
        errors.append(f"{VPP} ({lay.vpp}) needs {PP} > 1 (got {lay.pp})")

    if model is not None:
        heads, groups = model.num_attention_heads, model.num_query_groups
        if heads % lay.tp:
            errors.append(f"model.num_attention_heads ({heads}) must be divisible by {TP} ({lay.tp})")
        if groups % lay.tp:
            errors.append(f"model.num_query_groups ({groups}) must be divisible by {TP} ({lay.tp})")
        if heads % groups:
            errors.append(f"model.num_attention_heads ({heads}) must be divisible by model.num_query_groups ({groups})")
        if model.ffn_hidden_size % lay.tp:
            errors.append(f"model.ffn_hidden_size ({model.ffn_hidden_size}) must be divisible by {TP} ({lay.tp})")
        stages = lay.pp * (lay.vpp or 1)
        if model.num_layers % stages:
            what = f"{PP} x {VPP} ({lay.pp} x {lay.vpp} = {stages})" if lay.vpp else f"{PP} ({lay.pp})"
            errors.append(f"model.num_layers ({model.num_layers}) must be divisible by {what}")
        n_exp = model.moe.num_experts
        if n_exp:
            if n_exp % lay.ep:
                errors.append(f"model.moe.num_experts ({n_exp}) must be divisible by {EP} ({lay.ep})")
            if model.moe.router_topk > n_exp:
                errors.append(f"model.moe.router_topk ({model.moe.router_topk}) must be <= model.moe.num_experts ({n_exp})")
            if lay.tp > 1 and not par.sequence_parallel:
                errors.append(f"{SP} must be true for MoE models with {TP} > 1 (got tp={lay.tp}, sequence_parallel=false)")
            ffn = model.moe.ffn_hidden_size or model.ffn_hidden_size
            if ffn % lay.etp:
                errors.append(f"model.moe.ffn_hidden_size ({ffn}) must be divisible by {ETP} ({lay.etp})")
        elif lay.ep > 1:
            errors.append(f"{EP} ({lay.ep}) > 1 needs an MoE model (model.moe.num_experts is 0)")
    if seq_length is not None and lay.cp > 1 and seq_length % (2 * lay.cp):
        errors.append(
            f"sequence length data.max_prompt_length + data.max_response_length ({seq_length}) must be divisible by "
            f"2 x {CP} ({2 * lay.cp}) for load-balanced context parallelism")
    return errors


def layout_for(cfg: Config, world_size: Optional[int] = None) -> ParallelLayout:
    """The layout of a validated config (world size from the cluster section unless given)."""
    return ParallelLayout.from_config(cfg.parallel, world_size or cfg.cluster.world_size)
