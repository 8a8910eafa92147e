"""Checkpoint directories: config.json + model.safetensors + stats.json (+ tokenizer.json for in-code presets).

No pickle anywhere. A pretrained backbone is stored by reference (its path and config hash, in config.json); its
weights are only written when they were trained or are random (presets).

Loading is strict: anything wrong with a file (missing, truncated, wrong type, non-finite weights, a spread of 0
in the stats; on request a model whose outputs on a neutral observation are not joint positions of this arm)
raises one CheckpointError naming the file and the field, which every entry point reports as one line.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meanflow_policy.backbone import TOKENIZER_FILE, load_tokenizer_file
from meanflow_policy.configuration import MeanFlowConfig
from so101_common.joints import JointLimits, home_vector

if TYPE_CHECKING:
    from meanflow_policy.modeling import MeanFlowPolicy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "stats.json"
_BACKBONE_PREFIX = "backbone."
# Plausibility of a loaded model: one chunk on a neutral observation (grey images, home pose) must be finite and
# mostly (at least half) joint positions of the arm. A value counts as outside when it passes a limit by more than
# the margin (a trained policy may aim a little past a limit, e.g. to squeeze the gripper shut).
PLAUSIBLE_LIMIT_MARGIN_RAD = 0.1
MAX_OUTSIDE_FRACTION = 0.5
NEUTRAL_INSTRUCTION = "pick up the cube"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and, where there is one, the field."""


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
            raise CheckpointError(f"cannot check unknown config field {key!r} of checkpoint {path}")
        have = getattr(config, key)
        if isinstance(have, tuple):
            wanted = tuple(wanted)
        if have != wanted:
            raise CheckpointError(f"checkpoint {path} has {key}={have!r}, but {wanted!r} is required")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file}: not readable JSON: {exc}") from exc


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file; a truncated or foreign file and non-finite values are refused."""
    try:
        stored = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in stored.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        first = ", ".join(f"{k}: {n} of {stored[k].numel()}" for k, n in sorted(bad.items())[:3])
        more = ", ..." if len(bad) > 3 else ""
        raise CheckpointError(f"{file}: {len(bad)} tensors contain NaN or inf ({first}{more}); the weights are corrupt")
    return stored


def _check_stats_spread(stats: Any, config: MeanFlowConfig, file: Path, min_std: float) -> None:
    """A standard deviation under the floor training writes means stats that did not come from data."""
    names = {"state": [f"state[{i}]" for i in range(config.state_dim)], "action": list(config.joint_names)}
    for key, labels in names.items():
        try:
            std = np.asarray(stats[key]["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            continue  # a missing or malformed field is named by set_stats
        if std.shape == (len(labels),) and np.any(std < min_std):
            low = [f"{label} {v:g}" for label, v in zip(labels, std) if v < min_std]
            raise CheckpointError(f"{file}: field {key}.std is below {min_std:g} for {low}; a spread of 0 would "
                                  "make normalisation meaningless (stats computed from demos are floored at "
                                  f"{min_std:g})")


def check_plausible(policy: "MeanFlowPolicy", file: Path) -> None:
    """One chunk on a neutral observation must be finite and mostly inside the arm's joint limits.

    Catches weights that are corrupt yet finite (flipped bytes, a wrong file) before they drive joints into their
    limits; the chunk's noise is seeded, so the verdict does not change between loads."""
    config = policy.config
    limits = JointLimits.so101(config.joint_names)
    size = int(config.image_size)
    neutral = {"images": {k: np.full((size, size, 3), 128, np.uint8) for k in config.camera_keys},
               "state": home_vector(config.joint_names).astype(np.float32), "instruction": NEUTRAL_INSTRUCTION}
    generator = torch.Generator(device=policy.device).manual_seed(0)
    chunk = policy.sample(neutral, generator=generator).astype(np.float64)
    if not np.all(np.isfinite(chunk)):
        raise CheckpointError(f"{file}: the model gives NaN or inf on a neutral observation; the weights are corrupt")
    outside = (chunk < limits.lower - PLAUSIBLE_LIMIT_MARGIN_RAD) | (chunk > limits.upper + PLAUSIBLE_LIMIT_MARGIN_RAD)
    share = float(outside.mean())
    if share > MAX_OUTSIDE_FRACTION:
        joints = [n for n, out in zip(limits.names, outside.any(axis=0)) if out]
        raise CheckpointError(f"{file}: on a neutral observation {100 * share:.0f} % of the model's joint targets "
                              f"are outside the joint limits (joints {joints}; at most "
                              f"{100 * MAX_OUTSIDE_FRACTION:.0f} % allowed): corrupt weights or stats, or not a "
                              "checkpoint for this arm")


def load_policy(cls: type["MeanFlowPolicy"], path: Path, device: torch.device,
                expect: Mapping[str, Any] | None, check_outputs: bool) -> "MeanFlowPolicy":
    """Rebuild a policy from a checkpoint directory, checking every file against the config (CheckpointError)."""
    from meanflow_policy.modeling import MIN_STD  # modeling imports this module

    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE, STATS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}")
    raw_config = _read_json(path / CONFIG_FILE)
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{path / CONFIG_FILE}: expected a JSON object, got {type(raw_config).__name__}")
    try:
        config = MeanFlowConfig.from_dict(raw_config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid {CONFIG_FILE}: {exc}") from exc
    _check_expect(config, expect, path)
    tokenizer = None
    if config.backbone_is_preset:
        if not (path / TOKENIZER_FILE).is_file():
            raise CheckpointError(f"checkpoint {path} lacks {TOKENIZER_FILE} (needed by preset {config.backbone!r})")
        try:
            tokenizer = load_tokenizer_file(path / TOKENIZER_FILE)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a bad file
            raise CheckpointError(f"{path / TOKENIZER_FILE}: not a valid tokenizer file: {exc}") from exc
    try:
        policy = cls(config, tokenizer=tokenizer)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot build the model of {CONFIG_FILE} (backbone "
                              f"{config.backbone!r}): {exc}") from exc
    stored = _load_weights(path / WEIGHTS_FILE)
    model_state = policy.state_dict()
    include_backbone = backbone_weights_included(config)
    expected = {k for k in model_state if include_backbone or not k.startswith(_BACKBONE_PREFIX)}
    missing = sorted(expected - set(stored))
    unexpected = sorted(set(stored) - expected)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS_FILE} does not match {CONFIG_FILE}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key in sorted(expected):
        if tuple(stored[key].shape) != tuple(model_state[key].shape):
            raise CheckpointError(f"checkpoint {path}: tensor {key} has shape {tuple(stored[key].shape)} in "
                                  f"{WEIGHTS_FILE} but {tuple(model_state[key].shape)} in a model built from "
                                  f"{CONFIG_FILE}")
    policy.load_state_dict(stored, strict=not (set(model_state) - expected))
    stats = _read_json(path / STATS_FILE)
    try:
        policy.set_stats(stats)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid {STATS_FILE}: {exc}") from exc
    _check_stats_spread(stats, config, path / STATS_FILE, MIN_STD)
    policy.to(device)
    policy.backbone.clear_cache()
    policy.eval()
    if check_outputs:
        check_plausible(policy, path / WEIGHTS_FILE)
        policy.backbone.clear_cache()  # the check's instruction must not linger as the cached one
    return policy
