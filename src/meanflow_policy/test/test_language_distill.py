"""Language distillation (train/distill.py): a tiny-smollm2 student learns, through its text projection alone, to act
on phrasings as its tiny-text teacher acts on the recorded sentences.

The slow tests need the de-quantised SmolLM2 (see test_model_language.py); the checks of settings run without it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meanflow_policy.data.demo_bags import synthetic_episode, write_bag
from meanflow_policy.model.configuration import TINY_SMOLLM2_PRESET, MeanFlowConfig, TrainConfig
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.testing import random_batch
from meanflow_policy.tools import train as train_cli
from meanflow_policy.train.distill import TEXT_PROJECTION, LanguageDistillation
from so101_common.phrasings import NO_TASK_PHRASINGS, PICK_PLACE_GREEN, PICK_PLACE_RED, phrasings_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASKS = (PICK_PLACE_RED, PICK_PLACE_GREEN)


def _stats() -> dict:
    return {"state": {"mean": [0.0] * 6, "std": [0.5] * 6}, "action": {"mean": [0.0] * 6, "std": [0.5] * 6}}


def _teacher() -> MeanFlowPolicy:
    """A tiny policy whose chunks depend on its instruction (random weights, shifted off the seed's)."""
    torch.manual_seed(0)
    teacher = MeanFlowPolicy(MeanFlowConfig.tiny(train_backbone=False, instruction_film=True))
    teacher.set_stats(_stats())
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher.eval()


def test_distillation_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs instruction_variety"):
        TrainConfig(distill_from="teacher")
    with pytest.raises(ValueError, match="excludes freeze_backbone"):
        TrainConfig(distill_from="teacher", instruction_variety=True, freeze_backbone=True)
    with pytest.raises(ValueError, match="distill_tau must be > 0"):
        TrainConfig(distill_tau=0.0)
    with pytest.raises(ValueError, match=r"distill_no_task must be in \[0, 1\), and > 0 only with distill_from"):
        TrainConfig(distill_no_task=0.2)
    with pytest.raises(ValueError, match=r"distill_no_task must be in \[0, 1\)"):
        TrainConfig(distill_from="teacher", instruction_variety=True, distill_no_task=1.0)
    teacher = _teacher()
    with pytest.raises(ValueError, match="the student must use the tiny-smollm2 backbone, it uses 'tiny'"):
        LanguageDistillation(teacher, _teacher(), TASKS, 0.01)


def test_a_missing_teacher_is_one_clear_error_before_any_data_is_read(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    start = _teacher().save(tmp_path / "start")
    code = train_cli.main(["--bags", str(tmp_path / "no_bags"), "--out", str(tmp_path / "run"), "--init-from",
                           str(start), "--distill-from", str(tmp_path / "gone"), "--instruction-variety",
                           "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 2
    assert f"--distill-from {tmp_path / 'gone'}: no checkpoint there" in caplog.text
    assert "no_bags" not in caplog.text, "the teacher is checked before the (missing) bags are read"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_only_the_text_projection_learns_and_the_student_comes_to_act_as_the_teacher() -> None:
    """On a fixed batch of phrasings, a few steps lower both the error to the teacher's chunks and the contrast;
    every weight but the projection from SmolLM2 stays the teacher's. A student with other stats is refused."""
    teacher = _teacher()
    student = train_cli.onto_language_model(teacher, TINY_SMOLLM2_PRESET, sentence_tokens=2)
    distill = LanguageDistillation(teacher, student, TASKS, 0.01)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(TEXT_PROJECTION) for n in trainable)
    batch = random_batch(student.config, batch_size=8)
    batch["recorded_instruction"] = [TASKS[i % 2] for i in range(8)]
    batch["instruction"] = [phrasings_for(t)[1 + i] for i, t in enumerate(batch["recorded_instruction"])]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    student.train()
    infos = []
    for _ in range(30):
        loss, info = distill.loss(batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        infos.append(info)
    assert infos[-1]["mse"] < 0.5 * infos[0]["mse"] and infos[-1]["contrast"] < infos[0]["contrast"]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(TEXT_PROJECTION) for k in changed)

    other = train_cli.onto_language_model(teacher, TINY_SMOLLM2_PRESET, sentence_tokens=2)
    other.set_stats({**_stats(), "action": {"mean": [0.1] * 6, "std": [0.5] * 6}})
    with pytest.raises(ValueError, match="normalisation stats differ from the teacher's"):
        LanguageDistillation(teacher, other, TASKS, 0.01)
    with pytest.raises(ValueError, match="not among the distilled ones"):
        LanguageDistillation(teacher, student, TASKS[:1], 0.01).loss(batch, None)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_task_wordings_learn_to_hold_where_the_arm_is() -> None:
    """With distill_no_task, instructions that ask for nothing are trained towards the arm holding its measured
    position: after a few steps the student's chunk for one of them is much nearer that hold than before and than a
    task's chunk, which stays the teacher's."""
    teacher = _teacher()
    student = train_cli.onto_language_model(teacher, TINY_SMOLLM2_PRESET, sentence_tokens=2)
    distill = LanguageDistillation(teacher, student, TASKS, 0.01, no_task=0.5)
    batch = random_batch(student.config, batch_size=8)
    batch["recorded_instruction"] = [TASKS[i % 2] for i in range(8)]
    batch["instruction"] = [phrasings_for(t)[1 + i] for i, t in enumerate(batch["recorded_instruction"])]
    state = batch["state"].float()
    noise = student._noise(8, torch.Generator().manual_seed(1))
    hold = student.normalize_actions(state)[:, None].expand(-1, student.config.chunk_size, -1)

    def from_hold(instruction: str) -> float:
        with torch.no_grad():
            chunk = student.eval().chunks_normalized(batch["images"], state, [instruction] * 8, noise, 1)
        return float((chunk - hold).pow(2).mean())

    asked = NO_TASK_PHRASINGS[0]
    before = from_hold(asked)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss, _ = distill.loss(batch, generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # (the random teacher's chunks answer its text only so far: the hold itself is out of the projection's reach)
    assert from_hold(asked) < 0.7 * before, (before, from_hold(asked))
    assert from_hold(asked) < 0.7 * from_hold(TASKS[0]), (from_hold(asked), from_hold(TASKS[0]))
    with torch.no_grad():
        told = student.chunks_normalized(batch["images"], state, [TASKS[0]] * 8, noise, 1)
        meant = teacher.chunks_normalized(batch["images"], state, [TASKS[0]] * 8, noise, 1)
    assert float((told - meant).pow(2).mean()) < 0.3 * float((told - hold).pow(2).mean())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_meanflow_train_distills_and_resumes_exactly(tmp_path: Path) -> None:
    """``meanflow-train --distill-from`` (with no-task wordings): stopped after 2 of 4 steps and resumed, the run ends
    with the weights of an uninterrupted one; the teacher and the loss terms are in its records; only the projection
    left the teacher's weights."""
    bags = tmp_path / "bags"
    for i, task in enumerate(TASKS * 2):
        write_bag(bags / f"ep{i}", synthetic_episode(i, duration_s=1.0, height=64, width=64), instruction=task)
    teacher_dir = _teacher().save(tmp_path / "teacher")

    def run(out: Path, *extra: str) -> None:
        code = train_cli.main(["--bags", str(bags), "--out", str(out), "--steps", "4", "--batch-size", "4",
                               "--val-every", "4", "--val-batches", "1", "--val-fraction", "0.25", "--log-every", "1",
                               "--cache-dir", str(tmp_path / "cache"), "--cpu-threads", "1", "--no-progress",
                               *extra])
        assert code == 0

    start = ["--init-from", str(teacher_dir), "--preset", TINY_SMOLLM2_PRESET, "--sentence-tokens", "2",
             "--distill-from", str(teacher_dir), "--instruction-variety", "--distill-no-task", "0.25"]
    run(tmp_path / "whole", *start)
    run(tmp_path / "pieces", *start, "--stop-after", "2")
    run(tmp_path / "pieces", "--resume")
    whole = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    pieces = load_file(str(tmp_path / "pieces" / "last" / "model.safetensors"))
    assert whole.keys() == pieces.keys()
    for key in whole:
        torch.testing.assert_close(pieces[key], whole[key], rtol=0, atol=1e-6, msg=key)
    taught = load_file(str(teacher_dir / "model.safetensors"))
    # (the tiny LM's embedding table is the one other name they share: the student keeps only its lead and pad rows)
    moved = [k for k in whole if k in taught and whole[k].shape == taught[k].shape and not torch.equal(whole[k],
                                                                                                     taught[k])]
    assert moved == [], f"weights other than the projection changed: {moved[:3]}"
    assert any(k.startswith(TEXT_PROJECTION) for k in whole)
    state = json.loads((tmp_path / "pieces" / "last" / "train_state.json").read_text())
    assert state["train_config"]["distill_from"] == str(teacher_dir)
    assert state["train_config"]["distill_no_task"] == 0.25
    history = json.loads((tmp_path / "pieces" / "log.json").read_text())
    assert any("contrast" in row and "mse" in row for row in history)
