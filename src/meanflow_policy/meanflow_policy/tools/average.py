"""``meanflow-average``: one checkpoint whose weights are the (weighted) mean of several checkpoints of one model.

Why: a fine-tune of the multi-task policy trades one task for another (docs/notes/multitask_training.md); the
mean of the start's and the fine-tune's weights (weight-space ensembling) measured between the two on every task and
above both in instruction following. Only checkpoints of the same model average: the same config, normalisation
stats and tokenizer file (a fine-tune with ``--init-from`` keeps them), else one error naming what differs.

    meanflow-average CKPT_A CKPT_B [--weights 0.5,0.5] --out runs/mean_ab
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from meanflow_policy.model import checkpoint
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.tools.common import run_json_cli

LOG = logging.getLogger("meanflow_average")


def average(checkpoints: Sequence[Path], weights: Sequence[float] | None = None) -> MeanFlowPolicy:
    """The first checkpoint's policy with every floating-point tensor replaced by the weighted mean over all of them
    (weights normalised to sum 1; integer buffers such as batch-norm counters are the first's)."""
    if len(checkpoints) < 2:
        raise ValueError(f"give at least two checkpoints to average, got {len(checkpoints)}")
    weights = [1.0] * len(checkpoints) if weights is None else list(weights)
    if len(weights) != len(checkpoints) or any(not w > 0 for w in weights):
        raise ValueError(f"--weights: one positive number per checkpoint ({len(checkpoints)}), got {weights}")
    policies = [MeanFlowPolicy.load(path) for path in checkpoints]
    first = policies[0]
    for path, policy in zip(checkpoints[1:], policies[1:]):
        _check_same_model(checkpoints[0], first, path, policy)
    total = sum(weights)
    states = [policy.state_dict() for policy in policies]
    mean = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            acc = sum(w / total * state[key].double() for w, state in zip(weights, states))
            mean[key] = torch.as_tensor(acc).to(value.dtype)
        else:
            mean[key] = value
    first.load_state_dict(mean)
    return first


def _check_same_model(path_a: Path, a: MeanFlowPolicy, path_b: Path, b: MeanFlowPolicy) -> None:
    config_a, config_b = a.config.to_dict(), b.config.to_dict()
    fields = sorted(k for k in config_a.keys() | config_b.keys() if config_a.get(k) != config_b.get(k))
    if fields:
        raise ValueError(f"{path_b} is not the same model as {path_a}: config differs in {', '.join(fields)}")
    if a.get_stats() != b.get_stats():
        raise ValueError(f"{path_b} is not the same model as {path_a}: its normalisation stats differ "
                         f"({checkpoint.STATS_FILE}); only fine-tunes of one checkpoint average")
    tok_a, tok_b = path_a / checkpoint.TOKENIZER_FILE, path_b / checkpoint.TOKENIZER_FILE
    if a.config.code_tokenizer and tok_a.read_bytes() != tok_b.read_bytes():
        raise ValueError(f"{path_b} is not the same model as {path_a}: its {checkpoint.TOKENIZER_FILE} differs")


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-average", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT",
                   help="checkpoint directories of one model (e.g. a policy and its fine-tune)")
    p.add_argument("--weights", type=_weights, default=None,
                   help="comma-separated weight per checkpoint, normalised to sum 1 (default: equal)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (must not exist)")
    return p


def _run(args: argparse.Namespace) -> dict:
    if args.out.exists():
        raise ValueError(f"--out {args.out} exists: choose a new directory (nothing was written)")
    policy = average(args.checkpoints, args.weights)
    policy.save(args.out)
    LOG.info("wrote the mean of %d checkpoints to %s", len(args.checkpoints), args.out)
    return {"out": str(args.out), "checkpoints": [str(c) for c in args.checkpoints],
            "weights": args.weights or [1.0] * len(args.checkpoints)}


def main(argv: Sequence[str] | None = None) -> int:
    return run_json_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
