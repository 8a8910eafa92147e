"""summary.png of a multi-task so101-eval run (a tiny random checkpoint, two tasks, an NFE sweep): the bars are the
success rates of summary.json with its Wilson intervals as whiskers, and each task's histograms hold every chunk
latency of its episodes."""
from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest

from so101_sim import evaluate
from so101_sim.eval_plot import plot_summary

TASKS = ("pick_place", "stacking")
NFES = (1, 2)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    from meanflow_policy import testing

    root = tmp_path_factory.mktemp("eval_plot")
    ckpt = testing.make_tiny_checkpoint(root / "ckpt")
    out = root / "eval"
    assert evaluate.main(["--checkpoint", str(ckpt), "--tasks", ",".join(TASKS), "--episodes", "2",
                          "--max-steps", "30", "--image-size", "32", "--sweep-nfe", "1,2", "--video-episodes", "0",
                          "--out", str(out)]) == 0
    return out


def test_so101_eval_writes_summary_png(eval_dir) -> None:
    image = iio.imread(eval_dir / "summary.png")
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 700
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 10  # drawn, not a blank canvas


def test_the_plot_shows_the_summary_numbers_and_every_chunk_latency(eval_dir, tmp_path) -> None:
    summary = json.loads((eval_dir / "summary.json").read_text())
    reports = {t: {n: json.loads((eval_dir / t / f"eval_nfe{n}.json").read_text()) for n in NFES} for t in TASKS}
    fig = plot_summary(reports, tmp_path / "again.png")
    assert (tmp_path / "again.png").is_file()
    bars, *hists = fig.axes
    containers = [c for c in bars.containers if hasattr(c, "patches")]
    assert len(containers) == len(NFES)
    for nfe, container in zip(NFES, containers):
        for task, bar in zip(TASKS, container.patches):
            cell = summary["reports"][task][str(nfe)]
            assert bar.get_height() == pytest.approx(cell["success_rate"])
    whiskers = [c for c in bars.containers if not hasattr(c, "patches")]
    for nfe, whisker in zip(NFES, whiskers):
        segments = whisker.lines[2][0].get_segments()
        for task, segment in zip(TASKS, segments):
            assert [segment[0][1], segment[1][1]] == pytest.approx(summary["reports"][task][str(nfe)]["ci95"])
    assert [ax.get_title() for ax in hists] == list(TASKS)
    for task, ax in zip(TASKS, hists):
        counted = sum(p.get_height() for p in ax.patches)
        assert counted == sum(reports[task][n]["chunk_latency"]["count"] for n in NFES) > 0
