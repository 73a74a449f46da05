"""Every loss mode at every layout the actor supports equals one process (issue 15).

loss_agg token-mean, seq-mean-token-sum, seq-mean-token-mean and Dr. GRPO's constant normaliser
(seq-mean-token-sum-norm), with BOTH loss implementations (algorithm.loss_impl fused | torch,
chosen through the config), at TP2+SP, PP2+VPP2, uneven DP2, CP2 (the CPU twin's mask path),
MoE EP2 and TP2xPP2: the loss, the metrics and every gradient of one step within 1e-5 of the
single-process torch reference. The batch and the micro-batch budget are chosen so that the
layouts really hit the hard cases: DP2 ranks get 2 and 1 micro-batches (an empty one is padded
in), PP2+VPP2 rounds 3 micro-batches up to 4, and on CP2 short sequences sit wholly on one rank.
At TP2+SP (and PP2+VPP2 for KL) the same holds for the KL term against reference log-probs
(k3, k1), GSPO, CISPO and truncated-IS weights.

Three torchrun launches (loss_modes_worker.py; each check builds the actor once per layout and
loss implementation, and skips the optimizer step so that all variants share the weights).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_actor_dist import launch, ok  # noqa: E402

pytestmark = [pytest.mark.megatron, pytest.mark.dist, pytest.mark.slow]
pytest.importorskip("megatron.core", reason="megatron-core is not installed")

WORKER = Path(__file__).with_name("loss_modes_worker.py")
TOL = 1e-5
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
EXTRA = ["kl_k3", "kl_k1", "gspo", "cispo", "tis"]
IMPLS = ["torch", "fused"]
LAYOUTS_2P = {
    "tp2_sp": dict(model="dense", lay={"tp": 2, "sequence_parallel": True}, variants=MODES + EXTRA),
    "pp2_vpp2": dict(model="dense", lay={"pp": 2, "vpp": 2}, variants=MODES + ["kl_k3"]),
    "dp2_uneven": dict(model="dense", lay={}, variants=MODES),
    "cp2": dict(model="dense", lay={"cp": 2}, variants=MODES + ["tis"]),
    "ep2": dict(model="moe", lay={"ep": 2}, variants=MODES),
}
LAYOUTS_4P = {
    "tp2_pp2": dict(model="dense", lay={"tp": 2, "pp": 2, "sequence_parallel": True}, variants=MODES),
}


def _launch(nproc, checks, workdir, name):
    return launch(nproc, checks, workdir, name, worker=WORKER)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loss_modes")


@pytest.fixture(scope="module")
def refs(workdir) -> dict:
    checks = [{"name": "ref_dense", "kind": "lm_reference", "args": {"model": "dense", "variants": MODES + EXTRA}},
              {"name": "ref_moe", "kind": "lm_reference", "args": {"model": "moe", "variants": MODES}},
              {"name": "refpolicy_1p", "kind": "lm_reference_policy", "args": {"lay": {}}}]
    return _launch(1, checks, workdir, "lm1")


def _parity_checks(layouts):
    return [{"name": f"{name}_{impl}", "kind": "lm_parity",
             "args": {"model": a["model"], "lay": a["lay"], "impl": impl, "variants": a["variants"]}}
            for name, a in layouts.items() for impl in IMPLS]


REFPOLICY_2P = {"refpolicy_tp2": {"tp": 2}, "refpolicy_pp2": {"pp": 2}}


@pytest.fixture(scope="module")
def two(workdir, refs) -> dict:
    checks = _parity_checks(LAYOUTS_2P)
    checks += [{"name": n, "kind": "lm_reference_policy", "args": {"lay": lay}} for n, lay in REFPOLICY_2P.items()]
    return _launch(2, checks, workdir, "lm2")


@pytest.fixture(scope="module")
def four(workdir, refs) -> dict:
    return _launch(4, _parity_checks(LAYOUTS_4P), workdir, "lm4")


def test_references_are_distinct_per_mode(refs):
    """The modes really differ (a parity that cannot tell them apart would prove nothing)."""
    m = ok(refs, "ref_dense")["metrics"]
    losses = [m[v]["loss"] for v in MODES + EXTRA]
    assert len({round(x, 6) for x in losses}) == len(losses), losses
    assert m["token-mean"]["clip_fraction"] > 0 and m["kl_k3"]["kl"] > 0
    assert ok(refs, "ref_moe")["finite"]


def _assert_parity(r: dict, variants: list, impl: str) -> None:
    assert r["logp"] < TOL and r["entropy"] < TOL
    assert r["impl"] == impl
    for v in variants:
        x = r[v]
        for key, d in x.items():
            if key.startswith("metric_"):
                assert d < TOL, (v, key, d)
        g = x["grads"]
        assert g["n"] >= 8 and not g["only_a"] and not g["only_b"], (v, g)
        assert g["max"] < TOL, (v, g)
        assert x["loss_impl_fused"] == (1.0 if impl == "fused" else 0.0)
    # the implementation the config chose is the one every training loss went through
    other = "torch" if impl == "fused" else "fused"
    assert r["calls"][impl] > 0 and r["calls"][other] == 0, r["calls"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(LAYOUTS_2P))
def test_loss_modes_2proc(two, name, impl):
    r = ok(two, f"{name}_{impl}")
    _assert_parity(r, LAYOUTS_2P[name]["variants"], impl)
    if name == "dp2_uneven":
        assert r["empty_micro_batches"] >= 1  # one DP rank padded with an empty micro-batch
    if name == "pp2_vpp2":
        assert r["empty_micro_batches"] >= 1  # 3 micro-batches rounded up to 4
    if name == "cp2":
        assert r["cp_missing_sequences"] >= 1  # a CP rank without a token of some sequence


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(LAYOUTS_4P))
def test_loss_modes_4proc(four, name, impl):
    _assert_parity(ok(four, f"{name}_{impl}"), LAYOUTS_4P[name]["variants"], impl)


@pytest.mark.parametrize("name", ["refpolicy_1p", "refpolicy_tp2", "refpolicy_pp2"])
def test_kl_reference_policy_is_the_frozen_start(refs, two, name):
    r = ok(refs if name.endswith("1p") else two, name)
    assert r["impl"] == "fused"  # the config's default
    assert r["start_vs_single"] < TOL          # same starting weights as the single-process run
    assert r["moved"] > 1e-4                   # the step moved the policy ...
    assert r["ref_vs_start"] == 0.0            # ... not the reference: exactly the start
    assert r["restored"] == 0.0                # the trained weights come back bit for bit
    assert r["kl_step1"] == pytest.approx(0.0, abs=1e-7)  # policy == reference at the start
    assert r["kl_step2"] > 1e-6 and r["kl_step2"] == pytest.approx(r["kl_hand"], rel=1e-4, abs=1e-7)
