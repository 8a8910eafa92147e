"""``meanflow-bench-node`` runs end to end and ends with its JSON line (figures are checked for sense, not speed)."""
import json
import subprocess
import sys


def test_bench_node_prints_consistent_figures(tmp_path):
    out = subprocess.run([sys.executable, "-m", "meanflow_policy.tools.bench_node", "--nfe", "1", "--chunks", "4",
                          "--height", "48", "--width", "64", "--image-hz", "5", "--read-size", "32"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["image_size"] == "64x48" and result["read_size"] == 32
    assert result["e2e_ms_nfe1"] > 0 and result["bare_ms_nfe1"] > 0
    # e2e contains the model's own time, so the overhead is a part of it; the node's part is a part of that.
    assert 0 < result["overhead_ms"] < result["e2e_ms_nfe1"]
    assert 0 < result["node_only_ms_nfe1"]
    assert "reported nfe [1]" in out.stdout
