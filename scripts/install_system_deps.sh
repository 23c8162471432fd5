#!/usr/bin/env bash
# System packages the GUI tests need (a virtual X server and the Qt/OpenGL libraries napari loads).
# Idempotent: does nothing when they are present. Needs root (or passwordless sudo) to install.
set -euo pipefail
PKGS=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-image0 libxcb-randr0
      libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libegl1 libgl1 libgl1-mesa-dri libdbus-1-3 libfontconfig1)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { echo "system packages for the GUI tests: present"; exit 0; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "WARNING: cannot install ${missing[*]} without root; the napari GUI tests will be skipped" >&2; exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
