#!/usr/bin/env bash
# Sets up (idempotent) and runs the test suite. Extra arguments go to pytest.
# Without a GPU, Triton kernels run in triton's CPU interpreter and GPU-only tests skip.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
PY="${RCAR_FAST_VENV:-$ROOT/.venv}/bin/python"
# Lint first (pyproject.toml: pyflakes + bugbear), where ruff is installed: the GPU image has none.
if "$PY" -c "import ruff" 2>/dev/null; then
  "$PY" -m ruff check .
else
  echo "[test] ruff is not installed here: lint skipped"
fi
# pytest exits 5 when nothing ran: under `set -e` that fails the command, as it should.
exec "$PY" -m pytest -q "$@"
