#!/usr/bin/env bash
# The multi-task recipe behind `make train-multitask` (run inside build/env.sh): one policy for the paper's three
# tasks and the two language-decided variants, trained on their mixed demos.
#
# 1. Demos: 100 scripted episodes per task variant (seeds 0-99, 64 px); the variants that differ only in the
#    instruction (sorting / sorting_swapped, pick_place_red / pick_place_green) share their scenes seed by seed.
# 2. Stage A, backbone + expert together (MeanFlow objective), warm-started from the shipped single-task
#    checkpoint (its backbone already sees the arm, a cube and a box). Long: it runs in pieces of TIME_LIMIT
#    seconds and resumes exactly (`--resume`) where the last piece stopped.
# 3. Recovery rounds (DAgger-style, as scripts/train_sim.sh does for pick-place): per round, the previous stage's
#    policy runs every task variant at NFE 1 and the scripted expert takes over from the states it reaches
#    (so101-sim-recovery --task T: RECOVERY_EPISODES per variant, RECOVERY_EPISODES_FOR per named one), then the
#    policy is fine-tuned for ROUND_STEPS on the demos plus every recovery set so far (--init-from the previous stage's last/). Seeds of round r
#    (1..RECOVERY_ROUNDS), variant i (0..5): from 3000 + 10000 (r - 1) + 1000 i, at most 4 x its episode count of
#    them, so they never meet the demo seeds (0-99), the evaluation seeds (1000-1049) nor the held-out 70000-70049.
# Finished stages, episodes and recovery sets are skipped, so the recipe continues where it was stopped; a stage
# stopped by TIME_LIMIT ends the invocation (run it again to continue).
# On a fresh machine (nothing of an earlier session's runs/ left), FROM=CHECKPOINT START_ROUND=r continues from a
# kept checkpoint (e.g. the committed sim_multitask): stage A is skipped and rounds r..RECOVERY_ROUNDS start from it (the recovery sets of earlier rounds found in DATA are trained on too).
# OBJECTIVE=flow_matching trains the baseline of the comparison: the same start (INIT, switched to flow matching),
# data, steps and seeds, in runs multitask_fm_joint, multitask_fm_r1, ...; it collects no recovery sets of its own
# but trains on the MeanFlow run's (data/multitask_recovery_r*), so both objectives see exactly the same episodes.
set -euo pipefail

DATA=${DATA:-data}
RUNS=${RUNS:-runs}
TASK_VARIANTS=(pick_place stacking sorting sorting_swapped pick_place_red pick_place_green)
DEMOS_PER_TASK=${DEMOS_PER_TASK:-100}
STAGE_A_STEPS=${STAGE_A_STEPS:-14000}
TIME_LIMIT=${TIME_LIMIT:-0}   # seconds per invocation (0: none)
THREADS=${THREADS:-2}
JOBS=${JOBS:-2}               # demo and recovery sets made at once (one core each)
RECOVERY_ROUNDS=${RECOVERY_ROUNDS:-2}
RECOVERY_EPISODES=${RECOVERY_EPISODES:-50}   # per task variant per round
# Per-variant counts that replace RECOVERY_EPISODES for the variants named ("stacking=100 sorting=100"): a round can
# put its collection where the policy fails most.
RECOVERY_EPISODES_FOR=${RECOVERY_EPISODES_FOR:-}
ROUND_STEPS=${ROUND_STEPS:-6000}
LR=${LR:-}                    # peak learning rate of each new stage (empty: meanflow-train's default)
ANCHOR_DECAY=${ANCHOR_DECAY:-0}   # meanflow-train --anchor-decay of each new stage: pull back to its start weights
FROM=${FROM:-}                # a checkpoint to start the recovery rounds from instead of stage A
START_ROUND=${START_ROUND:-1}
OBJECTIVE=${OBJECTIVE:-meanflow}
# 1: the instruction also gates the image tokens and conditions the expert (meanflow-train --instruction-film),
# added zero-initialised to a start checkpoint without it. Rounds 1-4 ran without it and ignored red vs green.
INSTRUCTION_FILM=${INSTRUCTION_FILM:-1}
film=()
(( INSTRUCTION_FILM )) && film=(--instruction-film)
# Samples of each episode's first START_WINDOW seconds are drawn START_REPEAT times per epoch (meanflow-train
# --start-repeat): from ~0.4 s on an episode's state already shows which object the arm is heading for, so only the
# start (and a recovery episode's hand-over) teaches the policy to read the instruction. x3 since round 6 (x8 in
# round 5 cost pick-place: 82 % -> 20 %, largely because it favoured the idle hand-overs that meanflow-train's
# --idle-start, default since round 8, now leaves out).
START_REPEAT=${START_REPEAT:-3}
START_WINDOW=${START_WINDOW:-0.4}
case "$OBJECTIVE" in
  meanflow) prefix=multitask ;;
  flow_matching) prefix=multitask_fm ;;
  *) echo "train_multitask: OBJECTIVE must be meanflow or flow_matching, got $OBJECTIVE" >&2; exit 2 ;;
