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


@pytest.fixture(scope="module", autouse=True)
def restore_torch_threads():
    """Tests that run the CLIs in-process (--cpu-threads 1) leave the thread count as they found it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Deterministic, comparable CPU runs: one torch thread for the module (opt in with usefixtures)."""
    from meanflow_policy.testing import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def good_bag(tmp_path_factory: pytest.TempPathFactory):
    """One short synthetic episode bag (16 x 16 images) with an instruction."""
    from meanflow_policy.data.demo_bags import synthetic_episode, write_bag

    return write_bag(tmp_path_factory.mktemp("good") / "ep", synthetic_episode(0, duration_s=1.0, height=16,
                                                                               width=16), instruction="reach")

