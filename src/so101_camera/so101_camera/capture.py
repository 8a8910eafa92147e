"""Frame capture without ROS: V4L2 devices, looped video files and a synthetic test pattern.

The node only wires this to topics. Everything that decides *which* frames are published lives here so it can
be tested alone: sources are reopened with exponential backoff when they fail (a camera unplugged, a file
removed), frames are converted to RGB at the requested size, and empty or repeated frames are never returned.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import cv2
import numpy as np
import yaml

TEST_PATTERN = "test_pattern"


class SourceKind(str, Enum):
    DEVICE = "device"
    FILE = "file"
    TEST_PATTERN = "test_pattern"


class CaptureError(RuntimeError):
    """A source that cannot deliver frames right now (missing, unplugged, unreadable)."""


@dataclass(frozen=True)
class CaptureConfig:
    """What to open and how; validated on construction so a bad parameter fails at start with its name."""

    source: str
    width: int = 640
    height: int = 480
    fps: float = 30.0
    fourcc: str = "MJPG"

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source is empty; use /dev/videoN, a /dev/v4l/by-id/... path, a video file or "
                             f"{TEST_PATTERN!r}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive, got {self.width}x{self.height}")
        if not 0 < self.fps <= 240:
            raise ValueError(f"fps must be in (0, 240], got {self.fps}")
        if len(self.fourcc) != 4:
            raise ValueError(f"fourcc must have 4 characters (e.g. 'MJPG'), got {self.fourcc!r}")

    @property
    def kind(self) -> SourceKind:
        if self.source == TEST_PATTERN:
            return SourceKind.TEST_PATTERN
        if self.source.startswith("/dev/"):
            return SourceKind.DEVICE
        return SourceKind.FILE


@dataclass
class Backoff:
    """Exponential retry delay: initial, doubled after each failure up to maximum, reset on success."""

    initial_s: float = 0.2
    maximum_s: float = 2.0
    current_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.maximum_s < self.initial_s:
            raise ValueError(f"backoff needs 0 < initial ({self.initial_s}) <= maximum ({self.maximum_s})")

    def next_delay(self) -> float:
        self.current_s = self.initial_s if self.current_s == 0 else min(self.maximum_s, self.current_s * 2)
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


def to_rgb(frame_bgr: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV BGR (or gray) frame -> (height, width, 3) uint8 RGB, resized only when the size differs."""
    if frame_bgr is None or frame_bgr.size == 0:
        raise CaptureError("empty frame")
    if frame_bgr.ndim == 2:
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2RGB)
    else:
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    if rgb.shape[0] != height or rgb.shape[1] != width:
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


