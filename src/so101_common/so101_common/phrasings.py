"""Instruction phrasings per task: training templates (several wordings of one task) and held-out paraphrases.

Keyed by the task's instruction as recorded in its demos (episode.json); so101_sim's task classes take their
instructions from the constants here, so each sentence has one source. A policy
trained on one sentence per task learns that sentence, not the task. ``TRAIN_TEMPLATES`` gives every task several
hand-written phrasings; ``TRAINING_POOL`` adds phrasings generated from a small grammar (128 per task), which the
training pipeline draws per sample (``meanflow-train --instruction-variety``); ``HELD_OUT_PARAPHRASES`` is never used
in training and measures whether other wordings still work: per task one synonym rewrite, one word-order change, one
polite form and one typo. ``UNRELATED`` are instructions that name no task, which should not make the policy do one.

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

# A second held-out set, written after instruction grounding was built (2026-12-05) and never used to change it: terse
# and conversational forms further from the training grammar than HELD_OUT_PARAPHRASES (meanflow-ground reports how it
# reads them; docs/language.md).
SECOND_HELD_OUT: dict[str, tuple[str, ...]] = {
    PICK_PLACE_RED: ("put the red one in the box", "red block into the box please",
                     "can you drop the red cube in the box", "I want the red block in the box",
                     "the box needs the red cube", "pick the red cube up and drop it in the box"),
    PICK_PLACE_GREEN: ("put the green one in the box", "green block into the box please",
                       "can you drop the green cube in the box", "I want the green block in the box",
                       "the box needs the green cube", "pick the green cube up and drop it in the box"),
    SORTING: ("red goes left, green goes right", "left box: red cube, right box: green cube",
              "sort them so red is on the left and green on the right",
              "the red cube belongs in the left box and the green one in the right box",
              "put red in the left box and green in the right box"),
    SORTING_SWAPPED: ("green goes left, red goes right", "left box: green cube, right box: red cube",
                      "sort them so green is on the left and red on the right",
                      "the green cube belongs in the left box and the red one in the right box",
                      "put green in the left box and red in the right box"),
    STACKING: ("put the toy on top of the stack", "place the orange thing on the blocks",
               "stack the toy on the tower of blocks", "can you set the orange figure on the coloured stack",
               "orange toy on top of the blocks please"),
}
SECOND_UNRELATED: tuple[str, ...] = ("go home", "do nothing", "freeze", "leave everything as it is", "take a break",
                                     "what can you do", "open your hand", "show me the red cube",
                                     "put the toy in the box", "clap your hands")

# A third held-out set, written (and committed) before the grounding's wider grammar, to check it: the second set's
# shapes went into that grammar, so only this one measures it.
THIRD_HELD_OUT: dict[str, tuple[str, ...]] = {
    PICK_PLACE_RED: ("could the red cube go into the box", "box, red block, now", "the red block, in the box",
                     "drop red in the box", "I'd like the red cube placed in the box",
                     "get the red block into the box"),
    PICK_PLACE_GREEN: ("could the green cube go into the box", "box, green block, now", "the green block, in the box",
                       "drop green in the box", "I'd like the green cube placed in the box",
                       "get the green block into the box"),
    SORTING: ("left gets red, right gets green", "red into left, green into right", "place red left and green right",
              "the left box is for the red cube, the right box for the green cube",
              "red cube left box, green cube right box", "put the cubes away: red on the left, green on the right"),
    SORTING_SWAPPED: ("left gets green, right gets red", "green into left, red into right",
                      "place green left and red right",
                      "the left box is for the green cube, the right box for the red cube",
                      "green cube left box, red cube right box",
                      "put the cubes away: green on the left, red on the right"),
    STACKING: ("the orange toy goes on top", "top the blocks with the orange toy",
               "put the orange toy up on the blocks", "orange toy onto the stack",
               "balance the orange toy on the blocks"),
}
THIRD_UNRELATED: tuple[str, ...] = ("turn around", "sleep", "look up", "stand still", "raise your hand",
                                    "put the red block on the green block", "move the box", "say hello",
                                    "wait a second", "point at the red cube")

# Instructions that ask for none of the tasks, for fitting an instruction grounding's "no task" class (meanflow_policy
# model/grounding.py): commands to stop or move elsewhere, other objects, chit-chat, and the tasks' objects with
# other verbs. Disjoint from UNRELATED and SECOND_UNRELATED, which measure it.
NO_TASK_PHRASINGS: tuple[str, ...] = (
    "stop", "stop moving", "go to the home position", "open the gripper", "close the gripper", "raise the arm",
    "lower the arm", "turn left", "turn right", "point at the window", "hello", "what time is it", "tell me a joke",
    "shut down", "wait", "pause", "never mind", "cancel", "rest", "go to sleep", "push the box off the table",
    "throw the red block", "look at the green cube", "clean the table", "bring me a coffee", "open the door",
    "pick up the pen", "draw a circle", "nod", "dance", "look at me", "spin around", "take a picture", "how are you",
    "go back", "reset", "move up", "thank you", "knock over the blocks", "hide the orange toy", "count the cubes",
    "give me the box", "sing a song", "what colour is the cube", "switch off", "move the camera", "lift the table",
    "sweep the floor")


# Words and forms no generated phrasing uses, so that each held-out paraphrase keeps the change it tests unseen:
# the synonyms' new words, the polite forms, the typos (the grammar spells correctly), and the fronted destination of
# the pick-place and stacking word-order paraphrases ("into the box, put ..."; no generated phrasing starts with a
# preposition).
HELD_OUT_WORDS: tuple[str, ...] = ("bin", "doll", "colourful", "lay", "please", "could", "would")
_FRONTED = ("in ", "into ", "inside ", "on ", "onto ")
POOL_SIZE = 128  # phrasings per task drawn from its grammar (the hand-written templates come first)
RECORDED_SHARE = 0.25  # share of training samples that keep the recorded sentence (the one users of the demos say)


def _pick_place_grammar(colour: str) -> list[str]:
    objects, boxes, preps = ("block", "cube"), ("box", "container"), ("in", "into", "inside")
    grasps = ("grasp", "pick up", "take", "grab", "lift", "get")
    puts = ("put it", "place it", "drop it", "set it", "leave it")
    verbs = ("put", "place", "move", "drop", "bring", "carry", "transfer", "set")
    out = []
    for o in objects:
        for d in boxes:
            for prep in preps:
                out += [f"{g} the {colour} {o}{joint} {p} {prep} the {d}"
                        for g in grasps for p in puts for joint in (" and", ", then")]
                out += [f"{v} the {colour} {o} {prep} the {d}" for v in verbs]
                out += [f"the {colour} {o} goes {prep} the {d}", f"{colour} {o} {prep} the {d}"]
    return out


def _sorting_grammar(left: str, right: str) -> list[str]:
    """Both halves in both orders; every phrasing binds each colour to its box within one clause. Right-box-first
    phrasings never have the held-out word order's shape (one verb for both halves: "put the X in the right box and
    the Y in the left box"): they repeat the verb, or name the box or the cube first without a verb."""
    objects, boxes, preps = ("cube", "block"), ("box", "container"), ("in", "into")
    verbs = ("put", "place", "move", "drop", "set")
    out = []
    for o in objects:
        for d in boxes:
            for prep in preps:
                halves = {side: (colour, side) for colour, side in ((left, "left"), (right, "right"))}
                for first, second in (("left", "right"), ("right", "left")):
                    (c1, s1), (c2, s2) = halves[first], halves[second]
                    if first == "left":  # the recorded shape: one verb for both halves
                        out += [f"{v} the {c1} {o} {prep} the {s1} {d} and the {c2} {o} {prep} the {s2} {d}"
                                for v in verbs]
                    out += [f"{v} the {c1} {o} {prep} the {s1} {d} and {v} the {c2} {o} {prep} the {s2} {d}"
                            for v in verbs]
                    out += [f"first {v} the {c1} {o} {prep} the {s1} {d}, then the {c2} {o} {prep} the {s2} {d}"
                            for v in verbs]
                    out += [f"the {c1} {o} goes {prep} the {s1} {d} and the {c2} {o} goes {prep} the {s2} {d}",
                            f"the {s1} {d} gets the {c1} {o} and the {s2} {d} gets the {c2} {o}",
                            f"{c1} {o} to the {s1} {d}, {c2} {o} to the {s2} {d}",
                            f"sort the {o}s: {c1} to the {s1} {d}, {c2} to the {s2} {d}"]
    return out


