#!/usr/bin/env bash
# The whole suite in the workspace environment; fails on any failure and on "no tests collected" (exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pytest src tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests: that is a failure" >&2
fi
exit "$rc"
