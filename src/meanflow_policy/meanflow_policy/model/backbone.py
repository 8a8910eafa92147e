"""The frozen vision-language backbone: SmolVLM (SigLIP vision + connector + the first N SmolLM2 layers).

It turns the camera images and the instruction into the prefix features the action expert attends to. The LM runs
over ``[instruction tokens, camera-1 image tokens, camera-2 image tokens, ...]``: text first, so the instruction's
key/value cache can be computed once and reused for every chunk while the instruction does not change.

Presets built in code, offline:
- ``tiny``: a small random SmolVLM, a byte-level BPE tokenizer trained in-process and the SmolVLM image processor's
  normalisation; deterministic from a seed. It is the DEV/TEST backbone (random features, not pretrained).
- ``smolvlm2-500m``: the real SmolVLM2-500M-Video-Instruct architecture with random weights (for benchmarks).
- ``tiny-smollm2``: the tiny preset whose instruction tokens are not its own embeddings but the frozen, pretrained
  SmolLM2-135M's hidden states (model/language.py), standardised and projected (trainable with the backbone) into
  the tiny LM's input space. The SmolLM2 pass runs once per instruction; images then attend to its projection.
Anything else is a SmolVLM2 directory (or hub id in the local cache) loaded with ``from_pretrained`` offline.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoTokenizer, DynamicCache, PreTrainedTokenizerBase, PreTrainedTokenizerFast, SmolVLMConfig,
                          SmolVLMModel)
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from so101_common.phrasings import TRAIN_TEMPLATES
from meanflow_policy.model.configuration import (AUTO_PRECISION, BACKBONE_PRECISIONS, SENTENCE_POOLINGS,
                                                 SMOLVLM2_500M_PRESET, TINY_BACKBONE, TINY_SMOLLM2_PRESET,
                                                 MeanFlowConfig, fastest_precision)
from meanflow_policy.model.cpu_attention import BF16_PRODUCTS_ATTENTION, SDPA_ATTENTION, cpu_multiplies_bf16
from meanflow_policy.model.language import FrozenLanguageModel

_TINY_VOCAB = 512
_TINY_SPECIAL_TOKENS = ("<|pad|>", "<|im_start|>", "<image>")
# tiny-smollm2: the tiny LM's own vocabulary is only these three (pad, lead, image); text comes from SmolLM2.
_LEAD_ONLY_VOCAB = len(_TINY_SPECIAL_TOKENS)
# Words the tiny tokenizer learns merges from (instructions of a tabletop arm); bytes cover everything else.
_TINY_CORPUS_WORDS = (
    "pick place put the a an red green blue yellow white black orange purple cube block ball cup bowl box bin "
    "tray plate marker pen into onto on in to left right front back top bottom middle center side near far "
    "grasp grab lift move push pull slide stack unstack open close gripper arm up down rotate turn over under "
    "next of and then from with table drawer lid object item small large big tiny first second third stop "
    "wait go home reset slowly quickly carefully please it them this that these those one two three"
)


def _strip_versions(d: object) -> object:
    """Config dict without transformers_version entries, so a hash survives a library upgrade."""
    if isinstance(d, dict):
        return {k: _strip_versions(v) for k, v in sorted(d.items()) if k != "transformers_version"}
    return d


def backbone_config_hash(vlm_config: SmolVLMConfig) -> str:
    """Short stable hash of a SmolVLM config: a checkpoint records it to detect a different backbone."""
    text = json.dumps(_strip_versions(vlm_config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in-process on a fixed corpus (deterministic, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_TINY_VOCAB, special_tokens=list(_TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = _TINY_CORPUS_WORDS.split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|im_start|>")


def tiny_vlm_config(config: MeanFlowConfig, vocab_size: int) -> SmolVLMConfig:
    """A few-hundred-K-parameter SmolVLM with the real model's structure (SigLIP + pixel shuffle + Llama)."""
    return SmolVLMConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=config.tiny_patch_size, image_size=config.image_size),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128,
                         num_hidden_layers=config.num_vlm_layers, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=vocab_size, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1, tie_word_embeddings=False),
        scale_factor=2, image_token_id=2, vocab_size=vocab_size, pad_token_id=0, tie_word_embeddings=False,
    )


