#!/usr/bin/env bash
# Idempotent set-up shared by scripts/demo.sh and scripts/test.sh: a virtual environment,
# the dependencies, and the editable install with its native extension.
#
# * Fresh CPU machine (no torch): a plain venv; torch 2.13.0 (CPU wheel) and the rest from PyPI.
# * GPU machine with torch preinstalled and no registry: a venv that sees the system
#   site-packages, so nothing is downloaded (PIP_NO_INDEX=1: a missing required package fails
#   at once, with its name, instead of hanging on an unreachable index; missing optional ones
#   are reported as skipped); the extension is rebuilt against that torch.
# Re-running does nothing unless setup.py, pyproject.toml or csrc/ changed (then it rebuilds).
# `setup.sh --probe` only reports what it would do (used by `gpu_check.sh --dry-run`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${RCAR_FAST_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_PIN="torch==2.13.0"
TRITON_PIN="triton==3.8.0"   # CPU only: the interpreter runs the Triton kernel tests
# import name:package. REQUIRED: the package, its build and its tests. OPTIONAL: what the
# documented extras use (nltk: vocabularies of `rcar-fast eval`; hypothesis: property tests;
# matplotlib, nvidia-ml-py: benchmark plots and GPU facts; ruff: the lint in scripts/test.sh).
# A fresh machine installs both; a preinstalled-torch machine without an index skips OPTIONAL.
REQUIRED="numpy:numpy tqdm:tqdm pytest:pytest pytest_benchmark:pytest-benchmark ninja:ninja
          pybind11:pybind11 setuptools:setuptools wheel:wheel"
OPTIONAL="nltk:nltk hypothesis:hypothesis matplotlib:matplotlib pynvml:nvidia-ml-py ruff:ruff"
PROBE=0
[ "${1:-}" = "--probe" ] && PROBE=1

cd "$ROOT"
TORCH_PREINSTALLED=0
if [ -x "$VENV/bin/python" ]; then
  PROBE_PY="$VENV/bin/python"
else
  PROBE_PY="$PYTHON"
fi
"$PROBE_PY" -c "import torch" 2>/dev/null && TORCH_PREINSTALLED=1
if [ "$TORCH_PREINSTALLED" = 1 ] && [ -z "${PIP_NO_INDEX+x}" ]; then
  export PIP_NO_INDEX=1
fi

missing_in() {  # missing_in PYTHON "mod:pkg ..." -> the missing packages' names
  local py=$1 mod_pkg
  for mod_pkg in $2; do
    "$py" -c "import ${mod_pkg%%:*}" 2>/dev/null || printf '%s ' "${mod_pkg#*:}"
  done
}

if [ "$PROBE" = 1 ]; then
  echo "[setup --probe] python: $("$PROBE_PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  echo "[setup --probe] venv: $VENV ($([ -x "$VENV/bin/python" ] && echo exists || echo 'would be created'))"
  echo "[setup --probe] torch preinstalled: $([ "$TORCH_PREINSTALLED" = 1 ] && echo "yes (PIP_NO_INDEX=${PIP_NO_INDEX:-})" || echo no)"
  echo "[setup --probe] missing required: $(missing_in "$PROBE_PY" "$REQUIRED")"
  echo "[setup --probe] missing optional: $(missing_in "$PROBE_PY" "$OPTIONAL")"
  echo "[setup --probe] nvcc: $(command -v nvcc || echo 'not found (CUDA kernels not built)')"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  if [ "$TORCH_PREINSTALLED" = 1 ]; then
    echo "[setup] torch found on $("$PYTHON" -c 'import sys; print(sys.executable)'): venv with system site-packages"
    # A python that is itself a venv (/opt/torch/.venv on the GPU image) may have no ensurepip:
    # then the venv gets no pip of its own and uses the parent's, through the .pth below.
    if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' || ! "$PYTHON" -c "import ensurepip" 2>/dev/null; then
      "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
    else
      "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
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

python -m pip --version >/dev/null 2>&1 || {
  echo "[setup] no pip in $VENV (nor in the environment it extends): install pip there" >&2; exit 1; }

pip_install() {  # (pip's "Location ... is ignored" lines come from this machine's mirror config: noise)
  python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
read -r -a missing <<< "$(missing_in python "$REQUIRED")"
python -c "import torch" 2>/dev/null || missing+=("$TORCH_CPU_PIN")
python -c "import triton" 2>/dev/null || missing+=("$TRITON_PIN")
read -r -a optional <<< "$(missing_in python "$OPTIONAL")"
if [ "$TORCH_PREINSTALLED" = 0 ]; then
  missing+=("${optional[@]}")  # a fresh machine gets every documented feature
  optional=()
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing: ${missing[*]}"
  pip_install "${missing[@]}" || {
    if [ "${PIP_NO_INDEX:-}" = 1 ]; then
      echo "[setup] missing required packages: ${missing[*]}; PIP_NO_INDEX=1 (torch is preinstalled, so no" \
           "package index is assumed): install them into $PYTHON's environment, or run with PIP_NO_INDEX=0" >&2
    else
      echo "[setup] pip install failed: ${missing[*]}" >&2
    fi
    exit 1; }
fi
skipped=()
for pkg in "${optional[@]}"; do  # one at a time: whatever a local wheel folder offers still installs
  if pip_install "$pkg" >/dev/null 2>&1; then echo "[setup] installed (optional): $pkg"; else skipped+=("$pkg"); fi
done
[ ${#skipped[@]} -eq 0 ] || echo "[setup] skipped (optional; not installed and not installable here): ${skipped[*]}"

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
