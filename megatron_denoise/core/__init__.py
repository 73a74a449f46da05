"""The DenoiseRL algorithm core: pure code, no engines (METHOD.md sections 2-4).

types      typed records of a step (Problem, PrefixSpan, RolloutRequest, Completion, Rollout)
prefix     building a step's N main + K denoise requests (token-level wrong prefixes)
fold       visible response [prefix, continuation], loss mask per partial mode, packing
advantages GRPO / Dr. GRPO advantages, DAPO dynamic sampling and overlong shaping
losses     the policy-loss reference (the fused kernel's specification)
metrics    step metrics (recovery rate, main vs denoise accuracy, fallbacks, ...)

Submodules are not imported here, so `import megatron_denoise.core.types` does not load torch.
"""