def _stacking_grammar() -> list[str]:
    toys = ("orange toy", "orange figure", "orange figurine", "little orange toy")
    targets = ("coloured blocks", "colored blocks", "stack of blocks", "block stack", "coloured cubes", "blocks")
    preps = ("on", "onto", "on top of")
    verbs = ("put", "place", "set", "stack", "move", "drop")
    out = []
    for toy in toys:
        for target in targets:
            for prep in preps:
                out += [f"{v} the {toy} {prep} the {target}" for v in verbs]
                out += [f"the {toy} goes {prep} the {target}", f"{toy} {prep} the {target}"]
    return out


def _pool(templates: tuple[str, ...], grammar: list[str], seed: int) -> tuple[str, ...]:
    """The hand-written templates, then grammar phrasings drawn without replacement (fixed seed) up to POOL_SIZE;
    never a held-out paraphrase, a held-out word or a fronted destination."""
    held_out = {t for ps in HELD_OUT_PARAPHRASES.values() for t in ps.values()}
    allowed = sorted({g for g in grammar if g not in held_out and g not in templates
                      and not set(g.replace(",", " ").replace(":", " ").split()) & set(HELD_OUT_WORDS)
                      and not g.startswith(_FRONTED)})
    order = np.random.default_rng(seed).permutation(len(allowed))
    return templates + tuple(allowed[i] for i in order[:POOL_SIZE - len(templates)])


