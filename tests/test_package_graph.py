"""The package graph: every package.xml read, no cycle (colcon refuses one, in any dependency category), and what
the code and the tests of a package use from another workspace package (imports, share-directory lookups, launched
nodes) is declared. Tests that need the whole stack (launch files of so101_bringup) live in tests/, not in a package.

This is what keeps so101_sim free of meanflow_policy (the sim evaluates any rollout Policy; the MeanFlow adapter is
a plugin of the policy package) and every launch file's package dependencies visible to rosdep and colcon.
"""
from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_TAGS = ("depend", "exec_depend", "build_export_depend")
ALL_TAGS = (*RUN_TAGS, "build_depend", "buildtool_depend", "test_depend")
# Launch files and config at the workspace top level are installed (and so owned) by so101_bringup.
TOP_LEVEL_OWNER = {"launch": "so101_bringup"}
SHARE_LOOKUPS = {"get_package_share_directory", "FindPackageShare", "get_package_prefix"}


def manifests() -> dict[str, ET.Element]:
    found = {}
    for path in sorted(ROOT.glob("src/*/package.xml")):
        root = ET.parse(path).getroot()
        found[root.findtext("name")] = root
    return found


def deps(root: ET.Element, tags: tuple[str, ...]) -> set[str]:
    return {e.text.strip() for tag in tags for e in root.findall(tag)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A dependency cycle as a path of names, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def used_packages(path: Path, workspace: set[str]) -> dict[str, str]:
    """Workspace packages a Python file uses -> how (import, share lookup, launched node)."""
    used: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in workspace:
                used.setdefault(name, f"import at line {node.lineno}")
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            literals = [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
            literals += [k.value.value for k in node.keywords
                         if k.arg == "package" and isinstance(k.value, ast.Constant)]
            if func in SHARE_LOOKUPS or func == "Node":
                for value in literals:
                    if value in workspace:
                        used.setdefault(value, f"{func}({value!r}) at line {node.lineno}")
    return used


def owned_sources(name: str) -> tuple[list[Path], list[Path]]:
    """(runtime files, test files) of a package: its module tree and launch files; its test/ directory."""
    pkg = ROOT / "src" / name
    runtime = [p for p in pkg.rglob("*.py") if "test" not in p.relative_to(pkg).parts[:1] and p.name != "setup.py"]
    runtime += [p for top, owner in TOP_LEVEL_OWNER.items() if owner == name for p in (ROOT / top).glob("*.py")]
    return sorted(runtime), sorted((pkg / "test").rglob("*.py"))


def test_every_package_manifest_is_read():
    assert {"so101_sim", "meanflow_policy", "so101_bringup", "so101_description"} <= set(manifests())


def test_the_package_graph_has_no_cycle_in_any_dependency_category():
    found = manifests()
    graph = {name: deps(root, ALL_TAGS) & set(found) for name, root in found.items()}
    assert find_cycle(graph) is None, f"dependency cycle: {' -> '.join(find_cycle(graph))}"


def test_cycle_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(manifests()))
def test_what_the_code_uses_is_declared(name):
    found = manifests()
    workspace = set(found)
    runtime_deps = deps(found[name], RUN_TAGS)
    test_deps = runtime_deps | deps(found[name], ("test_depend",))
    runtime, tests = owned_sources(name)
    missing = [f"{p.relative_to(ROOT)}: {other} ({how})" for p in runtime
               for other, how in used_packages(p, workspace).items() if other != name and other not in runtime_deps]
    missing += [f"{p.relative_to(ROOT)}: {other} ({how}, needs exec_depend or test_depend)" for p in tests
                for other, how in used_packages(p, workspace).items() if other != name and other not in test_deps]
    assert not missing, f"{name}/package.xml does not declare:\n" + "\n".join(missing)


def test_the_sim_does_not_depend_on_the_policy_package():
    sim = manifests()["so101_sim"]
    assert "meanflow_policy" not in deps(sim, RUN_TAGS + ("build_depend",))
    runtime, _ = owned_sources("so101_sim")
    importers = [str(p.relative_to(ROOT)) for p in runtime
                 if "meanflow_policy" in used_packages(p, {"meanflow_policy"})]
    assert importers == []
