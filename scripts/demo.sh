#!/usr/bin/env bash
# `make demo` lands with the simulation and reference-results work (issues 8 and 9); until then it says so.
echo "make demo: the simulated closed-loop demo is not built yet (so101_sim + meanflow_policy)." >&2
exit 1
