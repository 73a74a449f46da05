"""The supervised warm-start stage: cross-entropy on solution tokens through the Megatron actor.

    python -m megatron_denoise.launch.sft --config configs/sft-tiny-llama-cpu-1n1g.yaml [--dry-run]

    data.py    reference-schema rows -> token rows (chat-template prompt + solution + EOS) and
               actor batches with the loss on the solution; the run's plan (pure)
    config.py  the warm-start config as the actor's training Config (pure)
    runner.py  processes, actor, loop, checkpoints (resume) and Hugging Face exports (the edge)

The typed settings are `SFTConfig` in megatron_denoise/config/schema.py. Importing this package
loads no engine.
"""
