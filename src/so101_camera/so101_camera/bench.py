"""Speed figures of the capture core: ``python -m so101_camera.bench`` (prints, asserts nothing).

Per-frame cost of what the node does besides waiting for the camera: decode (file source), BGR->RGB,
duplicate check, and the rgb8 Image message build; it must stay far below a 30 Hz period per camera.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from so101_camera.capture import CaptureConfig, FrameSource
from so101_common.images import rgb_to_image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (args.width, args.height))
        for _ in range(60):
            writer.write(rng.integers(0, 255, (args.height, args.width, 3), np.uint8))
        writer.release()
        for source in (str(path), "test_pattern"):
            src = FrameSource(CaptureConfig(source, width=args.width, height=args.height))
            times = []
            for _ in range(args.frames):
                t0 = time.perf_counter()
                result = src.read()
                if result is not None:
                    rgb_to_image(result[0], result[1])
                times.append((time.perf_counter() - t0) * 1e3)
            name = "MJPG file" if source != "test_pattern" else "test_pattern"
            print(f"{name} {args.width}x{args.height}: read+convert+Image median {np.median(times):.2f} ms, "
                  f"p95 {np.percentile(times, 95):.2f} ms, {src.stats.frames} frames")


if __name__ == "__main__":
    main()
