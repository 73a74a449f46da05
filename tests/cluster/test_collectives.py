"""Bug 2 of issue 14: NCCL-only groups cannot reduce the CPU tensors the actor all-reduces. Groups
are now created "cpu:gloo,cuda:nccl" on GPU, and ONE helper (megatron_denoise.collectives) picks
the device of every collective's tensor; no module calls torch.distributed's tensor collectives
directly."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from megatron_denoise import collectives as coll
from megatron_denoise.megatron.parallel_state import process_group_backend

REPO = Path(__file__).resolve().parents[2]
TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
                      "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
                      "isend", "irecv", "batch_isend_irecv"}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def direct_collectives(path: Path) -> list[str]:
    """Calls like dist.all_reduce(...) / torch.distributed.broadcast(...) in one file."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed" for a in node.names):
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TENSOR_COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                hits.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node.func)}")
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            hits += [f"{_rel(path)}:{node.lineno}: from torch.distributed import {a.name}"
                     for a in node.names if a.name in TENSOR_COLLECTIVES]
    return hits


def test_no_collective_bypasses_the_helper():
    files = sorted([*(REPO / "megatron_denoise").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])
    assert len(files) > 50
    hits = [h for f in files if f.name != "collectives.py" or f.parent.name != "megatron_denoise"
            for h in direct_collectives(f)]
    assert hits == [], "collectives outside megatron_denoise.collectives:\n" + "\n".join(hits)
    # the sites named in the review do go through it
    for rel in ("megatron_denoise/megatron/actor.py", "megatron_denoise/convert/pipeline.py", "kernels/fused.py",
                "megatron_denoise/convert/megatron_io.py", "megatron_denoise/megatron/logprobs.py"):
        assert "coll.all_reduce(" in (REPO / rel).read_text() or "coll.all_gather(" in (REPO / rel).read_text(), rel


def test_the_scan_finds_a_direct_call(tmp_path):
    bad = tmp_path / "probe.py"  # outside the source tree: never seen by a concurrent scan
    bad.write_text("import torch.distributed as dist\nfrom torch import distributed as d2\n"
                   "def f(t):\n    dist.all_reduce(t)\n    d2.broadcast(t, 0)\n")
    assert len(direct_collectives(bad)) == 2


def test_backend_strings():
    assert process_group_backend("nccl", cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("auto", cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("auto", cuda=False) == "gloo"
    assert coll.backend_device_types("nccl") == {"cuda"}
    assert coll.backend_device_types("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    assert coll.device_for(torch.device("cpu"), {"cuda"}) == torch.device("cuda")
    assert coll.device_for(torch.device("cpu"), {"cpu", "cuda"}) == torch.device("cpu")


def test_a_tensor_on_a_device_the_group_lacks_is_moved_and_copied_back(monkeypatch):
    """Behaviour of the helper: the collective runs on a device the group supports. Here a group
    that supports only 'meta' (standing for the CUDA device a CPU machine lacks) receives a CPU
    tensor: the collective sees it on 'meta', and the result is copied back into the caller's
    tensor (which 'meta' cannot do: it holds no data — the copy-back is what raises)."""
    seen = []

    def fake_all_reduce(t, op=None, group=None):
        seen.append(t.device.type)

    monkeypatch.setattr(coll.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(coll, "group_device_types", lambda group=None: {"cpu"})
    x = torch.zeros(3)
    assert coll.all_reduce(x) is x and seen == ["cpu"]       # supported device: in place
    monkeypatch.setattr(coll, "group_device_types", lambda group=None: {"meta"})
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta"):
        coll.all_reduce(x)
    assert seen == ["cpu", "meta"]


def test_real_gloo_group(tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("cpu:gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert coll.group_device_types() == {"cpu"}
        t = torch.tensor([2.0, 3.0])
        coll.all_reduce(t, op=coll.ReduceOp.MAX)
        parts = [torch.empty(2)]
        coll.all_gather(parts, t)
        assert parts[0].tolist() == [2.0, 3.0]
    finally:
        dist.destroy_process_group()

