"""Per-chunk latency benchmark (``meanflow-bench``): one model, one observation, every sampler.

Runs the same policy on the same observation for MeanFlow nfe 1/2/5/10, flow matching nfe 10 and DDPM 100 and
reports median/p95 of the prefix (backbone + expert context) and expert (sampling) parts, then where the prefix
time goes. The LAST printed line is one JSON object with the figures (``expert_ms``/``chunk_ms`` maps, ratios).

    python -m meanflow_policy.tools.bench --preset tiny --device cpu
    python -m meanflow_policy.tools.bench --preset smolvlm2-500m --device cuda --runs 50
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from so101_common.joints import home_vector

from meanflow_policy.model.configuration import SMOLVLM2_500M_PRESET, TINY_BACKBONE, TINY_SMOLLM2_PRESET, MeanFlowConfig
from meanflow_policy.model.objectives import make_objective
from meanflow_policy.model.policy import MeanFlowPolicy

VARIANTS: tuple[tuple[str, int], ...] = (
    ("meanflow", 1), ("meanflow", 2), ("meanflow", 5), ("meanflow", 10), ("flow_matching", 10), ("ddpm", 100),
)
# Expert sizes per preset: the tiny dev expert, and a ~46 M-parameter expert for the real backbone.
_PRESETS = {
    TINY_BACKBONE: dict(image_size=64, num_vlm_layers=4, expert_width=128, expert_depth=4, expert_heads=4),
    TINY_SMOLLM2_PRESET: dict(image_size=64, num_vlm_layers=4, expert_width=128, expert_depth=4, expert_heads=4),
    SMOLVLM2_500M_PRESET: dict(image_size=512, num_vlm_layers=16, expert_width=512, expert_depth=8, expert_heads=8),
}


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def build_policy(preset: str, device: str, image_size: int | None, backbone_dtype: str) -> MeanFlowPolicy:
    values = dict(_PRESETS[preset])
    if image_size:
        values["image_size"] = image_size
    policy = MeanFlowPolicy(MeanFlowConfig(backbone=preset, **values)).to(device)
    if backbone_dtype != "float32":
        policy.backbone.to(getattr(torch, backbone_dtype))
    return policy.eval()


def make_observation(config: MeanFlowConfig, height: int, width: int, seed: int = 0) -> dict[str, object]:
    """Camera-sized random images (the policy resizes them), home-pose state, a fixed instruction."""
    rng = np.random.default_rng(seed)
    return {"images": {cam: rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for cam in config.camera_keys},
            "state": home_vector(config.joint_names).astype(np.float32),
            "instruction": "pick up the red cube and place it in the bowl"}


def time_variant(policy: MeanFlowPolicy, obs: dict[str, object], objective: str, nfe: int, runs: int,
                 warmup: int) -> dict[str, list[float]]:
    """Sample ``warmup + runs`` chunks with ``objective``'s sampler on the same weights; keep the warm timings."""
    saved = policy.objective
    policy.objective = make_objective(replace(policy.config, objective=objective))
    try:
        torch.manual_seed(0)  # noise drawn on the policy's device, as the node does (no generator)
        timings: dict[str, list[float]] = {"prefix_ms": [], "expert_ms": [], "post_ms": [], "total_ms": []}
        for i in range(warmup + runs):
            policy.sample(obs, nfe=nfe)
            if i >= warmup:
                for key in timings:
                    timings[key].append(policy.last_timing[key])
        return timings
    finally:
        policy.objective = saved


def _timed(fn: Callable[[], object], sync: Callable[[], None], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@torch.inference_mode()
def prefix_breakdown(policy: MeanFlowPolicy, obs: dict[str, object], runs: int) -> dict[str, float]:
    """Median ms of each stage of the prefix, run separately (so they need not add up exactly)."""
    bb, sync = policy.backbone, policy._sync
    images, state, instruction = policy._observation_tensors(obs)
    cache = bb.text_cache(instruction)
    img_emb = bb.image_embeddings(images)
    feats = torch.cat([cache.features, bb.image_features(img_emb, cache)], dim=1)
    mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)

    def uncached_text() -> None:
        bb.clear_cache()
        if bb.language is not None:  # tiny-smollm2: a new instruction also costs its SmolLM2 pass
            bb.language.forget()
        bb.text_cache(instruction)

    stages = {
        "inputs (resize, to device)": lambda: policy._observation_tensors(obs),
        "vision encoder + connector (all cameras)": lambda: bb.image_embeddings(images),
        "LM layers over image tokens (cached text KV)": lambda: bb.image_features(img_emb, cache),
        "expert context (prefix proj, state token, cross K/V)": lambda: policy._context(feats, mask, state),
        "instruction LM pass (only when it changes)": uncached_text,
    }
    result = {name: _timed(fn, sync, runs) for name, fn in stages.items()}
    bb.clear_cache()
    return result