esac
mkdir -p "$RUNS"
INIT=${INIT:-$(python -c 'from ament_index_python.packages import get_package_share_directory as s; print(s("meanflow_policy"))')/checkpoints/sim_pick_place}

# Round r's seeds span 3000 + 10000 (r - 1) + [0, 6000): below 70000 up to round 7, from 73000 on after it, so
# only the episode count can make one variant's seeds run into the next one's.
declare -A episodes_of
for task in "${TASK_VARIANTS[@]}"; do episodes_of[$task]=$RECOVERY_EPISODES; done
for pair in $RECOVERY_EPISODES_FOR; do
  task=${pair%%=*}
  [[ -n "${episodes_of[$task]+set}" && "$pair" == *=* ]] || {
    echo "train_multitask: RECOVERY_EPISODES_FOR: '$pair' is not VARIANT=COUNT with VARIANT one of ${TASK_VARIANTS[*]}" >&2
    exit 2
  }
  episodes_of[$task]=${pair#*=}
done
for task in "${TASK_VARIANTS[@]}"; do
  n=${episodes_of[$task]}
  if ! [[ "$n" =~ ^[0-9]+$ ]] || (( n < 1 || 4 * n > 1000 )); then
    echo "train_multitask: $task's recovery episodes must be 1-250, got '$n' (more would run its seeds into" \
         "another variant's)" >&2
    exit 2
  fi
done

# The sets of one stage (demos, a round's recovery) are independent (own seeds, own folders): JOBS at a time, one
# core each, each logging to its own file; the first that failed ends the recipe, naming its log.
declare -A job_logs
start_job() {  # start_job LOG CMD...: CMD in the background once fewer than JOBS jobs run
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
  "${@:2}" > "$1" 2>&1 &
  job_logs[$!]=$1
}
wait_jobs() {  # wait_jobs WHAT: wait for every started job
  local pid
  for pid in "${!job_logs[@]}"; do
    wait "$pid" || { echo "train_multitask: $1 failed, see ${job_logs[$pid]}" >&2; exit 1; }
  done
  job_logs=()
}

demos_done() {  # demos_done DIR: DIR holds DEMOS_PER_TASK episodes and its index
  [[ -f "$1/index.json" ]] && (( $(find "$1" -mindepth 1 -maxdepth 1 -type d | wc -l) >= DEMOS_PER_TASK ))
}
demo_set() {  # demo_set TASK: the task's demos, written anew
  rm -rf "$DATA/sim_$1"
  OMP_NUM_THREADS=1 python -m so101_sim.demos --task "$1" --episodes "$DEMOS_PER_TASK" --seed 0 --image-size 64 \
    --out "$DATA/sim_$1"
}
bags=()
for task in "${TASK_VARIANTS[@]}"; do
  demos_done "$DATA/sim_$task" || start_job "$RUNS/demos_$task.log" demo_set "$task"
  bags+=("$DATA/sim_$task")
done
wait_jobs "a demo set"

done_at() {  # done_at RUN_DIR STEPS: the run's last/ checkpoint has reached STEPS
  [[ -f "$1/progress.json" ]] && python -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["step"] < int(sys.argv[2]))' \
    "$1/progress.json" "$2"
}

