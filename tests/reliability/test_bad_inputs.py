"""The README's table of bad inputs (issue 17), one test per row, named by the row's id (b01..).

Each case feeds one bad input to the layer that checks it (config loader, data reader, pool
checks, model-folder check, checkpoint loader/saver, verifier pool, actor update) and asserts
  1. what the user sees: the message names the key, file, row or rank (and says what to do), and
  2. that nothing already written is lost: an earlier run folder (metrics, problems log, a
     complete checkpoint and its `latest` marker) and the input files themselves are byte-equal
     before and after.
No case starts Ray, vLLM or torchrun; the verifier cases share one pool of verifier processes, and
the checkpoint/NaN cases one single-process gloo group.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_denoise.config.loader import ConfigError, load_config
from megatron_denoise.config.schema import Config, DataConfig, DenoiseConfig, RhoConfig
from megatron_denoise.data import BadDataError, load_problems, rows_to_table, write_table

REPO = Path(__file__).resolve().parents[2]
USER = {"role": "user", "content": "Compute 7+8."}


# ---------------------------------------------------------------------------------------------
# shared fixtures: a process group of one, an earlier run folder, byte snapshots

@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """A one-process gloo group (checkpoint save/load and the actor's update use torch.distributed)."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


LAYOUT_TP2 = {"world_size": 2, "tp": 2, "pp": 1, "vpp": None, "cp": 1, "ep": 1, "etp": 1, "sequence_parallel": False}


def write_checkpoint(root: Path, step: int, layout: dict = LAYOUT_TP2) -> Path:
    """A complete checkpoint in the project's layout (checkpoint.py): dist/ written by torch's
    distributed checkpoint writer (the torch_dist format megatron's dist_checkpointing writes),
    meta.json, rng/rank_00000.pt, and the `latest` marker."""
    import torch.distributed.checkpoint as dcp

    from megatron_denoise.megatron.checkpoint import _write_latest, checkpoint_name

    path = root / checkpoint_name(step)
    (path / "rng").mkdir(parents=True)
    dcp.save({"decoder.weight": torch.arange(4096, dtype=torch.float32).reshape(64, 64) * step,
              "embedding.weight": torch.ones(259, 32) * step}, checkpoint_id=str(path / "dist"))
    (path / "meta.json").write_text(json.dumps({"step": step, "layout": layout, "data_cursor": {"step": step},
                                                "scheduler": {}, "skipped_steps": 0, "has_optimizer": True,
                                                "optimizer_format": "dp_reshardable"}))
    torch.save({"torch": torch.get_rng_state()}, path / "rng" / "rank_00000.pt")
    _write_latest(root, path.name)
    return path


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, gloo):
    """What a run has already written when the bad input arrives."""
    run = tmp_path_factory.mktemp("run")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward_mean": s / 10}) + "\n"
                                               for s in range(1, 11)))
    (run / "problems.jsonl").write_text("".join(json.dumps({"step": s, "uids": [f"t:{s}"]}) + "\n"
                                                for s in range(1, 11)))
    write_checkpoint(run / "checkpoints", 5)
    write_checkpoint(run / "checkpoints", 10)
    return run


def snapshot(*paths: Path) -> dict[str, bytes]:
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        out.update({str(f): f.read_bytes() for f in files})
    return out


class Intact:
    """`with Intact(paths): ...` asserts every file under `paths` is byte-equal afterwards and
    that no file was added or removed."""

    def __init__(self, *paths: Path):
        self.paths = paths

    def __enter__(self):
        self.before = snapshot(*self.paths)
        assert self.before, "nothing to compare"
        return self

    def __exit__(self, *exc):
        after = snapshot(*self.paths)
        assert sorted(after) == sorted(self.before), set(after) ^ set(self.before)
        changed = [k for k in self.before if after[k] != self.before[k]]
        assert not changed, f"earlier output changed: {changed}"
        return False


