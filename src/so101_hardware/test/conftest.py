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
    with ServoBus(emulator.port_name, reply_timeout_ms=10.0, retries=2) as servo_bus:
        yield servo_bus
