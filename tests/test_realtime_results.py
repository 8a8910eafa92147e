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
    proc = _run("--out", str(tmp_path / "pooled"), "--what", "the expert at 400 ms",
                f"expert={tmp_path / 'block3'}", f"expert={tmp_path / 'block4'}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "pooled.json").read_text())
    assert [(p["handoff"], p["episodes"], p["seeds"]) for p in result["pooled"]] == [("replace", 2, [3, 4]),
                                                                                       ("rtc", 2, [3, 4])]
    for k, pooled in enumerate(result["pooled"]):
        rows = [block["rows"][k] for block in blocks]
        assert pooled["successes"] == round(sum(r["success_rate"] for r in rows))
        assert abs(pooled["boundary_accel_max"] - sum(r["boundary_accel_max"] for r in rows) / 2) < 1e-9
    text = (tmp_path / "pooled.md").read_text()
    assert text.startswith("# the expert at 400 ms") and blocks[0]["commit"] in text  # where the numbers came from
    bad = _run("--out", str(tmp_path / "x"), "--what", "w", f"expert={tmp_path / 'nowhere'}")
    assert bad.returncode != 0 and "rows.json does not exist (not an so101-eval-realtime --out folder)" in bad.stderr
