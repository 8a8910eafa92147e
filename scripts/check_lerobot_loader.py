"""Check that LeRobot's own ``LeRobotDataset`` reads what ``so101-export-lerobot`` writes, with the bags' values.

Run inside build/env.sh (docs/training.md, "LeRobot"):

    python scripts/check_lerobot_loader.py --bags data/sim_pick_place/episode_0000 data/sim_pick_place/episode_0001 \
        --lerobot-path /tmp/lerobot_pkgs --work /tmp/lerobot_check

``--lerobot-path`` holds lerobot and its dataset dependencies installed with ``pip install --target`` beside (not
into) this workspace's environment, so LeRobot's pins (torch < 2.11, huggingface-hub < 0.36) never touch it.
The bags are exported, LeRobot's loader reads every frame in a separate process (state, action, each camera's
image, task, episode and frame index, written as .npy files: no pickle), and each is compared with the training
pipeline's reading of the same bags: joints after LeRobot's units are converted back (float32 degrees in the table);
images against this workspace's decoding of the same videos (exact) and, as a bound, against the bags' raw frames
(the H.264 encoding error). The last line is one JSON object; exit status 1 when a value differs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from meanflow_policy.data import lerobot as lr
from meanflow_policy.data.cache import load_episodes
from meanflow_policy.data.sync import SyncConfig

JOINT_TOL_RAD = 1e-5  # float32 degrees in the parquet table
FRAME_DECODER_TOL = 1  # grey levels: LeRobot's decoding vs ours of the same mp4 (both FFmpeg via PyAV)
# Mean grey-level error of H.264 (CRF 18, yuv420p) against the bag's raw frames at 64 px, where chroma subsampling
# costs most (measured ~4.6 on the sim demos; the neighbouring frame is ~3 further off): a bound that catches a
# wrong frame, not a precision claim.
ENCODING_ERROR_MAX = 8.0

# Runs under --lerobot-path. PyPI's torchvision is a CUDA build: beside a CPU torch its C++ ops cannot load, and
# its meta registrations then fail on the two NMS ops they register without checking; declaring those two op
# schemas first lets the pure-Python parts LeRobot's loader uses (pyav decoding) import. Nothing else is replaced.
_LOADER = r"""
import importlib.util, json, sys
from pathlib import Path
import numpy as np
import torch

spec = importlib.util.find_spec("torchvision")
try:
    torch.ops.load_library(str(Path(spec.origin).parent / "_C.so"))
except (OSError, RuntimeError):
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import lerobot
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, out = Path(sys.argv[1]), Path(sys.argv[2])
ds = LeRobotDataset("local/so101_check", root=root, video_backend="pyav")
cams = list(ds.meta.camera_keys)
cols = {k: [] for k in ("observation.state", "action", "episode_index", "frame_index", *cams)}
tasks = []
for i in range(len(ds)):
    item = ds[i]
    for k in ("observation.state", "action", "episode_index", "frame_index"):
        cols[k].append(np.asarray(item[k]))
    for k in cams:  # float CHW in [0, 1] -> uint8 HWC
        cols[k].append((item[k].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8))
    tasks.append(item["task"])
for k, v in cols.items():
    np.save(out / (k + ".npy"), np.stack(v), allow_pickle=False)
