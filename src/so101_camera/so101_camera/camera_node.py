"""Camera node: publishes ``image_raw`` (rgb8) + ``camera_info`` in its namespace, plus /diagnostics.

Run one instance per camera, e.g. ``python -m so101_camera.camera_node --ros-args -r __ns:=/camera/wrist
-p source:=/dev/video0``. Frames are grabbed on a dedicated thread (a V4L2 read blocks until the next frame) and
stamped right after the grab.
"""
from __future__ import annotations

import sys
import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from so101_common.graph import DIAGNOSTICS_TOPIC
from so101_common.images import rgb_to_image
from so101_common.spin import spin_node

from so101_camera.capture import (
    Backoff,
    CaptureConfig,
    FrameSource,
    RateMeter,
    SourceKind,
    load_calibration,
)


class CameraNode(Node):
    def __init__(self) -> None:
        super().__init__("camera")

        def declare(name: str, default, description: str):
            return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

        source = declare("source", "test_pattern",
                         "/dev/videoN, a /dev/v4l/by-id/... path, a video file (looped) or 'test_pattern'")
        width = declare("width", 640, "published image width in pixels (frames are resized if the source differs)")
        height = declare("height", 480, "published image height in pixels")
        fps = declare("fps", 30.0, "capture rate requested from a device; publish rate for files/test pattern")
        fourcc = declare("fourcc", "MJPG", "pixel format requested from a V4L2 device (4 characters)")
        frame_id = declare("frame_id", "", "header.frame_id of images (default: '<node name>_optical_frame')")
        calibration = declare("calibration_file", "",
                              "camera_calibration YAML for CameraInfo; empty: uncalibrated CameraInfo")
        initial = declare("reconnect_initial_s", 0.2, "first retry delay after the source fails")
        maximum = declare("reconnect_max_s", 2.0, "retry delay cap (the delay doubles after each failure)")

        self.config = CaptureConfig(source=str(source), width=int(width), height=int(height), fps=float(fps),
                                    fourcc=str(fourcc))
        self.frame_id = str(frame_id) or f"{self.get_name()}_optical_frame"
        self.camera_info = self._camera_info(str(calibration))
        self.source = FrameSource(self.config, clock_ns=lambda: self.get_clock().now().nanoseconds,
                                  backoff=Backoff(float(initial), float(maximum)))
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = self.create_publisher(Image, "image_raw", qos)
        self.info_pub = self.create_publisher(CameraInfo, "camera_info", qos)
        self.diag_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)
        self.meter = RateMeter()
        self._was_connected = True
        self._running = True
        self._thread = threading.Thread(target=self._capture_loop, name="capture", daemon=True)
        self.create_timer(1.0, self._publish_diagnostics)
        self._thread.start()
        self.get_logger().info(f"capturing {self.config.kind.value} {self.config.source} at "
                               f"{self.config.width}x{self.config.height} {self.config.fps:g} fps -> "
                               f"{self.image_pub.topic_name}")

    def _camera_info(self, calibration_file: str) -> CameraInfo:
        info = CameraInfo()
        info.width, info.height = self.config.width, self.config.height
        info.header.frame_id = self.frame_id
        if calibration_file:
            cal = load_calibration(calibration_file, self.config.width, self.config.height)
            info.distortion_model = cal.distortion_model
            info.k, info.d, info.r, info.p = list(cal.k), list(cal.d), list(cal.r), list(cal.p)
            self.get_logger().info(f"calibration loaded from {calibration_file}")
        return info

    def _capture_loop(self) -> None:
        period = 1.0 / self.config.fps
        paced = self.config.kind is not SourceKind.DEVICE
        next_t = time.monotonic()
        while self._running and rclpy.ok(context=self.context):
            result = self.source.read()
            if result is not None:
                rgb, stamp_ns = result
                self._publish(rgb, stamp_ns)
            self._log_connection_change()
            if not self.source.connected:
                time.sleep(min(0.05, max(0.005, self.source.retry_in_s)))
                next_t = time.monotonic()
            elif paced:
                next_t += period
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_t = time.monotonic()

    def _publish(self, rgb, stamp_ns: int) -> None:
        msg = rgb_to_image(rgb, stamp_ns, self.frame_id)
        self.camera_info.header.stamp = msg.header.stamp
        self.image_pub.publish(msg)
        self.info_pub.publish(self.camera_info)
        self.meter.tick(time.monotonic())

    def _log_connection_change(self) -> None:
        connected = self.source.connected
        if connected == self._was_connected:
            return
        self._was_connected = connected
        if connected:
            self.get_logger().info(f"{self.config.source} is back (reconnect #{self.source.stats.reconnects})")
        else:
            self.get_logger().error(f"{self.config.source} failed: {self.source.stats.last_error}; "
                                    "retrying with backoff")

    def _publish_diagnostics(self) -> None:
        stats = self.source.stats
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: camera"
        status.hardware_id = self.config.source
        rate = self.meter.rate(time.monotonic())
        if not self.source.connected:
            status.level = DiagnosticStatus.ERROR
            status.message = f"source unavailable, retrying: {stats.last_error}"
        elif rate < 0.5 * self.config.fps:
            status.level = DiagnosticStatus.WARN
            status.message = f"publishing {rate:.1f} fps, below half of {self.config.fps:g}"
        else:
            status.level = DiagnosticStatus.OK
            status.message = f"publishing {rate:.1f} fps"
        values = {"fps": f"{rate:.2f}", "frames": stats.frames, "duplicates_dropped": stats.duplicates_dropped,
                  "empty_dropped": stats.empty_dropped, "reconnects": stats.reconnects,
                  "failures": stats.failures, "last_error": stats.last_error}
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [status]
        self.diag_pub.publish(array)

    def shutdown(self) -> None:
        self._running = False
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self.source.close()


def main(args: list[str] | None = None) -> None:
    sys.exit(spin_node(CameraNode, "camera_node", args, cleanup=lambda node: node.shutdown()))


if __name__ == "__main__":
    main()
