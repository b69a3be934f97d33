#!/usr/bin/env bash
# Test suite: set up (or reuse) .venv/, then run pytest. Extra args go to pytest.
# TEST_WORKERS (default 2, the CI machine's cores) pytest-xdist workers, each taking whole
# files (--dist loadfile: module-scoped fixtures such as the serving exports are built once);
# TEST_WORKERS=0 runs in this process.
set -uo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh || exit 1
.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 \
  -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
# pytest exits 5 when no test was collected: that is a failure of the suite here.
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