def config_error(overrides, world_size=1, path=None) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides, world_size=world_size)
    return str(ei.value)


# ---------------------------------------------------------------------------------------------
# config: the loader (every problem at once, before anything starts)

def test_b01_config_unknown_key(earlier):
    with Intact(earlier):
        msg = config_error(["denoise.k_denoize=2"])
    assert "unknown key 'denoise.k_denoize' (did you mean 'denoise.k_denoise'?)" in msg


def test_b02_config_wrong_type(earlier):
    with Intact(earlier):
        msg = config_error(["denoise.n_main=two", "denoise=3"])
    assert "denoise.n_main: expected int, got str 'two'" in msg or "denoise: expected a section (mapping), got 3" in msg
    assert "denoise.n_main: expected int, got str 'two'" in config_error(["denoise.n_main=two"])
    assert "denoise: expected a section (mapping), got 3" in config_error(["denoise=3"])


def test_b03_config_out_of_range(earlier):
    with Intact(earlier):
        msg = config_error(["denoise.rho.value=1.5", "optimizer.lr=0"])
    assert "denoise.rho.value (1.5) must be in (0, 1]" in msg and "optimizer.lr (0.0) must be > 0" in msg
    assert "2 problems" in msg  # every problem at once


def test_b04_config_inconsistent_parallel_sizes(earlier):
    with Intact(earlier):
        msg = config_error(["parallel.tensor_model_parallel_size=2"], world_size=3)
    assert "world size (3) must be divisible by parallel.tensor_model_parallel_size" in msg and "(2 x 1 x 1 = 2)" in msg


def test_b05_config_bad_interpolation(earlier, monkeypatch):
    monkeypatch.delenv("MDN_NO_SUCH_VAR", raising=False)
    with Intact(earlier):
        msg = config_error(["logging.output_dir=${nope.x}"])
        env = config_error(["name=${oc.env:MDN_NO_SUCH_VAR}"])
    assert "interpolation error at logging.output_dir: Interpolation key 'nope.x' not found" in msg
    assert "interpolation error at name" in env and "MDN_NO_SUCH_VAR" in env


def test_b06_config_missing_file(earlier, tmp_path, capsys):
    from megatron_denoise.launch.train import main as train_main

    missing = tmp_path / "nope-1n1g.yaml"
    with Intact(earlier):
        assert train_main(["--config", str(missing), f"logging.output_dir={earlier}"]) == 2
    assert f"cannot read config file {missing}: No such file or directory" in capsys.readouterr().err


def test_b07_config_names_a_missing_file(earlier):
    with Intact(earlier):
        msg = config_error(["prepare.warm_start.config=configs/no-such-sft.yaml"])
    assert "prepare.warm_start.config: configs/no-such-sft.yaml does not exist" in msg