def smolvlm2_500m_config(num_layers: int) -> SmolVLMConfig:
    """SmolVLM2-500M-Video-Instruct's architecture (SigLIP-B/16 at 512 px, scale factor 4, SmolLM2-360M text),
    truncated to the first ``num_layers`` LM layers."""
    return SmolVLMConfig(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           patch_size=16, image_size=512, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        text_config=dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=num_layers,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49280,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=False, pad_token_id=2, bos_token_id=1, eos_token_id=2),
        scale_factor=4, image_token_id=49190, vocab_size=49280, tie_word_embeddings=False,
    )


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every (B, N, H, W, C) image by its own random offset in [-max_shift, max_shift] pixels per axis,
    filling the uncovered border with the edge pixels (the random-crop augmentation of Diffusion Policy, kept
    at full size so the token grid is unchanged)."""
    if max_shift <= 0:
        return images
    b, n, h, w, _ = images.shape
    gen_device = generator.device if generator is not None else images.device
    offsets = torch.randint(-max_shift, max_shift + 1, (2, b, n), generator=generator, device=gen_device)
    offsets = offsets.to(images.device)
    rows = (torch.arange(h, device=images.device).view(1, 1, h) + offsets[0].unsqueeze(-1)).clamp(0, h - 1)
    cols = (torch.arange(w, device=images.device).view(1, 1, w) + offsets[1].unsqueeze(-1)).clamp(0, w - 1)
    bi = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    ni = torch.arange(n, device=images.device).view(1, n, 1, 1)
    return images[bi, ni, rows.unsqueeze(-1), cols.unsqueeze(-2)]


@dataclass
class _TextCache:
    """LM key/values and features of one instruction (batch 1), reused while the instruction is unchanged."""

    instruction: str
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per LM layer (keys, values), never mutated
    features: torch.Tensor
    n_tokens: int


class VLMBackbone(nn.Module):
    """SmolVLM prefix encoder. Frozen unless ``config.train_backbone``."""

    # image normalisation buffers (registered in __init__), declared so the type checker knows they are tensors
    pixel_scale: torch.Tensor
    pixel_offset: torch.Tensor

    def __init__(self, config: MeanFlowConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        super().__init__()
        self.config = config
        self.language: FrozenLanguageModel | None = None
        self.text_proj: LanguageProjection | None = None
        if config.backbone == TINY_SMOLLM2_PRESET:
            self.language = language_model(config)
            self.tokenizer = self.language.tokenizer
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.backbone_seed)
                self.vlm = SmolVLMModel(tiny_vlm_config(config, _LEAD_ONLY_VOCAB))
                self.text_proj = LanguageProjection(self.language, self.vlm.config.text_config.hidden_size,
                                                    config.language_sentence_tokens,
                                                    config.language_sentence_pooling != SENTENCE_POOLINGS[0])
            processor = SmolVLMImageProcessorPil(do_image_splitting=False)
        elif config.backbone_is_preset:
            self.tokenizer = tokenizer or build_tiny_tokenizer()
            vlm_config = (tiny_vlm_config(config, len(self.tokenizer)) if config.backbone == TINY_BACKBONE
                          else smolvlm2_500m_config(config.num_vlm_layers))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.backbone_seed)
                self.vlm = SmolVLMModel(vlm_config)
            processor = SmolVLMImageProcessorPil(do_image_splitting=False)
        else:
            self.vlm, self.tokenizer, processor = _load_pretrained(config)
        self.vlm.config.text_config._attn_implementation = SDPA_ATTENTION
        self.vlm.config.vision_config._attn_implementation = SDPA_ATTENTION
        vcfg = self.vlm.config.vision_config
        self.patch_size = vcfg.patch_size
        self.scale_factor = self.vlm.config.scale_factor
        grid = config.image_size // self.patch_size
        if config.image_size % self.patch_size or grid % self.scale_factor:
            raise ValueError(f"image_size {config.image_size} must be a multiple of patch size {self.patch_size} "
                             f"times pixel-shuffle factor {self.scale_factor} for this backbone")
        self.tokens_per_image = (grid // self.scale_factor) ** 2
        self.input_size = config.image_size  # camera images' size in px (set_input_size), the trained one by default
        self.feature_dim = self.vlm.config.text_config.hidden_size
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_offset", -mean / std, persistent=False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Every instruction starts with this token, so even an empty one has a text position.
        self.lead_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_id
        if self.language is not None:  # ids of the tiny LM's own three-token vocabulary
            self.pad_id, self.lead_id = 0, 1
        self._text_cache: _TextCache | None = None
        self.vlm.requires_grad_(config.train_backbone)
        if self.text_proj is not None:
            self.text_proj.requires_grad_(config.train_backbone)

    @property
    def trainable(self) -> bool:
        return self.config.train_backbone

    def set_precision(self, precision: str) -> str:
        """Run the SmolVLM (vision encoder, connector, LM layers) in ``precision`` for inference (one of
        BACKBONE_PRECISIONS, or ``auto``: the fastest measured for this device, ``fastest_precision``); returns
        the precision applied. int8 replaces every Linear by a dynamically quantised one (int8 weights with one
        scale per tensor, activations quantised per call): on a CPU its matrix products run on int8 kernels (fbgemm /
        oneDNN, AVX2 is enough; the real backbone's vision encoder ran 1.5x faster on an AVX2 CPU). It cannot be
        undone (load the checkpoint again) and leaves no gradients, so a training backbone refuses it."""
        device = self.pixel_scale.device
        if precision == AUTO_PRECISION:
            precision = fastest_precision(device.type, torch.cpu.get_capabilities(),
                                          device.type == "cuda" and torch.cuda.is_bf16_supported())
        if precision not in BACKBONE_PRECISIONS:
            raise ValueError(f"backbone precision must be one of {BACKBONE_PRECISIONS} or {AUTO_PRECISION!r}, "
                             f"got {precision!r}")
        self.clear_cache()
        # The vision encoder's attention products in bf16 where a CPU multiplies bf16 natively and the backbone is
        # already reduced (model/cpu_attention.py); float32 stays the exact reference.
        bf16_attention = (device.type == "cpu" and precision in ("int8", "bfloat16")
                          and cpu_multiplies_bf16(torch.cpu.get_capabilities()))
        self.vlm.config.vision_config._attn_implementation = (BF16_PRODUCTS_ATTENTION if bf16_attention
                                                              else SDPA_ATTENTION)
        if precision != "int8":
            self.vlm.to(getattr(torch, precision))
            return precision
        if device.type != "cpu":
            raise ValueError("backbone precision int8 runs on the CPU only (use bfloat16 or float16 on a GPU)")
        if self.training:
            raise ValueError("backbone precision int8 is for inference (policy.eval()), not training")
        self.vlm.to(torch.float32)
        with warnings.catch_warnings():
            # torch 2.13 marks its eager quantisation API deprecated in favour of torchao (not a dependency here);
            # the pinned torch still ships and tests it.
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            torch.ao.quantization.quantize_dynamic(self.vlm, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return precision

    def input_sizes(self) -> list[int]:
        """The camera image sizes (px) this backbone can read: multiples of patch size x pixel-shuffle factor, up
        to the trained size."""
        step = self.patch_size * self.scale_factor
        return list(range(step, self.config.image_size + 1, step))

    def set_input_size(self, size: int) -> int:
        """Read camera images of ``size`` px instead of the trained ``config.image_size`` (inference): fewer
        patches, which the vision embeddings place on the trained position grid by their fractional coordinates
        (SmolVLM's own variable-resolution scheme: each patch takes the position of the trained grid cell its corner
        falls in), and fewer image tokens. Returns the image tokens per camera."""
        sizes = self.input_sizes()
        if size not in sizes:
            shown = sizes if len(sizes) <= 12 else [*sizes[:4], "...", *sizes[-4:]]
            raise ValueError(f"image size {size} px cannot be read by this backbone (trained at "
                             f"{self.config.image_size} px): use one of {shown} (multiples of patch "
                             f"{self.patch_size} x pixel shuffle {self.scale_factor}, at most the trained size)")
        self.input_size = size
        self.tokens_per_image = (size // self.patch_size // self.scale_factor) ** 2
        return self.tokens_per_image

    def clear_cache(self) -> None:
        """Forget the cached instruction features (weights or mode changed)."""
        self._text_cache = None

    def train(self, mode: bool = True) -> "VLMBackbone":
        self.clear_cache()
        return super().train(mode and self.trainable)

    # ---- inputs -----------------------------------------------------------------------------------------------
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, H, W, 3) uint8 -> (B*N, 3, H, W) normalised float, as SmolVLM's image processor does."""
        if images.dtype != torch.uint8 or images.ndim != 5 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, n_cameras, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        size = self.input_size
        if images.shape[2] != size or images.shape[3] != size:
            raise ValueError(f"images must be {size}x{size} (the backbone's input size), "
                             f"got {images.shape[2]}x{images.shape[3]}")
        x = images.flatten(0, 1).permute(0, 3, 1, 2).float()
        dtype = self.vlm.dtype
        return (x * self.pixel_scale + self.pixel_offset).to(dtype)

    def tokenize(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction strings -> right-padded ids (B, L) and mask (B, L); a BOS (lead) token always comes first."""
        rows = []
        for text in instructions:
            if not isinstance(text, str):
                raise ValueError(f"instruction must be a str, got {type(text).__name__}")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.config.max_text_tokens - 1]
            rows.append([self.lead_id] + ids)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        device = self.pixel_scale.device
        return ids.to(device), mask.to(device)

    def text_embeddings(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's text input: right-padded embeddings (B, L, D) and mask (B, L), a lead token first. tiny-smollm2:
        the lead token's embedding, then the projected SmolLM2 states of the instruction's tokens."""
        if self.language is None or self.text_proj is None:  # set together, in __init__
            ids, mask = self.tokenize(instructions)
            return self.vlm.get_input_embeddings()(ids), mask
        for text in instructions:
            if not isinstance(text, str):
                raise ValueError(f"instruction must be a str, got {type(text).__name__}")
        embedding = self.vlm.get_input_embeddings()
        lead = embedding(torch.tensor([self.lead_id], device=embedding.weight.device))
        rows = {}
        for text in dict.fromkeys(instructions):
            states = self.language.hidden_states(self.language.token_ids(text, self.config.max_text_tokens - 1))
            rows[text] = torch.cat([lead, self.text_proj(states.to(lead.device)).to(lead.dtype)])
        length = max(len(r) for r in rows.values())
        emb = lead.new_zeros((len(instructions), length, lead.shape[-1]))
        mask = torch.zeros((len(instructions), length), dtype=torch.bool, device=lead.device)
        for i, text in enumerate(instructions):
            emb[i, : len(rows[text])] = rows[text]
            mask[i, : len(rows[text])] = True
        return emb, mask

    def sentence_hidden(self, instructions: list[str]) -> torch.Tensor:
        """(B, SENTENCE_HIDDEN): the sentence network's hidden layer per instruction (tiny-smollm2 with
        language_sentence_tokens > 0)."""
        if self.language is None or self.text_proj is None:
            raise ValueError("sentence_hidden needs the tiny-smollm2 backbone")
        device = self.pixel_scale.device
        return torch.stack([self.text_proj.hidden(self.language.hidden_states(
            self.language.token_ids(text, self.config.max_text_tokens - 1)).to(device)) for text in instructions])

    # ---- features ---------------------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """All cameras of all samples in ONE vision batch -> (B, N * tokens_per_image, D) LM input embeddings."""
        b, n = images.shape[:2]
        pixels = self.pixel_values(images)
        vision, patch = self.vlm.vision_model, self.vlm.config.vision_config.patch_size
        # The vision transformer's own forward, without its padding masks: every patch is real here. Its forward
        # would build the patch mask on the CPU and copy it over, and test the attention mask's contents, neither of
        # which a CUDA-graph capture allows (model/cuda_graphs.py); with no mask attention takes the same kernel.
        patches = torch.ones((pixels.shape[0], pixels.shape[2] // patch, pixels.shape[3] // patch), dtype=torch.bool,
                             device=pixels.device)
        embedded = vision.embeddings(pixel_values=pixels, patch_attention_mask=patches)
        hidden = vision.post_layernorm(vision.encoder(inputs_embeds=embedded, attention_mask=None).last_hidden_state)
        tokens = self.vlm.connector(hidden)
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])

    def forward(self, images: torch.Tensor, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch path (training): prefix features (B, L, D) and validity mask (B, L)."""
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{len(instructions)} instructions for a batch of {images.shape[0]} image sets")
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            text_emb, text_mask = self.text_embeddings(list(instructions))
            img_emb = self.image_embeddings(images)
            emb = torch.cat([text_emb, img_emb.to(text_emb.dtype)], dim=1)
            img_mask = torch.ones(img_emb.shape[:2], dtype=torch.bool, device=emb.device)
            mask = torch.cat([text_mask, img_mask], dim=1)
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            out = self.vlm.text_model(inputs_embeds=emb, attention_mask=mask.long(), position_ids=positions,
                                      use_cache=False).last_hidden_state
        return out, mask

    def encode_one(self, images: torch.Tensor, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path for one observation: the instruction's LM pass is cached; images run with its KV."""
        if images.shape[0] != 1:
            raise ValueError("encode_one takes a single observation (batch 1)")
        cache = self.text_cache(instruction)
        feats = torch.cat([cache.features, self.image_features(self.image_embeddings(images), cache)], dim=1)
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)

    def text_cache(self, instruction: str) -> _TextCache:
        """LM pass over the instruction alone (batch 1), recomputed only when the instruction changes."""
        cache = self._text_cache
        if (cache is None or cache.instruction != instruction or cache.features.device != self.pixel_scale.device
                or cache.features.dtype != self.vlm.dtype):
            emb, _ = self.text_embeddings([instruction])
            out = self.vlm.text_model(inputs_embeds=emb, use_cache=True)
            kv = [(layer.keys, layer.values) for layer in out.cache.layers]
            cache = _TextCache(instruction, kv, out.last_hidden_state, emb.shape[1])
            self._text_cache = cache
        return cache

    def image_features(self, img_emb: torch.Tensor, cache: _TextCache) -> torch.Tensor:
        """LM pass over the image tokens, attending to the cached instruction keys/values (left untouched: a
        fresh cache starts from them and grows by concatenation, 4x cheaper than deep-copying the cache)."""
        img_emb = img_emb.to(cache.features.dtype)
        positions = torch.arange(cache.n_tokens, cache.n_tokens + img_emb.shape[1], device=img_emb.device)
        kv = DynamicCache()
        for i, (keys, values) in enumerate(cache.kv):
            kv.update(keys, values, i)
        return self.vlm.text_model(inputs_embeds=img_emb, position_ids=positions.unsqueeze(0), cache=kv,
                                   use_cache=True).last_hidden_state


# Width of the hidden layer that turns an instruction's pooled SmolLM2 states into sentence tokens.
SENTENCE_HIDDEN = 128


class LanguageProjection(nn.Module):
    """SmolLM2 token states -> the tiny LM's input space: standardised per channel with fixed statistics, then a
    linear map per token, or (``sentence_tokens`` k > 0) a GELU network from their pooled states to k tokens. The
    statistics (over the tokens of the hand-written TRAIN_TEMPLATES of phrasings.py) take out the large per-channel
    offsets a pretrained LM carries, which would otherwise drown the part that differs between instructions; they
    are buffers, so a checkpoint keeps the ones it was trained with."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, language: FrozenLanguageModel, width: int, sentence_tokens: int = 0,
                 with_mean: bool = False) -> None:
        super().__init__()
        corpus = [t for templates in TRAIN_TEMPLATES.values() for t in templates]
        tokens = torch.cat([language.hidden_states(language.token_ids(t, 10**6)) for t in corpus])
        self.register_buffer("mean", tokens.mean(0))
        self.register_buffer("std", tokens.std(0).clamp(min=1e-4))
        self.width, self.sentence_tokens, self.with_mean = width, sentence_tokens, with_mean
        self.linear = None if sentence_tokens else nn.Linear(language.hidden_size, width)
        pooled = language.hidden_size * (2 if with_mean else 1)
        self.sentence = nn.Sequential(nn.Linear(pooled, SENTENCE_HIDDEN), nn.GELU()) if sentence_tokens else None
        self.sentence_out = nn.Linear(SENTENCE_HIDDEN, sentence_tokens * width) if sentence_tokens else None

    def hidden(self, states: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden_size) -> (SENTENCE_HIDDEN,): the sentence network's hidden layer, from the standardised
        states averaged with weights 1, 2, ..., n along the sentence, beside their plain mean with ``with_mean`` (what
        the phrasing-contrastive loss shapes)."""
        if self.sentence is None:
            raise ValueError("this projection maps tokens, it has no sentence network (language_sentence_tokens = 0)")
        standard = (states - self.mean) / self.std
        weight = torch.arange(1, states.shape[0] + 1, dtype=states.dtype, device=states.device)[:, None]
        pooled = (standard * weight).sum(0) / weight.sum().clamp(min=1.0)
        if self.with_mean:
            pooled = torch.cat([pooled, standard.mean(0)])
        return self.sentence(pooled)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden_size) -> (tokens, width), or (sentence_tokens, width) with a sentence network."""
        if self.sentence_out is not None:
            return self.sentence_out(self.hidden(states)).view(self.sentence_tokens, self.width)
        assert self.linear is not None
        return self.linear((states - self.mean) / self.std)


def language_model(config: MeanFlowConfig) -> FrozenLanguageModel:
    """The frozen SmolLM2 of tiny-smollm2 or of instruction grounding; a checkpoint's recorded GGUF hash must match
    the installed one."""
    language = FrozenLanguageModel(config.language_layers)
    if config.language_model_sha256 and config.language_model_sha256 != language.sha256:
        raise ValueError(f"the installed language model ({language.sha256[:16]}...) is not the one this model was "
                         f"built with (language_model_sha256 {config.language_model_sha256[:16]}...)")
    config.language_model_sha256 = language.sha256
    return language


def _load_pretrained(config: MeanFlowConfig) -> tuple[SmolVLMModel, PreTrainedTokenizerBase, SmolVLMImageProcessorPil]:
    """Load a SmolVLM2 from a local directory (or the local hub cache), offline, keeping the first N LM layers."""
    source = config.backbone
    try:
        vlm_config = SmolVLMConfig.from_pretrained(source, local_files_only=True)
    except OSError as exc:
        raise ValueError(f"backbone {source!r} is neither a preset ({TINY_BACKBONE!r}, {SMOLVLM2_500M_PRESET!r}) "
                         f"nor a SmolVLM directory available offline: {exc}") from exc
    digest = backbone_config_hash(vlm_config)
    if config.backbone_config_hash and config.backbone_config_hash != digest:
        raise ValueError(f"backbone {source!r} has config hash {digest}, but the checkpoint was trained with "
                         f"{config.backbone_config_hash}: a different backbone")
    config.backbone_config_hash = digest
    total = vlm_config.text_config.num_hidden_layers
    if config.num_vlm_layers > total:
        raise ValueError(f"num_vlm_layers {config.num_vlm_layers} > the {total} LM layers of {source!r}")
    vlm_config.text_config.num_hidden_layers = config.num_vlm_layers
    vlm = SmolVLMModel.from_pretrained(source, config=vlm_config, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    processor = SmolVLMImageProcessorPil.from_pretrained(source, local_files_only=True, do_image_splitting=False)
    return vlm, tokenizer, processor


def load_tokenizer_file(path: Path) -> PreTrainedTokenizerFast:
    """The tiny preset's tokenizer as saved beside a checkpoint (JSON, no pickle)."""
    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<|pad|>", bos_token="<|im_start|>")
