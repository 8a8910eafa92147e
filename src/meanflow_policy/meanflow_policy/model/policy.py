"""MeanFlowPolicy: frozen SmolVLM prefix + action expert; training loss and chunk sampling in joint units.

Observation -> (chunk_size, action_dim) joint position targets (radians, config.joint_names order). The prefix
(image tokens of every camera, instruction tokens, a state token) is built once per chunk; the expert then runs
nfe times on it. Normalisation stats live inside the policy and its checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from so101_common.joints import JointLimits, home_vector

from meanflow_policy.images import resize_image
from meanflow_policy.model import checkpoint
from meanflow_policy.model import objectives
from meanflow_policy.model.action_expert import ActionExpert, ActionExpertContext
from meanflow_policy.model.backbone import VLMBackbone, language_model, load_tokenizer_file, random_shift
from meanflow_policy.model.checkpoint import CheckpointError
from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.model.cuda_graphs import ChunkGraphs
from meanflow_policy.model.grounding import Grounding, InstructionGrounding
from meanflow_policy.units import MIN_STD

_STAT_KEYS = ("state", "action")
# Batch keys of precomputed prefix features (frozen backbone output), used instead of images + instructions.
PREFIX_FEATURES, PREFIX_MASK = "prefix_features", "prefix_mask"
# Plausibility of a loaded model: one chunk on a neutral observation (grey images, home pose) must be finite and
# mostly (at least half) joint positions of the arm. A value counts as outside when it passes a limit by more than
# the margin (a trained policy may aim a little past a limit, e.g. to squeeze the gripper shut).
PLAUSIBLE_LIMIT_MARGIN_RAD = 0.1
MAX_OUTSIDE_FRACTION = 0.5
NEUTRAL_INSTRUCTION = "pick up the cube"
# Real-time chunking's request to the sampler: target rows (n, action_dim) in joint units and a weight per value.
ChunkGuide = tuple[np.ndarray, np.ndarray]


def _repeat(ctx: ActionExpertContext, n: int) -> ActionExpertContext:
    """A one-observation context for ``n`` samples at once (views: the prefix's K/V are not copied)."""
    def rep(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.expand(n, *t.shape[1:])
    return dataclasses.replace(ctx, kv=[(k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:])) for k, v in ctx.kv],
                               attn_mask=rep(ctx.attn_mask), cond=rep(ctx.cond), known=rep(ctx.known),
                               known_mask=rep(ctx.known_mask))


# (image scale (B, D), image shift (B, D), expert conditioning term (B, W))
FilmTerms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Temperature of the phrasing-contrastive loss (cosine similarities / this): a common supervised-contrastive setting.
CONTRAST_TEMPERATURE = 0.1


