"""megatron_denoise: DenoiseRL post-training (GRPO/DAPO with wrong-prefix denoise rollouts).

Importing this package loads only pure code: no torch.distributed process-group code, vLLM,
megatron-core or Ray. Engines are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
