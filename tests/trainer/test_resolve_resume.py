"""checkpoint.resume, resolved once for the trainer and the warm-start (megatron.checkpoint.resolve_resume)."""
from __future__ import annotations

import pytest

from megatron_denoise.megatron.checkpoint import resolve_resume


def test_none_auto_and_explicit_paths(tmp_path):
    root = tmp_path / "ckpt"
    assert resolve_resume("none", root) is None
    assert resolve_resume("auto", root) is None                      # nothing saved yet
    (root / "step_2").mkdir(parents=True)
    (root / "step_2" / "meta.json").write_text("{}")
    import torch
    import torch.distributed.checkpoint as dcp

    # resolve_resume checks the shard files against the shard index (truncated copies: issue 17)
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(root / "step_2" / "dist"))
    (root / "latest").write_text("step_2\n")
    assert resolve_resume("auto", root) == root / "step_2"
    assert resolve_resume("none", root) is None
    assert resolve_resume(str(root / "step_2"), root) == (root / "step_2").resolve()
    with pytest.raises(FileNotFoundError, match="checkpoint.resume: .*step_9 is not a complete checkpoint"):
        resolve_resume(str(root / "step_9"), root)