# The training pool per task (``--instruction-variety``): the hand-written templates and generated phrasings.
TRAINING_POOL: dict[str, tuple[str, ...]] = {
    PICK_PLACE_RED: _pool(TRAIN_TEMPLATES[PICK_PLACE_RED], _pick_place_grammar("red"), 0),
    PICK_PLACE_GREEN: _pool(TRAIN_TEMPLATES[PICK_PLACE_GREEN], _pick_place_grammar("green"), 1),
    SORTING: _pool(TRAIN_TEMPLATES[SORTING], _sorting_grammar("red", "green"), 2),
    SORTING_SWAPPED: _pool(TRAIN_TEMPLATES[SORTING_SWAPPED], _sorting_grammar("green", "red"), 3),
    STACKING: _pool(TRAIN_TEMPLATES[STACKING], _stacking_grammar(), 4),
}


# Terser and conversational shapes, for instruction grounding only (the training pools stay as they are, so earlier
# runs reproduce): the second held-out set's shapes (bare bindings such as "X goes left", a box that "needs" a cube,
# "can you ...", "the ... one"), which the first grounding misread.
GROUNDING_EXTRA_SIZE = 96


def _pick_place_terse(colour: str) -> list[str]:
    out = []
    for o in ("block", "cube", "one"):
        for d in ("box", "container"):
            out += [f"{colour} {o} in the {d}", f"the {colour} {o} in the {d}", f"put the {colour} {o} in the {d}",
                    f"the {d} needs the {colour} {o}", f"the {d} gets the {colour} {o}",
                    f"I want the {colour} {o} in the {d}", f"can you put the {colour} {o} in the {d}",
                    f"can you drop the {colour} {o} into the {d}", f"{colour} {o} into the {d}",
                    f"pick the {colour} {o} up and put it in the {d}", f"the {colour} {o} belongs in the {d}",
                    f"the {colour} {o} should go in the {d}", f"just put the {colour} {o} in the {d}",
                    f"take the {colour} {o} to the {d}"]
    return out


def _sorting_terse(left: str, right: str) -> list[str]:
    def clauses(colour: str, side: str) -> list[str]:
        return [f"{colour} goes {side}", f"{colour} goes to the {side}", f"{colour} to the {side}",
                f"{colour} on the {side}", f"{colour} cube on the {side}", f"{side} gets {colour}",
                f"{side} gets the {colour} cube", f"{side} box: {colour} cube", f"{colour} in the {side} box",
                f"the {colour} cube belongs in the {side} box", f"the {colour} one in the {side} box",
                f"{colour} is on the {side}"]
    out = []
    pairs = ((left, "left"), (right, "right"))
    for first, second in (pairs, pairs[::-1]):
        for a, b in zip(clauses(*first), clauses(*second)):
            out += [f"{a}, {b}", f"{a} and {b}", f"sort them: {a}, {b}", f"sort them so {a} and {b}"]
        out += [f"put {first[0]} in the {first[1]} box and {second[0]} in the {second[1]} box",
                f"put the {first[0]} one in the {first[1]} box and the {second[0]} one in the {second[1]} box",
                f"can you put {first[0]} in the {first[1]} box and {second[0]} in the {second[1]} box"]
    return out


