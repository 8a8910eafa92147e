"""Checkpoint directories, as a file format: config.json + model.safetensors + stats.json (+ tokenizer.json for
presets with an in-code tokenizer, + grounding.safetensors for a policy with instruction grounding).

This module knows the files, not the model: the policy (model/policy.py) hands it tensors and
stats to write, and checks what it reads against a model built from the config.

No pickle anywhere. A pretrained backbone is stored by reference (its path and config hash, in config.json); its
weights are only written when they were trained or are random (presets). The frozen SmolLM2 of tiny-smollm2 is
never written: config.json names it by its GGUF file's SHA-256, which loading checks. An instruction grounding's
classifier (meanflow-ground) has a file of its own, so that grounding a policy adds a small file beside its weights
instead of a second copy of them (checkpoints grounded before keep it in model.safetensors, which still loads).

Reading is strict: anything wrong with a file (missing, truncated, wrong type, non-finite weights, tensors that do
not fit the config, a spread of 0 in the stats) raises one CheckpointError naming the file and the field, which
every entry point reports as one line.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.units import MIN_STD

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"
GROUNDING_FILE = "grounding.safetensors"
GROUNDING_PREFIX = "grounding."
# State-dict keys of the backbone: left out of the weights file when the backbone is stored by reference.
BACKBONE_PREFIX = "backbone."
# State-dict keys of the frozen pretrained language model (tiny-smollm2): never stored, always by reference.
LANGUAGE_PREFIX = "backbone.language."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and, where there is one, the field."""


def backbone_weights_included(config: MeanFlowConfig) -> bool:
    """Presets are random (rebuilt only via their weights); a pretrained backbone is by reference unless trained."""
    return config.backbone_is_preset or config.train_backbone


def stored_keys(config: MeanFlowConfig, state_keys: Iterable[str]) -> list[str]:
    """The state-dict keys a checkpoint of ``config`` stores (all but the backbone's when it is by reference, and
    never the frozen language model's)."""
    include_backbone = backbone_weights_included(config)
    return [k for k in state_keys if (include_backbone or not k.startswith(BACKBONE_PREFIX))
            and not k.startswith(LANGUAGE_PREFIX)]


def write_checkpoint(path: Path, config: MeanFlowConfig, state: Mapping[str, torch.Tensor],
                     stats: Mapping[str, Any]) -> Path:
    """Write weights (the stored keys of ``state``), config and stats into ``path`` (created if needed)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in stored_keys(config, state)}
    metadata = {"format": "meanflow_policy", "objective": config.objective}
    grounding = {k: v for k, v in tensors.items() if k.startswith(GROUNDING_PREFIX)}
    save_file({k: v for k, v in tensors.items() if k not in grounding}, str(path / WEIGHTS_FILE), metadata=metadata)
    if grounding:
        save_file(grounding, str(path / GROUNDING_FILE), metadata=metadata)
    elif (path / GROUNDING_FILE).exists():
        (path / GROUNDING_FILE).unlink()  # a classifier of an earlier save must not outlive its config
    config.save(path / CONFIG_FILE)
    (path / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
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


def read_config(path: Path, expect: Mapping[str, Any] | None = None) -> MeanFlowConfig:
    """The config of a checkpoint directory whose files are all present; ``expect`` maps config fields to the
    values the caller requires."""
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
    if config.code_tokenizer and not (path / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} lacks {TOKENIZER_FILE} (needed by preset {config.backbone!r})")
    return config


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """One safetensors file, refused when unreadable or holding NaN / inf."""
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


def read_weights(path: Path, expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """All tensors of the weights file (and of the grounding file, if there is one), which together must hold
    exactly ``expected_shapes`` (key -> shape of the model built from the config); a truncated or foreign file and
    non-finite values are refused."""
    stored = _read_tensors(path / WEIGHTS_FILE)
    files = WEIGHTS_FILE
    if (path / GROUNDING_FILE).is_file():
        grounding = _read_tensors(path / GROUNDING_FILE)
        twice = sorted(set(grounding) & set(stored))
        if twice or not all(k.startswith(GROUNDING_PREFIX) for k in grounding):
            raise CheckpointError(f"{path / GROUNDING_FILE}: holds weights other than the grounding's or ones that "
                                  f"{WEIGHTS_FILE} holds too ({(twice or sorted(grounding))[:3]})")
        stored.update(grounding)
        files = f"{WEIGHTS_FILE} + {GROUNDING_FILE}"
    missing = sorted(set(expected_shapes) - set(stored))
    unexpected = sorted(set(stored) - set(expected_shapes))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: {files} does not match {CONFIG_FILE}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key in sorted(expected_shapes):
        if tuple(stored[key].shape) != tuple(expected_shapes[key]):
            raise CheckpointError(f"checkpoint {path}: tensor {key} has shape {tuple(stored[key].shape)} in "
                                  f"{files} but {tuple(expected_shapes[key])} in a model built from "
                                  f"{CONFIG_FILE}")
    return stored


def read_stats(path: Path) -> Any:
    """The stats JSON as stored; its fields are checked by whoever installs them, its spread by check_stats_spread."""
    return _read_json(path / STATS_FILE)


def check_stats_spread(stats: Any, config: MeanFlowConfig, path: Path) -> None:
    """A standard deviation under the floor training writes means stats that did not come from data."""
    file = path / STATS_FILE
    names = {"state": [f"state[{i}]" for i in range(config.state_dim)], "action": list(config.joint_names)}
    for key, labels in names.items():
        try:
            std = np.asarray(stats[key]["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            continue  # a missing or malformed field is named by set_stats
        if std.shape == (len(labels),) and np.any(std < MIN_STD):
            low = [f"{label} {v:g}" for label, v in zip(labels, std) if v < MIN_STD]
            raise CheckpointError(f"{file}: field {key}.std is below {MIN_STD:g} for {low}; a spread of 0 would "
                                  "make normalisation meaningless (stats computed from demos are floored at "
                                  f"{MIN_STD:g})")
