"""The megatron-core actor (engine edge): imported lazily, never by the pure algorithm layers.

parallel_state  the only module touching megatron.core.parallel_state
cpu_shims       every CUDA-only workaround, applied only without a GPU
model           TransformerConfig + layer spec + GPTModel chunks from the typed ModelConfig
"""
