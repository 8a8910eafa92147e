#!/usr/bin/env bash
# Ours against LeRobot's SmolVLA on this CPU, same hour (docs/method.md, "Attention products in bf16"): meanflow-bench
# on the real SmolVLM2-500M architecture (float32, int8, bfloat16), then meanflow-bench-peers --peers smolvla with the
# ratios to ours. LeRobot 0.4.4 wants transformers < 5, so it and what it imports are installed into a folder of
# their own ($PEERS, outside the workspace) from PyPI wheels, beside this workspace's CPU torch. The torchvision
# wheel PyPI serves is built for CUDA: its compiled operators cannot load beside the CPU torch, and its fake-kernel
# registrations for them then fail at import. SmolVLA never calls them, so that one registration module is emptied
# in $PEERS (nothing in the workspace changes). Run after `make setup`:
#   bash scripts/cpu_peers.sh            # OUT=runs/cpu_peers THREADS=2 RUNS=3
set -euo pipefail
OUT=${OUT:-runs/cpu_peers}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
PEERS=${PEERS:-/tmp/so101_peers}
source build/env.sh
mkdir -p "$OUT" "$PEERS/wheels"
if [ ! -d "$PEERS/site/lerobot" ]; then
  python -m pip download -q --no-deps --only-binary=:all: -d "$PEERS/wheels" lerobot==0.4.4 draccus==0.10.0 \
    mergedeep==1.3.4 diffusers==0.35.2 deepdiff==9.1.0 orderly-set==5.5.0 datasets==4.1.1 dill==0.4.0 \
    multiprocess==0.70.16 pyserial==3.5 cachebox==6.2.10 transformers==4.57.6 tokenizers==0.22.2 \
    huggingface-hub==0.35.3 fsspec==2025.9.0 typing-inspect==0.9.0 mypy-extensions==1.1.0 xxhash==4.1.0 einops==0.8.2 \
    torchvision==0.28.0
  python -m pip install -q --no-index --no-deps --no-compile --target "$PEERS/site" "$PEERS"/wheels/*.whl
  echo "# emptied by scripts/cpu_peers.sh: the CUDA build's compiled operators cannot load beside the CPU torch" \
    > "$PEERS/site/torchvision/_meta_registrations.py"
fi
python -c "from meanflow_policy.model.backbone import smolvlm2_500m_config as c
c(32).save_pretrained('$PEERS/smolvlm2')"
echo "== ours, SmolVLM2-500M architecture, 512 px, $THREADS threads"
meanflow-bench --preset smolvlm2-500m --threads "$THREADS" --precisions float32,int8,bfloat16 --runs "$RUNS" \
  --warmup 1 --candidates "" > "$OUT/ours_500m.txt" 2>&1
tail -n 1 "$OUT/ours_500m.txt" | cut -c1-300
echo "== LeRobot SmolVLA"
PYTHONPATH="$PEERS/site:src/meanflow_policy:src/so101_common" python -m meanflow_policy.tools.bench_peers \
  --device cpu --threads "$THREADS" --peers smolvla --vlm-config "$PEERS/smolvlm2" --ours "$OUT/ours_500m.txt" \
  --runs "$RUNS" --warmup 1 > "$OUT/peers.txt" 2>&1
tail -n 1 "$OUT/peers.txt"