def _stacking_terse() -> list[str]:
    out = []
    for toy in ("toy", "orange toy", "orange thing", "orange figure", "figure", "little toy"):
        for target in ("stack", "blocks", "tower of blocks", "coloured stack", "block tower", "tower", "cubes"):
            for prep in ("on", "on top of", "onto"):
                out += [f"{toy} {prep} the {target}", f"the {toy} {prep} the {target}",
                        f"put the {toy} {prep} the {target}", f"can you put the {toy} {prep} the {target}",
                        f"the {toy} goes {prep} the {target}", f"I want the {toy} {prep} the {target}"]
    return out


def _extra(grammar: list[str], taken: tuple[str, ...], seed: int) -> tuple[str, ...]:
    """GROUNDING_EXTRA_SIZE of ``grammar``'s phrasings (fixed seed), none in ``taken`` or in any held-out set, with no
    held-out word and no fronted destination (the first held-out set's kinds stay unseen)."""
    held_out = ({t for ps in HELD_OUT_PARAPHRASES.values() for t in ps.values()}
                | {t for ts in SECOND_HELD_OUT.values() for t in ts}
                | {t for ts in THIRD_HELD_OUT.values() for t in ts})
    allowed = sorted({g for g in grammar if g not in held_out and g not in taken
                      and not set(g.replace(",", " ").replace(":", " ").split()) & set(HELD_OUT_WORDS)
                      and not g.startswith(_FRONTED)})
    order = np.random.default_rng(seed).permutation(len(allowed))
    return tuple(allowed[i] for i in order[:GROUNDING_EXTRA_SIZE])


GROUNDING_EXTRA: dict[str, tuple[str, ...]] = {
    PICK_PLACE_RED: _extra(_pick_place_terse("red"), TRAINING_POOL[PICK_PLACE_RED], 10),
    PICK_PLACE_GREEN: _extra(_pick_place_terse("green"), TRAINING_POOL[PICK_PLACE_GREEN], 11),
    SORTING: _extra(_sorting_terse("red", "green"), TRAINING_POOL[SORTING], 12),
    SORTING_SWAPPED: _extra(_sorting_terse("green", "red"), TRAINING_POOL[SORTING_SWAPPED], 13),
    STACKING: _extra(_stacking_terse(), TRAINING_POOL[STACKING], 14),
}
# Instructions that name the tasks' objects but ask for none of the tasks (fitted as "no task" beside
# NO_TASK_PHRASINGS): another destination, another object in the box, the opposite action.
NO_TASK_CONFUSABLE: tuple[str, ...] = (
    "put the orange toy in the box", "put the box on the blocks", "move the red block to the left",
    "give me the green cube", "take the toy off the blocks", "hide the red cube", "take the cubes out of the boxes",
    "put both cubes in the left box", "put the green cube next to the box", "throw the orange toy",
    "take the red block out of the box", "put the blocks in a row")


def grounding_phrasings_for(instruction: str) -> tuple[str, ...]:
    """What instruction grounding is fitted on for ``instruction``: its training pool, then GROUNDING_EXTRA's."""
    return phrasings_for(instruction) + GROUNDING_EXTRA.get(instruction, ())


def phrasings_for(instruction: str) -> tuple[str, ...]:
    """The training pool of a task instruction (recorded sentence first); an instruction without one is its only
    phrasing."""
    return TRAINING_POOL.get(instruction, (instruction,))


def draw_phrasings(instructions: list[str], rng: np.random.Generator) -> list[str]:
    """One training phrasing per sample: the recorded sentence with probability RECORDED_SHARE, else uniformly
    among its task's pool (so a pool of 128 does not starve the sentence the demos were recorded with)."""
    out = []
    for text in instructions:
        options = phrasings_for(text)
        keep = rng.random() < RECORDED_SHARE
        pick = int(rng.integers(len(options)))
        out.append(text if keep or len(options) == 1 else options[pick])
    return out