def test_b08_config_invalid_yaml(earlier, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("denoise: {k_denoise: 2\n")
    with Intact(earlier, bad):
        msg = config_error([], path=bad)
    assert f"{bad}: invalid YAML" in msg and "line 1, column 10" in msg


def test_b09_config_value_not_among_choices(earlier):
    with Intact(earlier):
        msg = config_error(["algorithm.loss_agg=mean"])
    assert "algorithm.loss_agg ('mean') must be one of token-mean, seq-mean-token-sum" in msg


# ---------------------------------------------------------------------------------------------
# data: the reader (bad rows by file and row; data.bad_rows skip | error)

def row(content="Compute 7+8.", gt="15", pool=("\\boxed{14}",), **kw):
    r = {"data_source": "t", "prompt": [{"role": "user", "content": content}],
         "reward_model": {"ground_truth": gt, "style": "rule"}, "wrong_answer_with_boxed": list(pool)}
    r.update(kw)
    return r


def parquet(tmp_path: Path, rows, name="train.parquet") -> Path:
    path = tmp_path / name
    write_table(rows_to_table(rows), path)
    return path


def test_b10_data_missing_columns(earlier, tmp_path):
    path = tmp_path / "nocol.parquet"
    write_table(rows_to_table([row()]).drop_columns(["reward_model"]), path)
    with Intact(earlier, path), pytest.raises(ValueError) as ei:
        load_problems([str(path)])
    assert f"{path}: missing column(s) ['reward_model']" in str(ei.value)


def test_b11_data_empty_prompt(earlier, tmp_path):
    path = parquet(tmp_path, [row(), row(content="   ")])
    with Intact(earlier, path):
        problems, report = load_problems([str(path)])
        with pytest.raises(BadDataError) as ei:
            load_problems([str(path)], DataConfig(bad_rows="error"))
    assert len(problems) == 1
    assert [str(b) for b in report.bad_rows] == [f"{path} row 1: prompt[0] (user) is empty: empty problem"]
    assert f"{path} row 1: prompt[0] (user) is empty" in str(ei.value)


def test_b12_data_not_utf8(earlier, tmp_path):
    """Fixed: a JSONL line with bytes that are not UTF-8 raised a bare UnicodeDecodeError naming
    neither the file nor the line; now it is that row's problem and the other rows load."""
    path = tmp_path / "train.jsonl"
    good = json.dumps(row()).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + good.replace(b"Compute", b"Comp\xffute") + b"\n")
    with Intact(earlier, path):
        problems, report = load_problems([str(path)])
    assert len(problems) == 2
    col = good.index(b"Compute") + 5
    assert [str(b) for b in report.bad_rows] == [f"{path} row 2: not valid UTF-8 (byte 0xff at column {col})"]
    with pytest.raises(ValueError, match=rf"{path} line 3: not valid UTF-8"):
        from megatron_denoise.data import read_table

        read_table(path)


def test_b13_data_nan_ground_truth(earlier, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row()) + "\n" + json.dumps(row(gt=float("nan"))) + "\n")  # json writes NaN
    with Intact(earlier, path):
        problems, report = load_problems([str(path)])
    assert len(problems) == 1
    assert [str(b) for b in report.bad_rows] == [
        f"{path} row 1: reward_model.ground_truth: ground truth nan is not a finite number"]


def test_b14_data_empty_after_filtering(earlier, tmp_path):
    path = parquet(tmp_path, [row(gt=""), row(content="")])
    with Intact(earlier, path), pytest.raises(ValueError) as ei:
        load_problems([str(path)])
    msg = str(ei.value)
    assert f"no usable problems in ['{path}']" in msg and "0/2 rows kept" in msg
    assert f"{path} row 0: reward_model.ground_truth: empty ground truth" in msg
    assert f"{path} row 1: prompt[0] (user) is empty" in msg


def test_b15_data_prompt_longer_than_max_prompt_length(earlier, tmp_path):
    from megatron_denoise.prepare.models import byte_tokenizer

    tok = byte_tokenizer()  # the testbed's tokenizer: one token per byte
    path = parquet(tmp_path, [row(), row(content="Compute " + "+".join(["7"] * 60) + ".")])
    with Intact(earlier, path):
        problems, report = load_problems([str(path)], DataConfig(max_prompt_length=96), tokenizer=tok)
        with pytest.raises(BadDataError) as ei:
            load_problems([str(path)], DataConfig(max_prompt_length=96, bad_rows="error"), tokenizer=tok)
    # by hand: <|im_start|> "user\n" content <|im_end|> "\n" <|im_start|> "assistant\n", one token per byte
    n = 1 + 5 + len("Compute " + "+".join(["7"] * 60) + ".") + 1 + 1 + 1 + 10
    assert n == 147
    assert len(problems) == 1
    assert str(report.bad_rows[0]) == f"{path} row 1: prompt is {n} tokens > data.max_prompt_length (96)"
    assert "1 bad row(s) (data.bad_rows=error)" in str(ei.value)


