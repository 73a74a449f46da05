"""Static checks of slurm/*.sbatch that need no Slurm: syntax, the shared block, documented env."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + sorted((SLURM_DIR / "local").glob("*.sh"))
BEGIN, END = "# --- common: begin", "# --- common: end"


def _common(text: str) -> str:
    b = text.index(BEGIN)
    return text[b: text.index("\n", text.index(END)) + 1]


def _header(text: str) -> str:
    """The leading comment block (the script's documentation)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            lines.append(line)
        else:
            break
    return "\n".join(lines)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_expected_scripts_exist():
    names = {p.name for p in SLURM_DIR.glob("*.sbatch")}
    assert {"train.sbatch", "convert.sbatch", "evaluate.sbatch", "prepare_data.sbatch"} <= names


def test_common_block_is_identical_everywhere():
    blocks = {p.name: _common(p.read_text()) for p in SLURM_DIR.glob("*.sbatch")}
    ref = blocks["train.sbatch"]
    differ = [n for n, b in blocks.items() if b != ref]
    assert not differ, f"the common block of {differ} differs from train.sbatch's: copy it over"


@pytest.mark.parametrize("script", sorted(SLURM_DIR.glob("*.sbatch")), ids=lambda p: p.name)
def test_every_env_variable_read_is_documented(script):
    text = script.read_text()
    header = _header(text)
    body = text[len(header):]
    code = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))
    read = set(re.findall(r"\bMDN_[A-Z_]+\b", code))
    documented = set(re.findall(r"^#\s+(MDN_[A-Z_]+)\s", header, re.M))
    assert read <= documented, f"{script.name} reads undocumented variables: {sorted(read - documented)}"
    assert documented <= read, f"{script.name} documents variables it never reads: {sorted(documented - read)}"


@pytest.mark.parametrize("script", sorted(SLURM_DIR.glob("*.sbatch")), ids=lambda p: p.name)
def test_no_hyperparameters_in_scripts(script):
    """Scripts take a config and overrides; they must not pin training settings themselves."""
    code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    keys = ("trainer.", "optimizer.", "denoise.", "algorithm.", "data.", "rollout.", "parallel.", "model.")
    offending = [line for line in code if any(re.search(rf"\b{re.escape(k)}\w+=", line) for k in keys)]
    assert not offending, offending
