"""The supervised warm-start (megatron_denoise.sft, launch/sft.py).

Pure checks (no processes): the strict typed config and its dry-run, the token rows (prompt ids
identical to the RL trainer's, loss on solution + EOS only), bad rows named by file and row.

Two launches, shared by the checks below (module-scoped):
  W1  one process, world size 1, three CLI runs: A = 4 SGD steps (exports after step 1 and at the
      end); B1 = the same config stopped at 2 steps, B2 = B resumed to 4 steps.
  TP2 one CLI run at world size 2, tp=2 (two spawned ranks), 1 step, with sft.loss_impl=torch
      (W1 runs the default fused kernel): both loss paths meet the same reference.
The references are independent: transformers' LlamaForCausalLM on the same weights, rows built
here from the chat template + tokenizer directly, loss = -mean log-softmax of the solution tokens,
one SGD step = w - lr * autograd gradient.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TOL = 1e-5
LR = 0.1
ROWS_PER_STEP = 8

MODEL_YAML = """\
model:
  family: llama
  hf_path: {model}
  num_layers: 2
  hidden_size: 64
  ffn_hidden_size: 128
  num_attention_heads: 4
  num_query_groups: 2
  kv_channels: 32
  vocab_size: 259
  max_position_embeddings: 512
  rotary_base: 10000.0
  norm_epsilon: 1.0e-5
  qk_layernorm: false
  tie_word_embeddings: true
  params_dtype: float32
"""

RUN_YAML = """\
defaults: [model.yaml]
name: sft-test
cluster: {{gpus_per_node: 1, backend: gloo, device: cpu}}
parallel: {{use_distributed_optimizer: false}}
optimizer: {{name: sgd, lr: {lr}, min_lr: {lr}, weight_decay: 0.0, clip_grad: 0.0, scheduler: constant, warmup_steps: 0}}
checkpoint: {{dir: "${{logging.output_dir}}/checkpoints", save_interval: 2, keep_last: 2}}
logging: {{output_dir: {out}, tensorboard: false}}
sft:
  train_files: [{data}]
  val_files: [{val}]
  rows_per_step: {rows}
  total_steps: 4
  max_seq_length: 128
  micro_batch_tokens: 256
  export_hf_steps: [1]
  seed: 3
