# so101-meanflow: `make demo` runs the simulated arm + policy closed loop; `make test` runs every test.
# Every target sets the workspace up first (scripts/setup.sh is idempotent: well under a second when nothing changed).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
ENV := source build/env.sh &&

# shipped: the multi-task checkpoint meanflow_policy installs (sim_multitask, found in its share directory, not in
# src/); shipped:sim_pick_place the single-task one.
CHECKPOINT ?= shipped
EPISODES ?= 50
TASK ?= all
WORKERS ?= 2
NFE ?= 1
PRESET ?= tiny
DEMOS ?= data/sim_pick_place
RUNS ?= runs
DATA ?= data

.PHONY: setup test test-all demo eval-sim eval-realtime results-multitask ground train-language ablations train-sim train-multitask sim-demos bench-policy bench-node bench-data bench-train bench-sim \
        bench-hw bench-teleop clean

setup:
	@bash scripts/setup.sh

test: setup
	@$(ENV) bash scripts/run_tests.sh

# Every test, the slow ones too (the scripted experts' success rates: ~10 min).
test-all: setup
	@$(ENV) SLOW=1 bash scripts/run_tests.sh

# Sim node + one policy node (shipped checkpoint) over loopback DDS on the paper's three tasks in turn, the task
# changed between episodes by the sim's task parameter and set_instruction: per-episode score and chunk latency,
# demo.json and a GIF + MP4 per task in runs/demo. EPISODES= per task (2 here unless given), TASK=a,b narrows.
demo: setup
	@$(ENV) python -m so101_sim.closed_loop_demo --checkpoint $(CHECKPOINT) --nfe $(NFE) --out $(RUNS)/demo \
	  --episodes $(if $(filter file,$(origin EPISODES)),2,$(EPISODES)) $(if $(filter file,$(origin TASK)),,--tasks $(TASK))

# Closed-loop evaluation in-process of every task (TASK= narrows: a name, a comma list or `paper`), EPISODES per task
# on held-out seeds from 1000, in WORKERS processes; writes $(RUNS)/eval_sim/<task>/ and summary.{json,md}. The last
# line is one JSON object: tasks, mean_score (paper tasks), nfe, instruction_following, chunk_ms_median.
eval-sim: setup
	@$(ENV) OMP_NUM_THREADS=1 python -m so101_sim.evaluate --checkpoint $(CHECKPOINT) --tasks $(TASK) \
	  --episodes $(EPISODES) --nfe $(NFE) --seed 1000 --image-size 64 --workers $(WORKERS) --video-episodes 1 \
	  --out $(RUNS)/eval_sim

# Real-time evaluation: sim time advances while the policy computes (injected latencies in ms, or 'measured'), per
# hand-off (sync, replace, blend, rtc), cells in WORKERS processes; table + JSON in $(RUNS)/eval_realtime; the last
# line is one JSON object {"rows": [...]}. TASK= one task (pick_place unless given).
# POLICIES: space-separated CHECKPOINT@NFE (or expert), e.g. "runs/sim_meanflow/last@1 runs/sim_fm/last@10"; default
# the shipped pick-place checkpoint (shipped:sim_pick_place; CHECKPOINT= another). REALTIME_ARGS: more options, e.g.
# "--rtc-guidance --no-rtc-correction" (the RTC paper's real-time chunking, for a flow-matching policy).
LATENCIES ?= 0,33,100,200,400,800
HANDOFFS ?= sync,replace,blend,rtc
POLICIES ?= $(if $(filter file,$(origin CHECKPOINT)),shipped:sim_pick_place,$(CHECKPOINT))@$(NFE)
REALTIME_ARGS ?=
eval-realtime: setup
	@$(ENV) OMP_NUM_THREADS=1 python -m so101_sim.realtime $(foreach p,$(POLICIES),--policy $(p)) \
	  --latencies $(LATENCIES) --handoffs $(HANDOFFS) --episodes $(EPISODES) --task $(if $(filter file,$(origin TASK)),pick_place,$(TASK)) --seed 1000 \
	  --image-size 64 --workers $(WORKERS) --out $(RUNS)/eval_realtime $(REALTIME_ARGS)

# The multi-task results table (scripts/results_multitask.sh): every checkpoint in CHECKPOINTS ("LABEL=DIR@NFES ...")
# on every task, EPISODES per cell, then docs/results/multitask.{md,json} with commit and machine.
results-multitask: setup
	@$(ENV) CHECKPOINTS="$(CHECKPOINTS)" RUNS=$(RUNS) EPISODES=$(EPISODES) WORKERS=$(WORKERS) \
	  bash scripts/results_multitask.sh