def test_b16_data_duplicate_uids(earlier, tmp_path):
    """Fixed: duplicate uids were renamed silently; the renaming is now a report note naming the
    file and row (problems.jsonl and resumption key on uids), printed with the problem summary."""
    path = parquet(tmp_path, [row(extra_info={"index": 0}), row(extra_info={"index": 0}), row(extra_info={"index": 1})])
    with Intact(earlier, path):
        problems, report = load_problems([str(path)])
    assert [p.uid for p in problems] == ["t:0", "t:0@train:1", "t:1"]
    assert report.notes == [f"1 duplicate uid(s) renamed to stay unique (problems.jsonl and resumption key on uids): "
                            f"t:0 -> t:0@train:1 ({path} row 1)"]
    from megatron_denoise.trainer.problems import ProblemStream

    assert "note: 1 duplicate uid(s) renamed" in ProblemStream(problems, None, 0, False, report).describe()


def test_b17_data_file_missing(earlier, tmp_path):
    missing = tmp_path / "train.with_wrong_boxed.parquet"
    with Intact(earlier), pytest.raises(FileNotFoundError) as ei:
        load_problems([str(missing)])
    assert f"data file {missing} does not exist" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# pool: the wrong-solution column and the denoise rows built from it

def denoise_cfg(**kw) -> DenoiseConfig:
    base = dict(n_main=2, k_denoise=2, rho=RhoConfig(strategy="fixed", value=0.5))
    base.update(kw)
    return DenoiseConfig(**base)


def build(problems, denoise, R=64):
    from megatron_denoise.core.prefix import build_step_requests, render_prompt_ids
    from megatron_denoise.prepare.models import byte_tokenizer

    tok = byte_tokenizer()
    ids = [render_prompt_ids(tok, p.prompt) for p in problems]
    return build_step_requests(problems, ids, tok, denoise, R, step=0)


def test_b18_pool_empty_everywhere(earlier, tmp_path):
    """Fixed: training files without any pool entry and K > 0 trained plain GRPO with nothing said
    (only fallback/empty_pool counts in metrics.jsonl); the trainer now prints a warning naming the
    files, the column and the key before Ray starts. The run goes on: the tiny tp=2 demo config
    trains on a pool-less named set on purpose."""
    from megatron_denoise.trainer.problems import check_pools

    path = parquet(tmp_path, [row(pool=()), row(pool=())])
    cfg = Config()
    cfg.data.train_files = [str(path)]
    cfg.denoise.k_denoise = 2
    with Intact(earlier, path):
        problems, _ = load_problems([str(path)])
        msg = check_pools(cfg, problems)
    assert msg == (f"warning: data.train_files ['{path}']: none of the 2 problems has an entry in the pool column "
                   f"'wrong_answer_with_boxed', and denoise.k_denoise is 2: every denoise row will be an ordinary "
                   f"rollout (fallback/empty_pool). Build the pool first (launch/prepare_data.py or prepare.pool), "
                   f"or set denoise.k_denoise=0 for plain GRPO")
    cfg.denoise.k_denoise = 0
    assert check_pools(cfg, problems) is None  # plain GRPO needs no pool
    cfg.denoise.k_denoise = 2
    one = parquet(tmp_path, [row(pool=()), row()], name="one.parquet")
    assert check_pools(cfg, load_problems([str(one)])[0]) is None  # one pool is enough


def test_b19_pool_empty_for_one_problem(earlier, tmp_path):
    path = parquet(tmp_path, [row(pool=()), row(extra_info={"index": 1})])
    with Intact(earlier, path):
        problems, report = load_problems([str(path)])
        plan = build(problems, denoise_cfg())
    assert not report.bad_rows and len(problems) == 2
    # the problem without a pool keeps N + K rows: its K denoise slots are ordinary rollouts, counted
    assert plan.fallbacks == {"empty_pool": 2} and plan.problems_without_pool == 1
    assert [r.kind.value for r in plan.group(0)] == ["main", "main", "fallback", "fallback"]
    assert [r.kind.value for r in plan.group(1)] == ["main", "main", "denoise", "denoise"]


