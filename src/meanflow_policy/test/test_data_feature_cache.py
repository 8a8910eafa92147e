"""Frozen-backbone prefix-feature cache: the cached features give the loss the backbone gives, are computed once and
reused, are never used for another backbone, and work for the tiny preset and a pretrained-directory SmolVLM."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import SmolVLMConfig, SmolVLMModel
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from meanflow_policy.tools import train as train_cli
from meanflow_policy.model.backbone import build_tiny_tokenizer
from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.data.cache import load_episodes
from meanflow_policy.data.samples import SampleSet, compute_stats
from meanflow_policy.data.sync import SyncConfig
from meanflow_policy.data.demo_bags import synthetic_episode, write_bag
from meanflow_policy.train.feature_cache import FEATURES_DIR, _write_entry, load_prefix_features
from meanflow_policy.model.policy import PREFIX_FEATURES, PREFIX_MASK, MeanFlowPolicy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two episodes with instructions of different lengths (the cached batch must pad like the backbone does)."""
    root = tmp_path_factory.mktemp("demos")
    for i, instruction in enumerate(("reach the yellow square", "put the red cube in the left box")):
        write_bag(root / f"episode_{i}", synthetic_episode(seed=i, duration_s=1.0, height=48, width=64),
                  instruction=instruction)
    return root


def _policy_and_samples(config: MeanFlowConfig, bags: Path, cache: Path) -> tuple[MeanFlowPolicy, SampleSet]:
    sync = SyncConfig.from_policy_config(config)
    episodes, _ = load_episodes([bags], sync, cache)
    torch.manual_seed(0)
    policy = MeanFlowPolicy(config)
    policy.set_stats(compute_stats(episodes))
    return policy, SampleSet(episodes, sync)


def _loss(policy: MeanFlowPolicy, batch: dict) -> float:
    policy.train()
    with torch.no_grad():
        loss, _ = policy.compute_loss(batch, generator=torch.Generator().manual_seed(7))
    return float(loss)


def _backbone_calls(policy: MeanFlowPolicy) -> list[int]:
    calls: list[int] = []
    policy.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


def _check_cache_matches_backbone(policy: MeanFlowPolicy, samples: SampleSet, cache: Path,
                                  computed: int = 2) -> dict:
    features, report = load_prefix_features(policy, samples, cache)
    assert report.computed == computed and report.reused == 2 - computed
    rows = np.linspace(0, len(samples) - 1, 12).astype(np.int64)  # both episodes in one batch
    batch, cached = samples.batch(rows), features.batch(rows)
    assert "images" not in cached
    with torch.no_grad():
        policy.eval()
        direct, mask = policy.backbone(batch["images"], batch["instruction"])
    assert torch.equal(cached[PREFIX_MASK], mask) and not bool(mask.all())  # padded text, same layout
    scale = float(direct[mask].abs().max())
    torch.testing.assert_close(cached[PREFIX_FEATURES][mask], direct[mask], rtol=0, atol=2e-3 * scale)
    assert _loss(policy, cached) == pytest.approx(_loss(policy, batch), rel=2e-3)
    return cached


