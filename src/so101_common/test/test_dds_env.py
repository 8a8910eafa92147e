"""The test environment itself must keep DDS on loopback: this fails if it does not."""
import os

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
