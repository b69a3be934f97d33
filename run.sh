#!/usr/bin/env bash
# Main job, end to end: set up .venv/, prepare data with Apache Beam (DirectRunner),
# train DIN, DIN-L and avg-pooling with Keras, evaluate, print a metrics table.
#   ./run.sh                                   synthetic lifelong data (default)
#   ./run.sh --data ../shared/data/ml-latest-small    MovieLens (folder) or Taobao (csv file)
# Any other flag goes to `lifelong compare` (see `lifelong compare --help`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
# Defaults sized for a 2-core machine (about 10 minutes); later flags override them.
exec .venv/bin/lifelong compare --work_dir "${WORK_DIR:-artifacts/main}" --long_len 500 --epochs 2 --synthetic_users 1000 "$@"
