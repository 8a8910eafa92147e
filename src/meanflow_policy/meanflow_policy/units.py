"""The floor on normalisation spreads, shared by the data pipeline, the model and the checkpoint format.

Plain Python (no numpy, torch or rclpy), so those layers agree on it without importing each other. Time units live in
so101_common.stamps.
"""
from __future__ import annotations

# rad: floor on a stored or computed standard deviation, so a joint that never moved in the demos does not blow up
# normalisation (training floors its stats at it; a checkpoint below it did not come from data).
MIN_STD = 1e-3