train_stage() {  # train_stage OUT STEPS INIT BAGS...: train OUT to STEPS (resuming a stopped piece); a piece that
                 # TIME_LIMIT stopped first ends the invocation
  local out=$1 steps=$2 init=$3
  shift 3
  done_at "$out" "$steps" && return 0
  local common=(--bags "$@" --out "$out" --steps "$steps" --val-every 2000 --cpu-threads "$THREADS"
                --time-limit "$TIME_LIMIT" --cache-dir "$RUNS/cache" --no-progress)
  if [[ -f "$out/last/train_state.json" ]]; then
    python -m meanflow_policy.tools.train "${common[@]}" --resume
  else
    python -m meanflow_policy.tools.train "${common[@]}" --init-from "$init" --objective "$OBJECTIVE" "${film[@]}" \
      --start-repeat "$START_REPEAT" --start-window "$START_WINDOW" --batch-size 32 --ema-decay 0.999 --seed 0 \
      --anchor-decay "$ANCHOR_DECAY" ${LR:+--lr "$LR"}
  fi
  if ! done_at "$out" "$steps"; then
    echo "train_multitask: $out stopped before step $steps (TIME_LIMIT); run again to continue"
    exit 0
  fi
}

if [[ -n "$FROM" ]]; then
  [[ -f "$FROM/model.safetensors" ]] || { echo "train_multitask: FROM=$FROM holds no model.safetensors" >&2; exit 2; }
  previous="$FROM"
else
  stage_a="$RUNS/${prefix}_joint"
  train_stage "$stage_a" "$STAGE_A_STEPS" "$INIT" "${bags[@]}"
  echo "train_multitask: stage A in $stage_a"
  previous="$stage_a/last"
fi

recovery_set() {  # recovery_set ROUND I CHECKPOINT: variant I's recovery set of ROUND (skipped when finished)
  local round=$1 i=$2 checkpoint=$3
  local out="$DATA/multitask_recovery_r${round}_${TASK_VARIANTS[$i]}"
  [[ -f "$out/recovery.json" ]] && return 0
  if [[ "$OBJECTIVE" != meanflow ]]; then
    echo "train_multitask: $out is missing: the $OBJECTIVE baseline trains on the MeanFlow run's recovery sets" \
         "(run OBJECTIVE=meanflow first)" >&2
    return 1
  fi
  rm -rf "$out"
  # Fewer episodes than asked (every allowed seed tried) still make a recovery set: recovery.json is written.
  OMP_NUM_THREADS=1 python -m so101_sim.recovery --checkpoint "$checkpoint" --task "${TASK_VARIANTS[$i]}" --nfe 1 \
    --episodes "${episodes_of[${TASK_VARIANTS[$i]}]}" --max-tries $(( 4 * ${episodes_of[${TASK_VARIANTS[$i]}]} )) \
    --seed $(( 3000 + 10000 * (round - 1) + 1000 * i )) --image-size 64 --out "$out" ||
    [[ -f "$out/recovery.json" ]]
}

# A run continued FROM a checkpoint at START_ROUND still trains on the recovery sets of the rounds before it.
for round in $(seq 1 $(( START_ROUND - 1 ))); do
  for task in "${TASK_VARIANTS[@]}"; do
    out="$DATA/multitask_recovery_r${round}_$task"
    [[ -f "$out/recovery.json" ]] && compgen -G "$out/episode_*" > /dev/null && bags+=("$out")
  done
done

for round in $(seq "$START_ROUND" "$RECOVERY_ROUNDS"); do
  for i in "${!TASK_VARIANTS[@]}"; do
    # A finished set is not started again (nor its collection log truncated).
    [[ -f "$DATA/multitask_recovery_r${round}_${TASK_VARIANTS[$i]}/recovery.json" ]] && continue
    start_job "$RUNS/recovery_r${round}_${TASK_VARIANTS[$i]}.log" recovery_set "$round" "$i" "$previous"
  done
  wait_jobs "a recovery set of round $round"
  for task in "${TASK_VARIANTS[@]}"; do
    out="$DATA/multitask_recovery_r${round}_$task"
    compgen -G "$out/episode_*" > /dev/null && bags+=("$out")
  done
  stage="$RUNS/${prefix}_r$round"
  train_stage "$stage" "$ROUND_STEPS" "$previous" "${bags[@]}"
  previous="$stage/last"
done
echo "train_multitask: finished; multi-task $OBJECTIVE policy in $previous"
