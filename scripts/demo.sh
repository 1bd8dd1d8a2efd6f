#!/usr/bin/env bash
# Sets up (idempotent) and runs the main job: all-pairs similarity and retrieval recall on the
# embedded synthetic COCO-shaped set. Extra arguments go to `rcar-fast demo` (see --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${RCAR_FAST_VENV:-$ROOT/.venv}/bin/python" -m rcar_fast demo "$@"
