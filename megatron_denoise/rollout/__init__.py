"""Rollout engines behind one small protocol (engine.py). vLLM and transformers are imported
lazily by their modules, never by this package."""
from megatron_denoise.rollout.engine import RolloutEngine, SamplingSpec, check_requests, make_engine

__all__ = ["RolloutEngine", "SamplingSpec", "check_requests", "make_engine"]
