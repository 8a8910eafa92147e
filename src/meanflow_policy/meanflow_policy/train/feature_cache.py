"""Prefix-feature cache: with a frozen backbone each frame's prefix features are computed once per dataset.

A frozen backbone gives a training sample the same prefix at every step, so ``meanflow-train --freeze-backbone``
computes it once, stores it beside the dataset cache and trains the action expert alone (no backbone forward in
the step). One entry per episode, ``<cache-dir>/prefix-features/<key>/``; the key is a SHA-256 of the backbone's
weights (with its tokenizer and image normalisation), the frames' bytes, the instruction, the image size and the
cameras, so an entry built by another backbone, from other frames or at another size is never used.

Text comes first in the prefix and the LM is causal, so the instruction tokens' features are the same for every
step of an episode: stored once (float32). Image tokens: the per-(token, channel) episode mean in float32 plus each
sample's residual in float16 when it fits (the residual is small beside the large per-slot constant of frozen
features, so fp16's relative precision applies to the part that varies), memory-mapped while training. Entries are
written to a temporary folder and renamed into place; a broken entry is rebuilt. Several trainings may share one
cache: an entry another process finished meanwhile is used, never deleted under a reader.

It lives in the training layer, not in data/: building an entry runs the model's backbone, and the data pipeline
stays free of the model and transformers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from meanflow_policy.data.cache import install_entry
from meanflow_policy.data.samples import SampleSet
from meanflow_policy.data.sync import Episode
from meanflow_policy.model.backbone import VLMBackbone
from meanflow_policy.model.policy import PREFIX_FEATURES, PREFIX_MASK, MeanFlowPolicy

LOG = logging.getLogger("meanflow_policy.train.feature_cache")
FEATURES_DIR = "prefix-features"
FEATURE_CACHE_VERSION = 1
_META = "features.json"
_FP16_MAX = float(np.finfo(np.float16).max)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # a view, not a copy; numpy declares its buffer protocol to type checkers for Python >= 3.12 only
    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def backbone_fingerprint(backbone: VLMBackbone) -> str:
    """SHA-256 of everything that decides the prefix features: weights, tokenizer, image normalisation, sizes."""
    h = hashlib.sha256(json.dumps({"version": FEATURE_CACHE_VERSION, "image_size": backbone.config.image_size,
                                   "max_text_tokens": backbone.config.max_text_tokens, "lead_id": backbone.lead_id,
                                   "pad_id": backbone.pad_id}, sort_keys=True).encode())
    for name, tensor in sorted(backbone.vlm.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(_tensor_bytes(tensor))
    if backbone.language is not None and backbone.text_proj is not None:
        # tiny-smollm2: the language model by its hash, its projection by value
        h.update(f"language:{backbone.language.sha256}:{backbone.config.language_layers}".encode())
        for name, tensor in sorted(backbone.text_proj.state_dict().items()):
            h.update(f"text_proj.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(_tensor_bytes(tensor))
    for buffer in (backbone.pixel_scale, backbone.pixel_offset):
        h.update(_tensor_bytes(cast(torch.Tensor, buffer)))
    tokenizer = getattr(backbone.tokenizer, "backend_tokenizer", None)
    vocab = tokenizer.to_str() if tokenizer is not None else json.dumps(backbone.tokenizer.get_vocab(), sort_keys=True)
    h.update(vocab.encode())
    return h.hexdigest()[:32]


def episode_feature_key(fingerprint: str, episode: Episode, camera_keys: tuple[str, ...], image_size: int) -> str:
    """Cache key of one episode's prefix features: the backbone, the frames' content, instruction and size."""
    h = hashlib.sha256(json.dumps({"backbone": fingerprint, "instruction": episode.instruction,
                                   "cameras": list(camera_keys), "image_size": image_size,
                                   "version": FEATURE_CACHE_VERSION}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(episode.frame_index[episode.sample_steps]).tobytes())
    for cam in camera_keys:
        h.update(np.ascontiguousarray(episode.frames[cam]))  # type: ignore[arg-type]  # buffer protocol, see above
    return h.hexdigest()[:32]


@dataclass
class EpisodeFeatures:
    """Prefix features of one episode's samples (rows in ``episode.sample_steps`` order)."""

    text: np.ndarray  # (Lt, D) float32: instruction tokens, the same for every sample
    image_mean: np.ndarray  # (n_image_tokens, D) float32
    image_residual: np.ndarray  # (N, n_image_tokens, D) float16 or float32, memory-mapped

    def image(self, rows: np.ndarray) -> np.ndarray:
        return self.image_mean + self.image_residual[rows].astype(np.float32)


