"""so101-sim-bench: prints the sim's speed figures (no pass/fail; run it on the machine you report).

- one control step (physics substeps following a trajectory) + rendering both cameras, per image size;
- scripted demo generation (expert + rendering + bag writing) per episode, extrapolated to 100 episodes.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from so101_sim.demos import generate
from so101_sim.env import SimEnv
from so101_sim.expert import ScriptedExpert
from so101_sim.scene import SceneConfig


def bench_step(size: int, steps: int) -> dict[str, float]:
    env = SimEnv(SceneConfig(image_height=size, image_width=size))
    plan = ScriptedExpert(env).plan()
    env.render()
    physics, render = [], []
    for k in range(steps):
        env.command(plan[k % len(plan)])
        t0 = time.perf_counter()
        env.step()
        t1 = time.perf_counter()
        env.render()
        render.append(time.perf_counter() - t1)
        physics.append(t1 - t0)
    env.close()
    p, r = 1e3 * np.median(physics), 1e3 * np.median(render)
    return {"size": size, "physics_ms": p, "render_ms": r, "total_ms": p + r}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so101-sim-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,96,128", help="image sizes to time, comma-separated")
    parser.add_argument("--steps", type=int, default=200, help="control steps timed per size")
    parser.add_argument("--demo-episodes", type=int, default=3, help="demo episodes timed (0: skip)")
    parser.add_argument("--demo-image-size", type=int, default=128)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, MUJOCO_GL={os.environ.get('MUJOCO_GL', '')}")
    print("| image size | physics per control step (ms) | render 2 cameras (ms) | total per control step (ms) |")
    print("|---|---|---|---|")
    for size in sizes:
        r = bench_step(size, args.steps)
        print(f"| {size} | {r['physics_ms']:.2f} | {r['render_ms']:.2f} | {r['total_ms']:.2f} |")
    if args.demo_episodes > 0:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            results = generate(Path(tmp) / "demos", args.demo_episodes, image_size=args.demo_image_size,
                               log=lambda _msg: None)
            wall = time.perf_counter() - started
        per = wall / len(results)
        print(f"demo generation at {args.demo_image_size} px: {per:.2f} s/episode "
              f"({results[0].steps} control steps), 100 episodes ~ {100 * per / 60:.1f} min, "
              f"{sum(r.success for r in results)}/{len(results)} successful")
    return 0


if __name__ == "__main__":
    sys.exit(main())
