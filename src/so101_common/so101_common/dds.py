"""Loopback-only DDS: the environment every test, demo and CI run must have."""
from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import IO

REQUIRED_RANGE = "LOCALHOST"
# Domains handed out to test runs, demos and benchmarks. With Fast DDS's port mapping (7400 + 250 * domain) ids up to
# 101 stay below Linux's ephemeral port range; 42 (build/env.sh's default) and 0 (ROS's default) are left to users.
PRIVATE_DOMAINS = range(60, 102)
DOMAIN_LOCK_DIR = Path(tempfile.gettempdir()) / "so101-ros-domains"
# Fast DDS's shared-memory transport: one segment per participant (16 MiB in the loopback profile) and one per port,
# each beside an "<name>_el" file that its live users hold locked (flock). A process killed (SIGKILL, a crash, a
# forked child's os._exit) leaves both behind in RAM-backed /dev/shm until reboot.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "fastdds_"
SHM_LOCK_SUFFIX = "_el"
_held_domain_lock: IO[bytes] | None = None


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


def _lock_is_free(path: Path) -> bool:
    """True when no process holds ``path`` locked: the Fast DDS segment it guards has no live user."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def remove_stale_shm(directory: Path = SHM_DIR, min_age_s: float = 5.0) -> int:
    """Delete Fast DDS shared-memory segments whose users are all gone; return the bytes freed.

    A segment counts as stale when its ``_el`` lock file is older than ``min_age_s`` (a participant being created
    may not have locked it yet; Fast DDS does so at once) and nobody holds its lock; a port segment takes its
    semaphore along. Live participants, ours or another workspace's, keep theirs.
    """
    freed = 0
    now = time.time()
    for lock in directory.glob(f"{SHM_PREFIX}*{SHM_LOCK_SUFFIX}"):
        try:
            if now - lock.stat().st_mtime < min_age_s or not _lock_is_free(lock):
                continue
        except OSError:
            continue
        name = lock.name[:-len(SHM_LOCK_SUFFIX)]
        for path in (directory / name, directory / f"sem.{name}_mutex", lock):
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except OSError:
                pass
    return freed


def require_loopback() -> None:
    """Raise if DDS could leave the machine; called by our CLIs that start nodes."""
    problems = loopback_problems()
    if problems:
        raise RuntimeError("DDS is not confined to loopback: " + "; ".join(problems)
                           + ". Source build/env.sh (make setup writes it).")


def claim_private_domain() -> int:
    """Give this process, and every node it starts, a ROS domain that no other run on this machine uses.

    ``SO101_ROS_DOMAIN_ID`` wins when set (the user chose). Otherwise the first domain in ``PRIVATE_DOMAINS`` whose
    lock file nobody holds is taken; the lock is held until this process exits, so two test runs, a test run beside
    a running demo, or two workspaces on one machine never see each other's nodes.
    """
    global _held_domain_lock
    chosen = os.environ.get("SO101_ROS_DOMAIN_ID", "")
    if chosen:
        if not chosen.isdigit():
            raise RuntimeError(f"SO101_ROS_DOMAIN_ID must be a number, got {chosen!r}")
        os.environ["ROS_DOMAIN_ID"] = chosen
        return int(chosen)
    if _held_domain_lock is not None:
        return int(os.environ["ROS_DOMAIN_ID"])
    DOMAIN_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for domain in PRIVATE_DOMAINS:
        handle = open(DOMAIN_LOCK_DIR / f"{domain}.lock", "ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_domain_lock = handle
        os.environ["ROS_DOMAIN_ID"] = str(domain)
        return domain
    raise RuntimeError(f"every ROS domain in {PRIVATE_DOMAINS.start}-{PRIVATE_DOMAINS.stop - 1} is held by another "
                       f"run on this machine (locks in {DOMAIN_LOCK_DIR}); set SO101_ROS_DOMAIN_ID to choose one")
