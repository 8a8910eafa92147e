"""Fixtures shared by the policy-node tests: a tiny checkpoint and a node process with its probe."""
import pytest

from meanflow_policy.ros.probe import PolicyProbe

NODE = "meanflow_policy.ros.policy_node"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from meanflow_policy.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("policy") / "tiny", seed=0)


@pytest.fixture
def start_policy(checkpoint, node_process, ros_node):
    """Start the policy node (10 Hz, an instruction already set) and a probe in the test's node."""

    def start(**params):
        proc = node_process(NODE, params={"checkpoint": str(checkpoint), "rate_hz": 10.0,
                                          "instruction": "put the cube in the box", **params})
        return proc, PolicyProbe(ros_node, height=48, width=64)

    return start
