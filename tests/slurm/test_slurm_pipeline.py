"""slurm/prepare_data.sbatch, convert.sbatch and evaluate.sbatch on a real local Slurm.

One chain of jobs (sbatch --dependency=afterok) on a tiny random Llama with a byte tokenizer:
wrong-solution pool for 4 GSM8K problems -> HF to a megatron-core distributed checkpoint with
tp=2 (two processes, MDN_NPROC=2: the script's torchrun path) -> back to HF in one process
(tensors must come back bit-exact) -> AVG@k evaluation of the round-tripped folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_prepare_convert_evaluate_chain(slurm_cluster, job_env):
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from megatron_denoise.data.io import write_table
    from megatron_denoise.data.sources import load_named_set
    from megatron_denoise.prepare.models import tiny_random_model

    work = Path(slurm_cluster.run) / "pipeline"
    work.mkdir(parents=True)
    # two KV heads: tp=2 splits the query groups, one per rank
    model = tiny_random_model("llama", work / "tiny", tokenizer="bytes", num_key_value_heads=2)
    table, _ = load_named_set("gsm8k")
    problems = work / "gsm8k4.parquet"
    write_table(table.slice(0, 4), problems)
    ckpt, back, evald = work / "ckpt", work / "hf_back", work / "eval"

    sub = slurm_cluster.sbatch
    prep = sub("prepare_data.sbatch", [str(problems), "--model", model, "--engine", "hf", "--n", "2",
                                       "--max-tokens", "8", "--chunk-size", "2", "--workers", "1", "--no-progress"],
               work, env=job_env)
    to_mc = sub("convert.sbatch", ["--from-hf", "--hf", model, "--checkpoint", str(ckpt), "--tp", "2",
                                   "--no-progress"],
                work, env=dict(job_env, MDN_NPROC="2"), extra=["--cpus-per-task=2"])
    # as an srun step that sources the environment itself (the container code path, minus pyxis)
    to_hf = sub("convert.sbatch", ["--to-hf", "--checkpoint", str(ckpt), "--hf", str(back), "--no-progress"],
                work, env=dict(job_env, MDN_SRUN_ALL="1"), extra=[f"--dependency=afterok:{to_mc.id}"])
    # the environment from an MDN_SETUP file instead of MDN_VENV, with no venv on PATH: `python`
    # only has the package if the file was sourced
    setup = work / "setup.sh"
    setup.write_text(f". {job_env['MDN_VENV']}/bin/activate\n")
    bare_path = ":".join(p for p in os.environ.get("PATH", "").split(":") if not p.startswith(job_env["MDN_VENV"]))
    ev_env = {k: v for k, v in job_env.items() if k != "MDN_VENV"}
    ev_env.update(MDN_SETUP=str(setup), PATH=f"/usr/sbin:/usr/bin:/sbin:/bin:{bare_path}")
    ev = sub("evaluate.sbatch", ["--model", str(back), "--sets", "gsm8k", "--k", "2", "--engine", "hf",
                                 "--max-tokens", "6", "--max-problems", "2", "--workers", "1", "--output", str(evald)],
             work, env=ev_env, extra=[f"--dependency=afterok:{to_hf.id}"])

    for job in (prep, to_mc, to_hf, ev):
        info = slurm_cluster.wait(job, timeout=400)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.diagnose(job)

    # prepare_data: one row per problem, with the pool columns
    t = pq.read_table(work / "gsm8k4.with_wrong_boxed.parquet")
    assert t.num_rows == 4 and "wrong_answer_with_boxed" in t.column_names
    # the tp=2 save ran as two processes under the script's torchrun
    assert "torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2" in slurm_cluster.output(to_mc)
    assert "as a job step on node" in slurm_cluster.output(to_hf)
    # round trip HF -> tp=2 distributed checkpoint -> HF is bit-exact
    orig = {}
    for f in Path(model).glob("*.safetensors"):
        orig.update(load_file(str(f)))
    got = {}
    for f in back.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(got) == set(orig)
    for name, tensor in orig.items():
        assert got[name].dtype == tensor.dtype and got[name].equal(tensor), name
    # evaluation of the converted folder
    res = json.loads((evald / "eval_results.json").read_text())
    assert res["model"] == str(back) and set(res["sets"]) == {"gsm8k"}
    assert len(res["sets"]["gsm8k"]["per_problem"]) == 2
    assert "| gsm8k | 2 | 2 |" in slurm_cluster.output(ev)
    for job in (prep, to_mc, to_hf, ev):
        assert not slurm_cluster.wait_no_leftovers(job), f"processes of job {job.id} survived it"