def phrasing_contrast_loss(hidden: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """Supervised contrastive loss of (B, H) activations whose samples are labelled by their recorded sentence: for
    each sample with another of its task in the batch, minus the mean log-probability of picking those among all
    other samples by cosine similarity. 0 when no sample has a partner."""
    z = nn.functional.normalize(hidden.float(), dim=-1)
    b = z.shape[0]
    ids = {t: i for i, t in enumerate(dict.fromkeys(tasks))}
    label = torch.tensor([ids[t] for t in tasks], device=z.device)
    self_mask = torch.eye(b, dtype=torch.bool, device=z.device)
    positive = (label[:, None] == label[None, :]) & ~self_mask
    logits = (z @ z.T / CONTRAST_TEMPERATURE).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    counts = positive.sum(1)
    anchors = counts > 0
    if not bool(anchors.any()):
        return z.sum() * 0.0
    per = -(log_prob.masked_fill(~positive, 0.0).sum(1)[anchors] / counts[anchors])
    return per.mean()


class InstructionFilm(nn.Module):
    """The instruction as FiLM: its pooled token features scale and shift every image-token channel and add a term
    to the expert's adaLN conditioning.

    Why: through cross-attention alone the multi-task policy left the instruction unused where only it decides
    (round 4: red/green picked by chance; its text features for "red ..." and "green ..." differ by 4 %, the two
    sorting orders by 0.7 %: a large component shared by every instruction drowns the word). The pooled features
    are therefore standardised per channel over the instructions of the batch (running statistics at inference),
    as the image tokens are, before a channel-wise gate lets one word select which object's features the expert
    sees. The pooling weighs tokens by their position in the sentence, so word order counts: a plain mean gives the
    two sorting orders (the same words, colours swapped) one vector but for the LM's context (0.7 %; round 5 read
    red vs green, x2.1 open loop, and not the order, x1.02). Zero-initialised: added to a trained policy, it changes
    nothing until trained. With ``hidden`` > 0 a GELU layer of that width adds its own (zero-initialised) term to
    the linear one: which task a phrasing names can be an interaction of its words (colour and box), which a linear
    map of the pooled vector cannot read."""

    def __init__(self, feature_dim: int, width: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, affine=False, momentum=0.05)
        self.image = nn.Linear(feature_dim, 2 * feature_dim)
        self.expert = nn.Linear(feature_dim, width)
        self.mlp_in = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU()) if hidden else None
        self.mlp_out = nn.Linear(hidden, 2 * feature_dim + width) if hidden else None
        for layer in (self.image, self.expert, self.mlp_out):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> FilmTerms:
        """Text features (B, L, D) and mask (B, L) -> image scale (B, D), image shift (B, D), expert term (B, W)."""
        return self.terms(self.pool(text, mask))

    def terms(self, pooled: torch.Tensor, hidden: torch.Tensor | None = None) -> FilmTerms:
        """The FiLM terms of pooled features (B, D); ``hidden``: the hidden layer's activations when already known."""
        image, expert = self.image(pooled), self.expert(pooled)
        if self.mlp_in is not None and self.mlp_out is not None:
            extra = self.mlp_out(self.mlp_in(pooled) if hidden is None else hidden)
            image = image + extra[:, :image.shape[-1]]
            expert = expert + extra[:, image.shape[-1]:]
        scale, shift = image.chunk(2, dim=-1)
        return scale, shift, expert

    def pool(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D), (B, L) -> (B, D): the mean of the instruction's tokens weighted 1, 2, ..., n along the sentence
        (padding weighs 0 on either side), standardised per channel. Swapping two words moves it by their distance
        in the sentence times the difference of their features."""
        valid = mask.to(text.dtype)
        weight = valid.cumsum(1) * valid
        return self.norm((text * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1.0))


def resize_token_grid(values: torch.Tensor, grids: int, side: int, new_side: int) -> torch.Tensor:
    """Values per token of ``grids`` square side x side token grids (row-major, flattened: (grids * side**2 * D,)
    or (grids * side**2, D)) resized bilinearly (antialiased) to new_side x new_side grids, same layout and dtype:
    what a token at that place of a smaller image would carry."""
    d = values.numel() // (grids * side * side)
    grid = values.float().reshape(grids, side, side, d).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(new_side, new_side), mode="bilinear", align_corners=False, antialias=True)
    out = out.permute(0, 2, 3, 1).reshape(grids * new_side * new_side, d)
    return (out.reshape(-1) if values.ndim == 1 else out).to(values.dtype)


class MeanFlowPolicy(nn.Module):
    """The VLA policy (see module docstring); ``MeanFlowPolicy(config)`` or ``MeanFlowPolicy.load(dir)``."""

    # normalisation buffers (registered in __init__), declared so the type checker knows they are tensors
    state_mean: torch.Tensor
    state_std: torch.Tensor
    action_mean: torch.Tensor
    action_std: torch.Tensor

    def __init__(self, config: MeanFlowConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = VLMBackbone(config, tokenizer)
        width = config.expert_width
        feature_dim = self.backbone.feature_dim
        # Image-token features are standardised per (token slot, channel) with running dataset statistics: frozen
        # features carry a large per-slot constant that otherwise drowns the part that varies with the scene
        # (measured on a synthetic "where is the red square" task, 600 meanflow steps: one-step error 0.70 without,
        # 0.30 with it; predicting the mean gives 0.50).
        self.image_norm = nn.BatchNorm1d(self.n_image_tokens * feature_dim, affine=False, momentum=0.05)
        # image_norm's statistics resampled to the token grid of a smaller input size (set_image_size), by device
        self._image_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prefix_proj = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, width))
        self.state_proj = nn.Linear(config.state_dim, width)
        self.instruction_film = (InstructionFilm(feature_dim, width, config.instruction_film_hidden)
                                 if config.instruction_film else None)
        # The attribute keeps its name: checkpoints store the action expert's weights under "expert.".
        self.expert = ActionExpert(config.action_dim, config.chunk_size, width, config.expert_depth,
                                   config.expert_heads, config.expert_mlp_ratio,
                                   known_rows=config.action_prefix_rows > 0)
        self.register_buffer("state_mean", torch.zeros(config.state_dim), persistent=False)
        self.register_buffer("state_std", torch.ones(config.state_dim), persistent=False)
        self.register_buffer("action_mean", torch.zeros(config.action_dim), persistent=False)
        self.register_buffer("action_std", torch.ones(config.action_dim), persistent=False)
        # The objective (loss + sampler) is chosen once, here; nothing else looks at config.objective.
        self.objective = objectives.make_objective(config)
        self.grounding = (InstructionGrounding(self.backbone.language or language_model(config),
                                               config.grounding_instructions, config.grounding_min_confidence)
                          if config.grounding_instructions else None)
        self.last_grounding: Grounding | None = None
        self.last_timing: dict[str, float] = {}
        self._graphs: ChunkGraphs[ActionExpertContext] | None = None
        self.eval()

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.state_mean.device

    @property
    def n_image_tokens(self) -> int:
        """Image tokens of one observation, every camera, at the backbone's current input size."""
        return len(self.config.camera_keys) * self.backbone.tokens_per_image

    @property
    def image_size(self) -> int:
        """The size (px) camera images are resized to: the trained ``config.image_size`` unless set_image_size."""
        return self.backbone.input_size

    def set_image_size(self, size: int) -> int:
        """Read the cameras at ``size`` px instead of the trained size (0: the trained size), for inference: the
        vision pass shrinks with the number of patches (SmolVLM places them on its trained position grid,
        VLMBackbone.set_input_size) and the image-token statistics are resampled to the smaller token grid, as the
        image is. Cheaper chunks at some cost in success (docs/method.md, "Lower camera resolution"). Returns the
        size applied; a size the backbone cannot read is one ValueError listing those it can."""
        if self.training:
            raise ValueError("set_image_size is for inference (policy.eval()); train at the checkpoint's size")
        self.backbone.set_input_size(size or self.config.image_size)
        self._image_stats = None
        if self._graphs is not None:
            self._graphs.clear()
        return self.image_size

    def _normalise_image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(B, n_image_tokens * D) standardised by image_norm, whose statistics are per token slot of the trained
        size: at a smaller input size each camera's grid of slot statistics is resized bilinearly (antialiased) to
        the token grid read."""
        if self.image_size == self.config.image_size:
            return self.image_norm(image)
        mean, var = self._image_stats or (None, None)
        if mean is None or var is None or mean.device != image.device:
            cams, step = len(self.config.camera_keys), self.backbone.patch_size * self.backbone.scale_factor
            side, new_side = self.config.image_size // step, self.image_size // step
            assert self.image_norm.running_mean is not None and self.image_norm.running_var is not None
            mean, var = (resize_token_grid(stat, cams, side, new_side)
                         for stat in (self.image_norm.running_mean, self.image_norm.running_var))
            self._image_stats = (mean, var)
        return F.batch_norm(image, mean.to(image.dtype), var.to(image.dtype), training=False,
                            eps=self.image_norm.eps)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def cuda_graphs(self) -> bool:
        """Whether ``sample`` replays captured CUDA graphs where it can (see ``use_cuda_graphs``)."""
        return self._graphs is not None

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay each chunk as captured CUDA graphs (model/cuda_graphs.py; a CUDA device only): the first chunk of
        each instruction, sampler, step count and candidate count captures (~2 eager runs more), later ones replay.
        Applies to single draws and to the closest-of-candidates guide; the gradient-guided sampler, committed rows
        and stochastic samplers (ddpm) stay eager. Graphs are dropped when the policy changes mode, device or dtype."""
        if enabled and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the policy on a CUDA device, it is on {self.device}")
        self._graphs = ChunkGraphs() if enabled else None

    def compile_kernels(self) -> None:
        """Fuse the small kernels of the vision encoder and of the action expert with ``torch.compile`` (inductor,
        static shapes; in place: checkpoints keep their keys). The first call per input shape compiles (tens of
        seconds); with CUDA graphs that happens in the warm-up runs before a capture. The LM layers stay as they
        are: their key/value length changes with each instruction."""
        self.backbone.vlm.vision_model.encoder.compile(dynamic=False)
        self.expert.compile(dynamic=False)

    def train(self, mode: bool = True) -> "MeanFlowPolicy":
        graphs = getattr(self, "_graphs", None)  # None too while nn.Module.__init__ runs, before it is set
        if graphs is not None:
            graphs.clear()
        return super().train(mode)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "MeanFlowPolicy":
        """Moves and casts (``to``, ``half``, ...) invalidate captured graphs (they read weights by address) and
        the resampled image statistics."""
        graphs = getattr(self, "_graphs", None)  # None too while nn.Module.__init__ runs, before it is set
        if graphs is not None:
            graphs.clear()
        self._image_stats = None
        return super()._apply(fn, *args, **kwargs)

    def set_stats(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """Install normalisation stats ``{"state": {"mean", "std"}, "action": {"mean", "std"}}`` in joint units.

        Everything is checked before anything is changed, so a bad dict leaves the policy as it was."""
        dims = {"state": self.config.state_dim, "action": self.config.action_dim}
        checked: dict[str, np.ndarray] = {}
        for key in _STAT_KEYS:
            if key not in stats:
                raise ValueError(f"stats lack {key!r} (need {list(_STAT_KEYS)})")
            for field in ("mean", "std"):
                if field not in stats[key]:
                    raise ValueError(f"stats[{key!r}] lacks {field!r}")
                values = np.asarray(stats[key][field], dtype=np.float64)
                if values.shape != (dims[key],):
                    raise ValueError(f"stats[{key!r}][{field!r}] has shape {values.shape}, expected ({dims[key]},)")
                if not np.all(np.isfinite(values)):
                    raise ValueError(f"stats[{key!r}][{field!r}] contains NaN or inf")
                if field == "std" and np.any(values < 0):
                    raise ValueError(f"stats[{key!r}]['std'] has negative entries")
                checked[f"{key}_{field}"] = values
        for name, values in checked.items():
            getattr(self, name).copy_(torch.as_tensor(values, dtype=torch.float32))

    def get_stats(self) -> dict[str, dict[str, list[float]]]:
        return {key: {field: getattr(self, f"{key}_{field}").tolist() for field in ("mean", "std")}
                for key in _STAT_KEYS}

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        return (state - self.state_mean) / self.state_std.clamp(min=MIN_STD)

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions - self.action_mean) / self.action_std.clamp(min=MIN_STD)

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return actions * self.action_std.clamp(min=MIN_STD) + self.action_mean

    # ---- network ----------------------------------------------------------------------------------------------
    def _text(self, features: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The instruction's part of prefix features (B, L, D) and its mask (all valid when ``mask`` is None)."""
        text = features[:, :-self.n_image_tokens].to(self.state_proj.weight.dtype)
        text_mask = (torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None
                     else mask[:, :-self.n_image_tokens])
        return text, text_mask

    def _context(self, features: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor,
                 film: FilmTerms | None = None) -> ActionExpertContext:
        """Prefix = projected VLM features + one state token; returns the expert's per-chunk context. ``mask`` None:
        every token is valid (one observation: no padding; and no host sync to find that out). ``film``: the
        instruction's FiLM terms when already computed (training with the phrasing-contrastive loss)."""
        features = features.to(self.state_proj.weight.dtype)
        n_img, b = self.n_image_tokens, features.shape[0]
        text = features[:, :-n_img]
        image = self._normalise_image_tokens(features[:, -n_img:].reshape(b, -1)).view(b, n_img, -1)
        cond = None
        if self.instruction_film is not None:
            scale, shift, cond = film if film is not None else self.instruction_film(*self._text(features, mask))
            image = image * (1 + scale[:, None]) + shift[:, None]
        prefix = self.prefix_proj(torch.cat([text, image], dim=1))
        state_tok = self.state_proj(self.normalize_state(state))[:, None]
        prefix = torch.cat([prefix, state_tok], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return self.expert.prepare(prefix, mask, cond)

    @staticmethod
    def _with_known(ctx: ActionExpertContext, actions: torch.Tensor, rows: torch.Tensor,
                    valid: torch.Tensor | None = None) -> ActionExpertContext:
        """``ctx`` whose first ``rows[b]`` rows of sample b are committed to ``actions`` (B, T, D), normalised."""
        mask = torch.arange(actions.shape[1], device=actions.device)[None] < rows[:, None]
        if valid is not None:
            mask = mask & valid
        return dataclasses.replace(ctx, known=actions, known_mask=mask[..., None].to(actions.dtype))

    @staticmethod
    def _committed_start(noise: torch.Tensor, ctx: ActionExpertContext) -> torch.Tensor:
        """``noise`` whose committed rows start at their clean actions instead (no velocity there: they stay). The
        expert sees them in its noisy input, where it already reads its chunk, and learns to continue them: given
        only as an added input, they were never read (docs/notes/realtime_experiments.md, "Committed rows as an
        input")."""
        assert ctx.known is not None and ctx.known_mask is not None
        return torch.where(ctx.known_mask > 0, ctx.known.to(noise.dtype), noise)

    def _u_fn(self, ctx: ActionExpertContext) -> objectives.UFn:
        return lambda z, r, t: self.expert(z, r, t, ctx)

    def _validate_batch(self, batch: Mapping[str, Any]) -> None:
        cfg = self.config
        cached = PREFIX_FEATURES in batch
        inputs = (PREFIX_FEATURES, PREFIX_MASK) if cached else ("images", "instruction")
        for key in (*inputs, "state", "actions", "action_is_pad"):
            if key not in batch:
                raise ValueError(f"training batch lacks {key!r}")
        state, actions = batch["state"], batch["actions"]
        b = state.shape[0]
        if cached:
            feats, mask = batch[PREFIX_FEATURES], batch[PREFIX_MASK]
            if feats.ndim != 3 or feats.shape[0] != b or feats.shape[2] != self.backbone.feature_dim \
                    or feats.shape[1] <= self.n_image_tokens or tuple(mask.shape) != tuple(feats.shape[:2]):
                raise ValueError(f"batch[{PREFIX_FEATURES!r}] must be ({b}, > {self.n_image_tokens}, "
                                 f"{self.backbone.feature_dim}) with a matching mask, got {tuple(feats.shape)} "
                                 f"and {tuple(mask.shape)}")
        else:
            images = batch["images"]
            expected = (b, len(cfg.camera_keys), cfg.image_size, cfg.image_size, 3)
            if tuple(images.shape) != expected or images.dtype != torch.uint8:
                raise ValueError(f"batch['images'] must be uint8 {expected} (cameras {cfg.camera_keys}), "
                                 f"got {images.dtype} {tuple(images.shape)}")
            if len(batch["instruction"]) != b:
                raise ValueError(f"batch['instruction'] has {len(batch['instruction'])} entries for batch size {b}")
        if tuple(state.shape) != (b, cfg.state_dim):
            raise ValueError(f"batch['state'] must be ({b}, {cfg.state_dim}), got {tuple(state.shape)}")
        if tuple(actions.shape) != (b, cfg.chunk_size, cfg.action_dim):
            raise ValueError(f"batch['actions'] must be ({b}, {cfg.chunk_size}, {cfg.action_dim}), "
                             f"got {tuple(actions.shape)}")
        if tuple(batch["action_is_pad"].shape) != (b, cfg.chunk_size):
            raise ValueError(f"batch['action_is_pad'] must be ({b}, {cfg.chunk_size}), "
                             f"got {tuple(batch['action_is_pad'].shape)}")

    def compute_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None, t: torch.Tensor | None = None,
                     r: torch.Tensor | None = None, instruction_contrast: float = 0.0,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the configured objective on a dataset batch; ``noise``/``t``/``r`` override the random draws
        (as the objective reads them: r is ignored by flow_matching; for ddpm, t holds integer steps k). A batch
        may carry the frozen backbone's output instead of images + instructions (``prefix_features`` (B, L, D) and
        ``prefix_mask`` (B, L), see train/feature_cache.py): then no backbone runs. ``instruction_contrast`` > 0
        adds that weight times :func:`phrasing_contrast_loss` of the FiLM's hidden layer, labelled by the batch's
        ``recorded_instruction`` (the sentence each sample's phrasing was drawn for)."""
        if self.image_size != self.config.image_size:
            raise ValueError(f"the policy reads {self.image_size} px cameras (set_image_size); training needs the "
                             f"checkpoint's {self.config.image_size} px: set_image_size(0) first")
        self._validate_batch(batch)
        film_mlp = None if self.instruction_film is None else self.instruction_film.mlp_in
        sentence = self.config.language_sentence_tokens > 0
        if instruction_contrast and ((film_mlp is None and not sentence) or "recorded_instruction" not in batch
                                     or "instruction" not in batch):
            raise ValueError("instruction_contrast needs a policy with language_sentence_tokens > 0 or "
                             "instruction_film_hidden > 0, and a batch with 'instruction' and 'recorded_instruction' "
                             "(instruction variety)")
        cfg, dev = self.config, self.device
        if PREFIX_FEATURES in batch:
            features, mask = batch[PREFIX_FEATURES].to(dev), batch[PREFIX_MASK].to(dev, torch.bool)
        else:
            images = batch["images"].to(dev)
            if self.training:
                images = random_shift(images, cfg.image_shift_px, generator)
            features, mask = self.backbone(images, list(batch["instruction"]))
            if not self.backbone.trainable:
                features = features.detach()
        state = batch["state"].to(dev, torch.float32)
        actions = self.normalize_actions(batch["actions"].to(dev, torch.float32))
        valid = ~batch["action_is_pad"].to(dev, torch.bool)
        film, contrast = None, None
        if instruction_contrast and sentence:  # the code the instruction enters the backbone as
            contrast = phrasing_contrast_loss(self.backbone.sentence_hidden(list(batch["instruction"])),
                                              list(batch["recorded_instruction"]))
        elif instruction_contrast and self.instruction_film is not None and film_mlp is not None:
            pooled = self.instruction_film.pool(*self._text(features, mask))
            hidden = film_mlp(pooled)
            film = self.instruction_film.terms(pooled, hidden)
            contrast = phrasing_contrast_loss(hidden, list(batch["recorded_instruction"]))
        ctx = self._context(features, mask, state, film)
        if noise is None:
            noise = objectives.draw_normal(tuple(actions.shape), generator, dev)
        noise = noise.to(dev)
        if cfg.action_prefix_rows:
            # Each sample continues a random number of committed rows (0 included: a chunk from rest), given as
            # its own clean actions; the loss stays over every row.
            gen_device = generator.device if generator is not None else dev
            rows = torch.randint(0, cfg.action_prefix_rows + 1, (actions.shape[0],), generator=generator,
                                 device=gen_device).to(dev)
            ctx = self._with_known(ctx, actions, rows, valid)
            noise = self._committed_start(noise, ctx)
        loss, per, info = self.objective.loss(self._u_fn(ctx), actions, noise, valid, generator, t, r)
        if contrast is not None:
            info["contrast"] = float(contrast.detach())
            loss = loss + instruction_contrast * contrast
        info["loss"] = float(loss.detach())
        info["mse"] = float(per.detach().mean())
        return loss, info

    # ---- inference --------------------------------------------------------------------------------------------
    def _observation_tensors(self, observation: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, str]:
        cfg = self.config
        for key in ("images", "state", "instruction"):
            if key not in observation:
                raise ValueError(f"observation lacks {key!r}")
        images = observation["images"]
        missing = [c for c in cfg.camera_keys if c not in images]
        if missing:
            raise ValueError(f"observation['images'] lacks cameras {missing} (policy uses {cfg.camera_keys})")
        frames = []
        for cam in cfg.camera_keys:
            try:
                frames.append(resize_image(np.asarray(images[cam]), self.image_size))
            except ValueError as exc:
                raise ValueError(f"camera {cam!r}: {exc}") from exc
        state = np.asarray(observation["state"], dtype=np.float32)
        if state.shape != (cfg.state_dim,):
            raise ValueError(f"observation['state'] must have shape ({cfg.state_dim},), got {state.shape}")
        if not np.all(np.isfinite(state)):
            raise ValueError("observation['state'] contains NaN or inf")
        instruction = observation["instruction"]
        if not isinstance(instruction, str):
            raise ValueError(f"observation['instruction'] must be a str, got {type(instruction).__name__}")
        img = torch.from_numpy(np.stack(frames)[None]).to(self.device)
        return img, torch.from_numpy(state)[None].to(self.device), instruction

    def _noise(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B, T, D) starting noise. One draw per sample, so sample b of a batch is the b-th single draw of the
        generator (torch fills a larger tensor differently): the first of several candidates is the chunk one
        candidate would give."""
        cfg = self.config
        draws = [objectives.draw_normal((1, cfg.chunk_size, cfg.action_dim), generator, self.device,
                                        self.state_proj.weight.dtype) for _ in range(batch)]
        return draws[0] if batch == 1 else torch.cat(draws)  # no copy for the usual single draw

    def _sample_normalized(self, ctx: ActionExpertContext, noise: torch.Tensor, nfe: int,
                           generator: torch.Generator | None,
                           guide: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The expert's part of a chunk: nfe evaluations with the configured sampler from ``noise`` -> (B, T, D);
        with ``guide`` (normalised target rows, weights) the noise is first steered onto them."""
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        if guide is not None:
            return self.objective.guided_sample(self._u_fn(ctx), noise, nfe, *guide)
        return self.objective.sample(self._u_fn(ctx), noise, nfe, generator)

    @staticmethod
    def _closest(chunks: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, average: int) -> torch.Tensor:
        """The mean of the ``average`` of ``chunks`` (K, T, D) with the least weighted squared distance to ``target``
        -> (1, T, D): with 1 the closest draw itself."""
        error = (weights[None] * (chunks - target) ** 2).sum(dim=(1, 2))
        return chunks[error.argsort()[:average]].mean(dim=0, keepdim=True)

    def _guide_tensors(self, guide: ChunkGuide) -> tuple[torch.Tensor, torch.Tensor]:
        """A guide in joint units -> (1, T, D) normalised target and (T, D) weights, rows past it weighted 0."""
        cfg = self.config
        target = np.asarray(guide[0], dtype=np.float32)
        weights = np.asarray(guide[1], dtype=np.float32)
        n = len(target)
        if target.ndim != 2 or target.shape[1] != cfg.action_dim or not 1 <= n <= cfg.chunk_size:
            raise ValueError(f"guide target must have shape (1..{cfg.chunk_size}, {cfg.action_dim}), got "
                             f"{target.shape}")
        if weights.shape != target.shape:
            raise ValueError(f"guide weights must have the target's shape {target.shape}, got {weights.shape}")
        if not (np.all(np.isfinite(target)) and np.all(np.isfinite(weights)) and np.all(weights >= 0)):
            raise ValueError("guide target and weights must be finite, the weights >= 0")
        full = np.concatenate([target, np.repeat(target[-1:], cfg.chunk_size - n, axis=0)])
        w = np.concatenate([weights, np.zeros((cfg.chunk_size - n, cfg.action_dim), dtype=np.float32)])
        dtype = self.state_proj.weight.dtype
        target_n = self.normalize_actions(torch.from_numpy(full).to(self.device)).to(dtype)[None]
        return target_n, torch.from_numpy(w).to(self.device, dtype)

    @property
    def example_instruction(self) -> str:
        """An instruction this policy acts on (warm-ups and the plausibility check): its first grounded one, else
        a neutral sentence."""
        return self.config.grounding_instructions[0] if self.grounding is not None else NEUTRAL_INSTRUCTION

    def read_instruction(self, text: str) -> str | None:
        """The instruction the backbone reads for ``text``: ``text`` itself without grounding, else the trained
        instruction it is read as (``text`` itself with grounding_keeps_wording), None for no task
        (``last_grounding`` keeps the details)."""
        if self.grounding is None:
            return text
        reading = self.grounding.ground(text)
        if self.config.grounding_keeps_wording:
            reading = dataclasses.replace(reading, keeps_wording=True)
        self.last_grounding = reading
        if reading.instruction is None or not reading.keeps_wording:
            return reading.instruction
        return text

    def _check_eval_mode(self) -> None:
        if self.training:
            raise RuntimeError("sampling needs policy.eval(): in training mode the image-feature normalisation "
                               "would use (and update) batch statistics")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sample(self, observation: Mapping[str, Any], nfe: int | None = None,
               generator: torch.Generator | None = None, guide: ChunkGuide | None = None,
               candidates: int = 1, average: int = 1, steer: bool = False) -> np.ndarray:
        """One action chunk (chunk_size, action_dim) float32 in joint units.

        With instruction grounding (config.grounding_instructions) the policy reads the trained instruction the
        observation's one is read as (``read_instruction``); one read as no task gives a chunk that holds the
        observed joint state, without running the network (last_timing's nfe 0).
        ``guide`` (target rows in joint units, a weight per value: the rest of the plan being executed, so101_common
        .handoff.rtc_guide) asks for a chunk that continues those rows. With ``candidates`` > 1 the expert draws that
        many chunks in one batched pass (the prefix is computed once) and the one closest to the guide is returned
        (coherent sampling: consecutive chunks agree instead of each being an independent draw), or the mean of the
        ``average`` closest (draws of one mode: averaging them removes their jitter, not a choice). With one
        candidate, a policy trained with committed rows (``action_prefix_rows``) is given the rows weighted 1 (at most
        that many), returns them as given and continues them in the usual nfe passes (with several, each candidate
        does); any other is steered onto the weighted rows (``Objective.guided_sample``), and with ``steer`` so is
        each of several candidates before the closest are kept (real-time chunking with coherent sampling). Without
        a guide ``candidates``, ``average`` and ``steer`` have no effect. ``last_timing`` splits its latency:
        prefix_ms (inputs, backbone, expert context), expert_ms (noise + nfe expert evaluations, the guidance or the
        candidates included), post_ms (un-normalise, copy to host), total_ms; and nfe, candidates, average as used.
        """
        self._check_eval_mode()
        nfe = self.config.default_nfe if nfe is None else int(nfe)
        if candidates < 1 or not 1 <= average <= candidates:
            raise ValueError(f"candidates must be >= 1 and average within 1..candidates, got {candidates} and "
                             f"{average}")
        conditioned = guide is not None and self.config.action_prefix_rows > 0
        select = guide is not None and candidates > 1
        steered = guide is not None and not conditioned and (steer or not select)
        graphed = self._graphs is not None and self.objective.deterministic and not conditioned and not steered
        # Guidance differentiates through the expert (never its weights), which inference mode forbids.
        with torch.inference_mode(not steered), torch.no_grad():
            start = time.perf_counter()
            guide_t = None if guide is None else self._guide_tensors(guide)
            images, state, instruction = self._observation_tensors(observation)
            read_as = self.read_instruction(instruction)
            if read_as is None:  # no task: hold where the arm is
                hold = np.repeat(np.asarray(observation["state"], dtype=np.float32)[None], self.config.chunk_size, 0)
                total = (time.perf_counter() - start) * 1e3
                self.last_timing = {"prefix_ms": total, "expert_ms": 0.0, "post_ms": 0.0, "total_ms": total,
                                    "nfe": 0, "candidates": 0, "average": 0, "cuda_graphs": False}
                return hold
            instruction = read_as
            k, avg = (candidates, average) if select else (1, 1)
            out = None
            if graphed:
                try:
                    out, prefix_end = self._graphed_chunk(images, state, instruction, nfe, k, avg,
                                                          guide_t if select else None, generator)
                except RuntimeError as exc:  # an operation that cannot be captured: eager from now on
                    warnings.warn(f"CUDA graph capture failed, sampling eagerly from now on: {exc}", RuntimeWarning,
                                  stacklevel=2)
                    self._graphs, graphed = None, False
            if out is None:
                ctx = self._context(self.backbone.encode_one(images, instruction)[0], None, state)
                if guide_t is not None and conditioned:
                    target, weights = guide_t
                    committed = int((weights.max(dim=1).values >= 1.0).long().cumprod(0).sum())
                    rows = torch.tensor([min(committed, self.config.action_prefix_rows)], device=self.device)
                    ctx = self._with_known(ctx, target, rows)
                self._sync()
                prefix_end = time.perf_counter()
                noise = self._noise(k, generator)
                if guide_t is not None and conditioned:
                    noise = self._committed_start(noise, ctx)
                out = self._chunk_from(ctx, noise, nfe, guide_t if select else None, avg,
                                       generator, guide_t if steered else None)
                if ctx.known_mask is not None and ctx.known is not None:
                    # Committed rows are what the arm executes: returned as given, not as the expert redrew them.
                    out = torch.where(ctx.known_mask[0] > 0, ctx.known[0].to(out.dtype), out)
            self._sync()
            expert_end = time.perf_counter()
            chunk = self.unnormalize_actions(out.float()).cpu().numpy()
            end = time.perf_counter()
        self.last_timing = {"prefix_ms": (prefix_end - start) * 1e3, "expert_ms": (expert_end - prefix_end) * 1e3,
                            "post_ms": (end - expert_end) * 1e3, "total_ms": (end - start) * 1e3, "nfe": nfe,
                            "candidates": k, "average": avg, "cuda_graphs": graphed}
        return chunk

    def _graphed_chunk(self, images: torch.Tensor, state: torch.Tensor, instruction: str, nfe: int, k: int,
                       average: int, select: tuple[torch.Tensor, torch.Tensor] | None,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
        """``sample``'s CUDA-graph path: replay (capturing when new) the prefix graph, then the expert graph ->
        the normalised chunk (T, D) and the time the prefix finished."""
        assert self._graphs is not None
        prefix_key = (instruction, self.backbone.vlm.dtype)
        self._graphs.prefix(prefix_key, images, state,
                            lambda im, st: self._context(self.backbone.encode_one(im, instruction)[0], None, st),
                            prepare=lambda: self.backbone.text_cache(instruction))
        self._sync()
        prefix_end = time.perf_counter()
        out = self._graphs.expert(prefix_key, (self.objective.name, nfe, k, average), self._noise(k, generator),
                                  select, lambda c, n, g: self._chunk_from(c, n, nfe, g, average))
        return out, prefix_end

    def _chunk_from(self, ctx: ActionExpertContext, noise: torch.Tensor, nfe: int,
                    select: tuple[torch.Tensor, torch.Tensor] | None, average: int,
                    generator: torch.Generator | None = None,
                    steer: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One observation's context and (K, T, D) noise -> its normalised chunk (T, D): the K draws, each steered
        onto ``steer`` if given, then the closest to ``select`` (normalised target, weights; the mean of the
        ``average`` closest), else the one draw."""
        if select is not None:
            z = self._closest(self._sample_normalized(_repeat(ctx, noise.shape[0]), noise, nfe, generator, steer),
                              *select, average)
        else:
            z = self._sample_normalized(ctx, noise, nfe, generator, steer)
        return z[0]

    def chunks_normalized(self, images: torch.Tensor, state: torch.Tensor, instructions: list[str],
                          noise: torch.Tensor, nfe: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised chunks (B, T, D) of a batch from the given starting ``noise``, one draw each, differentiable
        where gradients are on: what the policy does, as a training target (language distillation, train/distill.py)
        and for offline evaluation (``sample_batch``)."""
        features, mask = self.backbone(images, instructions)
        return self._sample_normalized(self._context(features, mask, state), noise, nfe, generator)

    @torch.inference_mode()
    def sample_batch(self, batch: Mapping[str, Any], nfe: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Chunks (B, chunk_size, action_dim) in joint units for a dataset-format batch (offline evaluation)."""
        self._check_eval_mode()
        nfe = self.config.default_nfe if nfe is None else int(nfe)
        images = batch["images"].to(self.device)
        state = batch["state"].to(self.device, torch.float32)
        read = [self.read_instruction(text) for text in batch["instruction"]]
        instructions = [text if r is None else r for text, r in zip(batch["instruction"], read)]
        noise = self._noise(state.shape[0], generator)
        chunks = self.unnormalize_actions(self.chunks_normalized(images, state, instructions, noise, nfe,
                                                                 generator).float())
        for i, r in enumerate(read):
            if r is None:  # no task: hold (as sample)
                chunks[i] = state[i]
        return chunks

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save(self, checkpoint_dir: str | Path) -> Path:
        """Write a checkpoint directory (model/checkpoint.py's format) and return it."""
        path = checkpoint.write_checkpoint(Path(checkpoint_dir), self.config, self.state_dict(), self.get_stats())
        if self.config.code_tokenizer:
            self.backbone.tokenizer.backend_tokenizer.save(str(path / checkpoint.TOKENIZER_FILE))
        return path

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str | torch.device = "cpu",
             expect: Mapping[str, Any] | None = None, check_outputs: bool = False) -> "MeanFlowPolicy":
        """Load a checkpoint directory; any problem raises ``checkpoint.CheckpointError`` (a ValueError).

        ``expect`` maps config fields (joint_names, camera_keys, state_dim, action_dim, chunk_size, objective, ...)
        to the values the caller requires. ``check_outputs`` also samples one chunk on a neutral observation and
        refuses a model whose targets are not finite or mostly outside the joint limits: callers that drive an
        arm set it; training and offline evaluation may load an early, still implausible checkpoint."""
        path = Path(checkpoint_dir)
        config = checkpoint.read_config(path, expect)
        tokenizer = None
        if config.code_tokenizer:
            file = path / checkpoint.TOKENIZER_FILE
            try:
                tokenizer = load_tokenizer_file(file)
            except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a bad file
                raise CheckpointError(f"{file}: not a valid tokenizer file: {exc}") from exc
        try:
            policy = cls(config, tokenizer=tokenizer)
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot build the model of {checkpoint.CONFIG_FILE} (backbone "
                                  f"{config.backbone!r}): {exc}") from exc
        model_state = policy.state_dict()
        expected = {k: tuple(model_state[k].shape) for k in checkpoint.stored_keys(config, model_state)}
        stored = checkpoint.read_weights(path, expected)
        policy.load_state_dict(stored, strict=len(expected) == len(model_state))
        stats = checkpoint.read_stats(path)
        try:
            policy.set_stats(stats)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path}: invalid {checkpoint.STATS_FILE}: {exc}") from exc
        checkpoint.check_stats_spread(stats, config, path)
        policy.to(device)
        policy.backbone.clear_cache()
        policy.eval()
        if check_outputs:
            policy.check_plausible(path / checkpoint.WEIGHTS_FILE)
            policy.backbone.clear_cache()  # the check's instruction must not linger as the cached one
        return policy

    def check_plausible(self, file: Path) -> None:
        """One chunk on a neutral observation must be finite and mostly inside the arm's joint limits.

        Catches weights that are corrupt yet finite (flipped bytes, a wrong file) before they drive joints into their
        limits; the chunk's noise is seeded, so the verdict does not change between loads. ``file`` is named in the
        CheckpointError."""
        config = self.config
        limits = JointLimits.so101(config.joint_names)
        size = int(config.image_size)
        neutral = {"images": {k: np.full((size, size, 3), 128, np.uint8) for k in config.camera_keys},
                   "state": home_vector(config.joint_names).astype(np.float32), "instruction": self.example_instruction}
        generator = torch.Generator(device=self.device).manual_seed(0)
        chunk = self.sample(neutral, generator=generator).astype(np.float64)
        if not np.all(np.isfinite(chunk)):
            raise CheckpointError(f"{file}: the model gives NaN or inf on a neutral observation; the weights are "
                                  "corrupt")
        outside = ((chunk < limits.lower - PLAUSIBLE_LIMIT_MARGIN_RAD)
                   | (chunk > limits.upper + PLAUSIBLE_LIMIT_MARGIN_RAD))
        share = float(outside.mean())
        if share > MAX_OUTSIDE_FRACTION:
            joints = [limits.names[i] for i in np.flatnonzero(outside.any(axis=0))]
            raise CheckpointError(f"{file}: on a neutral observation {100 * share:.0f} % of the model's joint targets "
                                  f"are outside the joint limits (joints {joints}; at most "
                                  f"{100 * MAX_OUTSIDE_FRACTION:.0f} % allowed): corrupt weights or stats, or not a "
                                  "checkpoint for this arm")
