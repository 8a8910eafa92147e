"""Units shared by every layer: the one nanosecond constant and the floor on normalisation spreads.

Plain Python (no numpy, torch or rclpy), so the data pipeline, the model and the runtime core agree on them
without importing each other. Node code converts ROS stamps with rclpy.time.Time / rclpy.duration.Duration.
"""
from __future__ import annotations

NS_PER_S = 1_000_000_000
# rad: floor on a stored or computed standard deviation, so a joint that never moved in the demos does not blow up
# normalisation (training floors its stats at it; a checkpoint below it did not come from data).
MIN_STD = 1e-3


def ns_to_s(ns: float) -> float:
    """Nanoseconds (an int or a numpy array of them) -> seconds."""
    return ns / NS_PER_S


def s_to_ns(seconds: float) -> int:
    """Seconds -> whole nanoseconds, rounded (not truncated: 0.3 s must not become 299999999 ns)."""
    return int(round(seconds * NS_PER_S))
