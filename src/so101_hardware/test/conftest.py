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
    # 200 ms, not a real bus's 10 ms: the emulator is a thread of this test process, on a 2-core machine shared with
    # the rest of the suite. Tests count each fault kind exactly, so an emulator that is merely late must never look
    # like a fault: at 10 ms a full `make test` timed out a read 3 times; at 50 ms a sync read once timed out whole
    # (its bad-checksum frame counted as a timeout).
    with ServoBus(emulator.port_name, reply_timeout_ms=200.0, retries=2) as servo_bus:
        yield servo_bus
