#!/usr/bin/env bash
# Regenerates the click-to-mask pictures of docs/napari.md and docs/interactive.md:
# docs/images/interactive_napari_clicks.png (clicks + live preview) and interactive_napari_accepted.png.
# They are taken by the screenshot test in a real napari viewer (pytest-xvfb starts the X server; needs the
# packages of scripts/install_system_deps.sh) on the synthetic sample clip with the untrained backbone.
set -euo pipefail
cd "$(dirname "$0")/.."
SURGENET_NAPARI_ARTIFACTS=docs/images NAPARI_ASYNC=0 \
  .venv/bin/python -m pytest -q tests/test_napari_interactive.py -k screenshots "$@"
ls -l docs/images/interactive_napari_clicks.png docs/images/interactive_napari_accepted.png
