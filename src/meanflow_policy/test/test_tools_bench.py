"""meanflow-bench: the JSON last line names every timed variant, coherent sampling's candidate counts included."""
import json

import pytest

from meanflow_policy.tools import bench


def test_bench_times_each_candidate_count_beside_the_single_draw_variants(capsys):
    assert bench.main(["--preset", "tiny", "--runs", "2", "--warmup", "0", "--precisions", "float32",
                       "--threads", "1", "--candidates", "4,8"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    chunk = summary["chunk_ms"]
    assert {"meanflow_1", "meanflow_1_candidates_4", "meanflow_1_candidates_8", "flow_matching_10"} <= set(chunk)
    assert all(ms > 0 for ms in chunk.values())


def test_bench_refuses_a_candidate_count_below_two(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--candidates", "1"])
    assert exc.value.code == 2 and "each count must be >= 2" in capsys.readouterr().err
