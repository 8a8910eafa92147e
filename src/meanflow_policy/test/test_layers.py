"""The package's layers: base (units, images) < model, data < train, viz < ros < tools. Lower layers never
import upper ones (lazy imports inside functions included), every module imports alone, and the data pipeline never
pulls in the VLM backbone or transformers."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import meanflow_policy

PACKAGE = Path(meanflow_policy.__file__).parent
BASE = {"meanflow_policy", "meanflow_policy.units", "meanflow_policy.images"}
# Which layers each layer may import (besides the base and itself).
ALLOWED = {
    "model": set(),
    "data": set(),
    "train": {"model", "data"},
    "viz": {"data"},  # Rerun logging of bags and live messages: no model, no torch
    "ros": {"model", "viz"},
    "tools": {"model", "data", "train", "ros", "viz", "testing"},
    "testing": {"model"},
}
# Within the model layer: the file format knows the config, not the network.
CHECKPOINT_MAY_IMPORT = {"meanflow_policy.model.configuration"}


def _modules() -> dict[str, Path]:
    out = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = file
    return out


def _imports(file: Path) -> set[str]:
    """Every meanflow_policy module a file imports, at any depth of the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "meanflow_policy"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return None if module in BASE or len(parts) < 2 else parts[1]


def test_lower_layers_never_import_upper_ones():
    modules = _modules()
    assert {"model", "data", "train", "ros", "tools"} <= {_layer(m) for m in modules}
    unplaced = sorted(m for m in modules if _layer(m) is not None and _layer(m) not in ALLOWED)
    assert not unplaced, f"modules in no layer (place them in one, or give them a row in ALLOWED): {unplaced}"
    violations = []
    for name, file in modules.items():
        layer = _layer(name)
        for imported in _imports(file):
            if imported not in modules:  # a name imported from a module, e.g. meanflow_policy.model.objectives
                continue
            target = _layer(imported)
            if target is None or target == layer:
                continue
            if layer is None or target not in ALLOWED[layer]:
                violations.append(f"{name} ({layer or 'base'}) imports {imported} ({target})")
    assert not violations, "\n".join(violations)


def test_checkpoint_format_knows_nothing_of_the_model():
    modules = _modules()
    imported = {m for m in _imports(modules["meanflow_policy.model.checkpoint"]) if m in modules} - BASE
    assert imported <= CHECKPOINT_MAY_IMPORT, imported


def test_module_graph_has_no_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(file) if m in modules and m != name and m not in BASE}
             for name, file in modules.items()}
    done, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_every_module_imports_alone_and_data_stays_light():
    """In one interpreter: each module imported with none of ours loaded (third-party modules stay cached)."""
    code = r"""
import importlib, json, sys
names = json.loads(sys.argv[1])
failed, heavy = {}, {}
for name in names:
    for key in [k for k in sys.modules if k == "meanflow_policy" or k.startswith("meanflow_policy.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
    ours = {k for k in sys.modules if k.startswith("meanflow_policy.")}
    if name.startswith("meanflow_policy.data.") and (ours & {"meanflow_policy.model.backbone",
                                                            "meanflow_policy.model.policy"}):
        heavy[name] = sorted(ours)
print(json.dumps({"failed": failed, "heavy": heavy}))
"""
    names = [n for n in _modules() if n not in BASE] + sorted(BASE)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"failed": {}, "heavy": {}}
    # The data pipeline alone, in a fresh interpreter: no transformers (and so no VLM backbone).
    data = [n for n in names if n.startswith("meanflow_policy.data.")]
    check = "import importlib, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in data) + \
        "print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
