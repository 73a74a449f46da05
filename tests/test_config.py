"""Config loading, strict validation, parallel layout and the dry-run."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_denoise.config.loader import ConfigError, load_config
from megatron_denoise.config.schema import Config, describe
from megatron_denoise.launch.train import main as train_main
from megatron_denoise.layout import ParallelLayout

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def declared_world_size(path: Path) -> int:
    """File names declare the run: `...-<nodes>n<devices>g...yaml`."""
    m = re.search(r"-(\d+)n(\d+)g", path.stem)
    assert m, f"{path.name}: name must declare nodes and devices as -<N>n<G>g"
    return int(m.group(1)) * int(m.group(2))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_dry_runs_for_its_declared_world_size(path, capsys):
    from megatron_denoise.config.schema import SFTConfig
    from megatron_denoise.launch.sft import main as sft_main

    ws = declared_world_size(path)
    warm_start = path.name.startswith("sft-")  # the warm-start stage's configs (launch/sft.py)
    cfg = load_config(path, world_size=ws, root=SFTConfig if warm_start else Config)
    assert cfg.cluster.world_size == ws, "cluster section disagrees with the file name"
    assert cfg.name == path.stem or cfg.name.startswith("tiny-"), "name should say the run"
    main = sft_main if warm_start else train_main
    assert main(["--config", str(path), "--dry-run", "--world-size", str(ws)]) == 0
    out = capsys.readouterr().out
    assert f"world={ws}" in out and "rows_per_step" in out
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "each config's header says what it is and how to run it"


def test_there_are_configs_for_the_paper_runs():
    names = {p.name for p in RUN_CONFIGS}
    for size in ("1.7b", "4b", "8b"):
        for algo in ("grpo", "dapo"):
            assert any(n.startswith(f"denoise-{algo}-qwen3-{size}-") for n in names), (algo, size)
    assert any(n.startswith("grpo-") for n in names)
    assert any("-ep" in n for n in names) and any("-cp" in n for n in names)
    assert any(n.startswith("tiny-") for n in names)


def test_defaults_reproduce_the_paper_recipe():
    cfg = load_config(None, world_size=8, overrides=["parallel.tensor_model_parallel_size=2"])
    assert (cfg.denoise.n_main, cfg.denoise.k_denoise) == (12, 4)
    assert cfg.denoise.rho.strategy == "fixed" and cfg.denoise.rho.value == 0.2
    assert cfg.denoise.partial_mode == "cutdown" and cfg.denoise.shared_baseline
    assert cfg.data.max_response_length == 4096 and cfg.data.problems_per_step == 16
    assert cfg.optimizer.lr == 1e-6 and cfg.optimizer.scheduler == "constant"
    assert cfg.rollout.temperature == 1.0


def test_every_field_has_a_docstring():
    for line in describe(Config):
        key, doc = line.split("  # ", 1)
        assert doc.strip(), f"{key} has no docstring"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_inheritance_interpolation_and_overrides(tmp_path):
    write(tmp_path, "base/model.yaml", """
        model: {num_layers: 8, hidden_size: 256, ffn_hidden_size: 512, num_attention_heads: 8,
                num_query_groups: 4, kv_channels: 32, max_position_embeddings: 8192}
        denoise: {k_denoise: 2}
    """)
    write(tmp_path, "mid.yaml", """
        defaults: [base/model.yaml]
        denoise: {k_denoise: 3, n_main: 5}
        logging: {output_dir: /tmp/runs/x}
    """)
    top = write(tmp_path, "top.yaml", """
        defaults: mid.yaml
        name: exp
        checkpoint: {dir: "${logging.output_dir}/ckpt"}
        denoise: {n_main: 6}
    """)
    cfg = load_config(top, ["denoise.rho.value=0.5", "model.num_layers=16", "name=renamed"], world_size=1)
    assert cfg.model.num_layers == 16 and cfg.model.hidden_size == 256  # override beats files
    assert cfg.denoise.k_denoise == 3 and cfg.denoise.n_main == 6  # later files win, key by key
    assert cfg.checkpoint.dir == "/tmp/runs/x/ckpt"
    assert cfg.denoise.rho.value == 0.5 and cfg.name == "renamed"
    assert cfg.data.max_response_length == 4096  # untouched default


def test_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("MDN_MODEL_DIR", "/cluster/models")
    cfg = load_config(REPO / "configs" / "denoise-grpo-qwen3-4b-1n8g-tp2.yaml", world_size=8)
    assert cfg.model.hf_path == "/cluster/models/Qwen3-4B-Base"


def test_defaults_cycle_and_missing_file_are_named(tmp_path):
    write(tmp_path, "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"cycle a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml", world_size=1)
    write(tmp_path, "c.yaml", "defaults: [nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope.yaml \(in defaults of .*c.yaml\)"):
        load_config(tmp_path / "c.yaml", world_size=1)


TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16",
        "data.max_prompt_length=64", "data.max_response_length=64", "trainer.micro_batch_tokens=256",
        "data.problems_per_step=2", "denoise.n_main=2", "denoise.k_denoise=2"]

MOE = ["model.family=qwen3_moe", "model.moe.num_experts=4", "model.moe.router_topk=2"]

# (overrides, world size, substrings that the ONE error line must contain)
MALFORMED = [
    (["checkpoint.optimizer_format=fully_sharded"], 1, ["checkpoint.optimizer_format", "fully_sharded", "fully_reshardable"]),
    (["denoise.k_denoize=2"], 1, ["unknown key 'denoise.k_denoize'", "did you mean 'denoise.k_denoise'"]),
    (["paralel.tensor_model_parallel_size=2"], 1, ["unknown key 'paralel'", "did you mean 'parallel'"]),
    (["parallel.tensor_model_parallel_size=8"], 8, ["model.num_attention_heads (4)", "tensor_model_parallel_size (8)"]),
    (["parallel.pipeline_model_parallel_size=3"], 3, ["model.num_layers (4)", "pipeline_model_parallel_size (3)"]),
    (MOE + ["parallel.expert_model_parallel_size=3"], 3, ["model.moe.num_experts (4)", "expert_model_parallel_size (3)"]),
    (["parallel.tensor_model_parallel_size=2"], 3, ["world size (3)", "tensor_model_parallel_size", "= 2"]),
    (["denoise.k_denoise=-1"], 1, ["denoise.k_denoise (-1)", ">= 0"]),
    (["denoise.rho.value=1.5"], 1, ["denoise.rho.value (1.5)", "(0, 1]"]),
    (["denoise.rho.value=0"], 1, ["denoise.rho.value (0.0)", "(0, 1]"]),
    (["denoise.rho.strategy=uniform", "denoise.rho.low=0.6", "denoise.rho.high=0.3"], 1,
     ["denoise.rho.low (0.6)", "denoise.rho.high (0.3)"]),
    (["data.max_response_length=0"], 1, ["data.max_response_length (0)", ">= 1"]),
    (MOE + ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=false"], 2,
     ["parallel.sequence_parallel must be true", "tp=2"]),
    (["parallel.context_parallel_size=2", "data.max_prompt_length=61", "data.max_response_length=64"], 2,
     ["(125)", "2 x parallel.context_parallel_size (4)"]),
    (["denoise.pool_sampling=last"], 1, ["denoise.pool_sampling ('last')", "first, random"]),
    (["denoise.n_main=two"], 1, ["denoise.n_main: expected int, got str 'two'"]),
    (["algorithm.loss_agg=mean"], 1, ["algorithm.loss_agg ('mean')", "token-mean"]),
    (["parallel.virtual_pipeline_model_parallel_size=2"], 1, ["virtual_pipeline_model_parallel_size (2)", "> 1"]),
    (["trainer.malloc_arena_max=-1"], 1, ["trainer.malloc_arena_max (-1)", ">= 0"]),
]


@pytest.mark.parametrize("overrides,ws,needles", MALFORMED, ids=lambda x: str(x)[:60] if isinstance(x, list) else None)
def test_malformed_config_names_key_and_numbers(overrides, ws, needles):
    with pytest.raises(ConfigError) as ei:
        load_config(None, TINY + overrides, world_size=ws)
    errs = ei.value.errors
    hits = [e for e in errs if all(n in e for n in needles)]
    assert hits, f"no error contains {needles}: {errs}"


def test_three_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as ei:
        load_config(None, TINY + ["denoise.k_denoize=2", "denoise.rho.value=2.0",
                                  "parallel.tensor_model_parallel_size=3"], world_size=3)
    errs = ei.value.errors
    assert any("k_denoize" in e for e in errs)
    assert any("denoise.rho.value (2.0)" in e for e in errs)
    assert any("num_attention_heads (4)" in e and "(3)" in e for e in errs)
    assert str(ei.value).startswith("config: ") and f"{len(errs)} problems" in str(ei.value)


def test_layout_derives_dp_and_expert_dp():
    lay = ParallelLayout(world_size=32, tp=2, pp=2, ep=8, etp=1, sequence_parallel=True)
    assert (lay.dp, lay.edp) == (8, 2)
    cfg = load_config(None, TINY + ["parallel.tensor_model_parallel_size=1"], world_size=4)
    assert ParallelLayout.from_config(cfg.parallel, 4).dp == 4


def test_sequence_parallel_is_off_at_tp1_like_megatron():
    cfg = load_config(None, TINY + ["parallel.sequence_parallel=true"], world_size=2)
    assert ParallelLayout.from_config(cfg.parallel, 2).sequence_parallel is False


def test_dry_run_reports_errors_with_exit_code_2(tmp_path, capsys):
    p = write(tmp_path, "bad-1n1g.yaml", "denoise: {k_denoise: -3}\n")
    assert train_main(["--config", str(p), "--dry-run"]) == 2
    assert "denoise.k_denoise (-3)" in capsys.readouterr().err


def test_rollout_plan_counts(capsys):
    assert train_main(["--dry-run", "--world-size", "1", "data.problems_per_step=3",
                       "denoise.n_main=5", "denoise.k_denoise=2"]) == 0
    out = capsys.readouterr().out
    assert "rows_per_step: 21" in out and "main_rows: 15" in out and "denoise_rows: 6" in out


def test_importing_config_and_layout_loads_no_engine():
    code = (
        "import sys, megatron_denoise, megatron_denoise.config.loader, megatron_denoise.config.validate, "
        "megatron_denoise.layout, megatron_denoise.launch.train\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('vllm', 'megatron', 'ray', 'torch', 'triton')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
