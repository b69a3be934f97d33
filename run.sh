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
# --config_dir none: this quick end-to-end job keeps the built-in small model (emb 8,
# DIN 16-8, head 32-16; about 10 minutes on 2 cores). The per-model files in configs/
# are sized for the accuracy benchmark (emb 16, head 200-80, up to 20 epochs); pass
# `--config_dir configs` to use them here (a later flag wins).
.venv/bin/lifelong compare --work_dir "$work" --long_len 500 --epochs 2 --synthetic_users 1000 \
  --config_dir none "$@"
if [ "${SERVE:-1}" != "0" ]; then
  .venv/bin/lifelong replay --work_dir "$work"
fi
