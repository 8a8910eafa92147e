#!/usr/bin/env bash
# A GPU session's checks in one run (docs/method.md, "GPU path"): the CUDA-graph tests, meanflow-bench on the real
# SmolVLM2-500M architecture and on the tiny preset (eager and with CUDA graphs), then LeRobot's SmolVLA and
# Diffusion Policy on the same GPU (meanflow_policy.tools.bench_peers) with the ratios to ours. Every output lands
# in $OUT. Python packages the GPU machine's image lacks travel as wheels: .whl/ours (this project's pinned
# transformers) and .whl/lr (LeRobot 0.4.4 and what it imports, with the transformers < 5 it wants), each installed
# into its own folder so the two processes see their own transformers. Fetch them where pip reaches PyPI (the GPU
# machine's Python is 3.12), into folders git ignores:
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   pip download $P -d .whl/ours transformers==5.24.0
#   pip download $P -d .whl/lr lerobot==0.4.4 draccus==0.10.0 mergedeep==1.3.4 diffusers==0.35.2 deepdiff==9.1.0 \
#     orderly-set==5.5.0 datasets==4.1.1 dill==0.4.0 multiprocess==0.70.16 pyserial==3.5 cachebox==6.2.10 \
#     transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.35.3 fsspec==2025.9.0
# (35 MB; the rest LeRobot imports is on that machine's image). Then, there:
#   OUT=runs/gpu bash scripts/gpu_bench.sh
# PARTS picks what runs (default: tests ours peers tiny). `train` times training steps of the real architecture
# (meanflow_policy.tools.bench_train: joint vs cached prefix features, float32 and bfloat16 autocast) on episode
# bags written beforehand into
# .gpu_bags (`python -c "from pathlib import Path; from meanflow_policy.tools.bench_train import write_synthetic_bags
# as w; w(Path('.gpu_bags'), 4, 2.0)"`, 18 MB), read there without ROS (rosbags, with its needs as wheels in
# .whl/bags: rosbags apsw backports.zstd lz4 ruamel.yaml); carry .whl/ours, .whl/bags and .gpu_bags, not .whl/lr
# (the 64 MB limit).
set -uo pipefail
OUT=${OUT:-runs/gpu}
PARTS=${PARTS:-tests ours peers tiny}
part() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SRC=src/meanflow_policy:src/so101_common
install() {  # install() DIR WHEELS...: a private site folder
  local dir=$1; shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dir" "$@"
}
[ -d .whl/ours ] && install /tmp/site_ours .whl/ours/*.whl
[ -d .whl/lr ] && install /tmp/site_lr .whl/lr/*.whl
[ -d .whl/bags ] && install /tmp/site_bags .whl/bags/*.whl
OURS=/tmp/site_ours:/tmp/site_bags:$SRC
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
PYTHONPATH=$OURS python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__)" | tee -a "$OUT/gpu.txt"

if part tests; then
  echo "== $SECONDS s: CUDA-graph tests"
  PYTHONPATH=$OURS timeout 100 python3 -m pytest -q -p no:cacheprovider --noconftest -o addopts="" \
    src/meanflow_policy/test/test_model_cuda_graphs.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
fi

if part ours; then
  echo "== $SECONDS s: ours, SmolVLM2-500M architecture, 512 px"
  PYTHONPATH=$OURS timeout 300 python3 -m meanflow_policy.tools.bench --preset smolvlm2-500m --device cuda \
    --precisions float32,bfloat16 --cuda-graphs --compile --runs 16 --warmup 3 --candidates 8 > "$OUT/ours_500m.txt" 2>&1
  tail -c 3000 "$OUT/ours_500m.txt"
fi

if part peers; then
  echo "== $SECONDS s: peers: LeRobot SmolVLA and Diffusion Policy"
  PYTHONPATH=$OURS python3 -c "from meanflow_policy.model.backbone import smolvlm2_500m_config as c
c(32).save_pretrained('/tmp/smolvlm2')"
  PYTHONPATH=/tmp/site_lr:$SRC timeout 120 python3 -m meanflow_policy.tools.bench_peers --device cuda \
    --vlm-config /tmp/smolvlm2 --ours "$OUT/ours_500m.txt" --runs 20 --plot "$OUT/peers.png" > "$OUT/peers.txt" 2>&1
  tail -c 3000 "$OUT/peers.txt"
fi

if part tiny; then
  echo "== $SECONDS s: ours, tiny preset"
  PYTHONPATH=$OURS timeout 70 python3 -m meanflow_policy.tools.bench --preset tiny --device cuda \
    --precisions float32 --cuda-graphs --runs 50 --warmup 5 > "$OUT/ours_tiny.txt" 2>&1
  tail -c 1500 "$OUT/ours_tiny.txt"
fi

if part train && [ -d .gpu_bags ]; then
  for preset in smolvlm2-500m tiny; do
    for mp in float32 bfloat16; do
      echo "== $SECONDS s: training steps, $preset, batch 32, $mp"
      PYTHONPATH=$OURS timeout 200 python3 -m meanflow_policy.tools.bench_train --bags .gpu_bags --preset $preset \
        --device cuda --batch-size 32 --steps 10 --warmup 2 --mixed-precision $mp > "$OUT/train_${preset}_$mp.txt" 2>&1
      tail -n 6 "$OUT/train_${preset}_$mp.txt"
    done
  done
fi
