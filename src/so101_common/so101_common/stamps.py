"""Time units shared by every package: the one nanosecond constant and conversions (plain Python, no rclpy).

Node code converts ROS stamps with rclpy.time.Time / rclpy.duration.Duration; cores and tools that work on
integer nanoseconds (bags, the sim clock, the policy's input store) use these.
"""
from __future__ import annotations

NS_PER_S = 1_000_000_000


def ns_to_s(ns: float) -> float:
    """Nanoseconds (an int or a numpy array of them) -> seconds."""
    return ns / NS_PER_S


def s_to_ns(seconds: float) -> int:
    """Seconds -> whole nanoseconds, rounded (not truncated: 0.3 s must not become 299999999 ns)."""
    return int(round(seconds * NS_PER_S))
