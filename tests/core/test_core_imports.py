"""Importing the algorithm core loads no engine: no vLLM, megatron-core, Ray, and no
torch.distributed process-group code.

Precise check for torch.distributed: a bare `import torch` (2.13.0+cpu) already imports 27
torch.distributed modules, among them distributed_c10d, device_mesh and rpc, so "not imported" cannot
mean "absent from sys.modules". The rule is: the core adds NOTHING under torch.distributed to what a
bare `import torch` loads (so no launch/elastic/FSDP/tensor-parallel code), and no process group is
initialised. Both sides run in fresh subprocesses so the test process's own imports cannot leak in.
"""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import megatron_denoise.core as core_pkg

# Every module of the package, present and future.
CORE = sorted(m.name for m in pkgutil.iter_modules([str(Path(core_pkg.__file__).parent)]))
FORBIDDEN_TOP = ("vllm", "megatron", "ray", "transformer_engine", "apex", "triton")

PROBE = """
import json, sys
{imports}
import torch.distributed as dist
print(json.dumps({{
    "modules": sorted(sys.modules),
    "pg_initialized": bool(dist.is_available() and dist.is_initialized()),
}}))
"""


def _probe(imports: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], capture_output=True, text=True,
                         timeout=240, check=True, env={"PYTHONPATH": ":".join(sys.path), "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_imports_no_engine_and_no_process_group_code():
    base = _probe("import torch")
    core = _probe("\n".join(f"import megatron_denoise.core.{m}" for m in CORE))
    mods = set(core["modules"])
    assert {"types", "prefix", "fold", "advantages", "losses", "metrics"} <= set(CORE)
    assert all(f"megatron_denoise.core.{m}" in mods for m in CORE)
    bad = sorted(m for m in mods if m.split(".")[0] in FORBIDDEN_TOP)
    assert bad == [], f"the core imported engine modules: {bad}"
    dist_base = {m for m in base["modules"] if m.startswith("torch.distributed")}
    dist_core = {m for m in mods if m.startswith("torch.distributed")}
    assert dist_core - dist_base == set(), f"the core added torch.distributed modules: {sorted(dist_core - dist_base)}"
    assert core["pg_initialized"] is False


def test_types_prefix_and_fold_do_not_even_need_torch():
    # The records, row building and folding are plain Python: reward workers and the data layer
    # can use them without loading torch (pack() and the tensor modules import it).
    out = subprocess.run([sys.executable, "-c",
                          "import sys, megatron_denoise.core.types, megatron_denoise.core.prefix, "
                          "megatron_denoise.core.fold; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120, check=True,
                         env={"PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == "False"
