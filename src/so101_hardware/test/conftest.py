"""Fixtures: an emulated STS3215 bus on a pty pair, and a ServoBus opened on it."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from so101_hardware.emulator import BusEmulator
from so101_hardware.protocol import ServoBus


@pytest.fixture
def emulator() -> Iterator[BusEmulator]:
    with BusEmulator() as emu:
        yield emu


@pytest.fixture
def bus(emulator: BusEmulator) -> Iterator[ServoBus]:
    # 50 ms, not a real bus's 10 ms: the emulator shares this loaded 2-core machine with the rest of the suite (a
    # full `make test` once timed out a read at 10 ms x 3 tries), as the driver-node tests' EMULATED_BUS does.
    with ServoBus(emulator.port_name, reply_timeout_ms=50.0, retries=2) as servo_bus:
        yield servo_bus