def test_b20_pool_non_string_entries(earlier, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row()) + "\n" + json.dumps(row(pool=("\\boxed{3}", 3))) + "\n")
    with Intact(earlier, path):
        problems, report = load_problems([str(path)])
    assert len(problems) == 1
    assert [str(b) for b in report.bad_rows] == [f"{path} row 1: wrong_answer_with_boxed[1] is not a string (int)"]


def test_b21_pool_prefix_not_shorter_than_R(earlier, tmp_path):
    """A prefix of p >= R tokens leaves nothing to generate: that slot becomes an ordinary rollout
    with R tokens, counted as fallback/prefix_too_long (never a crash, never a 0-token request)."""
    long_wrong = "7+8 = 14. " * 20 + "\\boxed{14}"    # 210 bytes = 210 tokens of the byte tokenizer
    path = parquet(tmp_path, [row(pool=(long_wrong,))])
    with Intact(earlier, path):
        problems, _ = load_problems([str(path)])
        plan = build(problems, denoise_cfg(rho=RhoConfig(strategy="fixed", value=0.5)), R=64)  # p = 105 >= 64
    assert plan.fallbacks == {"prefix_too_long": 2}
    assert all(r.max_tokens == 64 and r.prefix is None for r in plan.group(0)[2:])
    ok = build(problems, denoise_cfg(rho=RhoConfig(strategy="fixed", value=0.2)), R=64)  # p = 42 < 64
    assert ok.fallbacks == {} and [r.max_tokens for r in ok.group(0)[2:]] == [64 - 42, 64 - 42]


# ---------------------------------------------------------------------------------------------
# model files: the folder check the trainer runs before any worker (convert/check.py)

@pytest.fixture
def model_dir(tmp_path):
    """A two-shard Llama folder of the testbed's shape class (tensors need not be a whole model:
    the check reads config, index and headers only)."""
    from safetensors.torch import save_file

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "vocab_size": 259, "hidden_size": 32}))
    shards = {"model-00001-of-00002.safetensors": {"model.embed_tokens.weight": torch.randn(259, 32)},
              "model-00002-of-00002.safetensors": {"lm_head.weight": torch.randn(259, 32)}}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(d / name))
        weight_map.update({k: name for k in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    from megatron_denoise.convert.check import check_model_folder

    check_model_folder(str(d))  # the intact folder passes
    return d


def test_b22_model_missing_shard(earlier, model_dir):
    from megatron_denoise.convert.check import ModelFolderError, check_model_folder

    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with Intact(earlier, model_dir), pytest.raises(ModelFolderError) as ei:
        check_model_folder(str(model_dir))
    assert (f"{model_dir}/model.safetensors.index.json names 1 shard(s) that do not exist in {model_dir}: "
            f"model-00002-of-00002.safetensors") in str(ei.value)


def test_b23_model_truncated_safetensors(earlier, model_dir):
    from megatron_denoise.convert.check import ModelFolderError, check_model_folder

    shard = model_dir / "model-00002-of-00002.safetensors"
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-1000])
    with Intact(earlier, model_dir), pytest.raises(ModelFolderError) as ei:
        check_model_folder(str(model_dir))
    assert f"{shard} is truncated: {full - 1000} bytes, its header describes {full} (1000 missing)" in str(ei.value)
    shard.write_bytes(b"\x05\x00")
    with pytest.raises(ModelFolderError, match="shorter than the 8-byte safetensors header length"):
        check_model_folder(str(model_dir))


