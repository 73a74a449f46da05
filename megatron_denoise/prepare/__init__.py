"""The data-preparation stage: everything a run needs before its first training step.

    tasks/    synthetic verifiable reasoning tasks (the science testbed): problems, held-out
              splits and step-by-step solutions for the supervised warm-start
    models.py local models for tests and demos (SmolLM2 de-quantised from its GGUF, tiny random
              models, the testbed's from-scratch Llama with a byte-level tokenizer)
    pool.py   the weak model's wrong-solution pool (METHOD.md section 1), resumable
    stage.py  the run config's `prepare:` section carried out in order, each step skipped when its
              output exists

Importing this package loads no engine (vLLM, torch, Ray, megatron); the modules import them
lazily where they run a model.
"""
