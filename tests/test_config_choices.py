"""One source of truth for enumerated settings (issue 15).

Every enumerated field of the config is typed with a `schema.Choice` enum; the loader rejects any
other value, naming the key and every allowed value; config/ and core/ spell each allowed value
exactly once (its enum member), and the dispatch tables elsewhere that branch on a value have
exactly the schema's values as keys. Also: every shipped config's --dry-run says
`loss_impl: fused`, and the rho std check is the same (> 0) for the loader and the core.
"""
from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from megatron_denoise.config import schema
from megatron_denoise.config.loader import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "megatron_denoise"
CHOICES = [c for c in vars(schema).values()
           if isinstance(c, type) and issubclass(c, schema.Choice) and c is not schema.Choice]
# free-form str fields whose docs list keywords besides arbitrary text (a path, a name)
FREE_FORM = {"checkpoint.resume"}
# (file relative to megatron_denoise/, value): spellings of a Choice value that are NOT that enum
NOT_ENUM_USES = {("config/schema.py", "auto")}  # checkpoint.resume's default: "auto" | "none" | a path


def _choice_type(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    return tp if isinstance(tp, type) and issubclass(tp, schema.Choice) else None


def _leaf_fields(cls=schema.Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for fl in dataclasses.fields(cls):
        tp = hints[fl.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f"{prefix}{fl.name}.")
        else:
            yield f"{prefix}{fl.name}", tp, fl


ENUM_FIELDS = [(key, _choice_type(tp), fl) for key, tp, fl in _leaf_fields() if _choice_type(tp)]


def test_enumerated_fields_are_typed_in_the_schema():
    assert len(ENUM_FIELDS) >= 20
    untyped = []
    for key, tp, fl in _leaf_fields():
        doc = fl.metadata.get("doc", "")
        if tp is str and " | " in doc and key not in FREE_FORM:
            untyped.append(key)  # a doc listing alternatives on a plain str: an enumeration left untyped
    assert not untyped, f"enumerated but typed str: {untyped}"
    for key, choice, fl in ENUM_FIELDS:
        default = fl.default if fl.default is not dataclasses.MISSING else None
        assert default is None or (type(default) is str and default in choice.values()), (key, default)


@pytest.mark.parametrize("key,choice", [(k, c) for k, c, _ in ENUM_FIELDS], ids=[k for k, _, _ in ENUM_FIELDS])
def test_loader_rejects_other_values_naming_key_and_allowed(key, choice):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=bogus_value"], world_size=8, validate=False)
    want = f"{key} ('bogus_value') must be one of {', '.join(choice.values())}"
    assert any(want in e for e in err.value.errors), err.value.errors
    for v in choice.values():  # ... and accepts each allowed value as the plain string
        got = load_config(None, [f"{key}={v}"], world_size=8, validate=False)
        node = got
        for part in key.split("."):
            node = getattr(node, part)
        assert node == v and type(node) is str


def _string_constants(root: Path):
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield path.relative_to(PKG).as_posix(), node.lineno, node.value


def test_no_enumerated_value_is_spelled_twice_in_config_and_core():
    definers: dict[str, int] = {}
    for c in CHOICES:
        for v in c.values():
            definers[v] = definers.get(v, 0) + 1
    seen: dict[str, list] = {}
    for root in (PKG / "config", PKG / "core"):
        for rel, line, value in _string_constants(root):
            if value in definers and (rel, value) not in NOT_ENUM_USES:
                seen.setdefault(value, []).append(f"{rel}:{line}")
    twice = {v: where for v, where in seen.items() if len(where) != definers[v]}
    assert not twice, f"enumerated values spelled outside their enum member: {twice}"
    # every definition lives in schema.py
    assert all(w.startswith("config/schema.py:") for where in seen.values() for w in where)


def test_dispatch_tables_elsewhere_match_the_schema_types():
    """Places outside config/ and core/ that branch on an enumerated value by table."""
    from megatron_denoise.convert import tables
    from megatron_denoise.kernels import dispatch  # noqa: F401  (the kernel's own impl names are not config values)
    from megatron_denoise.megatron import logprobs, model

    assert set(model.FAMILIES) == set(schema.Family.values())
    assert set(model._DTYPES) == set(schema.DType.values())
    assert set(tables.FAMILIES) == set(schema.Family.values())
    assert set(logprobs.LOSS_IMPL_CALLS) == set(schema.LossImpl.values())
    from megatron_denoise.core import losses

    assert losses.LOSS_AGG_MODES == schema.LossAgg.values() and losses.KL_TYPES == schema.KLEstimator.values()


def test_rho_std_check_is_the_same_in_loader_and_core():
    from megatron_denoise.core.prefix import validate_rho_config

    over = ["denoise.rho.strategy=normal", "denoise.rho.std=0.0"]
    with pytest.raises(ConfigError, match=r"denoise.rho.std \(0.0\) must be > 0"):
        load_config(None, over, world_size=8)
    with pytest.raises(ValueError, match=r"denoise.rho.std \(0.0\) must be > 0"):
        validate_rho_config(schema.RhoConfig(strategy="normal", std=0.0))
    validate_rho_config(schema.RhoConfig(strategy="normal", std=1e-3))
    load_config(None, ["denoise.rho.strategy=normal", "denoise.rho.std=0.001"], world_size=8)


def _training_configs():
    """Every shipped RL training config (the SFT warm-start configs, with an `sft:` section, are
    launch.sft's and carry no RL loss)."""
    import yaml

    return [p for p in sorted((REPO / "configs").glob("*.yaml")) if "sft" not in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("path", _training_configs(), ids=lambda p: p.name)
def test_dry_run_of_every_shipped_config_shows_the_fused_loss(path):
    from megatron_denoise.launch import train

    cfg = load_config(path)
    out = train.dry_run(cfg, cfg.cluster.world_size)
    assert "loss_impl: fused" in out.splitlines()


def test_cross_field_loss_checks():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm.policy_loss=gspo", "parallel.context_parallel_size=2",
                           "algorithm.mismatch.seq_mask_low=2.0", "algorithm.mismatch.seq_mask_high=1.5",
                           "algorithm.mismatch.threshold=1.0"], world_size=8)
    text = "\n".join(err.value.errors)
    assert "algorithm.policy_loss=gspo needs whole sequences" in text
    assert "algorithm.mismatch.seq_mask_low (2.0) must be < algorithm.mismatch.seq_mask_high (1.5)" in text
    assert "algorithm.mismatch.threshold (1.0) must be > 1" in text
