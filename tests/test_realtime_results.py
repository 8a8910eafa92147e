"""scripts/realtime_results.py pools real so101-eval-realtime runs (two seed blocks) into one table and JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from so101_sim import realtime

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "realtime_results.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_two_seed_blocks_pool_into_one_row_per_cell(tmp_path, capsys):
    blocks = []
    for seed in (3, 4):
        out = tmp_path / f"block{seed}"
        assert realtime.main(["--policy", "expert", "--latencies", "400", "--handoffs", "replace,rtc", "--episodes",
                              "1", "--seed", str(seed), "--max-steps", "60", "--image-size", "32", "--out",
                              str(out)]) == 0
        blocks.append(json.loads((out / "rows.json").read_text()))
    capsys.readouterr()
    proc = _run("--out", str(tmp_path / "pooled"), "--what", "the expert at 400 ms", "--plot", str(tmp_path / "p.png"),
                f"expert={tmp_path / 'block3'}", f"expert={tmp_path / 'block4'}", f"again={tmp_path / 'block3'}")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "pooled.json").read_text())
    assert [(p["variant"], p["handoff"], p["episodes"], p["seeds"]) for p in result["pooled"]] == [
        ("expert", "replace", 2, [3, 4]), ("again", "replace", 1, [3]), ("expert", "rtc", 2, [3, 4]),
        ("again", "rtc", 1, [3])]
    for k, pooled in enumerate(p for p in result["pooled"] if p["variant"] == "expert"):
        rows = [block["rows"][k] for block in blocks]
        assert pooled["successes"] == round(sum(r["success_rate"] for r in rows))
        assert abs(pooled["boundary_accel_max"] - sum(r["boundary_accel_max"] for r in rows) / 2) < 1e-9
    text = (tmp_path / "pooled.md").read_text()
    assert text.startswith("# the expert at 400 ms") and blocks[0]["commit"] in text  # where the numbers came from
    kept = _run("--out", str(tmp_path / "only"), "--what", "w", "--policy", "expert", f"expert={tmp_path / 'block3'}")
    assert kept.returncode == 0 and len(json.loads((tmp_path / "only.json").read_text())["pooled"]) == 2
    none = _run("--out", str(tmp_path / "x"), "--what", "w", "--policy", "meanflow_nfe1",
                f"expert={tmp_path / 'block3'}")
    assert none.returncode != 0 and "--policy meanflow_nfe1: no run has rows of it" in none.stderr
    bad = _run("--out", str(tmp_path / "x"), "--what", "w", f"expert={tmp_path / 'nowhere'}")
    assert bad.returncode != 0 and "rows.json does not exist (not an so101-eval-realtime --out folder)" in bad.stderr


def test_plot_rows_name_each_variant_but_the_first():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from realtime_results import plot_rows
    finally:
        sys.path.remove(str(SCRIPT.parent))
    pooled = [{"variant": v, "policy": "p", "latency_ms": 0.0, "handoff": "rtc", "successes": 3, "episodes": 4,
               "seeds": [1], "boundary_accel_max": 1.0, "between_accel_max": 1.0} for v in ("plain", "guided")]
    assert [(r["handoff"], r["success_rate"]) for r in plot_rows(pooled)] == [("rtc", 0.75), ("rtc (guided)", 0.75)]
