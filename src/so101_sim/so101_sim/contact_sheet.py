"""so101-sim-sheet: a contact sheet of one expert episode (top row wrist camera, bottom row top camera).

For checking by eye that both cameras see a task's objects at the dataset's image size: frames at the start,
at evenly spaced instants of the expert's episode, and at its end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from so101_sim.env import SimEnv
from so101_sim.expert import ScriptedExpert
from so101_sim.scene import SceneConfig
from so101_sim.tasks import TASKS


def expert_frames(env: SimEnv, seed: int, columns: int) -> list[dict[str, np.ndarray]]:
    """Camera images at ``columns`` evenly spaced control steps of the expert's episode for ``seed``."""
    env.reset(seed)
    plan = ScriptedExpert(env).plan()
    keep = set(np.linspace(0, len(plan), columns).round().astype(int).tolist())
    frames = [env.render()] if 0 in keep else []
    for k, target in enumerate(plan, start=1):
        env.command(target)
        env.step()
        if k in keep:
            frames.append(env.render())
    return frames


def sheet(frames: list[dict[str, np.ndarray]], gap: int = 2) -> np.ndarray:
    """Wrist images in the top row, top-camera images below, ``gap`` white pixels between them."""
    rows = []
    for camera in ("wrist", "top"):
        tiles = []
        for f in frames:
            tiles += [f[camera], np.full((f[camera].shape[0], gap, 3), 255, np.uint8)]
        rows += [np.concatenate(tiles[:-1], axis=1)]
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([rows[0], spacer, rows[1]], axis=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-sim-sheet", description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pick_place", choices=sorted(TASKS))
    parser.add_argument("--seed", type=int, default=0, help="episode seed")
    parser.add_argument("--image-size", type=int, default=128, help="camera images are SIZE x SIZE pixels")
    parser.add_argument("--columns", type=int, default=5, help="frames per camera")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    if args.columns < 2 or args.image_size < 16 or args.seed < 0:
        parser.error("--columns must be >= 2, --image-size >= 16 and --seed >= 0")
    env = SimEnv(SceneConfig(image_height=args.image_size, image_width=args.image_size), task=args.task)
    try:
        image = sheet(expert_frames(env, args.seed, args.columns))
    finally:
        env.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, image, optimize=True)
    print(f"{args.out}: {image.shape[1]}x{image.shape[0]} px, {args.out.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
