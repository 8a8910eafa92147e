"""The policy node as a managed node over real DDS: nothing is published before configure + activate; deactivate,
shutdown and Ctrl-C hold the arm; a checkpoint that cannot load fails configure and leaves the node alive; the
default autostart acts by itself as before."""
import numpy as np
import pytest
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from std_srvs.srv import SetBool

from meanflow_policy.ros.probe import PolicyProbe
from meanflow_policy.testing import corrupt_checkpoint
from so101_common import graph
from so101_common.testing import spin_until, wait_until_answering

NODE = "meanflow_policy.ros.policy_node"
START_TIMEOUT = 90.0
INSTRUCTION = "put the cube in the box"


class Lifecycle:
    """The node's lifecycle services, called from the test's node."""

    def __init__(self, node) -> None:
        self.node = node
        self.change = node.create_client(ChangeState, f"/{graph.POLICY_NODE}/change_state")
        self.get = node.create_client(GetState, f"/{graph.POLICY_NODE}/get_state")

    def wait(self) -> None:
        # An unknown transition label is answered with success=False and changes nothing.
        harmless = ChangeState.Request(transition=Transition(label="no-such-transition"))
        assert wait_until_answering(self.node, self.change, harmless, START_TIMEOUT), "change_state never answered"
        assert wait_until_answering(self.node, self.get, GetState.Request(), START_TIMEOUT), "get_state never answered"

    def _call(self, future, timeout: float = 60.0):
        assert spin_until(self.node, future.done, timeout), "lifecycle service call got no answer"
        return future.result()

    def transition(self, transition_id: int) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self._call(self.change.call_async(request), timeout=START_TIMEOUT).success

    def state(self) -> int:
        return self._call(self.get.call_async(GetState.Request())).current_state.id


def _quiet(node, probe: PolicyProbe, seconds: float) -> bool:
    """True when no trajectory arrives for ``seconds``."""
    before = len(probe.trajectories)
    spin_until(node, lambda: False, seconds)
    return len(probe.trajectories) == before


def _assert_hold_at(probe: PolicyProbe, positions: np.ndarray) -> None:
    hold = probe.trajectories[-1][0]
    assert len(hold.points) == 1 and tuple(hold.joint_names) == graph.JOINT_NAMES, "the last message is no hold"
    np.testing.assert_allclose(hold.points[0].positions, positions, atol=1e-9)


def _start(node_process, ros_node, checkpoint, **params):
    proc = node_process(NODE, params={"checkpoint": str(checkpoint), "rate_hz": 10.0, "instruction": INSTRUCTION,
                                      "autostart": False, **params})
    probe = PolicyProbe(ros_node, height=48, width=64)
    lifecycle = Lifecycle(ros_node)
    lifecycle.wait()
    return proc, probe, lifecycle


