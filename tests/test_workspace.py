"""The workspace is laid out as a ROS 2 user expects, and its metadata is valid."""
import ast
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "so101_interfaces": "ament_cmake",
    "so101_common": "ament_python",
    "so101_hardware": "ament_python",
    "so101_camera": "ament_python",
    "so101_teleop": "ament_python",
    "meanflow_policy": "ament_python",
    "so101_sim": "ament_python",
    "so101_bringup": "ament_cmake",
    "so101_description": "ament_cmake",
}


@pytest.mark.parametrize("name,build_type", sorted(PACKAGES.items()))
def test_package_manifest(name, build_type):
    root = ET.parse(ROOT / "src" / name / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == name
    assert root.find("export/build_type").text == build_type
    assert root.findtext("license") and root.findtext("description")


def test_top_level_layout():
    for entry in ("src", "launch", "config", "urdf", "docker", "tests", "colcon.meta", "README.md", "Makefile",
                  ".ci/run", "config/dds/fastdds-localhost.xml"):
        assert (ROOT / entry).exists(), entry
    meta = json.loads((ROOT / "colcon.meta").read_text())
    assert set(meta["names"]) <= set(PACKAGES)
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_launch_files_are_valid_python_with_generate_launch_description():
    files = list(ROOT.glob("launch/*.launch.py")) + list(ROOT.glob("src/*/launch/*.launch.py"))
    for file in files:
        tree = ast.parse(file.read_text(), filename=str(file))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "generate_launch_description" in names, file


def test_interfaces_are_importable():
    from so101_interfaces.msg import ChunkTiming
    from so101_interfaces.srv import SetInstruction, StartEpisode

    assert set(SetInstruction.Response.get_fields_and_field_types()) == {"accepted", "message"}
    assert set(StartEpisode.Response.get_fields_and_field_types()) == {"success", "message", "episode_path"}
    assert StartEpisode.Request.get_fields_and_field_types() == {"instruction": "string"}
    assert "nfe" in ChunkTiming.get_fields_and_field_types()


def test_one_definition_of_each_shared_constant():
    """One source of truth: the nanosecond constant and the std floor are defined once in src/."""
    for pattern in ("NS_PER_S = ", "MIN_STD = "):
        places = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")
                  if any(line.startswith(pattern) for line in p.read_text().splitlines())]
        assert len(places) == 1, f"{pattern.strip()} defined in {places}"


def test_every_package_has_a_readme():
    for name in PACKAGES:
        assert (ROOT / "src" / name / "README.md").is_file(), f"src/{name}/README.md is missing"
