"""``python -m meanflow_policy.tools.bench_language``: what the frozen SmolLM2 (tiny-smollm2) costs and buys.

1. Chunk latency at NFE 1 of tiny-smollm2 vs tiny on the same observation, instruction cached (the per-chunk cost
   the node pays), and the one-off instruction pass when the instruction changes.
2. Held-out paraphrases (so101_common/phrasings.py) vs the training phrasings: per paraphrase the cosine of
   its pooled SmolLM2 features to its own task's sentence minus the best other task's, and whether its nearest training
   phrasing is its own task's; the same for the context-free token embeddings of the same model (the baseline).
The LAST printed line is one JSON object. Run it with 1 thread on an otherwise idle CPU; it is not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from so101_common.joints import home_vector

from so101_common.phrasings import HELD_OUT_PARAPHRASES, PICK_PLACE_RED, TRAIN_TEMPLATES
from meanflow_policy.model.configuration import TINY_BACKBONE, TINY_SMOLLM2_PRESET, MeanFlowConfig
from meanflow_policy.model.language import FrozenLanguageModel, pooled_sentence_features
from meanflow_policy.model.policy import MeanFlowPolicy


def _observation(seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {"images": {cam: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for cam in ("wrist", "top")},
            "state": home_vector(MeanFlowConfig.joint_names).astype(np.float32),
            "instruction": PICK_PLACE_RED}


def _median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def latency(runs: int, warmup: int) -> dict[str, object]:
    obs = _observation()
    out: dict[str, object] = {}
    for preset in (TINY_BACKBONE, TINY_SMOLLM2_PRESET):
        torch.manual_seed(0)
        policy = MeanFlowPolicy(MeanFlowConfig.tiny(backbone=preset)).eval()
        chunk = _median_ms(lambda policy=policy: policy.sample(obs, nfe=1), runs, warmup)

        def instruction_pass(policy: MeanFlowPolicy = policy) -> None:
            policy.backbone.clear_cache()
            if policy.backbone.language is not None:
                policy.backbone.language.forget()
            with torch.inference_mode():
                policy.backbone.text_cache(str(obs["instruction"]))

        out[preset] = {"chunk_ms_nfe1": round(chunk, 3),
                       "instruction_pass_ms": round(_median_ms(instruction_pass, max(3, runs // 4), 1), 3),
                       "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 3)}
    out["ratio_chunk_smollm2_over_tiny"] = round(out[TINY_SMOLLM2_PRESET]["chunk_ms_nfe1"]
                                                 / out[TINY_BACKBONE]["chunk_ms_nfe1"], 3)
    return out


def _scores(features: Callable[[str], torch.Tensor]) -> dict[str, object]:
    rows = []
    for task, paraphrases in HELD_OUT_PARAPHRASES.items():
        for kind, text in paraphrases.items():
            f = features(text)
            to_sentence = {t: float(torch.cosine_similarity(f, features(t), dim=0)) for t in TRAIN_TEMPLATES}
            nearest = max(((t, float(torch.cosine_similarity(f, features(p), dim=0)))
                           for t, ps in TRAIN_TEMPLATES.items() for p in ps), key=lambda x: x[1])[0]
            rows.append({"task": task, "kind": kind, "paraphrase": text,
                         "cos_own_sentence": round(to_sentence[task], 3),
                         "cos_best_other_sentence": round(max(v for t, v in to_sentence.items() if t != task), 3),
                         "nearest_training_phrasing_is_own_task": nearest == task})
    closer = sum(r["cos_own_sentence"] > r["cos_best_other_sentence"] for r in rows)
    nearest_own = sum(r["nearest_training_phrasing_is_own_task"] for r in rows)
    return {"closer_to_own_sentence": f"{closer}/{len(rows)}",
            "nearest_phrasing_own_task": f"{nearest_own}/{len(rows)}", "paraphrases": rows}


@torch.no_grad()
def paraphrases(layers: int) -> dict[str, object]:
    lm = FrozenLanguageModel(layers)
    corpus: Sequence[str] = [t for ts in TRAIN_TEMPLATES.values() for t in ts]
    contextual = pooled_sentence_features(lambda t: lm.hidden_states(lm.token_ids(t, 64)), corpus)
    embeddings = pooled_sentence_features(lambda t: lm.model.embed_tokens(torch.tensor(lm.token_ids(t, 64))), corpus)
    return {"language_layers": layers, "smollm2": _scores(contextual), "token_embeddings_baseline": _scores(embeddings)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="timed chunks per preset (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--runs and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    try:
        summary = {"threads": args.threads, "runs": args.runs, "latency": latency(args.runs, args.warmup),
                   "paraphrases": paraphrases(MeanFlowConfig.language_layers)}
    except ValueError as exc:
        print(f"bench_language: {exc}", file=sys.stderr)
        return 2
    for name in ("smollm2", "token_embeddings_baseline"):
        s = summary["paraphrases"][name]
        print(f"{name}: closer to own sentence {s['closer_to_own_sentence']}, nearest training phrasing of own "
              f"task {s['nearest_phrasing_own_task']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
