"""Checkpoint directories: config.json + model.safetensors + stats.json (+ tokenizer.json for in-code presets).

No pickle anywhere. A pretrained backbone is stored by reference (its path and config hash, in config.json); its
weights are only written when they were trained or are random (presets).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from meanflow_policy.backbone import TOKENIZER_FILE, load_tokenizer_file
from meanflow_policy.configuration import MeanFlowConfig

if TYPE_CHECKING:
    from meanflow_policy.modeling import MeanFlowPolicy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "stats.json"
_BACKBONE_PREFIX = "backbone."


def backbone_weights_included(config: MeanFlowConfig) -> bool:
    """Presets are random (rebuilt only via their weights); a pretrained backbone is by reference unless trained."""
    return config.backbone_is_preset or config.train_backbone


def save_policy(policy: "MeanFlowPolicy", path: Path) -> Path:
    """Write the checkpoint directory (created if needed) and return it."""
    path.mkdir(parents=True, exist_ok=True)
    config = policy.config
    include_backbone = backbone_weights_included(config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in policy.state_dict().items()
               if include_backbone or not k.startswith(_BACKBONE_PREFIX)}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "meanflow_policy", "objective": config.objective})
    config.save(path / CONFIG_FILE)
    (path / STATS_FILE).write_text(json.dumps(policy.get_stats(), indent=2) + "\n")
    if config.backbone_is_preset:
        policy.backbone.tokenizer.backend_tokenizer.save(str(path / TOKENIZER_FILE))
    return path


def _check_expect(config: MeanFlowConfig, expect: Mapping[str, Any] | None, path: Path) -> None:
    for key, wanted in (expect or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"cannot check unknown config field {key!r} of checkpoint {path}")
        have = getattr(config, key)
        if isinstance(have, tuple):
            wanted = tuple(wanted)
        if have != wanted:
            raise ValueError(f"checkpoint {path} has {key}={have!r}, but {wanted!r} is required")


def load_policy(cls: type["MeanFlowPolicy"], path: Path, device: torch.device,
                expect: Mapping[str, Any] | None) -> "MeanFlowPolicy":
    """Rebuild a policy from a checkpoint directory, checking every file against the config."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE, STATS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} lacks {name}")
    try:
        config = MeanFlowConfig.load(path / CONFIG_FILE)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint {path}: invalid {CONFIG_FILE}: {exc}") from exc
    _check_expect(config, expect, path)
    tokenizer = None
    if config.backbone_is_preset:
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {path} lacks {TOKENIZER_FILE} (needed by preset {config.backbone!r})")
        tokenizer = load_tokenizer_file(path / TOKENIZER_FILE)
    policy = cls(config, tokenizer=tokenizer)
    stored = load_file(str(path / WEIGHTS_FILE))
    model_state = policy.state_dict()
    include_backbone = backbone_weights_included(config)
    expected = {k for k in model_state if include_backbone or not k.startswith(_BACKBONE_PREFIX)}
    missing = sorted(expected - set(stored))
    unexpected = sorted(set(stored) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: {WEIGHTS_FILE} does not match {CONFIG_FILE}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key in sorted(expected):
        if tuple(stored[key].shape) != tuple(model_state[key].shape):
            raise ValueError(f"checkpoint {path}: tensor {key} has shape {tuple(stored[key].shape)} in "
                             f"{WEIGHTS_FILE} but {tuple(model_state[key].shape)} in a model built from {CONFIG_FILE}")
    policy.load_state_dict(stored, strict=not (set(model_state) - expected))
    try:
        policy.set_stats(json.loads((path / STATS_FILE).read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"checkpoint {path}: invalid {STATS_FILE}: {exc}") from exc
    policy.to(device)
    policy.backbone.clear_cache()
    return policy.eval()
