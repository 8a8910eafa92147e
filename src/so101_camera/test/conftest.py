"""Video files generated for the camera tests (OpenCV VideoWriter, MJPG in AVI)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest


def write_video(path: Path, frames: int, width: int, height: int, fps: float = 30.0,
                repeat_every: int = 0) -> Path:
    """Each frame has a distinct grey level band and index text; with repeat_every=k, frame k is a copy of k-1."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    previous = None
    for i in range(frames):
        if repeat_every and i % repeat_every == 0 and previous is not None:
            frame = previous
        else:
            frame = np.zeros((height, width, 3), dtype=np.uint8)
            frame[:, :, 2] = 200  # BGR: red
            frame[: height // 4, :, :] = (i * 7) % 256
            cv2.putText(frame, str(i), (10, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        writer.write(frame)
        previous = frame
    writer.release()
    return path


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "clip.avi", frames: int = 30, width: int = 320, height: int = 240, **kw) -> Path:
        return write_video(tmp_path / name, frames, width, height, **kw)
    return make
