"""Language distillation: a policy that reads its instruction through the frozen, pretrained SmolLM2 learns to act on
any phrasing of a task as a trained policy (the teacher) acts on that task's recorded sentence.

Why: a multi-task policy trained on the ``tiny`` text side knows its recorded sentences and little else; trained
again end to end on SmolLM2 (``tiny-smollm2``) it reads paraphrases better but does its tasks worse (docs/language.md).
Here the teacher's policy is kept whole: moved onto ``tiny-smollm2`` (``--init-from TEACHER --preset tiny-smollm2``),
only the text projection from SmolLM2 into the tiny LM trains (vision, tiny LM, FiLM and expert stay the teacher's),
and its targets come from the teacher. For a frame whose episode recorded sentence s, with a phrasing of s drawn from
the training pool (``--instruction-variety``), the student's one-step chunk must be the teacher's chunk for s, from
the same noise. Most frames' chunks barely depend on the instruction (the scene already says what to do), so the
squared error alone is small everywhere and taught little; a contrast term makes the student's chunk nearer to the
teacher's chunk for s than to its chunks for the other recorded sentences: a cross-entropy over logits
``-d(student, teacher for s') / tau`` (d: mean squared difference of the normalised chunks). Where the teacher's
chunks for two sentences coincide (pick-place and sorting both start at the red cube) it pushes neither way.

The teacher knows no instruction that asks for nothing, so it acts on any wording it does not know. With
``no_task`` > 0 that share of samples reads an instruction of ``NO_TASK_PHRASINGS`` ("stop", "tell me a joke", ...)
whose target is the arm holding its measured position over the chunk; the hold is one more class of the contrast
for every sample, so a task's phrasings also learn to stay away from it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from meanflow_policy.model.policy import MeanFlowPolicy
from so101_common.phrasings import NO_TASK_PHRASINGS

LOG = logging.getLogger("meanflow_train")

# MeanFlowConfig fields that must agree between teacher and student: the chunks compared must mean the same thing.
_SHARED_FIELDS = ("chunk_size", "action_dim", "state_dim", "fps", "joint_names", "camera_keys", "image_size")
# The student's only trainable weights: the map from SmolLM2's states into the tiny LM (model/backbone.py).
TEXT_PROJECTION = "backbone.text_proj."
# The no-task wordings a hold is taught for: those naming none of the tasks' objects. Taught on all of them
# ("throw the red block" included), terse task paraphrases ("red block into the box please") read as a hold too.
HOLD_PHRASINGS = tuple(t for t in NO_TASK_PHRASINGS if not any(w in t for w in ("block", "cube", "box", "toy")))


class LanguageDistillation:
    """The teacher and the loss; builds with the student's every weight but its text projection frozen."""

    def __init__(self, teacher: MeanFlowPolicy, student: MeanFlowPolicy, sentences: Sequence[str],
                 tau: float, no_task: float = 0.0) -> None:
        if student.backbone.text_proj is None:
            raise ValueError(f"language distillation trains the projection from SmolLM2 into the policy: the student "
                             f"must use the tiny-smollm2 backbone, it uses {student.config.backbone!r} (start it "
                             "with --init-from TEACHER --preset tiny-smollm2)")
        for field in _SHARED_FIELDS:
            mine, theirs = getattr(student.config, field), getattr(teacher.config, field)
            if mine != theirs:
                raise ValueError(f"the teacher's {field} is {theirs!r}, the student's {mine!r}: their chunks cannot "
                                 "be compared")
        if student.get_stats() != teacher.get_stats():
            raise ValueError("the student's normalisation stats differ from the teacher's: start the student from "
                             "the teacher (--init-from TEACHER --preset tiny-smollm2)")
        if not sentences:
            raise ValueError("language distillation needs the recorded sentences of the training episodes")
        if tau <= 0:
            raise ValueError(f"distill_tau must be > 0, got {tau}")
        if not 0.0 <= no_task < 1.0:
            raise ValueError(f"distill_no_task must be in [0, 1), got {no_task}")
        if no_task and student.config.state_dim != student.config.action_dim:
            raise ValueError("distill_no_task holds the measured joints as the target chunk: the policy's state "
                             f"({student.config.state_dim} values) must be its joints ({student.config.action_dim})")
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.student, self.sentences, self.tau = student, list(dict.fromkeys(sentences)), tau
        self.no_task = no_task
        for name, param in student.named_parameters():
            param.requires_grad_(name.startswith(TEXT_PROJECTION))
        self.nfe = teacher.config.default_nfe

    @classmethod
    def load(cls, teacher_dir: Path, student: MeanFlowPolicy, sentences: Sequence[str],
             tau: float, no_task: float = 0.0) -> "LanguageDistillation":
        teacher = MeanFlowPolicy.load(teacher_dir, device=student.device)
        LOG.info("language distillation from %s over %d recorded sentences: only %s* trains (%d values)", teacher_dir,
                 len(dict.fromkeys(sentences)), TEXT_PROJECTION,
                 sum(p.numel() for n, p in student.named_parameters() if n.startswith(TEXT_PROJECTION)))
        return cls(teacher, student, sentences, tau, no_task)

    def loss(self, batch: Mapping[str, Any],
             generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Squared error to the teacher's chunk for each sample's recorded sentence, plus tau times the contrast
        cross-entropy (module docstring); ``batch`` as ``SampleSet.batch`` gives it with instruction variety."""
        if "recorded_instruction" not in batch:
            raise ValueError("language distillation needs batches with 'recorded_instruction' (instruction variety)")
        device = self.student.device
        images, state = batch["images"].to(device), batch["state"].to(device, torch.float32)
        recorded = list(batch["recorded_instruction"])
        unknown = sorted(set(recorded) - set(self.sentences))
        if unknown:
            raise ValueError(f"recorded sentence(s) {unknown} are not among the distilled ones {self.sentences}")
        b = state.shape[0]
        noise = self.student._noise(b, generator)
        instructions = list(batch["instruction"])
        label = torch.tensor([self.sentences.index(s) for s in recorded], device=device)
        if self.no_task:
            # Drawn from the run's generator (saved with its training state): a resumed run draws the same.
            hold = torch.rand(b, generator=generator) < self.no_task
            pick = torch.randint(len(HOLD_PHRASINGS), (b,), generator=generator)
            for i in torch.nonzero(hold).flatten().tolist():
                instructions[i] = HOLD_PHRASINGS[int(pick[i])]
            label[hold.to(device)] = len(self.sentences)
        # The student runs as at inference: its feature norm keeps the teacher's running statistics (in training mode
        # it would use, and drift towards, each batch's), and its frozen modules are the teacher's exactly.
        training = self.student.training
        self.student.eval()
        with torch.no_grad():
            targets = torch.stack([self.teacher.chunks_normalized(images, state, [s] * b, noise, self.nfe)
                                   for s in self.sentences], dim=1)  # (B, sentences, T, D)
            if self.no_task:
                still = self.student.normalize_actions(state)[:, None].expand(-1, targets.shape[2], -1)
                targets = torch.cat([targets, still[:, None]], dim=1)
        chunks = self.student.chunks_normalized(images, state, instructions, noise, self.nfe)
        self.student.train(training)
        mse = (chunks - targets[torch.arange(b, device=device), label]).pow(2).mean()
        distance = (chunks[:, None] - targets).pow(2).flatten(2).mean(2)
        contrast = F.cross_entropy(-distance / self.tau, label)
        loss = mse + self.tau * contrast
        return loss, {"loss": float(loss.detach()), "mse": float(mse.detach()), "contrast": float(contrast.detach())}
