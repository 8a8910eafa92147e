#!/usr/bin/env bash
# The multi-task recipe behind `make train-multitask` (run inside build/env.sh): one policy for the paper's three
# tasks and the two language-decided variants, trained on their mixed demos.
#
# 1. Demos: 100 scripted episodes per task variant (seeds 0-99, 64 px); the variants that differ only in the
#    instruction (sorting / sorting_swapped, pick_place_red / pick_place_green) share their scenes seed by seed.
# 2. Stage A, backbone + expert together (MeanFlow objective), warm-started from the shipped single-task
#    checkpoint (its backbone already sees the arm, a cube and a box). Long: it runs in pieces of TIME_LIMIT
#    seconds and resumes exactly (`--resume`) where the last piece stopped.
# Finished stages and episodes are skipped, so the recipe continues where it was stopped.
set -euo pipefail

DATA=${DATA:-data}
RUNS=${RUNS:-runs}
TASK_VARIANTS=(pick_place stacking sorting sorting_swapped pick_place_red pick_place_green)
DEMOS_PER_TASK=${DEMOS_PER_TASK:-100}
STAGE_A_STEPS=${STAGE_A_STEPS:-30000}
TIME_LIMIT=${TIME_LIMIT:-0}   # seconds per invocation (0: none)
THREADS=${THREADS:-2}
INIT=${INIT:-$(python -c 'from ament_index_python.packages import get_package_share_directory as s; print(s("meanflow_policy"))')/checkpoints/sim_pick_place}

bags=()
for task in "${TASK_VARIANTS[@]}"; do
  out="$DATA/sim_$task"
  if [[ ! -f "$out/index.json" ]] || (( $(find "$out" -mindepth 1 -maxdepth 1 -type d | wc -l) < DEMOS_PER_TASK )); then
    rm -rf "$out"
    OMP_NUM_THREADS=1 python -m so101_sim.demos --task "$task" --episodes "$DEMOS_PER_TASK" --seed 0 \
      --image-size 64 --out "$out"
  fi
  bags+=("$out")
done

stage_a="$RUNS/multitask_joint"
common=(--bags "${bags[@]}" --out "$stage_a" --steps "$STAGE_A_STEPS" --val-every 2000 --cpu-threads "$THREADS"
        --time-limit "$TIME_LIMIT" --cache-dir "$RUNS/cache" --no-progress)
if [[ -f "$stage_a/last/train_state.json" ]]; then
  python -m meanflow_policy.tools.train "${common[@]}" --resume
else
  python -m meanflow_policy.tools.train "${common[@]}" --init-from "$INIT" --batch-size 32 --ema-decay 0.999 --seed 0
fi
echo "train_multitask: stage A in $stage_a"
