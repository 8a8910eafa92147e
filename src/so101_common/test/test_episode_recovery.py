"""Nothing recorded is lost: an episode is marked on disk from its start, and so101-recover-episode rebuilds a
readable bag from the .mcap of a writer killed with SIGKILL (a real process, real files, no summary or footer)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rclpy.serialization import deserialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import JointState

from so101_common.episode_bag import (INDEX_FILE, EpisodeMetadata, EpisodeMetadataError, EpisodeWriter,
                                      read_episode_metadata, update_index)
from so101_common.graph import JOINT_STATES_TOPIC

RECOVER = shutil.which("so101-recover-episode")


def _bag_states(path: Path) -> list[float]:
    with Reader(path) as reader:
        return [deserialize_message(raw, JointState).position[0] for _c, _t, raw in reader.messages()]


def test_episode_is_marked_on_disk_from_its_start(tmp_path: Path) -> None:
    writer = EpisodeWriter(tmp_path / "ep", EpisodeMetadata(instruction="stack the blocks"))
    meta = read_episode_metadata(tmp_path / "ep")
    assert meta.status == "recording" and meta.instruction == "stack the blocks"
    index = update_index(tmp_path)
    assert [(e["name"], e["status"]) for e in index["episodes"]] == [("ep", "recording")]
    writer.close(success=True)
    assert read_episode_metadata(tmp_path / "ep").status == "complete"


@pytest.mark.parametrize("content, what", [
    (b'["stack"]', "expected a JSON object, got a JSON list"),
    (b'{"instruction": "gr\xfc\xdfe"}', "not UTF-8 text"),
    (b'{"instruction": "stack", "message_counts": [1]}', "field 'message_counts' is not an object"),
], ids=["json-list", "latin-1", "wrong-type"])
def test_unusable_episode_json_is_named_and_left_out_of_the_index(tmp_path: Path, content: bytes, what: str) -> None:
    EpisodeWriter(tmp_path / "good", EpisodeMetadata(instruction="stack")).close(success=True)
    EpisodeWriter(tmp_path / "bad", EpisodeMetadata(instruction="stack")).close(success=True)
    (tmp_path / "bad" / "episode.json").write_bytes(content)
    with pytest.raises(EpisodeMetadataError, match=f"bad/episode.json: {what}"):
        read_episode_metadata(tmp_path / "bad")
    assert [e["name"] for e in update_index(tmp_path)["episodes"]] == ["good"]


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import JointState
    from so101_common.episode_bag import EpisodeMetadata, EpisodeWriter, update_index
    from so101_common.graph import JOINT_NAMES, JOINT_STATES_TOPIC
    root, flushed, unflushed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    writer = EpisodeWriter(root + "/ep", EpisodeMetadata(instruction="wipe the table"))
    update_index(root)
    writer.add_topic(JOINT_STATES_TOPIC, "sensor_msgs/msg/JointState")
    for i in range(flushed + unflushed):
        writer.write(JOINT_STATES_TOPIC, 1_000 + i, serialize_message(
            JointState(name=list(JOINT_NAMES), position=[0.001 * i] * 6)))
        if i + 1 in (flushed // 2, flushed):
            writer.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed_episode(root: Path, flushed: int, unflushed: int) -> Path:
    root.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root), str(flushed), str(unflushed)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return root / "ep"


def _recover(*dirs: Path) -> subprocess.CompletedProcess:
    return subprocess.run([RECOVER, *map(str, dirs)], capture_output=True, text=True, timeout=120)


def test_recover_an_episode_whose_writer_was_killed(tmp_path: Path) -> None:
    ep = _killed_episode(tmp_path / "data", flushed=300, unflushed=40)
    assert sorted(p.name for p in ep.iterdir()) == ["ep.mcap", "episode.json"], "no metadata.yaml: not a bag"
    assert read_episode_metadata(ep).status == "recording"
    assert json.loads((tmp_path / "data" / INDEX_FILE).read_text())["episodes"][0]["status"] == "recording"

    result = _recover(ep)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and f"{ep}: recovered 300 messages [{JOINT_STATES_TOPIC} 300]" in lines[0]
    assert "original kept as ep.mcap.unfinalised" in lines[0]
    states = _bag_states(ep)
    assert states == pytest.approx([0.001 * i for i in range(300)]), "every flushed message, in order"
    meta = read_episode_metadata(ep)
    assert meta.status == "recovered" and meta.instruction == "wipe the table" and meta.success is None
    assert meta.message_counts == {JOINT_STATES_TOPIC: 300} and "so101-recover-episode" in meta.recovery
    assert meta.stop_time_ns == 1_000 + 299
    assert (ep / "ep.mcap.unfinalised").is_file()
    index = json.loads((tmp_path / "data" / INDEX_FILE).read_text())
    assert [(e["name"], e["status"], e["messages"]) for e in index["episodes"]] == [("ep", "recovered", 300)]
    again = _recover(ep)
    assert again.returncode == 0 and "already a readable bag" in again.stdout
    assert not list(tmp_path.glob("data/.*")), "no staging folder is left"


def test_recover_a_file_cut_in_the_middle(tmp_path: Path) -> None:
    """A file cut inside its second chunk (a copy cut short, a disk that filled up): the first chunk comes back."""
    ep = _killed_episode(tmp_path / "data", flushed=300, unflushed=0)
    mcap = ep / "ep.mcap"
    full = mcap.stat().st_size
    with open(mcap, "r+b") as fh:
        fh.truncate(full - 6000)  # into the chunk, not only the message index after it
    result = _recover(ep)
    assert result.returncode == 0, result.stderr
    assert "recovered 150 messages" in result.stdout and "reading stopped at byte" in result.stdout
    assert _bag_states(ep) == pytest.approx([0.001 * i for i in range(150)])


def test_recover_refuses_what_it_cannot_rebuild(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _recover(empty, tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"{empty}: no .mcap file in it: nothing to recover",
                                                  f"{tmp_path / 'missing'}: not a folder"]


def test_recover_a_bag_without_episode_json(tmp_path: Path) -> None:
    """A bare mcap (e.g. from another recorder) becomes a plain bag; training then asks for --instruction."""
    ep = _killed_episode(tmp_path / "data", flushed=10, unflushed=0)
    os.remove(ep / "episode.json")
    result = _recover(ep)
    assert result.returncode == 0 and "no episode.json: train with --instruction" in result.stdout
    assert sorted(p.name for p in ep.iterdir()) == ["ep.mcap", "ep.mcap.unfinalised", "metadata.yaml"]
    assert len(_bag_states(ep)) == 10
