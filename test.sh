#!/usr/bin/env bash
# Test suite: set up (or reuse) .venv/, then run pytest. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh || exit 1
.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
rc=$?
# pytest exits 5 when no test was collected: that is a failure of the suite here.
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
