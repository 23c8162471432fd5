#!/usr/bin/env bash
# Installs a real Label Studio 1.23.x into its own virtualenv (default: <repo>/.ls-venv) for the
# integration tests. Idempotent: a venv that already runs `label-studio --version` 1.23.x is kept.
# Usage: scripts/setup_label_studio.sh [VENV_DIR]      (env LS_VERSION overrides the pinned version)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LS_VENV="${1:-${SURGENET_ASSIST_LS_VENV:-$ROOT/.ls-venv}}"
LS_VERSION="${LS_VERSION:-1.23.2}"
PYTHON="${PYTHON:-python3}"
STAMP="$LS_VENV/.surgenet-ls-$LS_VERSION"

if [[ -f "$STAMP" && -x "$LS_VENV/bin/label-studio" ]]; then
  echo "Label Studio $LS_VERSION already installed in $LS_VENV"
  exit 0
fi
"$PYTHON" -m venv "$LS_VENV"
"$LS_VENV/bin/python" -m pip install -q --upgrade pip
"$LS_VENV/bin/python" -m pip install -q "label-studio==$LS_VERSION"
# --help creates ~/.local/share/label-studio unless a data dir is given: point it at a throwaway dir.
LABEL_STUDIO_BASE_DATA_DIR="$(mktemp -d)" "$LS_VENV/bin/python" -c \
  "import importlib.metadata as m; v = m.version('label-studio'); assert v == '$LS_VERSION', v; print('label-studio', v)"
touch "$STAMP"
echo "Label Studio $LS_VERSION installed in $LS_VENV"
