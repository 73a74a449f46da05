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
  is allowed only for source that libraries generate themselves, as observed over MATH-500
  (answers right and wrong) and lazy imports: the shapes of sympy's number parsing
  (`from sympy import *`, `Integer (123 )`, `Float ('1.5' )`, checked on the source, since
  `parse_expr` is the function that could see text), and a short table of trusted generators
  identified by the calling function (`sympy.polys.monomials.MonomialOps._build`, whose source is
  also checked token by token; `collections.namedtuple`; `dataclasses._create_fn`; `ast.parse`,
  which yields an AST only). Anything else is blocked. A `*.py` filename means a module import.
- `exec` of a code object that does not come from a module file is allowed only when it names
  nothing but sympy's number constructors, or when a trusted generator runs it.
- `marshal.loads` is allowed for the import system only (loading a module's cached bytecode).
- process creation (`os.system`, `os.exec*`, `os.spawn*`, `os.posix_spawn`, `os.fork*`,
  `subprocess.Popen`, `pty.spawn`), sockets, ctypes, code-object construction,
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

# Trusted code generators: library functions that compile source they build themselves (never
# from answer text), as met while judging MATH-500 answers or importing modules lazily.
# (file suffix, function) -> a check of the generated source (None: the caller is enough).
_MONOMIAL_CHARS = re.compile(r"[\sA-Za-z0-9_(),:=<>+\-*]*")
_MONOMIAL_TOKEN = re.compile(r"[A-Za-z_]\w*")
_MONOMIAL_WORD = re.compile(r"def|return|if|else|None|A|B|k|[abr]\d+|monomial_[a-z]+")


def _monomial_source(text: Optional[str]) -> bool:
    # sympy.polys.monomials.MonomialOps._build: `def monomial_mul(A, B):\n    (a0, a1,) = A ...`
    # per number of generators: only its own identifiers, no quotes, dots or brackets.
    return (text is not None and _MONOMIAL_CHARS.fullmatch(text) is not None
            and all(_MONOMIAL_WORD.fullmatch(t) for t in _MONOMIAL_TOKEN.findall(text)))


_TRUSTED_GENERATORS = {
    (os.path.join("sympy", "polys", "monomials.py"), "_build"): _monomial_source,
    (os.path.join("collections", "__init__.py"), "namedtuple"): None,   # __new__ of a namedtuple
    ("dataclasses.py", "_create_fn"): None,                              # __init__/__repr__/...
    ("ast.py", "parse"): None,                                           # source -> AST only
}


def _trusted_generator(caller: tuple[str, str], text: Optional[str], check_text: bool) -> bool:
    for (suffix, func), check in _TRUSTED_GENERATORS.items():
        if caller[1] == func and caller[0].endswith(suffix):
            return check is None or not check_text or check(text)
    return False


# Audit events that must never happen while judging an answer (prefix match on the event name).
_BLOCKED_PREFIXES = (
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "subprocess.", "pty.spawn", "socket.", "ctypes.", "code.__new__",
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


def _caller() -> tuple[str, str]:
    """(file, function) of the Python code that triggered the audited operation."""
    # Frame 0 is this function, 1 the hook, 2 the code that called exec/compile/marshal.
    try:
        f = sys._getframe(2)
    except ValueError:  # triggered from C with no Python caller: trust nothing
        return "", ""
    return f.f_code.co_filename, f.f_code.co_name


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
        if _trusted_generator(_caller(), text, check_text=True):
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
        # The code object of a trusted generator: its source was checked at compile time.
        if _trusted_generator(_caller(), None, check_text=False):
            return
        _block("exec")
    elif event == "marshal.loads":
        if not _caller()[0].startswith("<frozen importlib"):
            _block(event)
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
        # A late import must not try to write its bytecode cache: that write would be blocked.
        sys.dont_write_bytecode = True
        sys.addaudithook(_hook)
        _State.installed = True


def installed() -> bool:
    return _State.installed


def blocked_count() -> int:
    """Number of blocked attempts since `install()`."""
    return _State.blocked


def last_blocked_event() -> Optional[str]:
    return _State.last_event