# Instruction grounding (docs/language.md): CHECKPOINT (the shipped multi-task one) reads any wording of its tasks
# through the frozen SmolLM2 as the sentence it was trained on, and holds on an instruction that asks for no task;
# writes $(RUNS)/grounded (must not exist) and prints one JSON line (fit, held-out paraphrases, unrelated).
ground: setup
	@$(ENV) python -m meanflow_policy.tools.ground $(CHECKPOINT) --out $(RUNS)/grounded --cpu-threads 1

# The language recipe (scripts/train_language.sh): the shipped multi-task policy distilled onto the frozen, pretrained
# SmolLM2 (docs/language.md): 40 demos per task variant, then 2,500 steps training only the projection from SmolLM2
# (about 20 min on 2 cores) into $(RUNS)/multitask_smollm2, then a grounding that only refuses instructions asking for no
# task ($(RUNS)/multitask_smollm2/grounded: `shipped:sim_multitask_smollm2`); continues where it stopped.
train-language: setup
	@$(ENV) DATA=$(DATA) RUNS=$(RUNS) bash scripts/train_language.sh

# The paper's ablations (scripts/ablations.py): Tables I-IV on pick-place, each cell a fresh action expert on the shipped
# checkpoint's frozen backbone, evaluated on EPISODES held-out seeds; docs/results/ablations.{json,md}. Cells already in
# the (committed) JSON are skipped, so a rerun continues. STEPS= per run, TIME_LIMIT= s, TABLES="I III:1,5" (all).
STEPS ?= 12000
ablations: setup
	@$(ENV) OMP_NUM_THREADS=1 python scripts/ablations.py --steps $(STEPS) --episodes $(EPISODES) --jobs $(WORKERS) \
	  --demos $(DEMOS) --runs $(RUNS)/ablations $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT)) \
	  $(if $(TABLES),--tables $(TABLES))

# The reference recipe: 100 scripted demos, then MeanFlow and the flow-matching baseline on the same data and steps.
sim-demos: setup
	@$(ENV) test -d $(DEMOS) || python -m so101_sim.demos --episodes 100 --seed 0 --image-size 64 --out $(DEMOS)

# The reference recipe (scripts/train_sim.sh, exactly how the shipped checkpoint was made): behaviour cloning on the
# demos in four stages to 26000 steps, then recovery rounds (expert takeovers from the policies' own states, DAgger-
# style) with fine-tuning. Both objectives get the same data, seeds and steps; finished stages are skipped.
train-sim: sim-demos
	@$(ENV) DEMOS=$(DEMOS) RUNS=$(RUNS) bash scripts/train_sim.sh

# The multi-task recipe (scripts/train_multitask.sh): 100 scripted demos of each of the six task variants, then stage A
# (backbone + expert, warm-started from the shipped checkpoint) in resumable pieces, then recovery rounds; DATA=, RUNS=,
# TIME_LIMIT= (s); FROM=CHECKPOINT START_ROUND=r continue from a kept checkpoint on a fresh machine;
# OBJECTIVE=flow_matching trains the baseline on the same start, data, steps and seeds (the MeanFlow run's episodes).
train-multitask: setup
	@$(ENV) DATA=$(DATA) RUNS=$(RUNS) bash scripts/train_multitask.sh

bench-policy: setup
	@$(ENV) python -m meanflow_policy.tools.bench --preset $(PRESET) --device cpu --threads 1

# PRESET=smolvlm2-500m: the real architecture (random weights); BACKBONE_PRECISION=auto: its fastest path here.
BACKBONE_PRECISION ?= float32
bench-node: setup
	@$(ENV) python -m meanflow_policy.tools.bench_node --preset $(PRESET) --backbone-precision $(BACKBONE_PRECISION)

bench-data: setup
	@$(ENV) python -m meanflow_policy.tools.bench_data --cpu-threads 1

# Training steps/s with the backbone in every step vs on cached frozen-backbone prefix features (tiny preset, batch
# 32, CPU, one thread); the last line is one JSON object (steps_per_s, ratio_cached_over_joint, ...).
bench-train: setup
	@$(ENV) python -m meanflow_policy.tools.bench_train --device cpu --cpu-threads 1 --batch-size 32

bench-sim: setup
	@$(ENV) python -m so101_sim.bench

bench-hw: setup
	@$(ENV) python -m so101_hardware.bench --cycles 3000

bench-teleop: setup
	@$(ENV) python -m so101_teleop.bench && python -m so101_camera.bench && python -m so101_teleop.bench_leader

clean:
	rm -rf build install log