def test_b24_model_tokenizer_larger_than_vocabulary(earlier, model_dir):
    from megatron_denoise.convert.check import ModelFolderError, check_model_folder
    from megatron_denoise.prepare.models import byte_tokenizer

    tok = byte_tokenizer()  # 259 tokens
    check_model_folder(str(model_dir), tok)  # == vocab_size: fine (a larger, padded embedding is fine too)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(dict(cfg, vocab_size=256)))
    with Intact(earlier, model_dir), pytest.raises(ModelFolderError) as ei:
        check_model_folder(str(model_dir), tok)
    assert f"has 259 tokens but {model_dir}/config.json has vocab_size 256" in str(ei.value)
    assert "model.tokenizer_path" in str(ei.value)


def test_b25_model_unsupported_architecture(earlier, model_dir):
    from megatron_denoise.convert.check import check_model_folder
    from megatron_denoise.convert.errors import UnknownArchitectureError

    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(dict(cfg, architectures=["MistralForCausalLM"])))
    with Intact(earlier, model_dir), pytest.raises(UnknownArchitectureError) as ei:
        check_model_folder(str(model_dir))
    assert (f"unknown architecture 'MistralForCausalLM' in {model_dir}/config.json; supported: LlamaForCausalLM, "
            f"Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM") == str(ei.value)


# ---------------------------------------------------------------------------------------------
# checkpoints: the resume resolver/loader and the saver (megatron/checkpoint.py)

@pytest.fixture
def ckpts(tmp_path, gloo):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 10)
    write_checkpoint(root, 20)
    return root


def test_b26_checkpoint_truncated_shard(ckpts):
    """Fixed: a truncated shard surfaced inside torch's reader on every rank, after the workers had
    started; resolve_resume now checks every shard against the shard index first."""
    from megatron_denoise.megatron.checkpoint import CheckpointError, resolve_resume

    shard = ckpts / "step_00000020" / "dist" / "__0_0.distcp"
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:full // 2])
    with Intact(ckpts / "step_00000010", ckpts / "latest"), pytest.raises(CheckpointError) as ei:
        resolve_resume("auto", ckpts)
    assert str(ei.value) == (f"checkpoint.resume=auto: {shard} is truncated: {full // 2} bytes, the shard index "
                             f"needs {full}; an older checkpoint: checkpoint.resume={ckpts / 'step_00000010'}")
    assert resolve_resume(str(ckpts / "step_00000010"), ckpts) == ckpts / "step_00000010"


def test_b27_checkpoint_latest_names_a_missing_folder(ckpts):
    import shutil

    from megatron_denoise.megatron.checkpoint import resolve_resume

    shutil.rmtree(ckpts / "step_00000020")
    with Intact(ckpts), pytest.raises(FileNotFoundError) as ei:
        resolve_resume("auto", ckpts)
    assert str(ei.value) == (f"{ckpts / 'latest'} names 'step_00000020', but {ckpts / 'step_00000020' / 'meta.json'} "
                             f"does not exist; complete checkpoints here: step_00000010 (resume one with "
                             f"checkpoint.resume={ckpts / 'step_00000010'})")


def test_b28_checkpoint_other_layout_without_reshardable_optimizer(ckpts):
    """Saved at tp=2 with the default dp_reshardable optimizer format, resumed at tp=1: the weights
    reshard, the Adam state cannot; the run says so (rank 0's worker log AND the driver's console,
    through meta["optimizer_note"]) instead of failing or loading the wrong moments."""
    from megatron_denoise.megatron.checkpoint import check_checkpoint, optimizer_resume_plan

    with Intact(ckpts):
        meta = check_checkpoint(ckpts / "step_00000020")
        tp1 = dict(LAYOUT_TP2, world_size=1, tp=1)
        load, why = optimizer_resume_plan(meta, tp1, "dp_reshardable")
        assert optimizer_resume_plan(meta, dict(LAYOUT_TP2), "dp_reshardable") == (True, None)
        assert optimizer_resume_plan(dict(meta, optimizer_format="fully_reshardable"), tp1, "dp_reshardable") == (
            True, None)
        _, other_kind = optimizer_resume_plan(meta, dict(LAYOUT_TP2), "model_space")
    assert load is False
    assert why.startswith("optimizer and LR-scheduler state start fresh: it was saved as dp_reshardable at layout ")
    assert "differs in world_size 2 -> 1, tp 2 -> 1" in why and "checkpoint.optimizer_format=fully_reshardable" in why
    assert why.endswith("the weights are resumed")
    assert "parallel.use_distributed_optimizer" in other_kind