def _param_millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(0)
    policy = build_policy(args.preset, args.device, args.image_size, args.backbone_dtype)
    cfg = policy.config
    obs = make_observation(cfg, args.camera_height, args.camera_width)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    weights = "random vision, pretrained SmolLM2" if cfg.backbone == TINY_SMOLLM2_PRESET else "random weights"
    print(f"preset {args.preset} ({weights if cfg.backbone_is_preset else cfg.backbone}) on {device_name}; "
          f"image {cfg.image_size}px x {len(cfg.camera_keys)} cameras, {args.runs} warm runs after {args.warmup}")
    print(f"params: backbone {_param_millions(policy.backbone):.2f} M, expert {_param_millions(policy.expert):.2f} M, "
          f"prefix tokens {len(cfg.camera_keys) * policy.backbone.tokens_per_image} image + text + 1 state")
    results: dict[str, dict[str, list[float]]] = {}
    header = (f"{'variant':<18}{'prefix med':>11}{'expert med':>11}{'expert p95':>11}{'post med':>10}"
              f"{'chunk med':>11}{'chunk p95':>11}")
    print(header)
    print("-" * len(header))
    for objective, nfe in VARIANTS:
        key = f"{objective}_{nfe}"
        max_nfe = make_objective(replace(cfg, objective=objective)).max_nfe
        if max_nfe is not None and nfe > max_nfe:
            continue
        t = time_variant(policy, obs, objective, nfe, args.runs, args.warmup)
        results[key] = t
        print(f"{key:<18}{statistics.median(t['prefix_ms']):>11.2f}{statistics.median(t['expert_ms']):>11.2f}"
              f"{_percentile(t['expert_ms'], 95):>11.2f}{statistics.median(t['post_ms']):>10.2f}"
              f"{statistics.median(t['total_ms']):>11.2f}"
              f"{_percentile(t['total_ms'], 95):>11.2f}", flush=True)
    breakdown = prefix_breakdown(policy, obs, max(3, args.runs // 2))
    print("\nprefix breakdown (median ms per stage):")
    for name, ms in breakdown.items():
        print(f"  {name:<55}{ms:>9.2f}")
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in results.items()}
    summary: dict[str, object] = {
        "preset": args.preset, "device": device_name, "image_size": cfg.image_size, "runs": args.runs,
        "backbone_dtype": args.backbone_dtype,
        "params_m": {"backbone": round(_param_millions(policy.backbone), 3),
                     "expert": round(_param_millions(policy.expert), 3)},
        "expert_ms": {k: round(v["expert_ms"], 3) for k, v in med.items()},
        "expert_p95_ms": {k: round(_percentile(v["expert_ms"], 95), 3) for k, v in results.items()},
        "prefix_ms": {k: round(v["prefix_ms"], 3) for k, v in med.items()},
        "post_ms": {k: round(v["post_ms"], 3) for k, v in med.items()},
        "chunk_ms": {k: round(v["total_ms"], 3) for k, v in med.items()},
        "chunk_p95_ms": {k: round(_percentile(v["total_ms"], 95), 3) for k, v in results.items()},
        "prefix_breakdown_ms": {k: round(v, 3) for k, v in breakdown.items()},
    }
    mf1 = med["meanflow_1"]
    for name, key in (("fm10", "flow_matching_10"), ("ddpm100", "ddpm_100")):
        if key in med:
            summary[f"ratio_expert_{name}_over_mf1"] = round(med[key]["expert_ms"] / mf1["expert_ms"], 2)
            summary[f"ratio_chunk_{name}_over_mf1"] = round(med[key]["total_ms"] / mf1["total_ms"], 2)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(_PRESETS), default=TINY_BACKBONE,
                   help="backbone preset: tiny dev model, tiny with the frozen pretrained SmolLM2 (tiny-smollm2), or "
                        "the real SmolVLM2-500M architecture (random weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--runs", type=int, default=20, help="warm runs per variant (median/p95 over these)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per variant first")
    p.add_argument("--image-size", type=int, default=0, help="model input size (0: the preset's, 64 / 512)")
    p.add_argument("--camera-height", type=int, default=480, help="raw camera frame height (policy resizes)")
    p.add_argument("--camera-width", type=int, default=640, help="raw camera frame width")
    p.add_argument("--backbone-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="backbone weights dtype; auto: bfloat16 on CUDA, float32 on CPU (bf16 is slow on CPUs). "
                        "The expert always runs in float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch sees no CUDA device")
    if args.backbone_dtype == "auto":
        args.backbone_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = run(args)
    except ValueError as exc:
        print(f"meanflow-bench: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