"""


def _rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        a, b = 3 + i, 10 + 2 * i
        rows.append({
            "data_source": "toy", "ability": "math",
            "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "reward_model": {"ground_truth": str(a + b), "style": "rule"},
            "extra_info": {"index": i, "split": "train", "solution": f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}"},
        })
    return rows


def _write(rows: list[dict], path: Path) -> Path:
    from megatron_denoise.data import rows_to_table, write_table

    write_table(rows_to_table(rows), path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from megatron_denoise.prepare.models import tiny_random_model

    root = tmp_path_factory.mktemp("sft")
    model = tiny_random_model("llama", root / "tiny-model", tokenizer="bytes", seed=5, hidden_size=64,
                              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=512,
                              rope_theta=10000.0, tie_word_embeddings=True)
    data = _write(_rows(20), root / "train.parquet")
    val = _write(_rows(5, start=100), root / "val.parquet")
    (root / "model.yaml").write_text(MODEL_YAML.format(model=model))

    def config(name: str) -> Path:
        p = root / f"{name}.yaml"
        p.write_text(RUN_YAML.format(lr=LR, out=root / name, data=data, val=val, rows=ROWS_PER_STEP))
        return p

    return {"root": root, "model": model, "data": data, "val": val, "config": config}


def _launch(args: list, log: Path, timeout: int = 300) -> None:
    e = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        rc = subprocess.run([PY, *args], env=e, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    assert rc == 0, f"{args[:3]} failed (rc={rc}):\n{log.read_text()[-5000:]}"


@pytest.fixture(scope="module")
def w1(env):
    """World size 1, one process: run A (4 SGD steps); with Adam (whose state megatron can load
    back; SGD state it cannot) run C (4 steps), then D1 (2 steps) and D2 (D resumed to 4)."""
    a, c, d = env["config"]("A"), env["config"]("C"), env["config"]("D")
    adam = ["optimizer.name=adam", "optimizer.lr=0.01", "optimizer.min_lr=0.001", "optimizer.scheduler=cosine",
            "optimizer.warmup_steps=1", "optimizer.weight_decay=0.01", "optimizer.clip_grad=1.0"]
    runs = [["--config", str(a), "sft.export_hf_steps=[1,2]"],
            ["--config", str(c), *adam, "sft.export_hf_steps=[]"],
            ["--config", str(d), *adam, "sft.export_hf_steps=[]", "sft.stop_after=2"],
            ["--config", str(d), *adam, "sft.export_hf_steps=[]"]]
    _launch([str(Path(__file__).with_name("sft_worker.py")), json.dumps(runs)], env["root"] / "w1.log")
    return {k: env["root"] / k for k in "ACD"} | {"log": (env["root"] / "w1.log").read_text()}


@pytest.fixture(scope="module")
def tp2(env, w1):  # after w1: never two heavy launches at once
    c = env["config"]("TP2")
    _launch(["-m", "megatron_denoise.launch.sft", "--config", str(c), "--world-size", "2",
             "parallel.tensor_model_parallel_size=2", "sft.total_steps=1", "checkpoint.save_interval=0",
             "sft.loss_impl=torch"],
            env["root"] / "tp2.log")
    return {"dir": env["root"] / "TP2", "log": (env["root"] / "tp2.log").read_text()}


def _metrics(run_dir: Path) -> list[dict]:
    from megatron_denoise.trainer.observe import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ------------------------------------------------------------------------------------------------
# the independent reference: transformers on the same rows


def _reference_rows(env, step: int = 1) -> list[list[int]]:
    """(ids, prompt length) of the rows of `step`, built here from the file and the tokenizer."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from megatron_denoise.data import DataCursor

    tok = AutoTokenizer.from_pretrained(env["model"])
    table = pq.read_table(env["data"]).to_pylist()
    cursor = DataCursor(len(table), seed=3, shuffle=True)
    for _ in range(step - 1):
        cursor.next_indices(ROWS_PER_STEP)
    out = []
    for i in cursor.next_indices(ROWS_PER_STEP):
        r = table[i]
        prompt = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        sol = tok.encode(r["extra_info"]["solution"], add_special_tokens=False) + [tok.eos_token_id]
        out.append((prompt + sol, len(prompt)))
    return out


