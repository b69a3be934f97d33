#!/usr/bin/env bash
# Create (or reuse) .venv/ in the repository root and install the package with its
# pinned stack. Idempotent: a second run only reinstalls when setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum setup.py | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the package and its pinned dependencies (first run downloads ~1 GB)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.installed-*; touch "$stamp"
fi