def test_b29_checkpoint_disk_full_during_save(ckpts, monkeypatch):
    """The shard writer raises ENOSPC half-way: the error names the folder being written, errno 28
    and the checkpoint that stays the latest; the half-written folder is removed; step 20 and
    `latest` are byte-identical."""
    from megatron_denoise.megatron import checkpoint as ck

    def full_disk(state, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_bytes(b"\0" * 1000)  # a part written before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "_write_dist", full_disk)
    chunk = SimpleNamespace(sharded_state_dict=lambda: {})
    actor = SimpleNamespace(step=30, chunks=[chunk], skipped_steps=0,
                            cfg=SimpleNamespace(parallel=SimpleNamespace(use_distributed_optimizer=False)))
    with Intact(ckpts), pytest.raises(OSError) as ei:
        ck.save_checkpoint(actor, ckpts, step=30, data_cursor={"step": 30}, save_optimizer=False)
    assert ei.value.errno == errno.ENOSPC
    assert str(ei.value) == (f"[Errno 28] saving the checkpoint of step 30 into {ckpts / '.tmp-step_00000030'} "
                             f"failed: No space left on device (errno 28); nothing was published: "
                             f"{ckpts / 'step_00000020'} is still the latest checkpoint")
    assert ck.resolve_resume("auto", ckpts) == ckpts / "step_00000020"


# ---------------------------------------------------------------------------------------------
# verifier: the pool of sandboxed verifier processes (reward/pool.py)

@pytest.fixture(scope="module")
def verifier():
    from megatron_denoise.reward import VerifierPool

    with VerifierPool(num_workers=1, deadline_s=1.0, kill_grace_s=0.5) as pool:
        pool.wait_ready()
        yield pool


def test_b30_verifier_huge_answer(earlier, verifier):
    from megatron_denoise.reward import VerifyStatus

    with Intact(earlier):
        big = verifier.score("\\boxed{" + "1" * (1 << 20) + "}", "1")
        text = verifier.score("x" * (1 << 20) + " \\boxed{15}", "15")
    assert big.status is VerifyStatus.ERROR and big.score == 0.0
    assert big.detail == "answer too long (1048576 > 2048 chars)"  # never shipped to a worker
    assert text.correct  # a 1 MB text with a short answer is fine
    assert verifier.score("\\boxed{4}", "4").correct


def test_b31_verifier_deep_nesting(earlier, verifier):
    from megatron_denoise.reward import VerifyStatus

    with Intact(earlier):
        t0 = time.monotonic()
        res = verifier.score_batch(["\\boxed{" + "{" * 600 + "1" + "}" * 600 + "}",       # under max_answer_chars
                                    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",  # over it
                                    "\\boxed{(((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))}"],
                                   ["2", "1", "2"])
        wall = time.monotonic() - t0
    assert [r.score for r in res] == [0.0, 0.0, 0.0]
    assert res[0].status in (VerifyStatus.OK, VerifyStatus.TIMEOUT, VerifyStatus.ERROR)
    assert res[1].status is VerifyStatus.ERROR and "too long" in res[1].detail
    assert wall < 60, wall  # bounded by the deadline, not by the input
    assert verifier.score("\\boxed{4}", "4").correct


def test_b32_verifier_injection_attempts(earlier, verifier, tmp_path):
    from megatron_denoise.reward import VerifyStatus

    marker = tmp_path / "pwned"
    cmd = f"__import__('os').system('touch {marker}')"
    texts = [f"\\boxed{{{cmd}}}", f"\\boxed{{\\lambda x: {cmd}}}", f"$\\boxed{{{cmd}}}$ \\text{{{cmd}}}",
             "\\boxed{__import__('subprocess').run(['touch', '" + str(marker) + "'])}"]
    with Intact(earlier):
        res = verifier.score_batch(texts + ["\\boxed{1}"], ["1"] * len(texts) + [cmd])  # a ground truth, too
    assert not marker.exists()
    assert all(r.score == 0.0 and r.status in (VerifyStatus.OK, VerifyStatus.ERROR) for r in res), res


# ---------------------------------------------------------------------------------------------
# runtime

def test_b33_runtime_nan_loss(earlier, gloo):
    """A NaN loss (or grad norm): the actor's guard skips the update on every rank (weights and
    optimizer untouched, counted), and the console's step line says so."""
    from megatron_denoise.megatron.actor import MegatronActor
    from megatron_denoise.trainer.observe import Progress

    calls = []
    opt = SimpleNamespace(prepare_grads=lambda: calls.append("prepare"), get_grad_norm=lambda: 1.5,
                          zero_grad=lambda: calls.append("zero_grad"), step=lambda: calls.append("STEP"),
                          param_groups=[{"lr": 2e-5}])
    weight = torch.ones(4)
    fake = SimpleNamespace(optimizer=opt, cfg=SimpleNamespace(trainer=SimpleNamespace(nan_guard=True)),
                           model=[SimpleNamespace(zero_grad_buffer=lambda: calls.append("zero_buffer"))],
                           scheduler=SimpleNamespace(step=lambda increment: calls.append("SCHED")),
                           skipped_steps=0, step=7)
    with Intact(earlier):
        grad_norm, lr, skipped = MegatronActor._apply_update(fake, float("nan"))
    assert skipped and math.isclose(grad_norm, 1.5) and lr == 2e-5
    assert calls == ["prepare", "zero_grad", "zero_buffer"]  # no optimizer or scheduler step
    assert fake.skipped_steps == 1 and fake.step == 8 and torch.equal(weight, torch.ones(4))
    line = Progress(60, enabled=True, use_rich=False).line(8, {"reward_mean": 0.5, "skipped": 1.0, "time/step": 1.7})
    assert "| 1 update(s) skipped: loss or grad norm not finite (trainer.nan_guard) |" in line


def test_b34_runtime_verifier_worker_killed(earlier, verifier):
    """A verifier worker killed (kill -9) while it judges: the pool starts a replacement, the answer
    it was judging is judged again by it (once; here it times out again: 0, `timeout`), the rest of
    the batch is judged, and the death and the re-scoring are counted in the pool's stats. (The
    rollout worker and policy ranks: the chaos harness and the dead-worker tests of issue 17.)"""
    from megatron_denoise.reward import VerifyStatus

    before = dict(verifier.stats)
    victim = verifier.worker_pids()[0]
    out = {}

    def run():
        # a slow answer first, so the worker is busy when it is killed
        out["res"] = verifier.score_batch(["\\boxed{9^{9^{9^9}}}", "\\boxed{15}", "\\boxed{14}"], ["1", "15", "15"])

    with Intact(earlier):
        t = threading.Thread(target=run)
        t.start()
        t_end = time.monotonic() + 60
        while verifier._pid_judging(0) != victim and time.monotonic() < t_end:
            time.sleep(0.02)
        assert verifier._pid_judging(0) == victim, "the worker never started judging"
        os.kill(victim, signal.SIGKILL)
        t.join(timeout=120)
    assert not t.is_alive()
    res = out["res"]
    assert res[0].score == 0.0 and res[0].status is VerifyStatus.TIMEOUT
    assert res[1].correct and not res[2].correct and res[2].status is VerifyStatus.OK
    after = verifier.stats
    assert after["workers_died"] == before["workers_died"] + 1
    assert after["rescored"] == before.get("rescored", 0) + 1
    assert victim not in verifier.worker_pids()
    assert verifier.score("\\boxed{4}", "4").correct
