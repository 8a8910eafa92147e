"""The node parameter tables in docs/*.md, generated from what the nodes declare: one source of truth.

Each node is constructed for real (one process per node, rclpy on the workspace's loopback DDS) and every
``declare_parameter`` call is recorded as it happens: name, type, default (the value passed to the call, not an
override) and the descriptor's description. The tables sit between ``<!-- params:NODE -->`` and
``<!-- /params:NODE -->`` in the doc that describes the node.

    python scripts/param_docs.py            # rewrite the tables
    python scripts/param_docs.py --check    # exit 1 naming each table that differs from the code
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Parameters rclpy declares on every node itself.
RCLPY_OWN = {"use_sim_time", "start_type_description_service"}


def _shipped_checkpoint(_tmp: Path) -> list[str]:
    from meanflow_policy.tools.sim_adapter import default_checkpoint

    return ["-p", f"checkpoint:={default_checkpoint()}"]


def _temp_dataset(tmp: Path) -> list[str]:
    return ["-p", f"dataset_dir:={tmp / 'dataset'}"]


def _viz_to_file(tmp: Path) -> list[str]:
    return ["-p", "spawn:=false", "-p", f"save_path:={tmp / 'params.rrd'}"]  # no viewer window here


@dataclass(frozen=True)
class NodeDoc:
    """Where a node's class lives, which doc holds its table, and the overrides it needs to start at all."""

    key: str
    module: str
    cls: str
    doc: str
    overrides: Callable[[Path], list[str]] | None = None


NODES = (
    NodeDoc("so101_driver", "so101_hardware.driver_node", "DriverNode", "docs/hardware.md"),
    NodeDoc("camera_node", "so101_camera.camera_node", "CameraNode", "docs/teleop_recording.md"),
    NodeDoc("teleop_node", "so101_teleop.teleop_node", "TeleopNode", "docs/teleop_recording.md"),
    NodeDoc("episode_recorder", "so101_teleop.recorder_node", "RecorderNode", "docs/teleop_recording.md",
            _temp_dataset),
    NodeDoc("policy_node", "meanflow_policy.ros.policy_node", "PolicyNode", "docs/policy_node.md",
            _shipped_checkpoint),
    NodeDoc("sim_node", "so101_sim.sim_node", "SimNode", "docs/simulation.md"),
    NodeDoc("viz_node", "meanflow_policy.ros.viz_node", "VizNode", "docs/visualisation.md", _viz_to_file),
)
TYPE_WORDS = {"BOOL": "bool", "INTEGER": "int", "DOUBLE": "double", "STRING": "string", "BYTE_ARRAY": "byte[]",
              "BOOL_ARRAY": "bool[]", "INTEGER_ARRAY": "int[]", "DOUBLE_ARRAY": "double[]",
              "STRING_ARRAY": "string[]"}


def dump_node(spec: NodeDoc, out: Path) -> None:
    """In this process: construct the node, record its declarations, write them to ``out`` as JSON."""
    import importlib

    import rclpy
    from rclpy.node import Node

    declared: list[dict] = []
    original = Node.declare_parameter

    def recording(self, name, value=None, descriptor=None, ignore_override=False):
        parameter = original(self, name, value, descriptor, ignore_override)
        if name not in RCLPY_OWN:
            declared.append({"name": name, "type": TYPE_WORDS.get(parameter.type_.name, parameter.type_.name),
                             "default": value, "description": descriptor.description if descriptor else "",
                             "read_only": bool(descriptor.read_only) if descriptor else False})
        return parameter

    Node.declare_parameter = recording  # observes rclpy's own call; the declaration itself is unchanged
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--ros-args", *(spec.overrides(Path(tmp)) if spec.overrides else [])]
        rclpy.init(args=args)
        node = getattr(importlib.import_module(spec.module), spec.cls)()
        out.write_text(json.dumps(declared))
        node.destroy_node()
        rclpy.try_shutdown()


def declared_parameters(spec: NodeDoc) -> list[dict]:
    """The node's declarations, from a fresh process (nodes start threads and timers; the process ends them)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.json"
        proc = subprocess.run([sys.executable, __file__, "--dump", spec.key, str(out)], capture_output=True,
                              text=True, timeout=110)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{spec.key} ({spec.module}.{spec.cls}) did not start (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        return json.loads(out.read_text())


def _default(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return str(value)


def table(params: list[dict]) -> str:
    """The markdown table (and, for a node that marks parameters read-only, the ones that change at runtime)."""
    rows = ["| parameter | type | default | description |", "|---|---|---|---|"]
    for p in params:
        text = p["description"].replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{p['name']}` | {p['type']} | {_default(p['default'])} | {text} |")
    if all(p["read_only"] for p in params):
        rows += ["", "All are read-only: set them when the node starts."]
    elif any(p["read_only"] for p in params):
        changeable = ", ".join(f"`{p['name']}`" for p in params if not p["read_only"])
        rows += ["", f"Changeable at runtime (`ros2 param set`): {changeable}; the others are read-only."]
    return "\n".join(rows)


def _block(key: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- params:{key} [^\n]*-->\n)(.*?)(\n<!-- /params:{key} -->)", re.S)


def update(docs_root: Path, keys: list[str], check: bool) -> list[str]:
    """Rewrite (or, with ``check``, compare) the tables; returns one line per table that differs or is missing."""
    problems = []
    texts: dict[Path, str] = {}
    for spec in (n for n in NODES if n.key in keys):
        path = docs_root / spec.doc
        text = texts.get(path, path.read_text())
        match = _block(spec.key).search(text)
        if match is None:
            problems.append(f"{path}: no table for {spec.key} (markers <!-- params:{spec.key} ... --> and "
                            f"<!-- /params:{spec.key} -->)")
            continue
        fresh = table(declared_parameters(spec))
        if match.group(2) != fresh:
            problems.append(f"{path}: the {spec.key} parameter table differs from the parameters "
                            f"{spec.module}.{spec.cls} declares (regenerate: python scripts/param_docs.py)")
            texts[path] = text[:match.start(2)] + fresh + text[match.end(2):]
        else:
            texts[path] = text
    if not check:
        for path, text in texts.items():
            path.write_text(text)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if a table is stale")
    parser.add_argument("--docs-root", type=Path, default=ROOT, help="directory holding docs/")
    parser.add_argument("--nodes", nargs="+", choices=[n.key for n in NODES], default=[n.key for n in NODES])
    parser.add_argument("--dump", nargs=2, metavar=("NODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dump:
        dump_node(next(n for n in NODES if n.key == args.dump[0]), Path(args.dump[1]))
        sys.stdout.flush()
        os._exit(0)  # threads a node started (inference, capture) must not keep the process alive
    problems = update(args.docs_root, args.nodes, args.check)
    missing = [p for p in problems if "no table" in p]
    if args.check or missing:
        for line in problems if args.check else missing:
            print(line, file=sys.stderr)
        return 1 if (problems if args.check else missing) else 0
    print(f"param_docs: {len(problems)} table(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
