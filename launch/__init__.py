"""Thin entry points (importable as `megatron_denoise.launch`): train, prepare data, evaluate,
convert checkpoints. Each module has a `main()`."""
