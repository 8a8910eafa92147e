"""The capture core alone: sources, conversion, looping, reconnect with backoff, dedup, calibration."""
from __future__ import annotations

import numpy as np
import pytest

from so101_camera.capture import (Backoff, CaptureConfig, FrameSource, RateMeter, SourceKind, load_calibration,
                                  test_pattern as make_pattern, to_rgb)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_config_kinds_and_errors() -> None:
    assert CaptureConfig("/dev/video0").kind is SourceKind.DEVICE
    assert CaptureConfig("/dev/v4l/by-id/usb-cam-video-index0").kind is SourceKind.DEVICE
    assert CaptureConfig("test_pattern").kind is SourceKind.TEST_PATTERN
    assert CaptureConfig("clip.avi").kind is SourceKind.FILE
    with pytest.raises(ValueError, match="source is empty"):
        CaptureConfig("")
    with pytest.raises(ValueError, match="width and height"):
        CaptureConfig("x.avi", width=0)
    with pytest.raises(ValueError, match="fps"):
        CaptureConfig("x.avi", fps=0)
    with pytest.raises(ValueError, match="fourcc"):
        CaptureConfig("x.avi", fourcc="MJPEG")


def test_to_rgb_converts_and_resizes() -> None:
    bgr = np.zeros((60, 80, 3), np.uint8)
    bgr[..., 2] = 255
    rgb = to_rgb(bgr, 40, 30)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == 255).all() and (rgb[..., 2] == 0).all()
    assert to_rgb(np.full((30, 40), 9, np.uint8), 40, 30).shape == (30, 40, 3)


def test_test_pattern_frames_differ() -> None:
    src = FrameSource(CaptureConfig("test_pattern", width=64, height=48))
    a, b = src.read(), src.read()
    assert a is not None and b is not None
    assert a[0].shape == (48, 64, 3) and not np.array_equal(a[0], b[0])
    assert b[1] >= a[1]
    assert not np.array_equal(make_pattern(0, 64, 48), make_pattern(1, 64, 48))


def test_file_source_loops_with_right_size_and_colour(make_video) -> None:
    path = make_video(frames=10, width=160, height=120)
    src = FrameSource(CaptureConfig(str(path), width=160, height=120))
    frames = [src.read() for _ in range(25)]
    assert all(f is not None for f in frames), "a looped file must keep delivering frames"
    rgb = frames[0][0]
    assert rgb.shape == (120, 160, 3)
    # Lower part was pure red in BGR order; published as RGB it must be red in channel 0.
    assert rgb[100, 80, 0] > 150 and rgb[100, 80, 2] < 60
    assert src.stats.frames == 25 and src.stats.reconnects == 0 and src.stats.failures == 0
    stamps = [f[1] for f in frames]
    assert stamps == sorted(stamps)


def test_repeated_frames_are_dropped(make_video) -> None:
    path = make_video(frames=12, width=96, height=64, repeat_every=3)
    src = FrameSource(CaptureConfig(str(path), width=96, height=64))
    delivered = [src.read() for _ in range(12)]
    assert sum(d is None for d in delivered) == 3
    assert src.stats.duplicates_dropped == 3


def test_vanished_file_retries_with_backoff_and_recovers(make_video) -> None:
    path = make_video(frames=5, width=64, height=48)
    clock = FakeClock()
    src = FrameSource(CaptureConfig(str(path), width=64, height=48), backoff=Backoff(0.5, 2.0), monotonic=clock)
    assert src.read() is not None
    hidden = path.with_suffix(".gone")
    path.rename(hidden)
    results = [src.read() for _ in range(6)]  # the open handle reaches EOF, then the reopen fails
    assert results[-1] is None and not src.connected
    assert "does not exist" in src.stats.last_error
    assert src.retry_in_s == pytest.approx(0.5)
    clock.t += 0.6
    assert src.read() is None and src.retry_in_s == pytest.approx(1.0)  # failed again: delay doubled
    clock.t += 1.1
    assert src.read() is None and src.retry_in_s == pytest.approx(2.0)
    clock.t += 2.1
    assert src.read() is None and src.retry_in_s == pytest.approx(2.0)  # capped
    hidden.rename(path)
    assert src.read() is None, "still inside the backoff delay"
    clock.t += 2.1
    assert src.read() is not None and src.connected
    assert src.stats.failures == 4 and src.stats.reconnects == 1


def test_missing_device_reports_clearly() -> None:
    src = FrameSource(CaptureConfig("/dev/video_does_not_exist_77"))
    assert src.read() is None
    assert "does not exist" in src.stats.last_error and not src.connected


def _calibration_yaml(width: int, height: int) -> str:
    return f"""image_width: {width}
image_height: {height}
camera_name: wrist
camera_matrix: {{rows: 3, cols: 3, data: [500, 0, 320, 0, 500, 240, 0, 0, 1]}}
distortion_model: plumb_bob
distortion_coefficients: {{rows: 1, cols: 5, data: [0.1, -0.2, 0, 0, 0]}}
rectification_matrix: {{rows: 3, cols: 3, data: [1, 0, 0, 0, 1, 0, 0, 0, 1]}}
projection_matrix: {{rows: 3, cols: 4, data: [500, 0, 320, 0, 0, 500, 240, 0, 0, 0, 1, 0]}}
"""


def test_calibration_loads_and_checks_size(tmp_path) -> None:
    good = tmp_path / "wrist.yaml"
    good.write_text(_calibration_yaml(640, 480))
    cal = load_calibration(good, 640, 480)
    assert cal.k[0] == 500 and cal.k[2] == 320 and len(cal.p) == 12 and cal.d[1] == -0.2
    with pytest.raises(ValueError, match="calibrated for 640x480 but the camera publishes 320x240"):
        load_calibration(good, 320, 240)
    bad = tmp_path / "bad.yaml"
    bad.write_text(_calibration_yaml(640, 480).replace("data: [500, 0, 320, 0, 500, 240, 0, 0, 1]", "data: [1, 2]"))
    with pytest.raises(ValueError, match="'camera_matrix' must have 9 values, got 2"):
        load_calibration(bad, 640, 480)
    with pytest.raises(ValueError, match="does not exist"):
        load_calibration(tmp_path / "nope.yaml", 640, 480)


def test_rate_meter() -> None:
    meter = RateMeter(window_s=1.0)
    for i in range(31):
        meter.tick(10.0 + i / 30)
    assert meter.rate(11.0) == pytest.approx(30.0, rel=0.05)
    assert meter.rate(20.0) == 0.0
