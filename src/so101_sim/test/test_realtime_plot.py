"""realtime.png: one line per (policy, hand-off) over the injected latencies; bad input is one clear error."""
import json

import pytest

from so101_sim.realtime_plot import PLOT_FILE, main, plot_realtime


def _row(policy: str, handoff: str, latency, success: float) -> dict:
    return {"policy": policy, "handoff": handoff, "latency_ms": latency, "success_rate": success, "episodes": 50,
            "boundary_accel_max": 10.0 + success, "between_accel_max": 5.0}


def test_each_policy_and_hand_off_is_one_line_over_rising_latency(tmp_path):
    rows = [_row(p, h, lat, s) for p in ("meanflow_nfe1", "flow_matching_nfe10") for h in ("replace", "rtc")
            for lat, s in ((200.0, 0.9), (0.0, 1.0), (800.0, 0.1))]
    rows.append(_row("meanflow_nfe1", "rtc", "measured", 0.5))  # no place on a latency axis
    fig = plot_realtime(rows, tmp_path / "r.png", "title")
    success, accel = fig.axes
    assert [line.get_label() for line in success.get_lines()] == [
        "meanflow_nfe1, replace", "meanflow_nfe1, rtc", "flow_matching_nfe10, replace", "flow_matching_nfe10, rtc"]
    for ax in (success, accel):
        assert all(list(line.get_xdata()) == [0.0, 200.0, 800.0] for line in ax.get_lines())
    assert list(success.get_lines()[0].get_ydata()) == [100.0, 90.0, 10.0]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no row with an injected latency"):
        plot_realtime([_row("meanflow_nfe1", "rtc", "measured", 0.5)], tmp_path / "m.png")


def test_redraws_a_run_folder_and_names_what_is_wrong(tmp_path, capsys):
    run = {"rows": [_row("meanflow_nfe1", "rtc", 0.0, 1.0)], "task": "pick_place", "episodes": 50, "seed": 1000,
           "commit": "abc", "machine": "m"}
    (tmp_path / "rows.json").write_text(json.dumps(run))
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / PLOT_FILE).is_file()
    (tmp_path / "rows.json").write_text(json.dumps({"cells": []}))
    assert main([str(tmp_path)]) == 2
    assert "not an so101-eval-realtime rows.json" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "missing/rows.json" in capsys.readouterr().err