def test_pattern(index: int, width: int, height: int) -> np.ndarray:
    """A moving colour pattern with the frame index drawn on it: every frame differs, so staleness shows."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = x.astype(np.uint8)
    rgb[..., 1] = y.astype(np.uint8)
    rgb[..., 2] = 128
    bar = (index * 4) % width
    rgb[:, bar:bar + max(1, width // 40)] = 255
    cv2.putText(rgb, str(index), (8, max(16, height // 6)), cv2.FONT_HERSHEY_SIMPLEX,
                max(0.4, height / 480), (0, 0, 0), 2)
    return rgb


@dataclass
class CaptureStats:
    frames: int = 0
    duplicates_dropped: int = 0
    empty_dropped: int = 0
    reconnects: int = 0
    failures: int = 0
    last_error: str = ""


class FrameSource:
    """Delivers fresh RGB frames from one configured source, reopening it with backoff after failures.

    ``read()`` returns ``(rgb, stamp_ns)`` for a new frame, or None when nothing new can be delivered now
    (the caller just tries again later). ``stamp_ns`` comes from ``clock_ns`` taken right after the grab.
    """

    def __init__(self, config: CaptureConfig, clock_ns: Callable[[], int] = time.time_ns,
                 backoff: Backoff | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.stats = CaptureStats()
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._backoff = backoff or Backoff()
        self._cap: cv2.VideoCapture | None = None
        self._retry_at = 0.0
        self._last_crc: int | None = None
        self._pattern_index = 0
        self._failed_since_open = False

    @property
    def connected(self) -> bool:
        return self.config.kind is SourceKind.TEST_PATTERN or self._cap is not None

    @property
    def retry_in_s(self) -> float:
        return max(0.0, self._retry_at - self._monotonic())

    def _open(self) -> None:
        cfg = self.config
        if cfg.kind is SourceKind.FILE and not Path(cfg.source).is_file():
            raise CaptureError(f"video file {cfg.source} does not exist")
        if cfg.kind is SourceKind.DEVICE:
            if not Path(cfg.source).exists():
                raise CaptureError(f"camera device {cfg.source} does not exist (unplugged?)")
            cap = cv2.VideoCapture(cfg.source, cv2.CAP_V4L2)
            if cap.isOpened():
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*cfg.fourcc))
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
                cap.set(cv2.CAP_PROP_FPS, cfg.fps)
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        else:
            cap = cv2.VideoCapture(cfg.source)
        if not cap.isOpened():
            cap.release()
            raise CaptureError(f"OpenCV cannot open {cfg.kind.value} {cfg.source}")
        if self._failed_since_open:
            self.stats.reconnects += 1
            self._failed_since_open = False
        self._cap = cap

    def _fail(self, message: str) -> None:
        # The error is recorded before the source reads as disconnected: diagnostics published from another thread
        # in between must name it.
        self.stats.failures += 1
        self.stats.last_error = message
        self._failed_since_open = True
        self.close()
        self._retry_at = self._monotonic() + self._backoff.next_delay()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _grab_bgr(self) -> np.ndarray | None:
        assert self._cap is not None
        ok, frame = self._cap.read()
        if ok:
            return frame
        if self.config.kind is SourceKind.FILE:
            # End of file: reopen from the path (so a file that vanished is noticed) and loop. The old capture stays
            # ``connected`` until the reopen succeeded or the failure is recorded (_fail).
            finished = self._cap
            self._open()
            finished.release()
            ok, frame = self._cap.read()
            if ok:
                return frame
            raise CaptureError(f"video file {self.config.source} has no readable frames")
        raise CaptureError(f"camera {self.config.source} returned no frame")

    def read(self) -> tuple[np.ndarray, int] | None:
        cfg = self.config
        if cfg.kind is SourceKind.TEST_PATTERN:
            rgb = test_pattern(self._pattern_index, cfg.width, cfg.height)
            self._pattern_index += 1
            return self._accept(rgb, self._clock_ns())
        if self._cap is None:
            if self._monotonic() < self._retry_at:
                return None
            try:
                self._open()
            except CaptureError as exc:
                self._fail(str(exc))
                return None
        try:
            frame = self._grab_bgr()
            stamp = self._clock_ns()
        except (CaptureError, cv2.error) as exc:
            self._fail(str(exc))
            return None
        if frame is None or frame.size == 0:
            self.stats.empty_dropped += 1
            return None
        self._backoff.reset()
        return self._accept(to_rgb(frame, cfg.width, cfg.height), stamp)

    def _accept(self, rgb: np.ndarray, stamp_ns: int) -> tuple[np.ndarray, int] | None:
        crc = zlib.crc32(rgb.data)
        if crc == self._last_crc:
            self.stats.duplicates_dropped += 1
            return None
        self._last_crc = crc
        self.stats.frames += 1
        return rgb, stamp_ns


@dataclass(frozen=True)
class Calibration:
    """Intrinsics in the ROS camera_calibration YAML layout (what camera_calibration's cameracalibrator saves)."""

    width: int
    height: int
    camera_name: str
    distortion_model: str
    k: tuple[float, ...]
    d: tuple[float, ...]
    r: tuple[float, ...]
    p: tuple[float, ...]


def _matrix(data: dict, key: str, rows: int, cols: int | None, path: Path) -> tuple[float, ...]:
    block = data.get(key)
    if not isinstance(block, dict) or "data" not in block:
        raise ValueError(f"{path}: '{key}' is missing or has no 'data' list")
    values = [float(v) for v in block["data"]]
    if cols is not None and len(values) != rows * cols:
        raise ValueError(f"{path}: '{key}' must have {rows * cols} values, got {len(values)}")
    return tuple(values)


def load_calibration(path: str | Path, width: int, height: int) -> Calibration:
    """Read a camera_calibration YAML and check it matches the published image size."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration file {path} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a camera calibration YAML (top level is not a mapping)")
    try:
        cal_w, cal_h = int(data["image_width"]), int(data["image_height"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: image_width/image_height missing or not integers") from exc
    if (cal_w, cal_h) != (width, height):
        raise ValueError(f"{path}: calibrated for {cal_w}x{cal_h} but the camera publishes {width}x{height}")
    return Calibration(
        width=cal_w, height=cal_h, camera_name=str(data.get("camera_name", "")),
        distortion_model=str(data.get("distortion_model", "plumb_bob")),
        k=_matrix(data, "camera_matrix", 3, 3, path),
        d=_matrix(data, "distortion_coefficients", 1, None, path),
        r=_matrix(data, "rectification_matrix", 3, 3, path),
        p=_matrix(data, "projection_matrix", 3, 4, path),
    )


class RateMeter:
    """Frames per second over a sliding window of timestamps (for diagnostics)."""

    def __init__(self, window_s: float = 2.0) -> None:
        self._window = window_s
        self._times: list[float] = []

    def tick(self, t: float) -> None:
        self._times.append(t)
        cutoff = t - self._window
        while self._times and self._times[0] < cutoff:
            self._times.pop(0)

    def rate(self, now: float) -> float:
        times = [x for x in self._times if x >= now - self._window]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(1e-9, times[-1] - times[0])
