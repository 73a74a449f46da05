#!/usr/bin/env bash
# The test command (README): installs the environment if needed, then runs the default test set.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k config`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/install.sh"
venv="${VENV:-$root/.venv}"
cd "$root"
set +e
"$venv/bin/python" -m pytest -ra "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected: that is a broken selection, not a pass.
if [ $rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit $rc
