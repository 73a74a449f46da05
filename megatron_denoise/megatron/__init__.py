"""The megatron-core actor (engine edge): imported lazily, never by the pure algorithm layers.

parallel_state  the only module touching megatron.core.parallel_state: initialize(layout) ->
                ProcessGroups, teardown()
cpu_shims       every CUDA-only workaround megatron-core 0.16.1 needs, applied only without a GPU
model           TransformerConfig + layer spec (TE on GPU, local on CPU) + GPTModel chunks
batching        ActorBatch rows -> packed micro-batches (token budget, DP rows, CP chunks)
logprobs        vocab-parallel log-probs / entropy and the policy-loss boundary (fused kernel)
actor           MegatronActor: compute_logprobs, train_step, update (megatron schedules)
checkpoint      atomic distributed checkpoints: save_checkpoint, load_checkpoint, latest_checkpoint
cp_attention    context-parallel attention for the local spec (the CPU twin of TE's)
"""
