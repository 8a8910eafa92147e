"""Loopback-only DDS: the environment every test, demo and CI run must have."""
from __future__ import annotations

import os
from pathlib import Path

REQUIRED_RANGE = "LOCALHOST"


def loopback_problems(env: dict[str, str] | None = None) -> list[str]:
    """Return what is wrong with the DDS environment for loopback-only traffic (empty list: fine)."""
    env = dict(os.environ if env is None else env)
    problems = []
    if env.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != REQUIRED_RANGE:
        problems.append(f"ROS_AUTOMATIC_DISCOVERY_RANGE is {env.get('ROS_AUTOMATIC_DISCOVERY_RANGE')!r}, "
                        f"must be {REQUIRED_RANGE!r}")
    if not env.get("ROS_DOMAIN_ID", "").isdigit():
        problems.append("ROS_DOMAIN_ID is not set to a number")
    profile = env.get("FASTDDS_DEFAULT_PROFILES_FILE", "")
    if not profile or not Path(profile).is_file():
        problems.append(f"FASTDDS_DEFAULT_PROFILES_FILE {profile!r} is not a file")
    else:
        text = Path(profile).read_text()
        if "<useBuiltinTransports>false</useBuiltinTransports>" not in text:
            problems.append(f"{profile} keeps Fast DDS's builtin transports (they reach non-loopback interfaces)")
        if "<address>127.0.0.1</address>" not in text:
            problems.append(f"{profile} does not whitelist 127.0.0.1 for UDP")
    if env.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") != "rmw_fastrtps_cpp":
        problems.append(f"RMW_IMPLEMENTATION is {env['RMW_IMPLEMENTATION']!r}; the loopback profile is Fast DDS's")
    return problems


def require_loopback() -> None:
    """Raise if DDS could leave the machine; called by our CLIs that start nodes."""
    problems = loopback_problems()
    if problems:
        raise RuntimeError("DDS is not confined to loopback: " + "; ".join(problems)
                           + ". Source build/env.sh (make setup writes it).")
