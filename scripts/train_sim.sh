#!/usr/bin/env bash
# The reference recipe behind `make train-sim` and the shipped checkpoint (run inside build/env.sh).
#
# 1. Behaviour cloning on the scripted demos: 4000 steps, resumed to 8000, 20000 and 26000 (a resume keeps the
#    optimizer, EMA, RNG and data order and stretches the cosine schedule to the new end; the shipped checkpoint was
#    made before exact resume, when each resume restarted the optimizer moments and the schedule).
# 2. Recovery rounds (DAgger-style): both objectives' current policies are rolled out, the scripted expert takes
#    over from the states they reach (so101-sim-recovery), and each objective is fine-tuned on the demos plus every
#    recovery set so far.
# Both objectives always get the same data, seeds and steps. Finished stages are skipped, so an interrupted recipe
# continues where it stopped.
set -euo pipefail

DEMOS=${DEMOS:-data/sim_pick_place}
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
ROUNDS=${RECOVERY_ROUNDS:-2}
ROUND_STEPS=${ROUND_STEPS:-4000}
RECOVERY_EPISODES=${RECOVERY_EPISODES:-150}
OBJECTIVES=(meanflow flow_matching)
declare -A NFE=([meanflow]=1 [flow_matching]=10)
declare -A FIRST_SEED=([meanflow]=3000 [flow_matching]=5000)  # + 10000 per round; evaluation uses 1000-1049
TRAIN=(python -m meanflow_policy.tools.train --train-backbone --batch-size 32 --ema-decay 0.999 --cpu-threads 1
       --seed 0 --no-progress)

done_at() {  # done_at RUN_DIR STEPS: the run's last/ checkpoint has reached STEPS
  [[ -f "$1/progress.json" ]] && python -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["step"] < int(sys.argv[2]))' \
    "$1/progress.json" "$2"
}

for obj in "${OBJECTIVES[@]}"; do
  stage=0
  for steps in 4000 8000 20000 26000; do
    resume=(); [[ $stage -gt 0 ]] && resume=(--resume)
    val=$(( steps <= 4000 ? 500 : (steps <= 8000 ? 1000 : 2000) ))
    done_at "$RUNS/sim_$obj" "$steps" ||
      "${TRAIN[@]}" --bags "$DEMOS" --out "$RUNS/sim_$obj" --objective "$obj" --steps "$steps" --val-every "$val" \
        "${resume[@]}"
    stage=$((stage + 1))
  done
done

bags=("$DEMOS")
previous=sim
for round in $(seq 1 "$ROUNDS"); do
  for obj in "${OBJECTIVES[@]}"; do
    out="$DATA/sim_recovery_r${round}_$obj"
    [[ -f "$out/recovery.json" ]] ||
      OMP_NUM_THREADS=1 python -m so101_sim.recovery --checkpoint "$RUNS/${previous}_$obj/last" --nfe "${NFE[$obj]}" \
        --episodes "$RECOVERY_EPISODES" --seed $(( FIRST_SEED[$obj] + 10000 * (round - 1) )) --image-size 64 \
        --out "$out"
    bags+=("$out")
  done
  for obj in "${OBJECTIVES[@]}"; do
    done_at "$RUNS/sim_r${round}_$obj" "$ROUND_STEPS" ||
      "${TRAIN[@]}" --bags "${bags[@]}" --init-from "$RUNS/${previous}_$obj/last" --out "$RUNS/sim_r${round}_$obj" \
        --steps "$ROUND_STEPS" --val-every 2000
  done
  previous="sim_r$round"
done
echo "train_sim: finished; meanflow policy in $RUNS/${previous}_meanflow/last"
