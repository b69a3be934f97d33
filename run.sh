#!/usr/bin/env bash
# Main job, end to end: set up .venv/, prepare data with Apache Beam (DirectRunner),
# train DIN, DIN-L and avg-pooling with Keras, evaluate, print a metrics table; then
# serve them: export split-signature SavedModels (saved_models/), precompute the user
# caches with Beam + tfx-bsl RunInference, start the local gRPC server and replay the
# test users' last requests through it (AUC of the served CTRs, parity with the
# in-process model, rank latency).
#   ./run.sh                                   synthetic lifelong data (default)
#   ./run.sh --data ../shared/data/ml-latest-small    MovieLens (folder) or Taobao (csv file)
# Any other flag goes to `lifelong compare` (see `lifelong compare --help`).
# WORK_DIR=DIR changes the output folder (default artifacts/main); SERVE=0 skips serving.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
work="${WORK_DIR:-artifacts/main}"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do          # a --work_dir flag wins over WORK_DIR
  case "${args[$i]}" in
    --work_dir) work="${args[$((i + 1))]:-$work}" ;;
    --work_dir=*) work="${args[$i]#--work_dir=}" ;;
  esac
done
# Defaults sized for a 2-core machine (about 10 minutes); later flags override them.
.venv/bin/lifelong compare --work_dir "$work" --long_len 500 --epochs 2 --synthetic_users 1000 "$@"
if [ "${SERVE:-1}" != "0" ]; then
  .venv/bin/lifelong replay --work_dir "$work"
fi
