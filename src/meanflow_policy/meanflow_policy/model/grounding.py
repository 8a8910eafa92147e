"""Instruction grounding: the user's words -> one of the instructions a policy was trained on, or "no task".

Why: a policy's text side learns the sentences of its demos and reads other wordings as noise (the shipped
multi-task policy: 92 % with its own sentences, 67 % with held-out paraphrases, docs/language.md); fine-tuning it on
the pretrained SmolLM2's states of many phrasings moved paraphrases to 77 % but cost 8 points on its own sentences
and did not re-teach which colour goes to which box. Grounding leaves the policy as trained: the frozen SmolLM2
(model/language.py) reads the instruction, a small classifier names the trained instruction it means, and the policy
reads that sentence, the one it knows. An instruction that asks for none of them ("do not touch anything") is
refused: the policy then holds the arm where it is instead of guessing a task.

Features: the SmolLM2 token states (``language_layers`` layers), standardised per channel with the statistics of the
hand-written TRAIN_TEMPLATES' tokens, pooled two ways: weighted 1, 2, ..., n along the sentence (a later token has
read more of it) and plainly averaged. Classifier: GROUNDING_MEMBERS GELU networks (GROUNDING_HIDDEN units, dropout
while fitted) whose softmaxes are averaged, over the trained instructions plus one "no task" class; fitted on each
instruction's phrasing pool and terser wordings for grounding alone (so101_common.phrasings.grounding_phrasings_for),
and on NO_TASK_PHRASINGS and NO_TASK_CONFUSABLE; never on a held-out wording.
Before the LM reads an instruction, a misspelt word is corrected against the fitted wordings' words
(``correct_spelling``): the LM alone read four of the five held-out typo sentences right. The
layer count was chosen on a split of the training phrasings (fitted on the generated phrasings, scored on the
hand-written ones: 8 or 10 layers 46/46, 2-6 45/46, 12 44/46, 16 43/46; docs/language.md).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from so101_common.phrasings import NO_TASK_CONFUSABLE, NO_TASK_PHRASINGS, TRAIN_TEMPLATES, grounding_phrasings_for

from meanflow_policy.model.language import FrozenLanguageModel

GROUNDING_HIDDEN = 128
GROUNDING_MEMBERS = 5
GROUNDING_DROPOUT = 0.2
# The "no task" class's weight in the loss relative to one trained instruction's (it has far fewer phrasings).
NO_TASK_WEIGHT = 0.5
FIT_STEPS = 600
FIT_LR = 1e-3
FIT_WEIGHT_DECAY = 1e-2
# Spelling: a word of at least this many letters that no fitted phrasing uses is replaced by the one known word it is
# one edit away from (a letter changed, dropped, added, or two neighbours swapped), if exactly one is.
SPELLING_MIN_LETTERS = 4
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Grounding:
    """What an instruction was read as."""

    text: str
    instruction: str | None  # the trained instruction it means; None: no task (refused)
    confidence: float  # averaged probability of the class chosen (the no-task class's when refused)
    closest: str  # the trained instruction with the highest probability, even when refused
    closest_probability: float
    keeps_wording: bool = False  # accepted, the policy reads ``text`` itself (grounding_keeps_wording)

    def describe(self) -> str:
        """One line for logs and service responses."""
        if self.instruction is None:
            return (f"{self.text!r} asks for no task this policy was trained on (closest: {self.closest!r}, "
                    f"probability {self.closest_probability:.2f})")
        if self.keeps_wording:
            return (f"{self.text!r} accepted as a task ({self.instruction!r}, probability {self.confidence:.2f}); "
                    "the policy reads its own words")
        return f"{self.text!r} read as {self.instruction!r} (probability {self.confidence:.2f})"


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ by one letter changed, dropped or added, or by two neighbours swapped."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def correct_spelling(text: str, vocabulary: frozenset[str]) -> str:
    """``text`` with each unknown word of SPELLING_MIN_LETTERS or more letters that is one edit from exactly one
    ``vocabulary`` word (lower case) replaced by it; everything else as it was."""
    def fix(match: re.Match[str]) -> str:
        word = match.group(0)
        if len(word) < SPELLING_MIN_LETTERS or word.lower() in vocabulary:
            return word
        near = [v for v in vocabulary if _one_edit(word.lower(), v)]
        return near[0] if len(near) == 1 else word
    return _WORD.sub(fix, text)


def sentence_features(states: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(tokens, channels) LM states -> (2 * channels,): standardised, then position-weighted and plain means."""
    x = (states - mean) / std
    weight = torch.arange(1, x.shape[0] + 1, dtype=x.dtype, device=x.device)[:, None]
    return torch.cat([(x * weight).sum(0) / weight.sum().clamp(min=1.0), x.mean(0)])


def _member(features: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(GROUNDING_DROPOUT), nn.Linear(features, GROUNDING_HIDDEN), nn.GELU(),
                         nn.Linear(GROUNDING_HIDDEN, classes))


