#!/usr/bin/env bash
# The prepared GPU check (rtagger.deploy.gpu_check): one call on a GPU machine, < 8 minutes.
#
#   bash deploy/gpu_check.sh [OUT_DIR] [more options]   default OUT_DIR: gpu-check-report
#   bash deploy/gpu_check.sh "$OUT" --budget-s 300       a shorter run
#
# Writes OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.md, rewritten after every section, so
# a run stopped at its limit still leaves what it measured. Uses ./.venv when there is one,
# else $PYTHON or python3 (a GPU image's torch). When that Python cannot import rtagger, the
# repository is installed without dependencies and without the network into a temporary
# folder on PYTHONPATH (nothing is installed into the Python itself). GPU_CHECK_TIMEOUT_S
# (default 470) is a hard stop around the whole run. `python -P`: the checkout's rtagger/
# folder must not shadow the installed package (which holds rtagger.train and .deploy).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-gpu-check-report}
[ $# -gt 0 ] && shift

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! "$PYTHON" -P -c "import rtagger.deploy.gpu_check" >/dev/null 2>&1; then
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/rtagger-site.XXXXXX")
  echo "rtagger is not importable by $PYTHON; installing it (no deps, offline) into $SITE" >&2
  "$PYTHON" -m pip install -q --no-deps --no-index --no-build-isolation --target "$SITE" .
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1
exec timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-470}" \
  "$PYTHON" -P -m rtagger.deploy.gpu_check --device cuda --out "$OUT_DIR" "$@"
