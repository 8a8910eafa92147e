import json

import numpy as np
import pytest
import yaml
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import Image, JointState

from so101_common.episode_bag import EpisodeMetadata, EpisodeWriter, read_episode_metadata, update_index
from so101_common.images import ImageError, image_to_rgb, rgb_to_image, stamp_to_ns


def test_image_roundtrip_and_encodings():
    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    msg = rgb_to_image(rgb, stamp_ns=3_500_000_001, frame_id="cam")
    assert stamp_to_ns(msg.header.stamp) == 3_500_000_001
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)
    msg.encoding = "bgr8"
    np.testing.assert_array_equal(image_to_rgb(msg), rgb[:, :, ::-1])
    padded = Image(height=2, width=2, encoding="mono8", step=4, data=bytes([1, 2, 0, 0, 3, 4, 0, 0]))
    assert image_to_rgb(padded)[:, :, 0].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("field,value,match", [
    ("encoding", "16UC1", "unsupported image encoding"),
    ("height", 0, "zero size"),
    ("step", 2, "step"),
    ("data", b"\x00" * 10, "needs"),
])
def test_bad_images_are_named(field, value, match):
    msg = rgb_to_image(np.zeros((4, 5, 3), np.uint8))
    setattr(msg, field, value)
    with pytest.raises(ImageError, match=match):
        image_to_rgb(msg)


def test_episode_writer_roundtrip(tmp_path):
    path = tmp_path / "ds" / "ep0"
    w = EpisodeWriter(path, EpisodeMetadata(instruction="pick", task="pick_place", seed=3))
    w.add_topic("/joint_states", "sensor_msgs/msg/JointState")
    msgs = []
    for k in range(5):
        js = JointState(name=["a"], position=[float(k)])
        js.header.stamp.sec = k
        msgs.append(js)
        w.write("/joint_states", k * 1_000_000_000, serialize_message(js))
    meta = w.close(success=True)
    assert meta.status == "complete" and meta.message_counts == {"/joint_states": 5}
    with Reader(path) as reader:
        got = [deserialize_message(raw, JointState) for _, _, raw in reader.messages()]
    assert [m.position[0] for m in got] == [0.0, 1.0, 2.0, 3.0, 4.0]
    bag_meta = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert bag_meta["version"] == 9 and bag_meta["storage_identifier"] == "mcap"
    assert json.loads(bag_meta["custom_data"]["so101.episode"])["instruction"] == "pick"
    assert read_episode_metadata(path).success is True
    index = update_index(tmp_path / "ds")
    assert index["episodes"][0]["name"] == "ep0" and index["episodes"][0]["messages"] == 5
    with pytest.raises(FileExistsError):
        EpisodeWriter(path, EpisodeMetadata(instruction="again"))
    with pytest.raises(FileNotFoundError, match="not an episode"):
        read_episode_metadata(tmp_path)


def test_discard_removes_episode(tmp_path):
    w = EpisodeWriter(tmp_path / "ep", EpisodeMetadata(instruction="x"))
    w.add_topic("/joint_states", "sensor_msgs/msg/JointState")
    w.write("/joint_states", 1, serialize_message(JointState()))
    w.discard()
    assert not (tmp_path / "ep").exists()
    with pytest.raises(KeyError, match="not declared"):
        EpisodeWriter(tmp_path / "ep2", EpisodeMetadata(instruction="x")).write("/nope", 0, b"")
