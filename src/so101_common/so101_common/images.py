"""sensor_msgs/Image <-> numpy for the encodings we use (no cv_bridge in the pip environment).

Reading needs only the message's fields, so ``image_to_rgb`` also takes the messages rosbags decodes where the ROS
message packages are not installed (a training machine reading bags); building one imports sensor_msgs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sensor_msgs.msg import Image

_CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}


class ImageError(ValueError):
    """An Image message that cannot be turned into pixels (encoding, sizes, buffer length)."""


def image_to_rgb(msg: Any) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array; raises ImageError naming what is wrong."""
    enc = msg.encoding
    if enc not in _CHANNELS:
        raise ImageError(f"unsupported image encoding {enc!r}; expected one of {sorted(_CHANNELS)}")
    ch = _CHANNELS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageError(f"image has zero size ({w}x{h})")
    if step < w * ch:
        raise ImageError(f"image step {step} is smaller than width*channels {w * ch}")
    data = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, (bytes, bytearray, memoryview)) else msg.data,
                         dtype=np.uint8)
    if data.size < step * h:
        raise ImageError(f"image data has {data.size} bytes; {w}x{h} {enc} with step {step} needs {step * h}")
    rows = data[: step * h].reshape(h, step)[:, : w * ch].reshape(h, w, ch)
    if enc == "rgb8":
        return rows.copy()
    if enc == "bgr8":
        return rows[:, :, ::-1].copy()
    return np.repeat(rows, 3, axis=2)


def rgb_to_image(rgb: np.ndarray, stamp_ns: int = 0, frame_id: str = "") -> Image:
    """Build an rgb8 Image from an (H, W, 3) uint8 array."""
    from sensor_msgs.msg import Image

    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    msg = Image()
    msg.header.stamp.sec = int(stamp_ns // 1_000_000_000)
    msg.header.stamp.nanosec = int(stamp_ns % 1_000_000_000)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = int(rgb.shape[1] * 3)
    msg.data = rgb.tobytes()
    return msg


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