def _hf_loss_and_step(env):
    """(mean NLL per solution token, {name: weight after one SGD step}) with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float64)
    # transformers builds the embedding with padding_idx = pad_token_id, whose row then gets no
    # gradient from the input side; here pad is <|im_end|>, a real token of every prompt, which
    # megatron (rightly) trains like any other: compare the plain gradient
    model.model.embed_tokens.padding_idx = None
    rows = _reference_rows(env)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ids, p in rows:
        logits = model(torch.tensor([ids])).logits[0]                       # [n, V]
        logp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        total = total - logp[p - 1:].sum()                                  # tokens p .. n-1
        count += len(ids) - p
    loss = total / count
    loss.backward()
    stepped = {n: (w - LR * w.grad).detach() for n, w in model.named_parameters()}
    return float(loss.detach()), stepped


@pytest.fixture(scope="module")
def hf_ref(env):
    return _hf_loss_and_step(env)


# ------------------------------------------------------------------------------------------------
# pure: config, dry-run, rows


def test_config_strict_every_problem_at_once(env, capsys):
    from megatron_denoise.launch import sft

    rc = sft.main(["--config", str(env["config"]("bad")), "sft.rows_per_stepz=3", "sft.epochs=2",
                   "sft.micro_batch_tokens=64", "optimizer.lr=-1", "parallel.tensor_model_parallel_size=3"])
    err = capsys.readouterr().err
    assert rc == 2
    for piece in ["unknown key 'sft.rows_per_stepz' (did you mean 'sft.rows_per_step'?)",
                  "set exactly one of sft.total_steps (4) and sft.epochs (2.0)",
                  "sft.micro_batch_tokens (64) must hold one full row (sft.max_seq_length = 128)",
                  "optimizer.lr (-1.0) must be > 0", "parallel.tensor_model_parallel_size"]:
        assert piece in err, (piece, err)


def test_config_root_defaults_and_training_root_unchanged():
    from megatron_denoise.config.loader import load_config
    from megatron_denoise.config.schema import Config, OptimizerConfig, SFTConfig

    cfg = load_config(None, ["model.hf_path=x", "sft.train_files=[a.parquet]", "sft.epochs=1", "optimizer.lr=0.01"],
                      root=SFTConfig)
    # keys not given keep the ROOT's defaults for the section (SFT: cosine, min_lr 1e-4), not the class's
    assert (cfg.optimizer.lr, cfg.optimizer.scheduler, cfg.optimizer.min_lr) == (0.01, "cosine", 1e-4)
    assert isinstance(load_config(None, []), Config)
    assert load_config(None, ["optimizer.lr=0.5"]).optimizer == OptimizerConfig(lr=0.5)


def test_segment_attention_reaches_the_actor_config():
    """sft.segment_attention is the actor's trainer.segment_attention (the warm-start could not pick
    the old masked attention path before: the key did not exist)."""
    from megatron_denoise.config.loader import load_config
    from megatron_denoise.config.schema import SFTConfig
    from megatron_denoise.sft.config import actor_config

    base = ["model.hf_path=x", "sft.train_files=[a.parquet]", "sft.total_steps=3"]
    on = actor_config(load_config(None, base, root=SFTConfig), 3)
    off = actor_config(load_config(None, base + ["sft.segment_attention=false"], root=SFTConfig), 3)
    assert (on.trainer.segment_attention, off.trainer.segment_attention) == (True, False)


def test_dry_run_prints_layout_and_plan(env, capsys):
    from megatron_denoise.launch import sft

    assert sft.main(["--config", str(env["config"]("dry")), "--dry-run", "--world-size", "2",
                     "parallel.tensor_model_parallel_size=2", "sft.total_steps=null", "sft.epochs=2",
                     "sft.micro_batch_tokens=null"]) == 0
    out = capsys.readouterr().out
    assert "world=2 = tp 2 x pp 1 x cp 1 x dp 1" in out
    assert "rows: 20" in out and "rows_per_step: 8" in out
    assert "total_steps: 5" in out          # ceil(2 epochs x 20 rows / 8)
    assert "micro_batch_tokens: 256 (max_seq_length 128)" in out   # null: 2 x max_seq_length
    assert "tokens: " in out and not (env["root"] / "dry").exists()


def test_rows_match_rl_prompts_and_mask_solution_plus_eos(env):
    from transformers import AutoTokenizer

    from megatron_denoise.config.schema import Config, DataConfig, SFTTrainConfig
    from megatron_denoise.sft.data import load_examples, make_batch
    from megatron_denoise.trainer.problems import ProblemStream

    tok = AutoTokenizer.from_pretrained(env["model"])
    sft = SFTTrainConfig(max_seq_length=128)
    examples, report = load_examples([str(env["data"])], sft, tok)
    assert len(examples) == 20 and not report.bad_rows
    rl = ProblemStream.from_config(Config(data=DataConfig(train_files=[str(env["data"])])), tok)
    for ex, prob in zip(examples, rl.problems):
        prompt = rl.prompt_ids(prob)                     # what the RL trainer sends the engine
        assert ex.tokens[:ex.prompt_len] == prompt
        sol = tok.encode(prob.extra["extra_info"]["solution"], add_special_tokens=False)
        assert list(ex.tokens[ex.prompt_len:]) == sol + [tok.eos_token_id]
    batch = make_batch(examples, [3, 0], pad_id=tok.pad_token_id)
    for r, i in enumerate([3, 0]):
        ex = examples[i]
        n = len(ex.tokens)
        assert batch.input_ids[r, :n].tolist() == list(ex.tokens)
        assert batch.loss_mask[r].tolist() == [0.0] * ex.prompt_len + [1.0] * (n - ex.prompt_len) + \
            [0.0] * (batch.input_ids.shape[1] - n)


def test_bad_rows_named_by_file_and_row(env):
    from transformers import AutoTokenizer

    from megatron_denoise.config.schema import SFTTrainConfig
    from megatron_denoise.data import BadDataError
    from megatron_denoise.sft.data import load_examples

    rows = _rows(4)
    rows[1]["extra_info"]["solution"] = None
    rows[3]["extra_info"]["solution"] = "x" * 200              # longer than max_seq_length
    path = _write(rows, env["root"] / "bad.parquet")
    tok = AutoTokenizer.from_pretrained(env["model"])
    with pytest.raises(BadDataError) as e:
        load_examples([str(path)], SFTTrainConfig(max_seq_length=128), tok)
    msg = str(e.value)
    assert f"{path} row 1: extra_info.solution is missing" in msg
    assert f"{path} row 3: prompt + solution + EOS is" in msg and "> sft.max_seq_length (128)" in msg
    ex, report = load_examples([str(path)], SFTTrainConfig(max_seq_length=128, bad_rows="skip"), tok)
    assert [x.row for x in ex] == [0, 2] and [b.row for b in report.bad_rows] == [1, 3]


# ------------------------------------------------------------------------------------------------
# the actor: loss and SGD parity with transformers, resume, tp=2


@pytest.mark.megatron
@pytest.mark.dist
def test_loss_and_sgd_step_match_transformers(env, w1, hf_ref):
    loss_ref, stepped = hf_ref
    m = _metrics(w1["A"])
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert abs(m[0]["loss"] - loss_ref) < TOL, (m[0]["loss"], loss_ref)
    assert m[0]["loss_tokens"] == sum(len(ids) - p for ids, p in _reference_rows(env))
    assert m[0]["lr"] == LR and m[0]["skipped"] == 0.0
    assert m[0]["loss_impl_fused"] == 1.0                           # the default: the fused kernel
    assert math.isfinite(m[0]["grad_norm"]) and m[0]["grad_norm"] > 0
    assert "val/loss" in m[3] and math.isfinite(m[3]["val/loss"])
    got = _weights(w1["A"] / "hf" / "step_1")
    names = set(got) & set(stepped)
    assert "model.embed_tokens.weight" in names and len(names) >= 10, sorted(got)
    for n in names:
        diff = float((got[n].double() - stepped[n]).abs().max())
        assert diff < TOL, (n, diff)
    assert m[1]["loss"] < m[0]["loss"]    # the step went downhill


@pytest.mark.megatron
@pytest.mark.dist
def test_resumed_run_equals_uninterrupted_run(w1):
    c, d = _metrics(w1["C"]), _metrics(w1["D"])
    assert [r["step"] for r in d] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "val/loss"):                # same rows, same state: exact
        assert [r.get(key) for r in c] == [r.get(key) for r in d], key
    assert c[0]["lr"] < c[1]["lr"] > c[3]["lr"]                          # warmup, then cosine decay
    assert "resumed from" in w1["log"] and "stopped after step 2 (sft.stop_after)" in w1["log"]
    wc, wd = _weights(w1["C"] / "hf" / "final"), _weights(w1["D"] / "hf" / "final")
    assert set(wc) == set(wd) and wc
    for n in wc:
        assert bool((wc[n] == wd[n]).all()), n
    assert (w1["A"] / "hf" / "step_2").is_dir() and not (w1["C"] / "hf" / "step_1").exists()


@pytest.mark.megatron
@pytest.mark.dist
def test_tp2_same_loss(env, tp2, hf_ref):
    m = _metrics(tp2["dir"])
    assert len(m) == 1 and abs(m[0]["loss"] - hf_ref[0]) < TOL, (m, hf_ref[0])
    assert m[0]["loss_impl_fused"] == 0.0                           # this launch: the readable torch path
    # a multi-rank launch's rank-0 lines reach the run's logs/driver.log (the ranks' stdout is the
    # log file since the console filter of issue 17), a single-rank one's the console
    assert "world=2 = tp 2 x pp 1 x cp 1 x dp 1" in (tp2["dir"] / "logs" / "driver.log").read_text()
    got = _weights(tp2["dir"] / "hf" / "final")                      # after its one step
    for n, w in hf_ref[1].items():
        assert float((got[n].double() - w).abs().max()) < TOL, n
