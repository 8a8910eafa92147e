#!/usr/bin/env bash
# The whole suite in the workspace environment; fails on any failure and on "no tests collected" (exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
# Lint first (ruff.toml, mypy.ini at the top level): any finding fails the run before a test starts.
for tool in ruff mypy; do
  if ! command -v "$tool" >/dev/null; then
    echo "run_tests: $tool is not installed (it is pinned in requirements.txt): run make setup" >&2
    exit 2
  fi
done
echo "run_tests: ruff check"
ruff check . || exit 1
echo "run_tests: mypy (plain-Python cores, see mypy.ini)"
mypy --python-executable "$(command -v python)" || exit 1
# Tests marked slow (minutes each: e.g. the scripted experts' success rates over 40 seeds per task) run with SLOW=1.
if [ "${SLOW:-0}" = 1 ]; then marker=(); else marker=(-m "not slow"); fi
# TEST_WORKERS pytest-xdist workers (0: one process). Default 3 on this project's 2-core machines: node tests spend
# much of their time waiting (DDS discovery, node start-up, timeouts), which a third worker fills (6.75 -> ~4.8 min;
# docs/testing.md). Each worker claims a ROS domain of its own (so101_common.testing); --dist loadfile keeps a
# module's node fixtures in one worker.
workers=${TEST_WORKERS:-3}
if [ "$workers" = 0 ]; then parallel=(); else parallel=(-n "$workers" --dist loadfile); fi
# One OpenMP/torch thread per process (workers and the node processes they start): with several processes on two
# cores, multi-threaded torch spins at its barriers and burns CPU time that the other processes need.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The 25 slowest tests are listed at the end: where the suite's time goes (docs/testing.md).
python -m pytest src tests "${marker[@]}" "${parallel[@]}" --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests: that is a failure" >&2
fi
exit "$rc"
