"""so101-results-table: columns per run and NFE, rows per task + mean + instruction following, sources named."""
from __future__ import annotations

import json

import pytest

from so101_sim import results_table
from so101_sim.evaluate import multitask_summary, summarize
from so101_sim.rollout import EpisodeResult


def _summary(score: float, rate: float, followed: float | None, ms: float) -> dict:
    cell = {"score": score, "success_rate": rate, "episodes": 50, "ci95": [0.0, 1.0],
            "instruction_followed_rate": None, "chunk_ms_median": ms}
    return {"tasks": {"pick_place": cell, "sorting_swapped": {**cell, "instruction_followed_rate": followed}},
            "mean_score": score, "mean_score_over": ["pick_place"], "instruction_following": followed,
            "chunk_ms_median": ms}


def _write(directory, summary, **extra):
    directory.mkdir()
    (directory / "summary.json").write_text(json.dumps({"summary": summary, "checkpoint": "ck", "seed": 1000,
                                                        "image_size": 64, "commit": "abc123",
                                                        "machine": "CPU X, 2 cores", **extra}))


def test_table_has_a_column_per_run_and_nfe_and_names_its_sources(tmp_path, capsys):
    _write(tmp_path / "mf", {"nfe": [1, 10], "by_nfe": {"10": _summary(0.9, 0.8, 1.0, 30.0),
                                                         "1": _summary(0.95, 0.9, 0.96, 9.0)}})
    _write(tmp_path / "fm", {**_summary(0.5, 0.4, 0.5, 31.0), "nfe": 10})
    out = tmp_path / "res" / "multitask"
    assert results_table.main(["--eval", f"MeanFlow={tmp_path / 'mf'}", "--eval", f"FM={tmp_path / 'fm'}",
                               "--out", str(out)]) == 0
    md = (tmp_path / "res" / "multitask.md").read_text()
    assert md.splitlines()[0] == "| task | MeanFlow NFE 1 | MeanFlow NFE 10 | FM NFE 10 |"
    # Registered task order, then the mean, following and latency rows.
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines()[2:7]]
    # The mean row names what it averages (here the one paper task the runs had).
    assert rows == ["pick_place", "sorting_swapped", "**mean score (pick_place)**", "instruction following",
                    "chunk latency median (ms)"]
    assert "| pick_place | 0.95 (90 % of 50) | 0.90 (80 % of 50) | 0.50 (40 % of 50) |" in md
    assert "| instruction following | 96 % | 100 % | 50 % |" in md
    assert "commit abc123, CPU X, 2 cores" in md
    data = json.loads((tmp_path / "res" / "multitask.json").read_text())
    assert [(c["label"], c["nfe"]) for c in data["columns"]] == [("MeanFlow", 1), ("MeanFlow", 10), ("FM", 10)]


def test_a_single_task_table_has_no_mean_nor_following_row(tmp_path, capsys):
    """One task, nothing the instruction decides (e.g. objectives compared on pick-place): the table is that task's
    row and the latencies; a mean of one cell or a row of dashes would only repeat or say nothing."""
    cell = {"score": 0.9, "success_rate": 0.8, "episodes": 50, "ci95": [0.0, 1.0], "instruction_followed_rate": None,
            "chunk_ms_median": 5.0}
    _write(tmp_path / "one", {"tasks": {"pick_place": cell}, "mean_score": 0.9, "mean_score_over": ["pick_place"],
                              "instruction_following": None, "chunk_ms_median": 5.0, "nfe": 1})
    assert results_table.main(["--eval", f"MF={tmp_path / 'one'}", "--out", str(tmp_path / "t")]) == 0
    rows = [line.split(" | ")[0].lstrip("| ") for line in (tmp_path / "t.md").read_text().splitlines()[2:4]]
    assert rows == ["pick_place", "chunk latency median (ms)"]