@dataclass
class FeatureCacheReport:
    reused: int = 0
    computed: int = 0
    computed_samples: int = 0
    seconds: float = 0.0
    dtypes: tuple[str, ...] = ()

    def summary(self) -> str:
        return (f"{self.reused} episode(s) from the cache, {self.computed} computed ({self.computed_samples} samples, "
                f"{self.seconds:.1f} s); storage {', '.join(sorted(set(self.dtypes))) or '-'}")


@torch.no_grad()
def compute_episode_features(policy: MeanFlowPolicy, episode: Episode, camera_keys: tuple[str, ...],
                             batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(text (Lt, D), image tokens (N, n_image_tokens, D)) float32 of every sample, through the training path."""
    backbone, n_img = policy.backbone, policy.n_image_tokens
    steps = episode.sample_steps
    was_training = backbone.training
    backbone.eval()
    text: np.ndarray | None = None
    image = np.empty((len(steps), n_img, backbone.feature_dim), dtype=np.float32)
    try:
        for i in range(0, len(steps), batch_size):
            chunk = steps[i:i + batch_size]
            frames = np.stack([np.stack([episode.frames[cam][episode.frame_index[k, j]]
                                         for j, cam in enumerate(camera_keys)]) for k in chunk])
            out, _ = backbone(torch.from_numpy(frames).to(policy.device), [episode.instruction] * len(chunk))
            out = out.float().cpu().numpy()
            if text is None:
                text = out[0, :-n_img].copy()
            image[i:i + len(chunk)] = out[:, -n_img:]
    finally:
        backbone.train(was_training)
    if text is None:
        raise ValueError(f"episode {episode.name} has no samples")
    return text, image


def _write_entry(folder: Path, text: np.ndarray, image: np.ndarray, meta: dict[str, Any],
                 broken: bool = False) -> None:
    """Write one entry atomically (temporary folder + rename). An entry another process finished meanwhile is kept
    (another training may be reading it); ``broken``: the entry found there could not be read, and is replaced."""
    mean = image.mean(axis=0, dtype=np.float64).astype(np.float32)
    residual = image - mean
    half = residual.astype(np.float16)
    safe = bool(np.isfinite(half).all()) and float(np.abs(residual).max(initial=0.0)) < _FP16_MAX
    stored = half if safe else residual
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "text.npy", text.astype(np.float32))
        np.save(tmp / "image_mean.npy", mean)
        np.save(tmp / "image_residual.npy", stored)
        (tmp / _META).write_text(json.dumps({**meta, "residual_dtype": str(stored.dtype)}, indent=2) + "\n")
        install_entry(tmp, folder, _META, broken, "prefix features")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_entry(folder: Path, meta_expected: dict[str, Any]) -> tuple[EpisodeFeatures, str]:
    meta = json.loads((folder / _META).read_text())
    for key, value in meta_expected.items():
        if meta.get(key) != value:
            raise ValueError(f"{_META} has {key}={meta.get(key)!r}, expected {value!r}")

    def load(name: str) -> np.ndarray:
        return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    feats = EpisodeFeatures(np.asarray(load("text")), np.asarray(load("image_mean")), load("image_residual"))
    n, n_img, dim = meta_expected["samples"], meta_expected["image_tokens"], meta_expected["dim"]
    if (feats.image_residual.shape != (n, n_img, dim) or feats.image_mean.shape != (n_img, dim)
            or feats.text.ndim != 2 or feats.text.shape[1] != dim):
        raise ValueError("array shapes do not match features.json")
    return feats, str(feats.image_residual.dtype)


def load_prefix_features(policy: MeanFlowPolicy, samples: SampleSet, cache_root: str | Path,
                         batch_size: int = 32) -> tuple["PrefixFeatureSet", FeatureCacheReport]:
    """Prefix features of every episode of ``samples``: from the cache when the backbone and frames match, else
    computed once (frozen backbone, training path) and cached."""
    if policy.config.train_backbone:
        raise ValueError("prefix features can only be cached for a frozen backbone (train_backbone is set)")
    root = Path(cache_root) / FEATURES_DIR
    config = policy.config
    start = time.perf_counter()
    fingerprint = backbone_fingerprint(policy.backbone)
    report = FeatureCacheReport()
    features, dtypes = [], []
    for episode in samples.episodes:
        key = episode_feature_key(fingerprint, episode, tuple(config.camera_keys), config.image_size)
        folder = root / key
        expected = {"version": FEATURE_CACHE_VERSION, "key": key, "backbone": fingerprint,
                    "samples": int(len(episode.sample_steps)), "image_tokens": policy.n_image_tokens,
                    "dim": policy.backbone.feature_dim}
        entry = None
        broken = False
        if (folder / _META).is_file():
            try:
                entry, dtype = _read_entry(folder, expected)
                report.reused += 1
            except (OSError, ValueError, KeyError, TypeError) as exc:
                LOG.warning("prefix features %s unreadable (%s); recomputing them", folder, exc)
                broken = True
        if entry is None:
            text, image = compute_episode_features(policy, episode, tuple(config.camera_keys), batch_size)
            _write_entry(folder, text, image, {**expected, "episode": episode.name}, broken)
            entry, dtype = _read_entry(folder, expected)
            report.computed += 1
            report.computed_samples += len(episode.sample_steps)
        features.append(entry)
        dtypes.append(dtype)
    report.seconds = time.perf_counter() - start
    report.dtypes = tuple(dtypes)
    return PrefixFeatureSet(samples, features), report


class PrefixFeatureSet:
    """The samples of a SampleSet with cached prefix features instead of images: ``batch(rows)`` gives state,
    actions and pad mask as SampleSet does, plus ``prefix_features`` (B, L, D) and ``prefix_mask`` (B, L), laid out
    as the backbone's batch path does (instruction tokens right-padded to the batch's longest, then image tokens)."""

    def __init__(self, samples: SampleSet, features: list[EpisodeFeatures]) -> None:
        if len(features) != len(samples.episodes):
            raise ValueError(f"{len(features)} feature entries for {len(samples.episodes)} episodes")
        self.samples, self.features = samples, features
        # An entry holds a row per step of its episode's sample_steps (ascending); the SampleSet may keep only some
        # of them (idle starts left out), so a sample's row in the entry is found from its step, not its index.
        self._steps = [np.asarray(e.sample_steps, dtype=np.int64) for e in samples.episodes]
        for e, steps in zip(samples.episodes, self._steps):
            if np.any(np.diff(steps) <= 0):
                raise ValueError(f"episode {e.name}: sample steps must be ascending to index its cached features")

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, rows: Any) -> dict:
        rows = np.asarray(rows, dtype=np.int64)
        out = self.samples.batch(rows, images=False)
        episodes = self.samples.sample_episode[rows]
        steps = self.samples.sample_step[rows]
        n_text = max(self.features[e].text.shape[0] for e in np.unique(episodes))
        n_img, dim = self.features[0].image_mean.shape
        feats = np.zeros((len(rows), n_text + n_img, dim), dtype=np.float32)
        mask = np.zeros((len(rows), n_text + n_img), dtype=bool)
        mask[:, n_text:] = True
        for e in np.unique(episodes):
            idx = np.nonzero(episodes == e)[0]
            entry = self.features[e]
            lt = entry.text.shape[0]
            feats[idx, :lt] = entry.text
            mask[idx, :lt] = True
            local = np.searchsorted(self._steps[e], steps[idx])
            order = np.argsort(local)  # memory-mapped rows read in ascending order
            feats[idx[order], n_text:] = entry.image(local[order])
        out[PREFIX_FEATURES] = torch.from_numpy(feats)
        out[PREFIX_MASK] = torch.from_numpy(mask)
        return out
