"""Episode bags read where the ROS packages are not installed (a GPU training machine): rosbags' CDR decoder
(bag_reader.message_decoder) gives the same episode, frames included, as rclpy's deserializer."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from meanflow_policy.data.demo_bags import synthetic_episode, write_bag

# Run first in the child: every ROS package is missing there, as on a machine without the ROS wheels.
NO_ROS = textwrap.dedent("""
    import sys
    class NoRos:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("rclpy", "sensor_msgs", "trajectory_msgs", "std_msgs", "builtin_interfaces"):
                raise ImportError(f"no module named {name!r} (no ROS on this machine)")
            return None
    sys.meta_path.insert(0, NoRos())
""")
READ = textwrap.dedent("""
    import sys
    import numpy as np
    from meanflow_policy.data import bag_reader
    bag, out, clock = sys.argv[1], sys.argv[2], sys.argv[3]
    topics = bag_reader.BagTopics()
    raw = bag_reader.read_episode(bag, topics, clock=clock)
    arrays = {"state_times": raw.state_times, "states": raw.states}
    for cam, times in raw.image_times.items():
        arrays[f"image_times_{cam}"] = times
        frames = bag_reader.read_frames(bag, dict(topics.cameras)[cam], np.arange(len(times)), lambda rgb: rgb)
        arrays[f"frames_{cam}"] = np.stack([frames[i] for i in range(len(times))])
    for i, command in enumerate(raw.trajectories):
        arrays[f"trajectory_{i}"] = np.concatenate([[command.time_ns], command.times_s, command.positions.ravel()])
    arrays["rclpy_loaded"] = np.array("rclpy" in sys.modules)
    np.savez(out, **arrays)
""")


def _read(bag, out, clock, without_ros):
    code = (NO_ROS if without_ros else "") + READ
    subprocess.run([sys.executable, "-c", code, str(bag), str(out), clock], check=True, timeout=120)
    return dict(np.load(out))


@pytest.mark.parametrize("clock", ["bag", "header"])
def test_bags_read_without_ros_match_rclpy(tmp_path, clock):
    bag = tmp_path / "episode_0"
    write_bag(bag, synthetic_episode(3, 1.0, height=24, width=32), instruction="put the red cube in the box")
    with_ros = _read(bag, tmp_path / "ros.npz", clock, without_ros=False)
    without = _read(bag, tmp_path / "no_ros.npz", clock, without_ros=True)
    assert bool(with_ros.pop("rclpy_loaded")) and not bool(without.pop("rclpy_loaded"))
    assert set(with_ros) == set(without) and any(k.startswith("trajectory_") for k in with_ros)
    for key, value in with_ros.items():
        np.testing.assert_array_equal(without[key], value, err_msg=key)
    assert with_ros["frames_top"].shape[0] > 0 and with_ros["states"].shape[1] == 6
