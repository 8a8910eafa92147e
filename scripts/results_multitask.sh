#!/usr/bin/env bash
# The multi-task results table (docs/results/multitask.{md,json}), run inside build/env.sh: each checkpoint is
# evaluated by so101-eval on every task (held-out seeds from 1000, 64 px), then so101-results-table writes the table
# with each run's commit and machine. CHECKPOINTS is a list of LABEL=DIR@NFES (NFES comma-separated); the first one
# also gets the held-out paraphrases and an unrelated instruction.
set -euo pipefail

RUNS=${RUNS:-runs}
EPISODES=${EPISODES:-50}
WORKERS=${WORKERS:-2}
PARAPHRASES=${PARAPHRASES:-3}
OUT=${OUT:-docs/results/multitask}
read -r -a CHECKPOINTS <<< "${CHECKPOINTS:?set CHECKPOINTS='MeanFlow=runs/multitask_joint/best@1,2,5,10 ...'}"

evals=()
first=1
for spec in "${CHECKPOINTS[@]}"; do
  label=${spec%%=*}; rest=${spec#*=}; dir=${rest%@*}; nfes=${rest##*@}
  out="$RUNS/eval_multitask/${label// /_}"
  extra=()
  (( first )) && extra=(--paraphrases "$PARAPHRASES" --unrelated)
  OMP_NUM_THREADS=1 python -m so101_sim.evaluate --checkpoint "$dir" --tasks all --episodes "$EPISODES" \
    --sweep-nfe "$nfes" --seed 1000 --image-size 64 --workers "$WORKERS" --video-episodes 1 --out "$out" "${extra[@]}"
  evals+=(--eval "$label=$out")
  first=0
done
python -m so101_sim.results_table "${evals[@]}" --out "$OUT"