class InstructionGrounding(nn.Module):
    """Reads an instruction with the frozen SmolLM2 and names the trained instruction it means (see module
    docstring). The language model is shared, not owned: it is kept out of this module's state (checkpoints never
    store it) and runs on its own device."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, language: FrozenLanguageModel, instructions: Sequence[str], min_confidence: float) -> None:
        super().__init__()
        if not instructions or len(set(instructions)) != len(instructions) or not all(instructions):
            raise ValueError(f"grounding needs distinct, non-empty instructions, got {list(instructions)}")
        self._language = (language,)  # a tuple: not a submodule
        self.instructions = tuple(instructions)
        self.min_confidence = min_confidence
        width = 2 * language.hidden_size
        self.register_buffer("mean", torch.zeros(language.hidden_size))
        self.register_buffer("std", torch.ones(language.hidden_size))
        self.members = nn.ModuleList(_member(width, len(instructions) + 1) for _ in range(GROUNDING_MEMBERS))
        self.requires_grad_(False)
        self.no_task = tuple(t for t in NO_TASK_PHRASINGS + NO_TASK_CONFUSABLE if t not in self.instructions)
        self.vocabulary = frozenset(w.lower() for t in (*self.fitted_texts(), *self.no_task) for w in _WORD.findall(t))
        self._memo: dict[str, Grounding] = {}

    def fitted_texts(self) -> list[str]:
        """The wordings the classifier is fitted on for the trained instructions, in class order (each one's
        phrasing pool and grounding extras, so101_common.phrasings.grounding_phrasings_for)."""
        return [t for i in self.instructions for t in grounding_phrasings_for(i)]

    def train(self, mode: bool = True) -> "InstructionGrounding":
        return super().train(False)  # fitted by fit() alone; never in dropout mode inside a training policy

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - nn.Module's signature
        self._memo = {}  # device or dtype changes
        return super()._apply(fn, *args, **kwargs)

    @property
    def language(self) -> FrozenLanguageModel:
        return self._language[0]

    def _states(self, text: str) -> torch.Tensor:
        lm = self.language
        return lm.hidden_states(lm.token_ids(text, 10**6)).to(self.mean.device)

    def features(self, text: str) -> torch.Tensor:
        return sentence_features(self._states(text), self.mean, self.std)

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), instructions + 1): the members' averaged softmax; the last column is "no task"."""
        x = torch.stack([self.features(t) for t in texts])
        with torch.no_grad():
            return torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)

    def ground(self, text: str) -> Grounding:
        """The trained instruction ``text`` means (read after ``correct_spelling`` against the fitted wordings' words),
        or None (refused) when the no-task class wins or the best instruction's probability is below
        ``min_confidence``; memoised per text."""
        memo = self._memo.get(text)
        if memo is not None:
            return memo
        p = self.probabilities([correct_spelling(text, self.vocabulary)])[0]
        best = int(p[:-1].argmax())
        closest, closest_p = self.instructions[best], float(p[best])
        if int(p.argmax()) == len(self.instructions) or closest_p < self.min_confidence:
            result = Grounding(text, None, float(p[-1]), closest, closest_p)
        else:
            result = Grounding(text, closest, closest_p, closest, closest_p)
        self._memo[text] = result
        return result

    def fit(self, steps: int = FIT_STEPS, seed: int = 0) -> float:
        """Fit the classifier (full batch, AdamW) on ``fitted_texts`` and the no-task phrasings (NO_TASK_PHRASINGS and
        NO_TASK_CONFUSABLE that are not trained instructions); returns the accuracy on them. The standardisation
        statistics come from the TRAIN_TEMPLATES' tokens (as tiny-smollm2's LanguageProjection)."""
        corpus = [t for templates in TRAIN_TEMPLATES.values() for t in templates]
        tokens = torch.cat([self._states(t) for t in corpus])
        self.mean.copy_(tokens.mean(0))
        self.std.copy_(tokens.std(0).clamp(min=1e-4))
        self._memo = {}
        texts = self.fitted_texts() + list(self.no_task)
        labels = torch.tensor([k for k, i in enumerate(self.instructions) for _ in grounding_phrasings_for(i)]
                              + [len(self.instructions)] * len(self.no_task), device=self.mean.device)
        x = torch.stack([self.features(t) for t in texts])
        per_task = (len(texts) - len(self.no_task)) / len(self.instructions)
        weight = torch.ones(len(self.instructions) + 1, device=x.device)
        weight[-1] = NO_TASK_WEIGHT * per_task / len(self.no_task)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            for k in range(len(self.members)):
                torch.manual_seed(seed + k)
                member = _member(x.shape[1], len(self.instructions) + 1).to(x.device)
                optimizer = torch.optim.AdamW(member.parameters(), FIT_LR, weight_decay=FIT_WEIGHT_DECAY)
                member.train()
                for _ in range(steps):
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(member(x), labels, weight=weight).backward()
                    optimizer.step()
                self.members[k] = member.eval().requires_grad_(False)
        with torch.no_grad():
            predicted = torch.stack([m(x).softmax(-1) for m in self.members]).mean(0).argmax(-1)
        return float((predicted == labels).float().mean())
