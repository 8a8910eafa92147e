# so101-meanflow: `make demo` runs the simulated arm + policy closed loop; `make test` runs every test.
# Every target sets the workspace up first (scripts/setup.sh is idempotent: well under a second when nothing changed).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
ENV := source build/env.sh &&

CHECKPOINT ?= src/meanflow_policy/checkpoints/sim_pick_place
EPISODES ?= 20
NFE ?= 1
PRESET ?= tiny
DEMOS ?= data/sim_pick_place
RUNS ?= runs

.PHONY: setup test demo eval-sim train-sim sim-demos bench-policy bench-node bench-data bench-sim bench-hw \
        bench-teleop clean

setup:
	@bash scripts/setup.sh

test: setup
	@$(ENV) bash scripts/run_tests.sh

# Sim node + policy node (nfe=1, shipped checkpoint) over loopback DDS: success, chunk latency, GIF in runs/demo.
demo: setup
	@$(ENV) python -m so101_sim.closed_loop_demo --checkpoint $(CHECKPOINT) --episodes 3 --nfe 1 --out $(RUNS)/demo

# Closed-loop evaluation in-process; the last line is one JSON object (success_rate, episodes, nfe, chunk_ms_median).
eval-sim: setup
	@$(ENV) OMP_NUM_THREADS=1 python -m so101_sim.evaluate --checkpoint $(CHECKPOINT) --episodes $(EPISODES) --nfe $(NFE) \
	  --seed 1000 --image-size 64 --out $(RUNS)/eval_sim

# The reference recipe: 100 scripted demos, then MeanFlow and the flow-matching baseline on the same data and steps.
sim-demos: setup
	@$(ENV) test -d $(DEMOS) || python -m so101_sim.demos --episodes 100 --seed 0 --image-size 64 --out $(DEMOS)

# Four behaviour-cloning stages (4000 steps, resumed to 8000, 20000 and 26000; each resume restarts the optimizer
# moments and the cosine schedule), then one recovery stage (DAgger-style): both 26000-step policies are rolled out
# and the scripted expert takes over from the states they reach (150 episodes each, seeds apart from evaluation's),
# and each objective is fine-tuned on the demos plus both recovery sets. Exactly how the shipped checkpoint was
# made; both objectives get the same data, seeds and steps.
TRAIN_ARGS := --train-backbone --batch-size 32 --ema-decay 0.999 --cpu-threads 1 --seed 0 --no-progress
RECOVERY := data/sim_recovery_meanflow data/sim_recovery_flow_matching
FINETUNE_STEPS ?= 10000
train-sim: sim-demos
	@$(ENV) for obj in meanflow flow_matching; do \
	  python -m meanflow_policy.train_cli --bags $(DEMOS) $(TRAIN_ARGS) --out $(RUNS)/sim_$$obj --objective $$obj \
	    --steps 4000 --val-every 500 && \
	  python -m meanflow_policy.train_cli --bags $(DEMOS) $(TRAIN_ARGS) --out $(RUNS)/sim_$$obj --objective $$obj \
	    --steps 8000 --val-every 1000 --resume && \
	  python -m meanflow_policy.train_cli --bags $(DEMOS) $(TRAIN_ARGS) --out $(RUNS)/sim_$$obj --objective $$obj \
	    --steps 20000 --val-every 2000 --resume && \
	  python -m meanflow_policy.train_cli --bags $(DEMOS) $(TRAIN_ARGS) --out $(RUNS)/sim_$$obj --objective $$obj \
	    --steps 26000 --val-every 2000 --resume; done
	@$(ENV) test -d data/sim_recovery_meanflow || OMP_NUM_THREADS=1 python -m so101_sim.recovery --episodes 150 \
	  --checkpoint $(RUNS)/sim_meanflow/last --nfe 1 --seed 3000 --image-size 64 --out data/sim_recovery_meanflow
	@$(ENV) test -d data/sim_recovery_flow_matching || OMP_NUM_THREADS=1 python -m so101_sim.recovery --episodes 150 \
	  --checkpoint $(RUNS)/sim_flow_matching/last --nfe 10 --seed 5000 --image-size 64 \
	  --out data/sim_recovery_flow_matching
	@$(ENV) for obj in meanflow flow_matching; do \
	  python -m meanflow_policy.train_cli --bags $(DEMOS) $(RECOVERY) $(TRAIN_ARGS) --init-from $(RUNS)/sim_$$obj/last \
	    --out $(RUNS)/sim_$${obj}_recovery --steps $(FINETUNE_STEPS) --val-every 2000; done

bench-policy: setup
	@$(ENV) python -m meanflow_policy.bench --preset $(PRESET) --device cpu --threads 1

bench-node: setup
	@$(ENV) python -m meanflow_policy.bench_node

bench-data: setup
	@$(ENV) python -m meanflow_policy.bench_data --cpu-threads 1

bench-sim: setup
	@$(ENV) python -m so101_sim.bench

bench-hw: setup
	@$(ENV) python -m so101_hardware.bench --cycles 3000

bench-teleop: setup
	@$(ENV) python -m so101_teleop.bench && python -m so101_camera.bench

clean:
	rm -rf build install log
