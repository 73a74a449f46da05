"""An audit-hook sandbox for the verifier workers: model text can never become executed code.

Why this exists. math-verify's LaTeX path (latex2sympy2_extended) turns every number token into a
sympy number with `sympy.Number("123")`, which goes through `sympify` -> `parse_expr` -> Python
`eval` of generated source such as `Integer (123 )`. Its expression path (`ExprExtractionConfig`)
calls `parse_expr` on regex-extracted text. We never use the expression path, and the lexer only
emits digit tokens into `Number(...)`, so model text should not reach `eval`; this guard makes
that a checked invariant instead of a hope.

How. `install()` adds a `sys.addaudithook` hook (PEP 578) in the worker process, after the
worker has imported and warmed up math-verify. From then on:
- `compile` of source from a non-file origin (`<string>`, which is what eval/exec/parse_expr use)
  is allowed only when the source is one of the tiny shapes sympy's number parsing generates
  (`from sympy import *`, `Integer (123 )`, `Float ('1.5' )`); anything else is blocked.
  Compiles with a real `*.py` filename are module imports and are allowed.
- `exec` of a code object that does not come from a `*.py` file is allowed only when it names
  nothing but sympy's number constructors.
- process creation (`os.system`, `os.exec*`, `os.spawn*`, `os.posix_spawn`, `os.fork*`,
  `subprocess.Popen`, `pty.spawn`), sockets, ctypes, code-object construction, `marshal.loads`,
  file writes/removals/renames and signals to other processes are blocked.
A blocked event raises `GuardViolation` (a BaseException, so math-verify's `except Exception`
handlers cannot swallow it) from inside the audited call, i.e. BEFORE the operation happens,
and is counted. Audit hooks cannot be removed, which is what we want in a worker.

Stdlib only; importing this module does nothing until `install()` is called.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Optional

# Exactly the sources sympy's `sympify("<digits>")` compiles, as observed on all of MATH-500
# (sympy 1.14): a star import of sympy into the eval namespace, then one number constructor.
_ALLOWED_SOURCE = re.compile(
    r"from sympy import \*"
    r"|Integer \(\d+ \)"
    r"|Float \('(?:\d+\.?\d*|\.\d+)' \)"
)
_ALLOWED_NAMES = frozenset({"sympy", "Integer", "Float"})

# Audit events that must never happen while judging an answer (prefix match on the event name).
_BLOCKED_PREFIXES = (
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "subprocess.", "pty.spawn", "socket.", "ctypes.", "code.__new__", "marshal.loads",
    "os.remove", "os.unlink", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod",
    "os.chown", "os.symlink", "os.link", "os.kill", "os.killpg", "shutil.", "urllib.",
    "webbrowser.", "sys.remote_exec", "os.startfile", "winreg.",
)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class GuardViolation(BaseException):
    """Raised inside a guarded worker when model-controlled input tries to run code or touch the OS."""


class _State:
    installed = False
    blocked = 0                 # attempts blocked since install
    last_event: Optional[str] = None


def _source_text(src: Any) -> Optional[str]:
    if isinstance(src, str):
        return src
    if isinstance(src, (bytes, bytearray)):
        try:
            return bytes(src).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None  # an AST object or something else: not one of ours


def _is_file_origin(filename: Any) -> bool:
    # Module imports compile/exec code whose filename is the module's .py path.
    if isinstance(filename, bytes):
        filename = filename.decode("utf-8", "replace")
    # Frozen stdlib modules (`<frozen zipimport>`) are imports too.
    return isinstance(filename, str) and (filename.endswith(".py") or filename.startswith("<frozen "))


def _block(event: str) -> None:
    _State.blocked += 1
    _State.last_event = event
    raise GuardViolation(f"blocked audit event {event!r}")


def _hook(event: str, args: tuple) -> None:
    if event == "compile":
        src, filename = args[0], args[1]
        if _is_file_origin(filename):
            return
        text = _source_text(src)
        if text is not None and _ALLOWED_SOURCE.fullmatch(text.strip()):
            return
        _block("compile")
    elif event == "exec":
        code = args[0]
        filename = getattr(code, "co_filename", None)
        if _is_file_origin(filename):
            return
        names = set(getattr(code, "co_names", ()) or ())
        if filename == "<string>" and names <= _ALLOWED_NAMES:
            return
        _block("exec")
    elif event == "open":
        # args: (path, mode, flags); reads (imports, data files) are fine, writes are not.
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        ):
            _block("open-for-write")
    elif event.startswith(_BLOCKED_PREFIXES):
        _block(event)


def install() -> None:
    """Install the guard in this process (idempotent). Call after all imports and warm-up."""
    if not _State.installed:
        sys.addaudithook(_hook)
        _State.installed = True


def installed() -> bool:
    return _State.installed


def blocked_count() -> int:
    """Number of blocked attempts since `install()`."""
    return _State.blocked


def last_blocked_event() -> Optional[str]:
    return _State.last_event
