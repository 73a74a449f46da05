"""Config checks for the GPU path (issue 14): settings a GPU run would accept and then fail on."""
from __future__ import annotations

import pytest


def test_validation_refuses_float16_and_rope_types_the_model_raises_on():
    """Bug 6 of issue 14 (no loss scaling is wired) and the review's rope_scaling item."""
    from megatron_denoise.config.loader import ConfigError, load_config

    for bad, want in (("model.params_dtype=float16", "grad_scale_func"),
                      ("model.rope_scaling.type=yarn", "model.rope_scaling.type (yarn) is not built"),
                      ("model.rope_scaling.type=dynamic", "model.rope_scaling.type (dynamic) is not built"),
                      ("rollout.tensor_parallel_size=3", "must divide cluster.gpus_per_node (8)"),
                      ("rollout.sleep_level=3", "rollout.sleep_level (3) must be one of 0, 1, 2"),
                      ("rollout.num_gpus=8", "rollout.num_gpus (8) applies only with rollout.colocate false")):
        with pytest.raises(ConfigError, match=want.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, [bad], world_size=8)
    for ok in (["model.rope_scaling.type=llama3"], ["model.rope_scaling.type=linear"], ["model.params_dtype=bfloat16"],
               ["rollout.colocate=false", "rollout.num_gpus=8"]):
        load_config(None, ok, world_size=8)