(out / "loader.json").write_text(json.dumps({"lerobot": lerobot.__version__, "frames": len(ds), "cameras": cams,
                                             "episodes": ds.meta.total_episodes, "fps": ds.fps, "tasks": tasks}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bags", nargs="+", required=True, type=Path, help="episode bags (or folders of them)")
    p.add_argument("--lerobot-path", required=True,
                   help="folder(s) holding lerobot and its dataset dependencies (pip install --target), separated "
                        "by os.pathsep")
    p.add_argument("--work", type=Path, default=None, help="folder for the dataset and the loader's arrays, "
                                                           "replaced if there (default: a temporary one)")
    p.add_argument("--image-size", type=int, default=64, help="the bags' camera size (frames compared unresized)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lerobot_check_"))
    dataset, arrays = work / "dataset", work / "loader"
    for folder in (dataset, arrays, work / "cache"):
        shutil.rmtree(folder, ignore_errors=True)
    arrays.mkdir(parents=True)
    cfg = SyncConfig(image_size=args.image_size)
    lr.export_lerobot(args.bags, dataset, cfg)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.lerobot_path), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if subprocess.run([sys.executable, "-c", _LOADER, str(dataset), str(arrays)], env=env).returncode != 0:
        print(f"check_lerobot_loader: LeRobot's loader failed on {dataset} (its traceback above)", file=sys.stderr)
        return 2
    loaded = json.loads((arrays / "loader.json").read_text())
    got = {k: np.load(arrays / f"{k}.npy", allow_pickle=False)
           for k in ("observation.state", "action", "episode_index", "frame_index", *loaded["cameras"])}

    episodes, _ = load_episodes(args.bags, cfg, work / "cache")
    decoded, _ = lr.load_lerobot_episodes(dataset, cfg)  # the same videos through this workspace's decoder
    joints = list(cfg.joint_names)
    worst = {"state_rad": 0.0, "action_rad": 0.0, "image_vs_own_decoder": 0.0, "encoding_error_mean": 0.0}
    problems = []
    for e, (ep, dec) in enumerate(zip(episodes, decoded)):
        rows = np.nonzero(got["episode_index"] == e)[0]
        if len(rows) != len(ep.times_ns) or not np.array_equal(got["frame_index"][rows], np.arange(len(rows))):
            problems.append(f"episode {e} ({ep.name}): {len(rows)} frames from LeRobot, {len(ep.times_ns)} steps "
                            "in the bag")
            continue
        if any(loaded["tasks"][r] != ep.instruction for r in rows):
            problems.append(f"episode {e} ({ep.name}): task differs from the instruction {ep.instruction!r}")
        steps = ep.sample_steps
        state = lr.from_lerobot_units(got["observation.state"][rows].astype(np.float64), joints)
        action = lr.from_lerobot_units(got["action"][rows].astype(np.float64), joints)
        worst["state_rad"] = max(worst["state_rad"], float(np.abs(state[steps] - ep.state[steps]).max()))
        worst["action_rad"] = max(worst["action_rad"], float(np.abs(action[steps] - ep.action[steps]).max()))
        for c, cam in enumerate(cfg.camera_keys):
            theirs = got[lr.camera_feature(cam)][rows].astype(np.int16)
            own = dec.frames[cam][dec.frame_index[:, c]].astype(np.int16)
            worst["image_vs_own_decoder"] = max(worst["image_vs_own_decoder"], float(np.abs(theirs - own).max()))
            bag = ep.frames[cam][ep.frame_index[steps, c]].astype(np.int16)
            worst["encoding_error_mean"] = max(worst["encoding_error_mean"],
                                               float(np.abs(theirs[steps] - bag).mean()))
    if worst["state_rad"] > JOINT_TOL_RAD or worst["action_rad"] > JOINT_TOL_RAD:
        problems.append(f"joints differ from the bag by up to {max(worst['state_rad'], worst['action_rad']):.2e} "
                        f"rad (tolerance {JOINT_TOL_RAD})")
    if worst["image_vs_own_decoder"] > FRAME_DECODER_TOL:
        problems.append(f"LeRobot's frames differ from this workspace's decoding of the same video by up to "
                        f"{worst['image_vs_own_decoder']:.0f} grey levels (tolerance {FRAME_DECODER_TOL})")
    if worst["encoding_error_mean"] > ENCODING_ERROR_MAX:
        problems.append(f"LeRobot's frames differ from the bag's by {worst['encoding_error_mean']:.1f} grey levels "
                        f"on average: more than H.264 costs ({ENCODING_ERROR_MAX}); wrong frames?")
    for problem in problems:
        print(f"check_lerobot_loader: {problem}", file=sys.stderr)
    print(json.dumps({"ok": not problems, "lerobot": loaded["lerobot"], "episodes": len(episodes),
                      "frames": loaded["frames"], "cameras": loaded["cameras"], "worst": worst,
                      "tolerances": {"joint_rad": JOINT_TOL_RAD, "image_vs_own_decoder": FRAME_DECODER_TOL,
                                     "encoding_error_mean": ENCODING_ERROR_MAX}}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
