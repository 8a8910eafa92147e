"""Shared SO-101 contract and cores (no rclpy import in this package)."""