def test_cached_features_give_the_backbone_loss_are_reused_and_keyed_by_the_backbone(bags: Path,
                                                                                     tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    config = MeanFlowConfig.tiny()
    policy, samples = _policy_and_samples(config, bags, cache)
    calls = _backbone_calls(policy)
    cached = _check_cache_matches_backbone(policy, samples, cache)
    assert sum(calls) >= len(samples)  # computed: every sample went through the backbone once

    calls.clear()
    again, report = load_prefix_features(policy, samples, cache)
    assert (report.reused, report.computed, calls) == (2, 0, [])  # reused, not recomputed
    rows = np.linspace(0, len(samples) - 1, 12).astype(np.int64)
    assert torch.equal(again.batch(rows)[PREFIX_FEATURES], cached[PREFIX_FEATURES])
    stored = next((cache / FEATURES_DIR).iterdir())
    assert np.load(stored / "image_residual.npy", mmap_mode="r").dtype == np.float16

    other, _ = _policy_and_samples(MeanFlowConfig.tiny(backbone_seed=1), bags, cache)  # other backbone weights
    other_features, report = load_prefix_features(other, samples, cache)
    assert (report.reused, report.computed) == (0, 2)
    assert not torch.allclose(other_features.batch(rows)[PREFIX_FEATURES], cached[PREFIX_FEATURES])
    assert len(list((cache / FEATURES_DIR).iterdir())) == 4


def test_a_shared_cache_keeps_finished_entries_under_readers_and_rebuilds_broken_ones(bags: Path,
                                                                                    tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    policy, samples = _policy_and_samples(MeanFlowConfig.tiny(), bags, cache)
    features, _ = load_prefix_features(policy, samples, cache)
    rows = np.linspace(0, len(samples) - 1, 12).astype(np.int64)
    before = features.batch(rows)[PREFIX_FEATURES].clone()
    folder = sorted((cache / FEATURES_DIR).iterdir())[0]
    residual = np.load(folder / "image_residual.npy")
    # Another training that found no entry and computed the same one writes after this one finished: this one's
    # entry stays (it is being read: the failure seen with two trainings started side by side on one cache).
    _write_entry(folder, np.zeros((3, 4), np.float32), np.ones((2, 5, 4), np.float32), {"key": "another"})
    np.testing.assert_array_equal(np.load(folder / "image_residual.npy"), residual)
    again, report = load_prefix_features(policy, samples, cache)
    assert (report.reused, report.computed) == (2, 0)
    assert torch.equal(again.batch(rows)[PREFIX_FEATURES], before)
    # An entry that cannot be read is rebuilt in place.
    (folder / "image_residual.npy").unlink()
    rebuilt, report = load_prefix_features(policy, samples, cache)
    assert (report.reused, report.computed) == (1, 1)
    assert torch.equal(rebuilt.batch(rows)[PREFIX_FEATURES], before)
    assert not [p for p in (cache / FEATURES_DIR).iterdir() if ".tmp" in p.name or ".stale" in p.name]


def test_cached_features_stay_aligned_when_idle_starts_are_left_out(bags: Path, tmp_path: Path) -> None:
    # Recovery episodes begin with idle hand-overs that training leaves out; the cache still holds a row for every
    # step of the episode (it is shared with runs that keep them), so a sample's row is found by its step.
    cache = tmp_path / "cache"
    config = MeanFlowConfig.tiny()
    policy, every = _policy_and_samples(config, bags, cache)
    load_prefix_features(policy, every, cache)  # the entries, as a run keeping every sample wrote them
    first = every.episodes[0]
    first.action = np.array(first.action)
    first.action[:15] = first.action[0]  # the first episode starts with a hand-over that holds still
    kept = SampleSet(every.episodes, every.cfg, idle_start_rad=0.05)
    assert 0 < kept.idle_samples < len(first.sample_steps) and all(np.any(kept.sample_episode == i) for i in range(2))
    _check_cache_matches_backbone(policy, kept, cache, computed=0)


def test_pretrained_smolvlm_directory_path(bags: Path, tmp_path: Path) -> None:
    """The real-backbone path (from_pretrained on a local directory) with SmolVLM2's structure in small: SigLIP
    with gelu-tanh, pixel shuffle 4, a Llama text model with grouped-query attention and SmolLM2's RoPE base."""
    tokenizer = build_tiny_tokenizer()
    vlm_config = SmolVLMConfig(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           patch_size=8, image_size=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        text_config=dict(model_type="llama", hidden_size=60, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=10, vocab_size=len(tokenizer),
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        scale_factor=4, image_token_id=2, vocab_size=len(tokenizer), tie_word_embeddings=False)
    vlm_dir = tmp_path / "smolvlm"
    torch.manual_seed(3)
    SmolVLMModel(vlm_config).save_pretrained(vlm_dir)
    tokenizer.save_pretrained(vlm_dir)
    SmolVLMImageProcessorPil(do_image_splitting=False).save_pretrained(vlm_dir)
    config = MeanFlowConfig(backbone=str(vlm_dir), image_size=64, num_vlm_layers=2, expert_width=64, expert_depth=2,
                            expert_heads=2)
    policy, samples = _policy_and_samples(config, bags, tmp_path / "cache")
    assert policy.backbone.tokens_per_image == 4 and policy.backbone.feature_dim == 60
    _check_cache_matches_backbone(policy, samples, tmp_path / "cache")


def _train(bags: Path, out: Path, cache: Path, *extra: str) -> int:
    return train_cli.main(["--bags", str(bags), "--out", str(out), "--preset", "tiny", "--steps", "3",
                           "--batch-size", "4", "--val-every", "100", "--val-batches", "1", "--val-fraction", "0.5",
                           "--cache-dir", str(cache), "--device", "cpu", "--cpu-threads", "1", "--no-progress",
                           *extra])


def test_cli_freeze_backbone_trains_the_expert_on_cached_features(bags: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="meanflow_train"):
        assert _train(bags, tmp_path / "a", cache, "--freeze-backbone") == 0
        assert _train(bags, tmp_path / "b", cache, "--freeze-backbone") == 0
    lines = [r.getMessage() for r in caplog.records if "prefix features" in r.getMessage()]
    assert len(lines) == 2
    assert "0 episode(s) from the cache, 1 computed" in lines[0] and "1 episode(s) from the cache, 0 computed" \
        in lines[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meanflow_train"):
        assert _train(bags, tmp_path / "c", cache, "--freeze-backbone", "--image-shift", "2") == 0
    off = [r.getMessage() for r in caplog.records if "cache is OFF" in r.getMessage()]
    assert len(off) == 1 and "--image-shift 2" in off[0]
    assert _train(bags, tmp_path / "d", cache, "--freeze-backbone", "--train-backbone") == 2


def test_init_from_a_jointly_trained_checkpoint_with_freeze_backbone_trains_the_expert_alone(bags: Path,
                                                                                               tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert _train(bags, tmp_path / "joint", cache, "--train-backbone") == 0
    assert _train(bags, tmp_path / "ft", cache, "--init-from", str(tmp_path / "joint" / "last"),
                  "--freeze-backbone", "--lr", "1e-2") == 0
    before = MeanFlowPolicy.load(tmp_path / "joint" / "last").state_dict()
    after = MeanFlowPolicy.load(tmp_path / "ft" / "last")
    assert after.config.train_backbone is False
    weights = after.state_dict()
    backbone = [k for k in weights if k.startswith("backbone.")]
    expert = [k for k in weights if k.startswith("expert.")]
    assert backbone and expert
    assert all(torch.equal(weights[k], before[k]) for k in backbone)  # frozen as the checkpoint left it
    assert any(not torch.equal(weights[k], before[k]) for k in expert)