def test_keep_adds_columns_to_a_table_whose_runs_are_gone(tmp_path, capsys):
    """A fresh machine has the committed JSON but not the eval directories behind it: --keep carries those columns
    over (figures and sources), appends the new run and replaces a column given again."""
    _write(tmp_path / "old", {**_summary(0.7, 0.6, 0.8, 12.0), "nfe": 1})
    _write(tmp_path / "mid", {**_summary(0.75, 0.7, 0.85, 13.0), "nfe": 1})
    out = tmp_path / "multitask"
    assert results_table.main(["--eval", f"round 1={tmp_path / 'old'}", "--eval", f"round 2={tmp_path / 'mid'}",
                               "--out", str(out)]) == 0
    before = json.loads(out.with_suffix(".json").read_text())
    (tmp_path / "old" / "summary.json").unlink()
    _write(tmp_path / "new", {**_summary(0.6, 0.5, 0.7, 11.0), "nfe": 1}, commit="def456")
    _write(tmp_path / "mid2", {**_summary(0.8, 0.75, 0.9, 13.0), "nfe": 1})
    assert results_table.main(["--keep", "--eval", f"round 2={tmp_path / 'mid2'}",
                               "--eval", f"round 3={tmp_path / 'new'}", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [c["label"] for c in data["columns"]] == ["round 1", "round 2", "round 3"]
    assert data["columns"][0] == before["columns"][0] and data["sources"][0] == before["sources"][0]
    assert data["columns"][1]["mean_score"] == 0.8 and data["sources"][2]["commit"] == "def456"
    md = out.with_suffix(".md").read_text()
    assert md.splitlines()[0] == "| task | round 1 NFE 1 | round 2 NFE 1 | round 3 NFE 1 |"
    out.with_suffix(".json").write_text("{not json")
    assert results_table.main(["--keep", "--eval", f"round 3={tmp_path / 'new'}", "--out", str(out)]) == 2
    assert "--keep:" in capsys.readouterr().err


def test_a_directory_without_a_summary_is_one_clear_error(tmp_path, capsys):
    assert results_table.main(["--eval", f"X={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert "no summary.json (run so101-eval --tasks" in capsys.readouterr().err


def _wording(own: float, synonyms: float, unrelated: float, followed: float | None) -> dict:
    def kind(sentence: str, rate: float, follow: float | None) -> dict:
        return {"instruction": sentence, "score": rate, "success_rate": rate, "instruction_followed_rate": follow}
    return {"own": {"instruction": "own words", "score": own, "success_rate": own},
            "by_kind": {"synonyms": kind("other words", synonyms, followed),
                        "unrelated": kind("do not touch anything", unrelated, None)},
            "paraphrase_success_rate": synonyms, "paraphrase_score": synonyms,
            "paraphrase_relative_success": synonyms / own}


def test_wording_tables_compare_runs_and_pool_following_over_the_language_decided_variants(tmp_path, capsys):
    summary = _summary(0.8, 0.8, 0.9, 10.0)
    summary["instructions"] = {"pick_place": _wording(0.8, 0.4, 0.1, None),
                               "sorting_swapped": _wording(0.8, 0.6, 0.0, 0.5)}
    _write(tmp_path / "smollm2", {**summary, "nfe": 1})
    _write(tmp_path / "plain", {**_summary(0.8, 0.8, 0.9, 10.0), "nfe": 1})
    out = tmp_path / "language"
    assert results_table.main(["--wording", f"SmolLM2={tmp_path / 'smollm2'}", "--out", str(out)]) == 0
    md = (tmp_path / "language.md").read_text()
    # Own 80 %, paraphrases (40 + 60) / 2 = 50 % -> 0.62 of own; unrelated 5 %; following 90 % own, 50 % held out.
    assert "| SmolLM2 | 80 % | 50 % | 0.62 | 5 % | 90 % | 50 % |" in md
    assert "| sorting_swapped | 80 % (0.80) | 60 % (0.60) | 0 % (0.00) |" in md
    assert "commit abc123, CPU X, 2 cores" in md
    data = json.loads((tmp_path / "language.json").read_text())
    assert data["wording"]["rows"][0]["paraphrase_relative"] == 0.625
    assert results_table.main(["--wording", f"plain={tmp_path / 'plain'}", "--out", str(out)]) == 2
    assert "--wording plain=" in capsys.readouterr().err


def test_keep_carries_wording_runs_whose_directories_are_gone(tmp_path):
    summary = _summary(0.8, 0.8, 0.9, 10.0)
    summary["instructions"] = {"pick_place": _wording(0.8, 0.4, 0.1, None),
                               "sorting_swapped": _wording(0.8, 0.6, 0.0, 0.5)}
    _write(tmp_path / "smollm2", {**summary, "nfe": 1})
    out = tmp_path / "language"
    assert results_table.main(["--wording", f"SmolLM2={tmp_path / 'smollm2'}", "--out", str(out)]) == 0
    (tmp_path / "smollm2" / "summary.json").unlink()
    tiny = _summary(0.6, 0.6, 0.7, 10.0)
    tiny["instructions"] = {"pick_place": _wording(0.6, 0.3, 0.2, None)}
    _write(tmp_path / "tiny", {**tiny, "nfe": 1}, commit="def456")
    assert results_table.main(["--keep", "--wording", f"tiny={tmp_path / 'tiny'}", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    # The kept row is rebuilt as it was (following with the own sentences included); the new one follows it.
    assert "| SmolLM2 | 80 % | 50 % | 0.62 | 5 % | 90 % | 50 % |\n| tiny | 60 % | 30 % | 0.50 | 20 % | - | - |" in md
    assert "### SmolLM2" in md and "commit abc123" in md and "commit def456" in md


def test_headline_runs_make_the_task_table_and_every_run_gets_a_row(tmp_path, capsys):
    """With --headline the first table (rows = tasks) holds only the named runs, every run follows as a row of
    its own, and the choice is kept in the JSON for the next --keep; an unknown label is one clear error."""
    for name, score in (("r1", 0.6), ("ship", 0.8), ("fm", 0.7)):
        _write(tmp_path / name, {**_summary(score, score - 0.1, 0.9, 10.0), "nfe": 1})
    out = tmp_path / "multitask"
    evals = [f"round 1={tmp_path / 'r1'}", f"shipped={tmp_path / 'ship'}", f"FM={tmp_path / 'fm'}"]
    assert results_table.main([a for e in evals for a in ("--eval", e)]
                              + ["--headline", "shipped", "--headline", "FM", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0] == "| task | shipped NFE 1 | FM NFE 1 |"
    # "-": made before so101-eval watched for dwells
    assert "| round 1 | 1 | 0.60 (50 % of 50) | 0.60 (50 % of 50) | **0.60** | 90 % | - | 10.0 |" in md
    assert json.loads(out.with_suffix(".json").read_text())["headline"] == ["shipped", "FM"]
    _write(tmp_path / "r2", {**_summary(0.5, 0.4, 0.8, 10.0), "nfe": 1})
    assert results_table.main(["--keep", "--eval", f"round 2={tmp_path / 'r2'}", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text().splitlines()
    assert md[0] == "| task | shipped NFE 1 | FM NFE 1 |" and any(line.startswith("| round 2 | 1 |") for line in md)
    assert results_table.main(["--keep", "--headline", "nope", "--eval", f"round 2={tmp_path / 'r2'}",
                               "--out", str(out)]) == 2
    assert "--headline 'nope' is not the label of a run" in capsys.readouterr().err
    # The headline table follows the order of --headline, not that of the runs (a new shipped run goes first).
    assert results_table.main(["--keep", "--headline", "round 2", "--headline", "shipped", "--out", str(out)]) == 0
    assert out.with_suffix(".md").read_text().splitlines()[0] == "| task | round 2 NFE 1 | shipped NFE 1 |"


def _block(directory, seeds: range, succeeded: int, latency_ms: float, checkpoint: str = "ck",
           dwelt: int | None = None) -> None:
    """An so101-eval --tasks pick_place,pick_place_red output: per task a report of episodes with ``succeeded``
    successes (the red block followed exactly when successful), the last ``dwelt`` of them seen dwelling at a grasp
    and the first seen holding its object over the box (None: made before either was watched), and the summary
    so101-eval writes."""
    reports = {}
    directory.mkdir()
    for task in ("pick_place", "pick_place_red"):
        episodes = [EpisodeResult(seed=s, success=i < succeeded, steps=200, sim_seconds=6.7, chunks=20,
                                  chunk_latency_ms=[latency_ms] * 20, score=1.0 if i < succeeded else 0.5,
                                  instruction_followed=(i < succeeded) if task == "pick_place_red" else None,
                                  dwell_watched=dwelt is not None,
                                  dwell_step=90 if dwelt is not None and i >= len(seeds) - dwelt else None,
                                  hold_watched=dwelt is not None,
                                  hold_step=150 if dwelt is not None and i == 0 else None)
                    for i, s in enumerate(seeds)]
        report = summarize(episodes, [], 360, 10)
        (directory / task).mkdir()
        (directory / task / "eval_nfe1.json").write_text(json.dumps(report))
        reports[task] = {1: report}
    (directory / "summary.json").write_text(json.dumps(
        {"summary": multitask_summary(reports, [1]), "checkpoint": checkpoint, "seed": seeds[0], "image_size": 64,
         "candidates": 8, "average": 2, "commit": "abc123", "machine": "CPU X, 2 cores"}))


def test_runs_on_other_seed_blocks_pool_into_one_column_recomputed_from_their_episodes(tmp_path, capsys):
    """DIR+DIR pools two blocks of one checkpoint: 10 + 4 of 10 + 10 episodes is 70 %, with the Wilson interval,
    following and latency median of the 20 episodes, and both blocks named; runs of another checkpoint or the
    same seeds do not pool (one clear error each)."""
    _block(tmp_path / "a", range(1000, 1010), 10, 8.0)
    _block(tmp_path / "b", range(2000, 2010), 4, 12.0)
    out = tmp_path / "pooled"
    assert results_table.main(["--eval", f"both={tmp_path / 'a'}+{tmp_path / 'b'}", "--out", str(out)]) == 0
    column = json.loads(out.with_suffix(".json").read_text())["columns"][0]
    red = column["tasks"]["pick_place_red"]
    assert (red["episodes"], red["success_rate"], red["score"]) == (20, 0.7, 0.85)
    assert red["ci95"] == pytest.approx([0.481, 0.855], abs=1e-3)  # Wilson's, of 14 in 20
    assert column["instruction_following"] == 0.7 and column["chunk_ms_median"] == 10.0
    md = out.with_suffix(".md").read_text()
    assert "| pick_place | 0.85 (70 % of 20) |" in md and "seeds from 1000, 2000" in md
    _block(tmp_path / "c", range(3000, 3010), 5, 9.0, checkpoint="other")
    assert results_table.main(["--eval", f"x={tmp_path / 'a'}+{tmp_path / 'c'}", "--out", str(out)]) == 2
    assert "has checkpoint 'other'" in capsys.readouterr().err
    assert results_table.main(["--eval", f"x={tmp_path / 'a'}+{tmp_path / 'a'}", "--out", str(out)]) == 2
    assert "episodes of the same seed in two runs" in capsys.readouterr().err
    (tmp_path / "b" / "pick_place_red" / "eval_nfe1.json").write_text(json.dumps({"results": [{"seed": 1}]}))
    assert results_table.main(["--eval", f"x={tmp_path / 'a'}+{tmp_path / 'b'}", "--out", str(out)]) == 2
    assert "pick_place_red/eval_nfe1.json is not a so101-eval task report" in capsys.readouterr().err


def test_episodes_that_dwelt_or_held_are_counted_where_every_pooled_run_watched_for_them(tmp_path):
    _block(tmp_path / "a", range(1000, 1010), 8, 8.0, dwelt=2)
    _block(tmp_path / "b", range(2000, 2010), 9, 8.0, dwelt=1)
    _block(tmp_path / "old", range(3000, 3010), 9, 8.0)
    out = tmp_path / "t"
    assert results_table.main(["--eval", f"watched={tmp_path / 'a'}+{tmp_path / 'b'}",
                               "--eval", f"mixed={tmp_path / 'a'}+{tmp_path / 'old'}", "--out", str(out)]) == 0
    columns = json.loads(out.with_suffix(".json").read_text())["columns"]
    assert [c["dwelt"] for c in columns] == [6, None]  # 3 per task, two tasks
    assert [c["held_over_place"] for c in columns] == [4, None]  # 1 per task and block
    assert "| episodes that dwelt at a grasp | 6 of 40 | - |" in out.with_suffix(".md").read_text()
