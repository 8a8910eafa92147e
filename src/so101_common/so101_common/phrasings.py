"""Instruction phrasings per task: training templates (several wordings of one task) and held-out paraphrases.

Keyed by the task's instruction as recorded in its demos (episode.json); so101_sim's task classes take their
instructions from the constants here, so each sentence has one source. A policy
trained on one sentence per task learns that sentence, not the task. ``TRAIN_TEMPLATES`` gives every task several
phrasings the training pipeline may draw per sample (``meanflow-train --instruction-variety``);
``HELD_OUT_PARAPHRASES`` is never used in training and measures whether other wordings still work: per task one
synonym rewrite, one word-order change, one polite form and one typo. ``UNRELATED`` are instructions that name no
task, which should not make the policy do one.

Plain strings in so101_common: meanflow_policy's model reads the phrasings for its text statistics and its data
pipeline draws them; so101_sim's tasks and so101-eval --paraphrases read the same ones.
"""
from __future__ import annotations

import numpy as np

PICK_PLACE_RED = "grasp the red block and put it in the box"
PICK_PLACE_GREEN = "grasp the green block and put it in the box"
SORTING = "put the red cube in the left box and the green cube in the right box"
SORTING_SWAPPED = "put the green cube in the left box and the red cube in the right box"
STACKING = "put the orange toy on the coloured blocks"


def _pick_place(colour: str) -> tuple[str, ...]:
    return (f"grasp the {colour} block and put it in the box",
            f"pick up the {colour} block and place it in the box",
            f"put the {colour} cube in the box",
            f"take the {colour} block and drop it into the box",
            f"move the {colour} cube into the box",
            f"grab the {colour} cube and put it inside the box")


def _sorting(left: str, right: str) -> tuple[str, ...]:
    return (f"put the {left} cube in the left box and the {right} cube in the right box",
            f"place the {left} cube in the left box and the {right} cube in the right box",
            f"{left} cube into the left box, {right} cube into the right box",
            f"sort the cubes: {left} to the left box, {right} to the right box",
            f"put the {left} block in the left box and the {right} block in the right box",
            f"move the {left} cube to the left box and the {right} cube to the right box",
            # Right side first: the colour goes with the box named beside it, whichever is said first (the twin of
            # round 11 read a right-first paraphrase as the other order).
            f"the right box gets the {right} cube and the left box gets the {left} cube",
            f"{right} cube to the right box, {left} cube to the left box")


# The task's own sentence first; every entry is a complete instruction for that task.
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    PICK_PLACE_RED: _pick_place("red"),
    PICK_PLACE_GREEN: _pick_place("green"),
    SORTING: _sorting("red", "green"),
    SORTING_SWAPPED: _sorting("green", "red"),
    STACKING: (STACKING,
               "place the orange toy on top of the coloured blocks",
               "put the orange figure on the stack of blocks",
               "stack the orange toy on the coloured blocks",
               "set the orange toy onto the colored blocks",
               "move the orange toy onto the block stack"),
}


def _held_out_pick_place(colour: str) -> dict[str, str]:
    return {"synonyms": f"place the {colour} cube into the bin",
            "word_order": f"into the box, put the {colour} block",
            "polite": f"could you please put the {colour} block in the box?",
            "typo": f"grasp the {colour} blcok and put it in the box"}


def _held_out_sorting(left: str, right: str) -> dict[str, str]:
    return {"synonyms": f"drop the {left} block into the left bin and the {right} block into the right bin",
            "word_order": f"put the {right} cube in the right box and the {left} cube in the left box",
            "polite": f"please put the {left} cube in the left box and the {right} cube in the right box",
            "typo": f"put the {left} cube in the lfet box and the {right} cube in the rigth box"}


# Never drawn in training: kind of change -> paraphrase.
HELD_OUT_PARAPHRASES: dict[str, dict[str, str]] = {
    PICK_PLACE_RED: _held_out_pick_place("red"),
    PICK_PLACE_GREEN: _held_out_pick_place("green"),
    SORTING: _held_out_sorting("red", "green"),
    SORTING_SWAPPED: _held_out_sorting("green", "red"),
    STACKING: {"synonyms": "lay the orange doll on top of the colourful cubes",
               "word_order": "onto the coloured blocks, put the orange toy",
               "polite": "could you put the orange toy on the coloured blocks, please?",
               "typo": "put the ornage toy on the coloured blocks"},
}

# Instructions that ask for no task of the scene.
UNRELATED: tuple[str, ...] = ("do not touch anything", "stay where you are", "wave at the camera")


def templates_for(instruction: str) -> tuple[str, ...]:
    """The training phrasings of a task instruction; an instruction without templates is its only phrasing."""
    return TRAIN_TEMPLATES.get(instruction, (instruction,))


def draw_phrasings(instructions: list[str], rng: np.random.Generator) -> list[str]:
    """One training phrasing per sample, uniformly among its task's templates (the recorded sentence included)."""
    out = []
    for text in instructions:
        options = templates_for(text)
        out.append(options[int(rng.integers(len(options)))] if len(options) > 1 else text)
    return out
