#!/usr/bin/env bash
# Production serving: the real TensorFlow Serving (the tensorflow/serving image) on the
# SavedModels that `lifelong export` wrote, with the models.config it maintains.
#
#   serving/tf_serving.sh                  # saved_models/ of this repo; gRPC 127.0.0.1:8500,
#                                          # REST 127.0.0.1:8501; Ctrl-C stops it
#   BASE=/abs/path/saved_models GRPC_PORT=9000 serving/tf_serving.sh
#   serving/tf_serving.sh --dry_run        # print the docker command, run nothing
#   serving/tf_serving.sh --tensorflow_intra_op_parallelism=4    # extra flags go to the server
#
# Environment: BASE (default saved_models/ beside this folder), IMAGE (default
# tensorflow/serving:2.19.1, the version of tensorflow-serving-api the package pins),
# GRPC_PORT (8500), REST_PORT (8501), BIND (127.0.0.1; 0.0.0.0 exposes the ports to the
# network: TF Serving's plain ports have no TLS or authentication), BATCHING_FILE (the
# shared batching parameters; default: the file this script writes, see below).
#
# What the flags do:
# * --model_config_file=/models/models.config: every model `lifelong export` listed, with
#   base_path /models/<model> (where BASE is mounted) and version policy latest 2, so the
#   version a cached user was computed with stays servable while its successor rolls out
#   (the client pins its rank request to the cache's version).
# * --file_system_poll_wait_seconds: how often new version folders are picked up (export
#   renames a finished version into place, so a half-written version is never loaded);
#   --model_config_file_poll_wait_seconds: how often models.config is re-read (new models).
# * Batching. TF Serving batches the requests of one model together, and a batched
#   request must have the same 0th dimension in every input. `rank` requests do not
#   (cache and short window [1, ...], candidates [N]): under --enable_batching alone every
#   rank request with N > 1 fails with "Batching session Run() input tensors must have
#   equal 0th-dimension size". Hence --enable_per_model_batching_parameters: only a version
#   folder holding a batching_params.pbtxt (`lifelong export --batching_params FILE`) is
#   batched, i.e. a deployment that serves serving_default (one-shot, many small requests);
#   rank deployments carry none and are not batched (a rank request already is a batch of
#   N candidates). The global file below only sizes the shared batch thread pool.
# * --tensorflow_inter_op_parallelism=-1: ops run in the request's own thread (no hand-off
#   to a shared pool); the lowest latency for small ranking graphs (docs/benchmarks.md).
# * --xla_cpu_compilation_enabled=true: needed by versions exported with
#   `lifelong export --jit_rank` (rank compiled with XLA); harmless for the others.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
BASE="${BASE:-$(cd "$here/.." && pwd)/saved_models}"
IMAGE="${IMAGE:-tensorflow/serving:2.19.1}"
GRPC_PORT="${GRPC_PORT:-8500}"
REST_PORT="${REST_PORT:-8501}"
BIND="${BIND:-127.0.0.1}"
dry_run=0
args=()
for a in "$@"; do
  if [ "$a" = "--dry_run" ]; then dry_run=1; else args+=("$a"); fi
done

if [ ! -f "$BASE/models.config" ]; then
  echo "tf_serving.sh: $BASE/models.config not found: run \`lifelong export\` first" >&2
  [ "$dry_run" = 1 ] || exit 2
fi

written=""
if [ -z "${BATCHING_FILE:-}" ]; then
  BATCHING_FILE="$(mktemp -t lifelong_batching.XXXXXX)"
  written="$BATCHING_FILE"
  # TF Serving BatchingParameters (text format). With per-model parameters on, only the
  # thread pool is read from this file; each batched version's own batching_params.pbtxt
  # sets its batch sizes and timeout (a good start for one-shot serving_default traffic:
  # the last three lines below).
  cat > "$BATCHING_FILE" <<'EOF'
num_batch_threads { value: 2 }
max_batch_size { value: 256 }
batch_timeout_micros { value: 1000 }
max_enqueued_batches { value: 64 }
EOF
fi

cmd=(docker run --rm --name lifelong-tf-serving
  -p "$BIND:$GRPC_PORT:8500" -p "$BIND:$REST_PORT:8501"
  -v "$BASE:/models:ro"
  -v "$BATCHING_FILE:/config/batching_parameters.txt:ro"
  "$IMAGE"
  --model_config_file=/models/models.config
  --model_config_file_poll_wait_seconds=60
  --file_system_poll_wait_seconds=10
  --enable_batching=true
  --enable_per_model_batching_parameters=true
  --batching_parameters_file=/config/batching_parameters.txt
  --grpc_max_threads=64
  --tensorflow_inter_op_parallelism=-1
  --xla_cpu_compilation_enabled=true
  "${args[@]+"${args[@]}"}")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  [ -z "$written" ] || rm -f "$written"
  exit 0
fi
command -v docker >/dev/null || { echo "tf_serving.sh: docker is not installed" >&2; exit 2; }
exec "${cmd[@]}"
