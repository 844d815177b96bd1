#!/usr/bin/env bash
# Run the test suite as on a machine that has none of the optional parts, to prove that
# every test depending on one skips cleanly instead of failing.
#
#   bash deploy/test_without_optional.sh [pytest args...]
#
# Optional Python packages: a separate venv (.venv-minimal) holds rtagger with only the
# `train` extra (the training code the suite tests) and the test runner (pytest,
# hypothesis): no onnx/onnxruntime, librosa, jsonschema or playwright.
# Optional system packages: inside a private mount namespace (needs root and util-linux's
# unshare), the programs mma, fluidsynth, chromium and the PulseAudio tools are replaced by
# a non-executable file, and the soundfont, MMA and game-music folders by empty ones. The
# rest of the machine is untouched; nothing is uninstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-minimal
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" >/dev/null 2>&1 || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[train]" pytest hypothesis

if [ "$(id -u)" -ne 0 ] || ! command -v unshare >/dev/null 2>&1; then
  echo "test_without_optional: needs root and unshare to hide system packages" >&2
  exit 2
fi

exec unshare --mount --propagation private bash -s "$VENV" "$@" <<'EOF'
set -euo pipefail
VENV=$1; shift
for dir in /usr/share/sounds /usr/share/mma /usr/share/games /usr/share/soundfonts; do
  [ -d "$dir" ] && mount -t tmpfs none "$dir"
done
for prog in mma fluidsynth chromium pulseaudio paplay pactl parec pacat; do
  path=$(command -v "$prog" || true)
  [ -n "$path" ] && mount --bind /dev/null "$path"
done
for prog in mma fluidsynth chromium pulseaudio paplay; do
  if [ -x "$(command -v "$prog" || true)" ]; then
    echo "test_without_optional: failed to hide $prog" >&2
    exit 2
  fi
done
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
EOF
