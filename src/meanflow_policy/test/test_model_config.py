"""MeanFlowConfig: JSON round trip, defaults from the method, clear validation errors."""
import json

import pytest

from so101_common.graph import JOINT_NAMES

from meanflow_policy.model.configuration import MeanFlowConfig


def test_defaults_follow_the_method():
    cfg = MeanFlowConfig()
    assert cfg.chunk_size == 20 and cfg.num_vlm_layers == 16
    assert cfg.camera_keys == ("wrist", "top") and cfg.joint_names == JOINT_NAMES
    assert (cfg.flow_ratio, cfg.adaptive_gamma, cfg.adaptive_c) == (0.2, 0.5, 1e-3)
    assert (cfg.time_mean, cfg.time_std) == (-0.4, 1.0)
    assert cfg.dt == pytest.approx(1 / 30)


@pytest.mark.parametrize("objective,nfe", [("meanflow", 1), ("flow_matching", 10), ("ddpm", 100)])
def test_default_nfe_per_objective(objective, nfe):
    assert MeanFlowConfig(objective=objective).default_nfe == nfe
    assert MeanFlowConfig(objective=objective, default_nfe=3).default_nfe == 3


def test_json_round_trip(tmp_path):
    cfg = MeanFlowConfig.tiny(objective="ddpm", camera_keys=("top",), chunk_size=12, ddpm_sampler="ddim")
    back = MeanFlowConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.camera_keys, tuple)
    cfg.save(tmp_path / "c.json")
    assert MeanFlowConfig.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["camera_keys"] == ["top"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(objective="rectified"), "objective"),
    (dict(camera_keys=("wrist", "side")), "side"),
    (dict(joint_names=("shoulder_pan", "elbow"), action_dim=2), "elbow"),
    (dict(action_dim=5), "action_dim 5"),
    (dict(expert_width=130, expert_heads=4), "divisible"),
    (dict(flow_ratio=1.5), "flow_ratio"),
    (dict(adaptive_gamma=-0.1), "adaptive_gamma"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(ddpm_sampler="euler"), "ddpm_sampler"),
    (dict(tiny_patch_size=0), "tiny_patch_size"),
    (dict(image_shift_px=32, image_size=64), "image_shift_px"),
    (dict(image_shift_px=-1), "image_shift_px"),
])
def test_invalid_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeanFlowConfig(**kwargs)


def test_unknown_json_field_is_rejected():
    d = MeanFlowConfig().to_dict()
    d["chunk"] = 3
    with pytest.raises(ValueError, match="chunk"):
        MeanFlowConfig.from_dict(d)


@pytest.mark.parametrize("field,value,match", [
    ("chunk_size", "20", "field chunk_size must be an integer, got str '20'"),
    ("chunk_size", 20.0, "field chunk_size must be an integer, got float 20.0"),
    ("fps", "30", "field fps must be a number, got str '30'"),
    ("train_backbone", 1, "field train_backbone must be true or false, got int 1"),
    ("objective", None, "field objective must be a string, got NoneType None"),
    ("camera_keys", "wrist", "field camera_keys must be a list of strings, got str 'wrist'"),
    ("joint_names", [1, 2], "field joint_names must be a list of strings"),
])
def test_wrong_json_types_are_named(field, value, match):
    """JSON gives any type back: a string where a number belongs must be named, not fail deep inside torch."""
    d = MeanFlowConfig().to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=match):
        MeanFlowConfig.from_dict(d)
