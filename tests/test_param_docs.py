"""The parameter tables in docs/*.md are what the nodes declare (scripts/param_docs.py generates them).

Each node is constructed for real in its own process; a table that drifts from the code fails here, naming the
doc and the node, with the command that regenerates it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "param_docs.py"
NODES = ("so101_driver", "camera_node", "teleop_node", "episode_recorder", "policy_node", "sim_node", "viz_node")


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", *args], capture_output=True, text=True,
                          timeout=110)


@pytest.mark.parametrize("node", NODES)
def test_docs_table_matches_declared_parameters(node: str) -> None:
    proc = _check("--nodes", node)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_a_stale_or_missing_table_is_named(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    doc = tmp_path / "docs" / "teleop_recording.md"
    text = doc.read_text()
    assert "| `fps` | double | 30.0 |" in text
    doc.write_text(text.replace("| `fps` | double | 30.0 |", "| `fps` | double | 15.0 |", 1))
    proc = _check("--docs-root", str(tmp_path), "--nodes", "camera_node")
    assert proc.returncode == 1
    assert f"{doc}: the camera_node parameter table differs" in proc.stderr

    doc.write_text(text.replace("<!-- /params:camera_node -->", ""))
    proc = _check("--docs-root", str(tmp_path), "--nodes", "camera_node")
    assert proc.returncode == 1
    assert f"{doc}: no table for camera_node" in proc.stderr