def test_configure_activate_deactivate_cleanup_shutdown(checkpoint, node_process, ros_node):
    proc, probe, lifecycle = _start(node_process, ros_node, checkpoint)
    probe.start_streams(image_hz=15.0)
    assert lifecycle.state() == State.PRIMARY_STATE_UNCONFIGURED
    assert _quiet(ros_node, probe, 1.0) and probe.timings == [], "published while unconfigured"
    assert ros_node.count_publishers(graph.TRAJECTORY_TOPIC) == 0, "topics exist before configure"

    # configure: the checkpoint loads, topics and services exist, but nothing acts.
    assert lifecycle.transition(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.state() == State.PRIMARY_STATE_INACTIVE
    assert "configured:" in proc.output() and "ready:" not in proc.output()
    assert spin_until(ros_node, lambda: ros_node.count_publishers(graph.TRAJECTORY_TOPIC) == 1, 10.0)
    # (while inactive every enable request is refused and changes nothing)
    assert wait_until_answering(ros_node, probe.enable_client, SetBool.Request(data=True), 10.0)
    refused = probe.enable(True)
    assert spin_until(ros_node, refused.done, 30.0)
    assert not refused.result().success and "inactive" in refused.result().message
    assert _quiet(ros_node, probe, 1.5) and probe.timings == [], "published while inactive"

    # activate: chunks.
    assert lifecycle.transition(Transition.TRANSITION_ACTIVATE)
    assert lifecycle.state() == State.PRIMARY_STATE_ACTIVE
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 2, 30.0), proc.output()
    assert len(probe.trajectories[-1][0].points) == 20 and probe.timings

    # deactivate: a hold at the measured position, then silence (a chunk in flight is discarded).
    probe.sensors.positions = probe.sensors.positions + np.array([0.1, -0.2, 0.05, 0.0, 0.3, 0.2])
    spin_until(ros_node, lambda: False, 0.3)  # the node sees the new joint positions
    assert lifecycle.transition(Transition.TRANSITION_DEACTIVATE)
    assert lifecycle.state() == State.PRIMARY_STATE_INACTIVE
    spin_until(ros_node, lambda: False, 0.5)
    _assert_hold_at(probe, probe.sensors.positions)
    assert _quiet(ros_node, probe, 1.5), "chunks after deactivate"
    assert "inactive: stopped acting; holding at the current position" in proc.output()

    # cleanup releases the topics; a second configure + activate acts again.
    assert lifecycle.transition(Transition.TRANSITION_CLEANUP)
    assert lifecycle.state() == State.PRIMARY_STATE_UNCONFIGURED
    assert spin_until(ros_node, lambda: ros_node.count_publishers(graph.TRAJECTORY_TOPIC) == 0, 10.0)
    assert lifecycle.transition(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.transition(Transition.TRANSITION_ACTIVATE)
    count = len(probe.trajectories)
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= count + 2, 30.0), proc.output()

    # shutdown from active: the same hold, then finalized, and the process still exits cleanly.
    probe.sensors.positions = probe.sensors.positions - 0.1
    spin_until(ros_node, lambda: False, 0.3)
    assert lifecycle.transition(Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert lifecycle.state() == State.PRIMARY_STATE_FINALIZED
    spin_until(ros_node, lambda: False, 0.5)
    _assert_hold_at(probe, probe.sensors.positions)
    assert _quiet(ros_node, probe, 1.0), "chunks after shutdown"
    assert proc.alive()
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output()


@pytest.mark.parametrize("kind,named", [
    ("missing", "cannot load checkpoint"),
    ("truncated_weights", "model.safetensors: not a readable safetensors file"),
])
def test_configure_with_a_bad_checkpoint_fails_and_the_node_stays_unconfigured(checkpoint, node_process, ros_node,
                                                                              tmp_path, kind, named):
    bad = tmp_path / "nowhere" if kind == "missing" else corrupt_checkpoint(checkpoint, tmp_path / kind, kind)
    proc, probe, lifecycle = _start(node_process, ros_node, bad)
    assert not lifecycle.transition(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.state() == State.PRIMARY_STATE_UNCONFIGURED
    assert proc.alive()
    out = proc.output()
    failures = [line for line in out.splitlines() if "configure failed" in line]
    assert len(failures) == 1 and named in failures[0] and "ERROR" in failures[0], out
    assert "Traceback" not in out and "FATAL" not in out
    assert not lifecycle.transition(Transition.TRANSITION_ACTIVATE), "activated while unconfigured"
    assert not lifecycle.transition(Transition.TRANSITION_CONFIGURE), "a second try must fail the same way"
    assert lifecycle.state() == State.PRIMARY_STATE_UNCONFIGURED and proc.alive()
    assert probe.trajectories == []
    assert proc.stop() == 0, proc.output()


def test_autostart_by_default_acts_without_a_lifecycle_manager(start_policy, ros_node):
    proc, probe = start_policy()
    probe.start_streams(image_hz=15.0)
    lifecycle = Lifecycle(ros_node)
    lifecycle.wait()
    assert spin_until(ros_node, lambda: len(probe.trajectories) >= 2, START_TIMEOUT), proc.output()
    assert lifecycle.state() == State.PRIMARY_STATE_ACTIVE
    assert "ready:" in proc.output() and "waiting for configure" not in proc.output()
    # Ctrl-C while acting leaves the active state like shutdown does: the hold goes out before the process ends.
    probe.sensors.positions = probe.sensors.positions + 0.1
    spin_until(ros_node, lambda: False, 0.3)
    assert proc.stop() == 0, proc.output()
    spin_until(ros_node, lambda: False, 0.5)
    _assert_hold_at(probe, probe.sensors.positions)
    assert "shutting down (SIGINT): stopped acting; holding at the current position" in proc.output()
