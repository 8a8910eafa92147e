"""Run with only a fresh (non-symlinked) install space sourced: finds the shipped checkpoint, the URDF and the
policy node through the install space alone, and prints one JSON line of what it found.

tests/test_install_space.py copies this file next to the install space and runs it from there, so neither the
source tree nor $SO101_WS can be what it finds.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ament_index_python.packages import get_package_prefix

import meanflow_policy
import so101_sim
from so101_sim.env import SimEnv
from so101_sim.policy_plugins import default_checkpoint, load_checkpoint_policy
from so101_sim.scene import SceneConfig
from so101_common.kinematics import ArmKinematics
from so101_teleop.kinematics import default_urdf_path


def main() -> int:
    checkpoint = default_checkpoint()
    policy = load_checkpoint_policy(checkpoint)
    env = SimEnv(SceneConfig(image_height=64, image_width=64))
    try:
        env.reset(seed=0)
        chunk = policy(env.observation())
    finally:
        env.close()
    urdf = default_urdf_path()
    kinematics = ArmKinematics.from_file(urdf)
    node_exe = Path(get_package_prefix("meanflow_policy")) / "lib" / "meanflow_policy" / "policy_node"
    log = Path("policy_node.log")
    with log.open("wb") as out:
        node = subprocess.Popen([str(node_exe), "--ros-args", "-p", f"checkpoint:={checkpoint}"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline and node.poll() is None and "warm-up sample took" not in log.read_text():
            time.sleep(0.2)
        ready = "warm-up sample took" in log.read_text()
        node.send_signal(signal.SIGINT)
        try:
            node_rc = node.wait(30.0)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node_rc = node.wait()
    print(json.dumps({
        "sys_path": sys.path, "so101_sim": so101_sim.__file__, "meanflow_policy": meanflow_policy.__file__,
        "checkpoint": str(checkpoint), "chunk_shape": list(chunk.shape), "chunk_finite": bool(np.isfinite(chunk).all()),
        "urdf": str(urdf), "urdf_joints": list(kinematics.chain.urdf_joint_names), "policy_node": str(node_exe),
        "node_ready": ready, "node_rc": node_rc, "node_log": log.read_text()[-2000:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
