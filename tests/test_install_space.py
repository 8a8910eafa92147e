"""Acceptance: a plain `colcon build` (no --symlink-install) into a fresh prefix, then, with only that install
space sourced, the sim finds the shipped checkpoint and the policy node, and the teleop finds the URDF, through
the share directories alone (no source tree on sys.path, no $SO101_WS).

This is how the distro image and anyone installing a package alone get the stack; a path computed from a source
file's location (parents[2]/..., Path(__file__).parent.parent) passes a symlinked workspace and fails here.
Duration: see docs/testing.md (the build of so101_interfaces dominates).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from so101_common.graph import JOINT_NAMES

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
# What may pass from the test's environment: DDS confinement, locale, display, nothing that names a prefix.
KEEP = ("HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
        "RMW_IMPLEMENTATION", "MUJOCO_GL", "PYOPENGL_PLATFORM", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in KEEP if k in os.environ}
    env.update(PATH=f"{VENV}/bin:/usr/bin:/bin", AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV),
               ROS_LOG_DIR=str(tmp / "ros_log"), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def install_space(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plain_install")
    build = subprocess.run(
        [str(VENV / "bin" / "colcon"), "--log-base", str(tmp / "log"), "build", "--base-paths", "src",
         "--build-base", str(tmp / "build"), "--install-base", str(tmp / "install"),
         "--event-handlers", "console_cohesion-", "summary+"],
        cwd=ROOT, env=clean_env(tmp), capture_output=True, text=True, timeout=1100)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return tmp / "install"


def test_plain_install_space_alone_finds_checkpoint_urdf_and_policy_node(install_space):
    tmp = install_space.parent
    # Installed copies, not links into the source tree, of every shipped checkpoint; the default one is the probe's.
    shipped = install_space / "meanflow_policy" / "share" / "meanflow_policy" / "checkpoints"
    for name in ("sim_multitask", "sim_pick_place", "sim_pick_place_rtc", "sim_multitask_smollm2"):
        weights = shipped / name / "model.safetensors"
        assert weights.is_file() and not weights.is_symlink(), weights
    installed = shipped / "sim_multitask"
    probe = tmp / "probe"
    probe.mkdir()
    shutil.copy(ROOT / "tests" / "nodes" / "install_space_probe.py", probe / "probe.py")
    env = clean_env(tmp)
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(
        install_space / "so101_bringup" / "share" / "so101_bringup" / "config" / "dds" / "fastdds-localhost.xml")
    run = subprocess.run(["bash", "-c", f"source {install_space}/setup.bash && python probe.py"], cwd=probe,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    # Neither the source packages nor the workspace's own (symlinked) install space may be importable.
    forbidden = [str(ROOT / d) for d in ("src", "install", "tests", "build")]
    assert not [p for p in found["sys_path"] if p == str(ROOT) or p.startswith(tuple(forbidden))], found["sys_path"]
    for key in ("so101_sim", "meanflow_policy", "checkpoint", "urdf", "policy_node"):
        assert found[key].startswith(str(install_space)), (key, found[key])
    assert found["checkpoint"] == str(installed)
    assert found["urdf"] == str(install_space / "so101_description" / "share" / "so101_description" / "urdf" /
                                "so101.urdf.xacro")
    assert found["urdf_joints"][:len(JOINT_NAMES)] == list(JOINT_NAMES)
    assert found["chunk_finite"] and found["chunk_shape"][1] == len(JOINT_NAMES)
    assert found["node_ready"], found["node_log"]
    assert found["node_rc"] == 0, found["node_log"]
