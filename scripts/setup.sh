#!/usr/bin/env bash
# Idempotent set-up shared by scripts/demo.sh and scripts/test.sh: a virtual environment,
# the dependencies, and the editable install with its native extension.
#
# * Fresh CPU machine (no torch): a plain venv; torch 2.13.0 (CPU wheel) and the rest from PyPI.
# * GPU machine with torch preinstalled and no registry: a venv that sees the system
#   site-packages, so nothing is downloaded; the extension is rebuilt against that torch.
# Re-running does nothing unless setup.py, pyproject.toml or csrc/ changed (then it rebuilds).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${RCAR_FAST_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_PIN="torch==2.13.0"
TRITON_PIN="triton==3.8.0"   # CPU only: the interpreter runs the Triton kernel tests

cd "$ROOT"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[setup] torch found on $("$PYTHON" -c 'import sys; print(sys.executable)'): venv with system site-packages"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    # If that python is itself a virtual environment (e.g. /opt/torch/.venv on the GPU image),
    # --system-site-packages only reaches its base interpreter: point a .pth file at its
    # site-packages too, after the new venv's own, so torch and friends are found.
    parent_sites=$("$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')
    if [ -n "$parent_sites" ]; then
      venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      printf '%s\n' "$parent_sites" > "$venv_site/_rcar_fast_parent_env.pth"
    fi
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

missing=()
python -c "import torch" 2>/dev/null || missing+=("$TORCH_CPU_PIN")
python -c "import triton" 2>/dev/null || missing+=("$TRITON_PIN")
for mod_pkg in numpy:numpy tqdm:tqdm pytest:pytest pytest_benchmark:pytest-benchmark \
               ninja:ninja pybind11:pybind11 setuptools:setuptools wheel:wheel; do
  python -c "import ${mod_pkg%%:*}" 2>/dev/null || missing+=("${mod_pkg#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing: ${missing[*]}"
  # (pip's "Location ... is ignored" lines come from this machine's mirror config: noise)
  python -m pip install -q "${missing[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[setup] pip install failed" >&2; exit 1; }
fi

# The editable install builds the extension once; afterwards only the native build reruns, and
# only when its inputs change (ninja rebuilds just the changed sources under build/).
install_stamp="$VENV/.rcar_fast_install_stamp"
build_stamp="$VENV/.rcar_fast_build_stamp"
install_key=$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
build_key=$( { python -c "import torch; print(torch.__version__)"; cat setup.py;
               find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) \
                 -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$install_stamp" 2>/dev/null)" != "$install_key" ]; then
  echo "[setup] installing rcar_fast in editable mode and building its native extension (minutes on 2 cores)"
  python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import rcar_fast._C" || { echo "[setup] the native extension did not build" >&2; exit 1; }
  echo "$install_key" > "$install_stamp"
  echo "$build_key" > "$build_stamp"
elif [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_key" ] || ! python -c "import rcar_fast._C" 2>/dev/null; then
  echo "[setup] rebuilding the native extension"
  python setup.py -q build_ext --inplace
  python -c "import rcar_fast._C" || { echo "[setup] the native extension did not build" >&2; exit 1; }
  echo "$build_key" > "$build_stamp"
fi
