"""No recorded episode is dropped silently, and bad training input is named in one line (never a traceback).

Unfinished episodes (a recorder killed mid-episode), bag folders without metadata.yaml, unusable episode.json
files, all-NaN joint states, unwritable output/cache folders, and a cache disk that is full or refuses writes.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import meanflow_policy.data.cache as dataset
from meanflow_policy.tools import eval_bag as eval_bag_cli, train as train_cli
from meanflow_policy.data.bag_reader import BagError
from meanflow_policy.data.cache import load_episode, load_episodes
from meanflow_policy.data.sync import DatasetError, SyncConfig
from meanflow_policy.data.demo_bags import synthetic_episode, write_bag

CFG = SyncConfig(image_size=8)
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "sim_pick_place"




def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_unfinished_episode_and_bag_without_metadata_are_named(good_bag: Path, tmp_path: Path, caplog) -> None:
    """What a recorder killed mid-episode leaves (episode.json 'recording', an mcap, no metadata.yaml), and a bag
    folder whose metadata.yaml is gone: each is one warning line naming the folder and what to do."""
    root = tmp_path / "data"
    _copy(good_bag, root / "a_good")
    killed = _copy(good_bag, root / "b_killed")
    (killed / "metadata.yaml").unlink()
    meta = json.loads((killed / "episode.json").read_text())
    (killed / "episode.json").write_text(json.dumps({**meta, "status": "recording"}))
    bare = _copy(good_bag, root / "c_no_metadata")
    (bare / "metadata.yaml").unlink()
    (bare / "episode.json").unlink()
    (root / "notes").mkdir()  # a folder that is no episode at all stays out of the report
    with caplog.at_level(logging.WARNING, logger="meanflow_policy.data"):
        episodes, report = load_episodes([root], CFG, tmp_path / "cache")
    assert [e.name for e in episodes] == ["a_good"]
    assert sorted(Path(p).name for p in report.skipped) == ["b_killed", "c_no_metadata"]
    lines = _warnings(caplog)
    killed_line = [line for line in lines if "b_killed" in line]
    assert len(killed_line) == 1 and "unfinished episode" in killed_line[0]
    assert f"so101-recover-episode {killed}" in killed_line[0]
    bare_line = [line for line in lines if "c_no_metadata" in line]
    assert len(bare_line) == 1 and "without metadata.yaml" in bare_line[0] and "so101-recover-episode" in bare_line[0]
    assert not any("notes" in line for line in lines)
    assert "2 episodes skipped" in report.summary()
    with pytest.raises(DatasetError, match="strict mode.*b_killed: unfinished episode"):
        load_episodes([root], CFG, tmp_path / "cache", strict=True)
    with pytest.raises(BagError, match="b_killed: unfinished episode.*so101-recover-episode"):
        load_episode(killed, CFG, tmp_path / "cache")
    with pytest.raises(DatasetError, match="empty dataset: none of the 1 bags.*b_killed: .*unfinished episode"):
        load_episodes([killed], CFG, tmp_path / "cache")


@pytest.mark.parametrize("content, what", [
    (b'["reach"]', "expected a JSON object, got a JSON list"),
    ('{"instruction": "gr\u00fc\u00dfe"}'.encode("latin-1"), "not UTF-8 text"),
    (b'{"instruction": "reach", "status": 3}', "field 'status' is not a string"),
], ids=["json-list", "latin-1", "wrong-type"])
def test_unusable_episode_json_skips_that_episode_by_name(good_bag: Path, tmp_path: Path, caplog,
                                                          content: bytes, what: str) -> None:
    root = tmp_path / "data"
    _copy(good_bag, root / "a_good")
    broken = _copy(good_bag, root / "b_broken")
    (broken / "episode.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="meanflow_policy.data"):
        episodes, report = load_episodes([root], CFG, tmp_path / "cache")
    assert [e.name for e in episodes] == ["a_good"]
    reason = report.skipped[str(broken.resolve())]
    assert "b_broken/episode.json" in reason and what in reason
    assert sum("b_broken" in line and what in line for line in _warnings(caplog)) == 1


def test_all_nan_joint_states_name_the_field(tmp_path: Path) -> None:
    content = synthetic_episode(2, duration_s=0.5, height=16, width=16)
    content.states = [(t, names, [float("nan")] * len(p)) for t, names, p in content.states]
    bag = write_bag(tmp_path / "ep", content, instruction="reach")
    with pytest.raises(BagError) as info:
        load_episode(bag, CFG, tmp_path / "cache")
    text = str(info.value)
    assert "no usable joint states on /joint_states" in text
    assert "field 'position' holds non-finite values (NaN or inf)" in text
    assert f"{len(content.states)} messages" in text
    assert "do not match" not in text


def test_cache_needs_more_space_than_is_free(good_bag: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(dataset, "free_bytes", lambda path: 10 * 2**20)
    with pytest.raises(DatasetError, match=r"--cache-dir .*cache: episode ep needs .* MiB of cache .*only 10.0 MiB "
                                           r"are free"):
        load_episodes([good_bag], CFG, cache)
    assert list(cache.iterdir()) == [], "nothing half-written is left in the cache"


def test_write_error_in_the_cache_is_one_line_and_leaves_no_temp_folder(good_bag: Path, tmp_path: Path) -> None:
    """A real write error: the kernel refuses writes past RLIMIT_FSIZE (EFBIG), as a full disk would (ENOSPC)."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from meanflow_policy.data.cache import load_episodes
        from meanflow_policy.data.sync import DatasetError, SyncConfig
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        try:
            load_episodes([Path({str(good_bag)!r})], SyncConfig(image_size=96), Path({str(cache)!r}))
        except DatasetError as exc:
            print("ERROR", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ERROR --cache-dir"), result.stdout + result.stderr[-3000:]
    assert "writing the cache of episode ep failed (File too large)" in result.stdout
    assert "the partial entry was removed" in result.stdout
    assert [p.name for p in cache.iterdir()] == [], "the temporary entry folder is removed"


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demos")
    for i in range(2):
        write_bag(root / f"episode_{i}", synthetic_episode(seed=i, duration_s=1.0, height=48, width=64),
                  instruction="reach the yellow square")
    return root


def _not_a_folder(tmp_path: Path) -> Path:
    """A path that cannot be created even by root: its parent is a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "sub"


@pytest.mark.parametrize("which", ["--out", "--cache-dir"])
def test_train_refuses_an_unwritable_folder_before_loading(bags: Path, tmp_path: Path, caplog, which: str) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    bad = _not_a_folder(tmp_path)
    args = {"--out": out, "--cache-dir": cache, which: bad}
    with caplog.at_level(logging.INFO):
        code = train_cli.main(["--bags", str(bags), "--out", str(args["--out"]), "--steps", "2", "--batch-size",
                               "4", "--cache-dir", str(args["--cache-dir"]), "--device", "cpu", "--cpu-threads",
                               "1", "--no-progress"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"{which} {bad}: cannot write there (Not a directory)"]
    assert not any("dataset:" in r.getMessage() for r in caplog.records), "refused before the dataset was loaded"


def test_eval_bag_refuses_an_unwritable_out_before_evaluating(bags: Path, tmp_path: Path, caplog) -> None:
    bad = _not_a_folder(tmp_path)
    with caplog.at_level(logging.INFO):
        code = eval_bag_cli.main(["--checkpoint", str(CHECKPOINT), "--bags", str(bags / "episode_0"), "--out",
                                  str(bad), "--nfe", "1", "--timing-samples", "1", "--cache-dir",
                                  str(tmp_path / "cache"), "--device", "cpu", "--cpu-threads", "1"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"--out {bad}: cannot write there (Not a directory)"]
    assert not any("NFE 1" in r.getMessage() for r in caplog.records), "refused before evaluating"
