"""The test environment itself must keep DDS on loopback: this fails if it does not."""
import os
from pathlib import Path

from so101_common.dds import loopback_problems


def test_this_environment_is_loopback_only():
    assert loopback_problems() == []
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"


def test_detects_unsafe_environments(tmp_path):
    good = dict(os.environ)
    assert loopback_problems({**good, "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET"})
    assert loopback_problems({k: v for k, v in good.items() if k != "ROS_DOMAIN_ID"})
    open_profile = tmp_path / "open.xml"
    open_profile.write_text("<dds><profiles/></dds>")
    problems = loopback_problems({**good, "FASTDDS_DEFAULT_PROFILES_FILE": str(open_profile)})
    assert any("builtin transports" in p for p in problems)


def test_each_run_gets_its_own_domain():
    """This run holds a private domain; a second run on the machine (another process) gets a different one."""
    import subprocess
    import sys

    from so101_common.dds import PRIVATE_DOMAINS

    mine = int(os.environ["ROS_DOMAIN_ID"])
    assert mine in PRIVATE_DOMAINS
    code = "from so101_common.dds import claim_private_domain as c; print(c())"
    env = {k: v for k, v in os.environ.items() if k != "SO101_ROS_DOMAIN_ID"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) in PRIVATE_DOMAINS and int(other.stdout) != mine
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "SO101_ROS_DOMAIN_ID": "77"},
                            capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "77"
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "SO101_ROS_DOMAIN_ID": "x"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "SO101_ROS_DOMAIN_ID must be a number" in bad.stderr


def test_segments_of_killed_participants_are_freed_and_live_ones_kept():
    """A node killed with SIGKILL leaves its Fast DDS shared-memory segment (16 MiB of RAM) in /dev/shm; the
    cleaner frees it and leaves a live node's segment, which the live node keeps using."""
    import signal
    import subprocess
    import sys
    import time

    from so101_common.dds import SHM_DIR, remove_stale_shm

    node = ("import rclpy, sys, time; from std_msgs.msg import String; rclpy.init(); n = rclpy.create_node('shm');"
            "p = n.create_publisher(String, 'shm_probe', 1); print('up', flush=True); sys.stdin.read()")

    def start() -> tuple[subprocess.Popen, set[str]]:
        proc = subprocess.Popen([sys.executable, "-c", node], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        time.sleep(0.5)
        # A participant's own segments are those whose lock file it holds (/proc/locks: pid, then device:inode);
        # it also maps the segments of the participants it talks to, and port segments are shared.
        held = {line.split()[5].rsplit(":", 1)[1] for line in Path("/proc/locks").read_text().splitlines()
                if line.split()[4] == str(proc.pid)}
        return proc, {f.name[:-3] for f in SHM_DIR.glob("fastdds_*_el")
                      if not f.name.startswith("fastdds_port") and str(f.stat().st_ino) in held}

    killed, killed_files = start()
    live, live_files = start()
    try:
        assert killed_files and live_files and not killed_files & live_files
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert all((SHM_DIR / f).exists() for f in killed_files)  # the leak this guards against
        time.sleep(2.5)
        assert remove_stale_shm(min_age_s=2.0) >= 16 * 2**20
        assert not any((SHM_DIR / f).exists() for f in killed_files)
        assert all((SHM_DIR / f).exists() for f in live_files)
        assert live.poll() is None
    finally:
        for proc in (killed, live):
            if proc.poll() is None:
                proc.communicate("", timeout=10)
    assert live.returncode == 0 and not any((SHM_DIR / f).exists() for f in live_files)  # a clean exit frees its own
