"""Speed figures of the teleop and recorder cores: ``python -m so101_teleop.bench`` (prints, asserts nothing).

IK step and teleop tick must fit well inside a 30 Hz control period; one 640x480 rgb8 frame written to the
episode bag must cost far less than a camera period, since two cameras share the recorder's one thread.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from so101_common.graph import RECORDED_TOPICS, camera_image_topic
from so101_common.joints import home_vector
from so101_common.kinematics import ArmKinematics
from so101_teleop.kinematics import default_urdf_path
from so101_teleop.recorder import KNOWN_TOPIC_TYPES, EpisodeRecorder
from so101_teleop.teleop import JoyMapping, TeleopCore, TeleopSettings


def _timed(fn, n: int) -> tuple[float, float]:
    """Median and 95th percentile in milliseconds over n calls."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 95))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=300, help="640x480 frames written in the recorder bench")
    args = parser.parse_args(argv)

    kin = ArmKinematics.from_file(default_urdf_path())
    q = home_vector()
    print("fk: median %.3f ms, p95 %.3f ms" % _timed(lambda: kin.fk(q), 2000))
    print("ik_step (DLS, 4 joints): median %.3f ms, p95 %.3f ms"
          % _timed(lambda: kin.ik_step(q, np.array([0.001, 0.0, 0.0])), 2000))

    mapping = JoyMapping()
    core = TeleopCore(mapping, TeleopSettings(), kin)
    core.on_joint_states(["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"], q)
    core.on_joy(0.0, [0.0, 0.0], [int(i == mapping.button_mode) for i in range(11)])
    buttons = [int(i == mapping.button_deadman) for i in range(11)]
    clock = {"t": 0.0}

    def tick() -> None:
        clock["t"] += 1 / 30
        core.on_joy(clock["t"], [0.3, 0.5], buttons)
        core.step(clock["t"])

    print("teleop tick (Joy + Cartesian step): median %.3f ms, p95 %.3f ms" % _timed(tick, 2000))

    from rclpy.serialization import serialize_message
    from so101_common.images import rgb_to_image
    frame = serialize_message(rgb_to_image(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)))
    with tempfile.TemporaryDirectory() as tmp:
        rec = EpisodeRecorder(Path(tmp), min_free_bytes=0)
        for topic in RECORDED_TOPICS:
            rec.add_topic(topic, KNOWN_TOPIC_TYPES[topic])
        rec.start("benchmark")
        topic = camera_image_topic("wrist")
        stamp = {"t": 0}

        def write() -> None:
            stamp["t"] += 1
            rec.write(topic, stamp["t"], frame)

        med, p95 = _timed(write, args.frames)
        t0 = time.perf_counter()
        rec.stop()
        close_ms = (time.perf_counter() - t0) * 1e3
        mb = len(frame) / 2**20
        print(f"recorder write 640x480 rgb8 ({mb:.2f} MiB): median {med:.2f} ms, p95 {p95:.2f} ms "
              f"({mb / (med / 1e3):.0f} MiB/s); stop+index {close_ms:.0f} ms for {args.frames} frames")


if __name__ == "__main__":
    main()
