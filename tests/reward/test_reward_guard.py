"""The audit-hook guard, in a throw-away interpreter (a hook cannot be removed once installed)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    r"""
    import json, marshal, os, subprocess, sys
    import sympy
    from megatron_denoise.reward import guard

    marker = sys.argv[1]
    out = {}

    def attempt(name, fn):
        before = guard.blocked_count()
        try:
            fn()
            out[name] = "ran"
        except guard.GuardViolation:
            out[name] = "blocked"
        except Exception as e:  # a library may wrap the violation
            out[name] = "blocked" if guard.blocked_count() > before else "raised " + type(e).__name__

    # Before install nothing is blocked.
    attempt("eval_before", lambda: eval("1+1"))
    guard.install()
    inj = "__import__('os').system('touch " + marker + "')"
    attempt("sympify_injection", lambda: sympy.sympify(inj))
    attempt("parse_expr_injection", lambda: sympy.parse_expr(inj))
    attempt("eval", lambda: eval("1+1"))
    attempt("exec", lambda: exec("x = 1"))
    attempt("compile_exec_mode", lambda: compile("import os", "<string>", "exec"))
    attempt("os_system", lambda: os.system("touch " + marker))
    attempt("subprocess", lambda: subprocess.run(["touch", marker]))
    attempt("open_write", lambda: open(marker, "w"))
    attempt("os_remove", lambda: os.remove(marker))
    attempt("marshal_user", lambda: marshal.loads(marshal.dumps(compile("1", "f.py", "eval"))))
    attempt("fake_integer_shape", lambda: eval("Integer (1 );__import__('os')"))
    # What sympy legitimately does keeps working under the guard:
    attempt("sympify_number", lambda: sympy.sympify("123"))
    attempt("sympify_float", lambda: sympy.Number("1.25"))
    x1, x2, x3, x4, x5 = sympy.symbols("x1:6")
    attempt("polys_codegen", lambda: sympy.cancel((x1*x2*x3*x4*x5 + x1)/(x1*x5)))
    attempt("new_import", lambda: __import__("wave"))          # builds namedtuples at import
    import collections, dataclasses
    attempt("namedtuple", lambda: collections.namedtuple("P", "a b")(1, 2))
    attempt("dataclass", lambda: dataclasses.make_dataclass("D", ["a", "b"])(1, 2))
    attempt("open_read", lambda: open(sympy.__file__).read(10))
    out["blocked_total"] = guard.blocked_count()
    print(json.dumps(out))
    """
)


def test_guard_blocks_code_execution_and_allows_sympy(tmp_path):
    marker = tmp_path / "pwned_guard"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(marker)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    blocked = ["sympify_injection", "parse_expr_injection", "eval", "exec", "compile_exec_mode",
               "os_system", "subprocess", "open_write", "os_remove", "marshal_user", "fake_integer_shape"]
    allowed = ["eval_before", "sympify_number", "sympify_float", "polys_codegen", "new_import",
               "namedtuple", "dataclass", "open_read"]
    assert {k: out[k] for k in blocked} == {k: "blocked" for k in blocked}
    assert {k: out[k] for k in allowed} == {k: "ran" for k in allowed}
    assert out["blocked_total"] >= len(blocked)
    assert not marker.exists()
