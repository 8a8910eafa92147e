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
