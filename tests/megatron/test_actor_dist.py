"""The megatron actor on CPU/gloo: parity of every layout with the single-process run, the CPU
shims (each still needed), NaN guard, and distributed checkpoints (reshard, resume, kill -9).

Three torchrun launches run many checks each (mcore_worker.py; megatron import + launch cost
~15-30 s per launch):
    L1  1 process   single-process references; shims testable on one rank; a save killed by -9
    L2  2 processes TP2, TP2+SP, PP2, PP2+VPP2, DP2 (+distributed optimizer), MoE EP2 (alltoall,
                    allgather), CP2; NaN guard; save/load across TP/PP; resume; after the crash
    L3  4 processes TP2xPP2 (+SP), MoE TP2xEP2 (alltoall, SP), the uneven-collective shim
Tolerance: 1e-5 (fp32) on losses, log-probs, logits, gradients and weights after one step.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.megatron, pytest.mark.dist, pytest.mark.slow]

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

WORKER = Path(__file__).with_name("mcore_worker.py")
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, checks: list[dict], workdir: Path, name: str, timeout: int = 420,
           expect_killed: bool = False, worker: Path = WORKER) -> dict:
    """Run the worker (mcore_worker.py, or another script built on it) under torchrun; return
    {check name: result}."""
    spec = workdir / f"{name}.spec.json"
    out = workdir / f"{name}.out.json"
    spec.write_text(json.dumps({"workdir": str(workdir), "checks": checks}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), str(worker), str(spec), str(out)]
    log = workdir / f"{name}.log"
    # own session: when a rank is killed (-9 test), its checkpoint writer's multiprocessing
    # manager outlives it; killing the whole group afterwards leaves nothing behind
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            # the launcher's group, then each rank's own group (recorded by the worker)
            pgids = {proc.pid} | {int(p.read_text()) for p in workdir.glob(f"{out.stem}.pgid.*")}
            for pgid in pgids - {os.getpgrp()}:  # never our own group
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
    tail = log.read_text()[-6000:]
    if not out.exists():
        raise AssertionError(f"{name}: worker wrote no results (rc={rc})\n{tail}")
    if rc != 0 and not expect_killed:
        raise AssertionError(f"{name}: torchrun failed (rc={rc})\n{tail}")
    return json.loads(out.read_text())


def ok(results: dict, name: str) -> dict:
    r = results.get(name)
    assert r is not None, f"check {name} did not run"
    assert "error" not in r, f"check {name} raised:\n{r['error']}"
    return r


# ------------------------------------------------------------------------------------------------
# launches (module-scoped: each runs once)

SHIMS_1P = {
    # shim name -> a substring of the error megatron raises without it
    "rng_tracker": "CUDA",
    "cuda_current_device": "CUDA",
    "cuda_device_strings": "CUDA",
    "cuda_streams": "CUDA",
    "moe_router_gemm": "te_general_gemm",
    "optimizer_type_checks": "torch.cuda.FloatTensor",
}
SHIMS_2P = {
    "moe_split_sizes": ("all_to_all", {"ep": 2}),
    "sequence_parallel_norm": ("sequence parallel", {"tp": 2, "sequence_parallel": True}),
    "distopt_load": ("", {}),  # without it the resumed run diverges (or asserts)
    "cp_rope_positions": ("CUDA", {"cp": 2}),
    "tied_embedding_sync": ("CUDA", {"pp": 2}),
}
LAYOUTS_2P = {
    "tp2": dict(lay={"tp": 2}),
    "tp2_sp": dict(lay={"tp": 2, "sequence_parallel": True}),
    "pp2": dict(lay={"pp": 2}),
    "pp2_vpp2": dict(lay={"pp": 2, "vpp": 2}),
    "dp2": dict(lay={}),
    "dp2_distopt": dict(lay={}, distopt=True, optimizer="adam"),
    "moe_ep2_alltoall": dict(model="moe", lay={"ep": 2}),
    "moe_ep2_allgather": dict(model="moe", dispatcher="allgather", lay={"ep": 2}),
    "cp2": dict(lay={"cp": 2}),
    "tied_tp2": dict(model="tied", lay={"tp": 2}),
    "tied_pp2": dict(model="tied", lay={"pp": 2}),  # embedding/output grads synced across stages
    # the fused loss kernel (megatron_denoise.kernels) behind policy_loss_from_hidden
    "tp2_sp_fused_loss": dict(lay={"tp": 2, "sequence_parallel": True}, loss_impl="fused"),
    "cp2_fused_loss": dict(lay={"cp": 2}, loss_impl="fused"),
    "tp2_recompute": dict(lay={"tp": 2}, recompute=True),  # full activation recomputation
}
LAYOUTS_4P = {
    "tp2_pp2": dict(lay={"tp": 2, "pp": 2, "sequence_parallel": True}),
    "moe_tp2_ep2_alltoall": dict(model="moe", lay={"tp": 2, "ep": 2, "sequence_parallel": True}),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mcore")


@pytest.fixture(scope="module")
def l1(workdir) -> dict:
    checks = [
        {"name": "ref_dense", "kind": "reference", "args": {"model": "dense"}},
        {"name": "ref_dense_adam", "kind": "reference", "args": {"model": "dense", "optimizer": "adam"}},
        {"name": "ref_moe", "kind": "reference", "args": {"model": "moe"}},
        {"name": "ref_tied", "kind": "reference", "args": {"model": "tied"}},
    ]
    checks += [{"name": f"shim_{s}", "kind": "shim_needed", "args": {"shim": s}} for s in SHIMS_1P]
    checks.append({"name": "split_invariance", "kind": "split_invariance"})
    checks.append({"name": "update_ppo", "kind": "update_ppo"})
    checks += [{"name": f"attention_paths_{m}", "kind": "attention_paths", "args": {"model": m}}
               for m in ("dense", "tied")]
    checks += [{"name": f"train_logprobs_{impl}", "kind": "train_logprobs", "args": {"loss_impl": impl}}
               for impl in ("fused", "torch")]
    checks.append({"name": "moe_aux_loss", "kind": "moe_aux_loss"})
    checks.append({"name": "moe_aux_duplicates", "kind": "moe_aux_duplicates"})
    checks.append({"name": "ckpt_crash", "kind": "ckpt_crash"})  # last: it kills the process
    return launch(1, checks, workdir, "l1", expect_killed=True)


@pytest.fixture(scope="module")
def l2(workdir, l1) -> dict:
    checks = [{"name": n, "kind": "parity", "args": a} for n, a in LAYOUTS_2P.items()]
    checks += [{"name": f"shim_{s}", "kind": "shim_needed", "args": {"shim": s, "lay": lay}}
               for s, (_, lay) in SHIMS_2P.items()]
    checks += [
        {"name": "nan_guard", "kind": "nan_guard", "args": {"lay": {"tp": 2}}},
        {"name": "save_tp2", "kind": "ckpt_save", "args": {"lay": {"tp": 2}, "tag": "tp2"}},
        {"name": "load_tp2_as_tp1", "kind": "ckpt_load", "args": {"lay": {}, "tag": "tp2"}},
        {"name": "save_tp1", "kind": "ckpt_save", "args": {"lay": {}, "tag": "tp1"}},
        {"name": "load_tp1_as_tp2", "kind": "ckpt_load", "args": {"lay": {"tp": 2}, "tag": "tp1"}},
        {"name": "load_tp1_as_pp2_vpp2", "kind": "ckpt_load", "args": {"lay": {"pp": 2, "vpp": 2}, "tag": "tp1"}},
        {"name": "resume_tp2", "kind": "ckpt_resume", "args": {"lay": {"tp": 2}, "distopt": False}},
        {"name": "after_crash_tp2", "kind": "ckpt_after_crash", "args": {"lay": {"tp": 2}}},
        {"name": "reshard_full", "kind": "ckpt_reshard",
         "args": {"save_lay": {"tp": 2}, "load_lay": {}, "fmt": "fully_reshardable"}},
        {"name": "reshard_dp", "kind": "ckpt_reshard",
         "args": {"save_lay": {"tp": 2}, "load_lay": {}, "fmt": "dp_reshardable"}},
        {"name": "reshard_regular", "kind": "ckpt_reshard",
         "args": {"save_lay": {"tp": 2}, "load_lay": {"pp": 2}, "fmt": "dp_reshardable", "distopt": False}},
    ]
    return launch(2, checks, workdir, "l2")


@pytest.fixture(scope="module")
def l3(workdir, l1) -> dict:
    checks = [{"name": n, "kind": "parity", "args": a} for n, a in LAYOUTS_4P.items()]
    checks.append({"name": "shim_gloo_uneven_collectives", "kind": "shim_needed",
                   "args": {"shim": "gloo_uneven_collectives", "lay": {"tp": 2, "ep": 2, "sequence_parallel": True}}})
    return launch(4, checks, workdir, "l3")


# ------------------------------------------------------------------------------------------------


def test_references_ran(l1):
    for name in ("ref_dense", "ref_dense_adam", "ref_moe", "ref_tied"):
        r = ok(l1, name)
        assert r["finite"]
        m = r["metrics"]
        assert m["skipped"] == 0.0 and m["loss_tokens"] > 0 and m["num_micro_batches"] >= 2
        assert m["clip_fraction"] > 0  # the PPO clip binds in the parity batch


def test_loss_does_not_depend_on_the_micro_batch_split(l1):
    r = ok(l1, "split_invariance")
    assert r["num_micro_batches"] == 1 and r["ref_micro_batches"] >= 3
    assert r["loss"] < TOL and r["after"]["max"] < TOL and r["after"]["n"] >= 10


def test_update_recomputes_old_logprobs_and_steps(l1):
    r = ok(l1, "update_ppo")
    assert r["steps"] == 4 and r["actor_step"] == 4 and r["skipped"] == 0
    assert abs(r["ratio_first"] - 1.0) < 1e-6 and r["clip_first"] == 0.0  # old == current at first
    assert abs(r["ratio_last"] - 1.0) > 1e-6  # later mini-batches see moved weights


@pytest.mark.parametrize("model", ["dense", "tied"])
def test_segment_attention_equals_the_masked_attention(l1, model):
    """trainer.segment_attention: attention per packed sequence (SDPA) gives the masked path's
    log-probs, entropies, loss, gradients and updated weights (GQA, several packed micro-batches)."""
    r = ok(l1, f"attention_paths_{model}")
    assert r["mask_path"] == [True, "DotProductAttention"] and r["segment_path"] == [False, "SegmentAttention"]
    assert r["micro_batches"] >= 2
    for k in ("logp", "ent", "loss", "grad", "weights"):
        assert r[k] < TOL, (k, r[k])


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_update_returns_its_forward_logprobs(l1, impl):
    """trainer.logprobs_from_train: the update's own forward gives compute_logprobs' numbers (same
    weights) at the loss tokens, and asking for them changes nothing in the update.
    trainer.loss_tokens_only (the default) runs the output layer on the loss tokens only: the
    log-probs are 0 elsewhere and the update equals the one over every token; false gives the
    log-probs of every token."""
    r = ok(l1, f"train_logprobs_{impl}")
    only, every = r["only"], r["every"]
    assert 0 < only["nonzero"] == only["nonzero_loss_tokens"] < only["nonzero_all"]
    assert only["zero_outside_loss"] and only["max_diff_loss_tokens"] < TOL
    assert every["nonzero"] == every["nonzero_all"] > 0 and every["max_diff_all"] < TOL
    assert r["plain_vs_only"]["loss"] == 0.0 and r["plain_vs_only"]["weights"] == 0.0
    assert r["only_vs_every"]["loss"] < TOL and r["only_vs_every"]["weights"] < TOL


def test_moe_aux_loss_reaches_router_gradients(l1):
    r = ok(l1, "moe_aux_loss")
    assert r["loss"] < TOL  # the reported policy loss excludes the auxiliary loss
    assert r["router_grad_diff"] > 1e-6  # ... which still trains the router
    assert r["output_grad_diff"] < TOL  # the output layer sees only the policy loss


def test_moe_aux_loss_is_averaged_over_micro_batches(l1):
    r = ok(l1, "moe_aux_duplicates")
    assert r["micro_batches"] == [1, 3] and r["router_grad"] > 1e-4
    assert r["router_diff"] < TOL and r["max_diff"] < TOL  # 3 copies of a row == the row


def _assert_parity(r: dict) -> None:
    assert r["logp"] < TOL and r["entropy"] < TOL
    for key in ("loss", "pg_loss", "entropy", "clip_fraction", "dual_clip_fraction", "grad_norm", "loss_tokens"):
        assert r[f"metric_{key}"] < TOL, (key, r[f"metric_{key}"])
    if "grads" in r:
        g = r["grads"]
        assert g["n"] >= 8 and not g["only_a"] and not g["only_b"], g
        assert g["max"] < TOL, g
    a = r["after"]
    assert a["n"] >= 8 and not a["only_a"] and not a["only_b"], a
    assert a["max"] < TOL, a
    assert r["moved"] > 10 * TOL  # the step really moved the weights (Adam: about lr = 1e-3)


@pytest.mark.parametrize("name", list(LAYOUTS_2P))
def test_parity_2proc(l2, name):
    _assert_parity(ok(l2, name))


@pytest.mark.parametrize("name", list(LAYOUTS_4P))
def test_parity_4proc(l3, name):
    _assert_parity(ok(l3, name))


@pytest.mark.parametrize("shim", list(SHIMS_1P))
def test_shim_still_needed_1proc(l1, shim):
    r = ok(l1, f"shim_{shim}")
    assert r["without"] is not None, f"megatron ran without the {shim} shim: remove the shim"
    assert SHIMS_1P[shim] in r["without"], r["without"]
    assert r["with"] is None, r["with"]
    assert shim in r["applied"]


@pytest.mark.parametrize("shim", list(SHIMS_2P))
def test_shim_still_needed_2proc(l2, shim):
    r = ok(l2, f"shim_{shim}")
    assert r["without"] is not None, f"megatron ran without the {shim} shim: remove the shim"
    assert SHIMS_2P[shim][0] in r["without"], r["without"]
    assert r["with"] is None, r["with"]


def test_shim_uneven_collectives_4proc(l3):
    r = ok(l3, "shim_gloo_uneven_collectives")
    assert r["without"] is not None and "allgather" in r["without"], r["without"]
    assert r["with"] is None, r["with"]


def test_nan_guard_skips_and_reports(l2):
    r = ok(l2, "nan_guard")
    assert r["loss_bad_is_nan"] and r["skipped_bad"] == 1.0 and r["skipped_steps"] == 1
    assert r["unchanged"] == 0.0
    assert r["skipped_good"] == 0.0 and r["moved_after_good"] > 0


@pytest.mark.parametrize("name", ["load_tp2_as_tp1", "load_tp1_as_tp2", "load_tp1_as_pp2_vpp2"])
def test_checkpoint_reshards(l2, name):
    r = ok(l2, name)
    if r["logits"] is not None:
        assert r["logits"] < TOL and r["logits_shape"] == [6, 24, 300]
    assert r["logp"] < TOL and r["ent"] < TOL
    assert r["step"] == 1 and r["cursor"] == {"epoch": 0, "index": 7}


def test_resume_same_layout_is_exact(l2):
    r = ok(l2, "resume_tp2")
    assert r["weights"] == 0.0 and r["loss"] == 0.0 and r["grad_norm"] == 0.0
    assert r["step"] == 1 and r["actor_step"] == 3
    assert r["rng_restored"]  # torch and tracker (tp / ep) RNG states come back with the checkpoint
    assert all(a == b for a, b in r["lr"])
    # cosine after one warmup step over 5 steps (megatron: warmup from 0 at step 0): the resumed
    # steps 2 and 3 use lr(1) = 1e-3 and lr(2) = 1e-3 * (1 + cos(pi / 4)) / 2
    assert r["lr"][0][0] == pytest.approx(1e-3)
    assert r["lr"][1][0] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)


def test_optimizer_resumes_at_another_layout_when_reshardable(l2):
    """Saved at tp=2 (dp=1), resumed at dp=2 (tp=1), Adam with the distributed optimizer."""
    full = ok(l2, "reshard_full")
    assert full["optimizer_loaded"] and full["after"]["n"] >= 10
    assert full["after"]["max"] < TOL  # moments, step count and LR schedule came across
    assert full["lr"][0] == full["lr"][1]
    dp = ok(l2, "reshard_dp")  # dp_reshardable: weights resume, the optimizer starts fresh
    assert not dp["optimizer_loaded"] and dp["after"]["max"] > 1e-4
    regular = ok(l2, "reshard_regular")  # a regular optimizer's state is per parameter: tp2 -> pp2
    assert regular["optimizer_loaded"] and regular["after"]["max"] < TOL


def test_kill9_during_save_keeps_previous_checkpoint(l1, l2):
    assert "ckpt_crash" not in l1, l1.get("ckpt_crash")  # the process died inside the save
    r = ok(l2, "after_crash_tp2")
    assert r["latest"] == "step_00000001" and r["step"] == 1
    assert r["cursor"] == {"index": 1}
    assert r["tmp_left"] == [".tmp-step_00000002"]  # the killed save never got published
    assert r["logp"] < TOL
