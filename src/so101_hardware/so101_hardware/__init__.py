"""Feetech STS3215 bus protocol, calibration and the SO-101 driver node.

The node runs standalone or behind ros2_control's topic-based hardware.
"""
