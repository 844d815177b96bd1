#!/usr/bin/env bash
# Set up rtagger in ./.venv on a fresh machine; safe to re-run (skips what is done).
#
#   bash deploy/bootstrap.sh          runtime: rtagger + torch (+ libportaudio2 when root)
#   bash deploy/bootstrap.sh --dev    also the test tools and the system packages the
#                                     test suite uses (MMA, FluidSynth, soundfonts)
#
# On machines without an NVIDIA driver, torch is pinned to the CPU build 2.13.0 so pip never
# pulls a multi-GB CUDA build; with a driver, pip's default (CUDA) torch is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "usage: bash deploy/bootstrap.sh [--dev]" >&2; exit 2 ;;
  esac
done

APT_RUNTIME=(libportaudio2)
APT_DEV=(mma fluidsynth fluid-soundfont-gm timgm6mb-soundfont pulseaudio pulseaudio-utils
         libasound2-plugins chromium fonts-dejavu-core)
PYTHON=${PYTHON:-python3}
VENV=.venv

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: not root; please install: sudo apt-get install ${missing[*]}" >&2
    return 0
  fi
  echo "bootstrap: apt-get install ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if command -v apt-get >/dev/null 2>&1; then
  apt_install "${APT_RUNTIME[@]}"
  if [ "$DEV" -eq 1 ]; then
    apt_install "${APT_DEV[@]}"
    # MMA needs its groove database built once after installation.
    if command -v mma >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] \
        && ! ls /usr/share/mma/lib/stdlib/.mmaDB >/dev/null 2>&1; then
      mma -G >/dev/null 2>&1 || echo "bootstrap: 'mma -G' failed" >&2
    fi
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

EXTRAS="onnx,train"
[ "$DEV" -eq 1 ] && EXTRAS="dev,onnx,train"
# Re-install only when the project's requirements changed since the last run.
stamp="$VENV/.rtagger-bootstrap"
want="$(sha256sum pyproject.toml | cut -c1-16) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "${PIP[@]}" torch
    else
      "${PIP[@]}" torch==2.13.0
    fi
  fi
  "${PIP[@]}" -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
echo "bootstrap: ready ($VENV, extras: $EXTRAS)" >&2
