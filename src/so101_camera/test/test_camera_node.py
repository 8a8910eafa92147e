"""The camera node as its own process over DDS: a generated video file in, rgb8 images + CameraInfo out."""
from __future__ import annotations

import os
import signal
import time
import zlib

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image

from so101_common.graph import DIAGNOSTICS_TOPIC, camera_image_topic, camera_info_topic, camera_namespace
from so101_common.images import image_to_rgb, stamp_to_ns
from so101_common.testing import spin_until

# A private namespace prefix: other processes on this DDS domain may run cameras of their own.
PREFIX = f"/camera_test_{os.getpid()}"
CALIBRATION = """image_width: 320
image_height: 240
camera_name: wrist
camera_matrix: {rows: 3, cols: 3, data: [250, 0, 160, 0, 250, 120, 0, 0, 1]}
distortion_model: plumb_bob
distortion_coefficients: {rows: 1, cols: 5, data: [0.01, 0, 0, 0, 0]}
rectification_matrix: {rows: 3, cols: 3, data: [1, 0, 0, 0, 1, 0, 0, 0, 1]}
projection_matrix: {rows: 3, cols: 4, data: [250, 0, 160, 0, 0, 250, 120, 0, 0, 0, 1, 0]}
"""


def test_video_file_rate_size_and_recovery(node_process, ros_node, make_video, tmp_path) -> None:
    video = make_video(frames=30, width=320, height=240)
    calibration = tmp_path / "wrist.yaml"
    calibration.write_text(CALIBRATION)
    node = node_process("so101_camera.camera_node",
                        params={"source": str(video), "width": 320, "height": 240, "fps": 30.0,
                                "calibration_file": str(calibration), "reconnect_initial_s": 0.2,
                                "reconnect_max_s": 0.5},
                        extra_args=["--ros-args", "-r", f"__ns:={PREFIX}{camera_namespace('wrist')}"], name="wrist")
    images: list[tuple[float, Image]] = []
    infos: list[CameraInfo] = []
    diags: list[DiagnosticStatus] = []
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    ros_node.create_subscription(Image, PREFIX + camera_image_topic("wrist"),
                                 lambda m: images.append((time.monotonic(), m)), qos)
    ros_node.create_subscription(CameraInfo, PREFIX + camera_info_topic("wrist"), infos.append, qos)
    ros_node.create_subscription(DiagnosticArray, DIAGNOSTICS_TOPIC,
                             lambda m: diags.extend(d for d in m.status if d.hardware_id == str(video)), 10)

    assert spin_until(ros_node, lambda: len(images) >= 5, 20.0), node.output()
    images.clear()
    spin_until(ros_node, lambda: False, 2.0)
    times = [t for t, _ in images]
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 22.0 <= rate <= 38.0, f"rate {rate:.1f} Hz, expected ~30"
    for _, msg in images:
        assert (msg.encoding, msg.width, msg.height, msg.step) == ("rgb8", 320, 240, 960)
        assert len(msg.data) == 320 * 240 * 3
        assert msg.header.frame_id == "wrist_optical_frame"
    stamps = [stamp_to_ns(m.header.stamp) for _, m in images]
    assert all(b > a for a, b in zip(stamps, stamps[1:])), "stamps must strictly increase"
    crcs = [zlib.crc32(bytes(m.data)) for _, m in images]
    assert all(a != b for a, b in zip(crcs, crcs[1:])), "consecutive frames must differ"
    assert image_to_rgb(images[0][1])[200, 160, 0] > 150  # red stays in the R channel
    assert infos and infos[-1].width == 320 and infos[-1].k[0] == 250.0 and infos[-1].d[0] == 0.01
    assert set(stamps) & {stamp_to_ns(i.header.stamp) for i in infos}, "CameraInfo carries the image stamps"
    assert spin_until(ros_node, lambda: any(d.level == DiagnosticStatus.OK for d in diags), 3.0)

    hidden = video.with_suffix(".hidden")
    video.rename(hidden)
    diags.clear()
    assert spin_until(ros_node, lambda: any(d.level == DiagnosticStatus.ERROR for d in diags), 6.0), node.output()
    error = next(d for d in diags if d.level == DiagnosticStatus.ERROR)
    assert "does not exist" in error.message and error.hardware_id == str(video)
    images.clear()
    spin_until(ros_node, lambda: False, 0.6)
    assert not images, "no frames may be published while the file is gone"

    hidden.rename(video)
    assert spin_until(ros_node, lambda: len(images) >= 10, 5.0), node.output()
    diags.clear()
    assert spin_until(ros_node, lambda: any(d.level == DiagnosticStatus.OK for d in diags), 3.0)
    reconnects = {kv.key: kv.value for kv in diags[-1].values}["reconnects"]
    assert int(reconnects) >= 1
    assert node.alive()
    assert "failed" in node.output() and "is back" in node.output()
    node.proc.send_signal(signal.SIGINT)
    assert node.proc.wait(10) == 0, "SIGINT must end the node cleanly"


def test_bad_parameters_exit_with_a_clear_error(node_process, tmp_path) -> None:
    calibration = tmp_path / "wrist.yaml"
    calibration.write_text(CALIBRATION)
    node = node_process("so101_camera.camera_node", params={"source": "test_pattern", "width": 640, "height": 480,
                                                            "calibration_file": str(calibration)},
                        discovery=False)
    assert node.proc.wait(20) == 2
    assert "invalid configuration" in node.output() and "calibrated for 320x240" in node.output()
