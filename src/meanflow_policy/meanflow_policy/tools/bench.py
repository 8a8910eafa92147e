"""Per-chunk latency benchmark (``meanflow-bench``): one model, one observation, every sampler.

Runs the same policy on the same observation for MeanFlow nfe 1/2/5/10, flow matching nfe 10 and DDPM 100 and
reports median/p95 of the prefix (backbone + expert context) and expert (sampling) parts, then where the prefix
time goes, for each backbone precision asked (float32 and int8 on a CPU by default), with each fast precision's
parity against the first (chunk max abs in radians, prefix features relative) on a fixed observation set. The LAST
printed line is one JSON object with the figures (``expert_ms``/``chunk_ms`` maps, ratios, ``precisions``).

    python -m meanflow_policy.tools.bench --preset tiny --device cpu
    python -m meanflow_policy.tools.bench --checkpoint runs/sim_meanflow/last --precisions float32,int8
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
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from so101_common.handoff import DEFAULT_CANDIDATES, rtc_guide
from so101_common.joints import home_vector
from so101_common.provenance import provenance

from meanflow_policy.model.configuration import (AUTO_PRECISION, BACKBONE_PRECISIONS, PRECISION_PARITY_RAD,
                                                 SMOLVLM2_500M_PRESET, TINY_BACKBONE, TINY_SMOLLM2_PRESET,
                                                 MeanFlowConfig, fastest_precision)
from meanflow_policy.model.objectives import make_objective
from meanflow_policy.model.policy import ChunkGuide, MeanFlowPolicy

VARIANTS: tuple[tuple[str, int], ...] = (
    ("meanflow", 1), ("meanflow", 2), ("meanflow", 5), ("meanflow", 10), ("flow_matching", 10), ("ddpm", 100),
)
# Observations in the parity set a fast backbone precision is compared on.
PARITY_OBSERVATIONS = 4
# CUDA-graph replay runs eager mode's kernels on the same noise: its chunks must agree to float rounding (rad).
CUDA_GRAPH_PARITY_RAD = 1e-4
# Expert sizes per preset: the tiny dev expert, and a ~46 M-parameter expert for the real backbone.
_PRESETS = {
    TINY_BACKBONE: dict(image_size=64, num_vlm_layers=4, expert_width=128, expert_depth=4, expert_heads=4),
    TINY_SMOLLM2_PRESET: dict(image_size=64, num_vlm_layers=4, expert_width=128, expert_depth=4, expert_heads=4),
    SMOLVLM2_500M_PRESET: dict(image_size=512, num_vlm_layers=16, expert_width=512, expert_depth=8, expert_heads=8),
}


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def build_policy(preset: str, device: str, image_size: int | None, precision: str,
                 checkpoint: str = "", read_size: int = 0) -> MeanFlowPolicy:
    """The benchmarked model: a preset with random weights (the same weights every call: seeded), or a checkpoint;
    its backbone then runs in ``precision`` (BACKBONE_PRECISIONS) and reads cameras at ``read_size`` px
    (set_image_size; 0: the model's size)."""
    if checkpoint:
        policy = MeanFlowPolicy.load(checkpoint, device=device)
    else:
        values = dict(_PRESETS[preset])
        if image_size:
            values["image_size"] = image_size
        torch.manual_seed(0)
        policy = MeanFlowPolicy(MeanFlowConfig(backbone=preset, **values)).to(device).eval()
    policy.backbone.set_precision(precision)
    policy.set_image_size(read_size)
    return policy


def make_observation(config: MeanFlowConfig, height: int, width: int, seed: int = 0) -> dict[str, object]:
    """Camera-sized random images (the policy resizes them), home-pose state, a fixed instruction."""
    rng = np.random.default_rng(seed)
    return {"images": {cam: rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for cam in config.camera_keys},
            "state": home_vector(config.joint_names).astype(np.float32),
            "instruction": "pick up the red cube and place it in the bowl"}


# The guide of a steered variant (--rtc-guided): the previous chunk committed over 6 rows (200 ms at 30 Hz), the
# next chunk taking over after half of it, as the sim's real-time evaluation asks of a chunk at 200 ms.
GUIDED_DELAY_ROWS = 6


@dataclass
class Variant:
    """One timed way of sampling a chunk: ``objective``'s sampler with ``nfe`` evaluations; ``candidates`` > 1: the
    closest of that many draws to a guide (coherent sampling: the node guides every chunk after the first by the
    trajectory it published); ``steer``: each draw first steered onto the previous chunk (rtc guidance: the node's
    ``rtc_guidance``)."""

    key: str
    objective: str
    nfe: int
    candidates: int = 1
    steer: bool = False


# Chunks each variant samples in a row within a round of time_variants, after one untimed chunk that settles it.
ROUND_CHUNKS = 4


def time_variants(policy: MeanFlowPolicy, obs: dict[str, object], variants: Sequence[Variant], runs: int,
                  warmup: int) -> dict[str, dict[str, list[float]]]:
    """Sample ``warmup`` untimed and ``runs`` timed chunks of every variant on the same weights.

    The timed chunks come in rounds: each variant in turn samples one untimed chunk, then up to ``ROUND_CHUNKS``
    timed ones. A slow spell of a shared machine (seconds long on the 2-core VMs) then falls on every variant alike
    rather than on whichever ran through it (timed one variant after another, the tiny preset's fm10 / mf1 ranged
    6.6-8.9x over three runs on the 2-core AMD EPYC), while each timed chunk follows a chunk of its own variant, as
    in a node that samples the same way chunk after chunk (the first expert step after a different sampler,
    candidates 8 say, measured up to 0.2 ms slower: the allocator gave memory back between them)."""
    saved = policy.objective
    objectives = {v.objective: make_objective(replace(policy.config, objective=v.objective)) for v in variants}
    guides: dict[str, ChunkGuide] = {}
    timings = {v.key: {"prefix_ms": [], "expert_ms": [], "post_ms": [], "total_ms": []} for v in variants}

    def chunk(v: Variant, timed: bool) -> None:
        policy.objective = objectives[v.objective]
        policy.sample(obs, nfe=v.nfe, guide=guides.get(v.key), candidates=v.candidates, steer=v.steer)
        if timed:
            for key, values in timings[v.key].items():
                values.append(policy.last_timing[key])

    try:
        torch.manual_seed(0)  # noise drawn on the policy's device, as the node does (no generator)
        for v in variants:
            policy.objective = objectives[v.objective]
            if v.steer:
                previous = policy.sample(obs, nfe=v.nfe)
                guides[v.key] = rtc_guide(previous, 0, GUIDED_DELAY_ROWS, len(previous), len(previous) // 2)
            elif v.candidates > 1:
                previous = policy.sample(obs, nfe=v.nfe)
                guides[v.key] = (previous, np.ones_like(previous))
            for _ in range(warmup):
                chunk(v, timed=False)
        for start in tqdm(range(0, runs, ROUND_CHUNKS), desc="rounds", leave=False, dynamic_ncols=True):
            for v in variants:
                chunk(v, timed=False)
                for _ in range(min(ROUND_CHUNKS, runs - start)):
                    chunk(v, timed=True)
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


def parity_observations(config: MeanFlowConfig, height: int, width: int) -> list[dict[str, object]]:
    """The fixed observation set a fast path is compared on: random frames and states around home, seeded."""
    observations = []
    for seed in range(PARITY_OBSERVATIONS):
        obs = make_observation(config, height, width, seed=seed)
        obs["state"] = (np.asarray(obs["state"]) + np.random.default_rng(seed).uniform(-0.3, 0.3, config.state_dim)
                        ).astype(np.float32)
        observations.append(obs)
    return observations


@torch.inference_mode()
def parity_outputs(policy: MeanFlowPolicy, observations: Sequence[dict[str, object]]
                   ) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Prefix features and one-step chunks (noise seeded per observation) of every parity observation."""
    features, chunks = [], []
    for i, obs in enumerate(observations):
        images, _, instruction = policy._observation_tensors(obs)
        features.append(policy.backbone.encode_one(images, instruction)[0].float().cpu())
        generator = torch.Generator(device=policy.device).manual_seed(i)
        chunks.append(policy.sample(obs, nfe=1, generator=generator))
    return features, chunks


def parity(reference: tuple[list[torch.Tensor], list[np.ndarray]],
           other: tuple[list[torch.Tensor], list[np.ndarray]], tolerance_rad: float | None) -> dict[str, object]:
    """How far a fast path is from the reference: chunk max abs (rad), prefix features max abs relative to their
    largest magnitude (a random-weight model's chunk may ignore its prefix; its features do not); against a float32
    reference, whether the chunk is within the precision's stated tolerance."""
    chunk = max(float(np.abs(a - b).max()) for a, b in zip(reference[1], other[1]))
    scale = max(float(f.abs().max()) for f in reference[0])
    feature = max(float((a - b).abs().max()) for a, b in zip(reference[0], other[0])) / max(scale, 1e-12)
    result: dict[str, object] = {"chunk_max_abs_rad": round(chunk, 6), "prefix_max_rel": round(feature, 6)}
    if tolerance_rad is not None:
        result.update(tolerance_rad=tolerance_rad, ok=chunk <= tolerance_rad)
    return result


def bench_precision(policy: MeanFlowPolicy, obs: dict[str, object], args: argparse.Namespace,
                    label: str) -> dict[str, object]:
    """Every sampler on one precision: the table, the prefix breakdown and this precision's JSON figures."""
    cfg = policy.config
    header = (f"{'variant':<18}{'prefix med':>11}{'expert med':>11}{'expert p95':>11}{'post med':>10}"
              f"{'chunk med':>11}{'chunk p95':>11}")
    print(f"\nbackbone {label}:")
    print(header)
    print("-" * len(header))
    variants = []
    for objective, nfe in VARIANTS:
        max_nfe = make_objective(replace(cfg, objective=objective)).max_nfe
        if max_nfe is None or nfe <= max_nfe:
            variants.append(Variant(f"{objective}_{nfe}", objective, nfe))
    variants += [Variant(f"meanflow_1_candidates_{k}", "meanflow", 1, candidates=k) for k in args.candidates]
    if args.rtc_guided:
        variants += [Variant(f"{objective}_{nfe}_rtc_guided", objective, nfe, steer=True)
                     for objective, nfe in (("meanflow", 1), ("flow_matching", 10))]
    results = time_variants(policy, obs, variants, args.runs, args.warmup)
    for key, t in results.items():
        print(f"{key:<18}{statistics.median(t['prefix_ms']):>11.2f}{statistics.median(t['expert_ms']):>11.2f}"
              f"{_percentile(t['expert_ms'], 95):>11.2f}{statistics.median(t['post_ms']):>10.2f}"
              f"{statistics.median(t['total_ms']):>11.2f}"
              f"{_percentile(t['total_ms'], 95):>11.2f}", flush=True)
    breakdown = prefix_breakdown(policy, obs, max(3, args.runs // 2))
    print("prefix breakdown (median ms per stage):")
    for name, ms in breakdown.items():
        print(f"  {name:<55}{ms:>9.2f}")
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in results.items()}
    figures: dict[str, object] = {
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
            figures[f"ratio_expert_{name}_over_mf1"] = round(med[key]["expert_ms"] / mf1["expert_ms"], 2)
            figures[f"ratio_chunk_{name}_over_mf1"] = round(med[key]["total_ms"] / mf1["total_ms"], 2)
    return figures


def _speedup(reference: dict[str, object], figures: dict[str, object]) -> float:
    """How many times faster ``figures``' meanflow-1 chunk is than ``reference``'s."""
    return round(reference["chunk_ms"]["meanflow_1"] / figures["chunk_ms"]["meanflow_1"], 2)  # type: ignore[index]


def run(args: argparse.Namespace) -> dict[str, object]:
    """The first precision is the reference: its figures are the JSON's top level; every precision's figures (and,
    for the others, their parity with the reference and their meanflow-1 speed-up) are under ``precisions``."""
    reference = args.precisions[0]
    try:
        policy = build_policy(args.preset, args.device, args.image_size, reference, args.checkpoint, args.read_size)
    except ValueError as exc:
        raise SystemExit(f"meanflow-bench: --read-size {args.read_size}: {exc}") from exc
    cfg = policy.config
    obs = make_observation(cfg, args.camera_height, args.camera_width)
    parity_set = parity_observations(cfg, args.camera_height, args.camera_width)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    weights = "random vision, pretrained SmolLM2" if cfg.backbone == TINY_SMOLLM2_PRESET else "random weights"
    model = args.checkpoint or f"preset {args.preset} ({weights if cfg.backbone_is_preset else cfg.backbone})"
    read = f" read at {policy.image_size}px" if policy.image_size != cfg.image_size else ""
    print(f"{model} on {device_name}; image {cfg.image_size}px{read} x {len(cfg.camera_keys)} cameras, "
          f"{args.runs} warm runs after {args.warmup}; backbone precisions {', '.join(args.precisions)}")
    print(f"params: backbone {_param_millions(policy.backbone):.2f} M, expert {_param_millions(policy.expert):.2f} M, "
          f"prefix tokens {policy.n_image_tokens} image + text + 1 state")
    summary: dict[str, object] = {
        **provenance(), "preset": cfg.backbone, "checkpoint": args.checkpoint or None, "device": device_name,
        "image_size": cfg.image_size, "read_size": policy.image_size, "runs": args.runs, "backbone_dtype": reference,
        "params_m": {"backbone": round(_param_millions(policy.backbone), 3),
                     "expert": round(_param_millions(policy.expert), 3)},
    }
    per_precision: dict[str, dict[str, object]] = {}
    reference_outputs = parity_outputs(policy, parity_set)
    for precision in args.precisions:
        if precision != reference:
            policy = build_policy(args.preset, args.device, args.image_size, precision, args.checkpoint,
                                  args.read_size)
        figures = bench_precision(policy, obs, args, precision)
        eager_outputs = reference_outputs if precision == reference else parity_outputs(policy, parity_set)
        if precision != reference:
            tolerance = PRECISION_PARITY_RAD[precision] if reference == "float32" else None
            figures["parity"] = parity(reference_outputs, eager_outputs, tolerance)
            figures["speedup_chunk_mf1"] = _speedup(per_precision[reference], figures)
            print(f"parity with {reference} over {PARITY_OBSERVATIONS} observations: {figures['parity']}; "
                  f"meanflow_1 chunk {figures['speedup_chunk_mf1']}x faster")
        per_precision[precision] = figures
        policy.backbone.clear_cache()
        for compiled in ([False, True] if args.compile else [False]) if args.cuda_graphs else []:
            if compiled:
                policy.compile_kernels()
            policy.use_cuda_graphs()
            label = f"{precision}+cuda_graphs" + ("+compile" if compiled else "")
            graphed = bench_precision(policy, obs, args, label)
            tolerance = PRECISION_PARITY_RAD.get(precision, CUDA_GRAPH_PARITY_RAD) if compiled else (
                CUDA_GRAPH_PARITY_RAD)
            graphed["parity"] = parity(eager_outputs, parity_outputs(policy, parity_set), tolerance)
            graphed["cuda_graphs_active"] = policy.cuda_graphs  # False: a capture failed, the figures are eager
            graphed["speedup_chunk_mf1"] = _speedup(per_precision[reference], graphed)
            print(f"{label}: parity with eager {precision}: {graphed['parity']}; meanflow_1 chunk "
                  f"{graphed['speedup_chunk_mf1']}x faster than eager {reference}")
            per_precision[label] = graphed
            policy.use_cuda_graphs(False)
            policy.backbone.clear_cache()
    summary.update(per_precision[reference])
    summary["precisions"] = per_precision
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
    p.add_argument("--read-size", type=int, default=0,
                   help="read the cameras at this size (px; the node's image_size, MeanFlowPolicy.set_image_size): "
                        "fewer patches and image tokens than the model's size; 0: the model's size")
    p.add_argument("--camera-height", type=int, default=480, help="raw camera frame height (policy resizes)")
    p.add_argument("--camera-width", type=int, default=640, help="raw camera frame width")
    p.add_argument("--checkpoint", default="", help="benchmark this checkpoint directory instead of a preset with "
                   "random weights (--preset and --image-size are then ignored)")
    p.add_argument("--precisions", default="default",
                   help=f"comma list of backbone precisions from {', '.join(BACKBONE_PRECISIONS)} or auto (the "
                        "fastest measured for this device: bfloat16 on CUDA and on CPUs with AMX, int8 on other "
                        "CPUs); the first is the reference the others' parity and speed-up are measured against. "
                        "default: auto on CUDA, float32,auto on CPU. The expert always runs in float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="with --cuda-graphs: also time each precision with the vision encoder and the expert "
                        "compiled (torch.compile) under the graphs (label PRECISION+cuda_graphs+compile)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: also time each precision with its chunks replayed as captured CUDA graphs "
                        "(label PRECISION+cuda_graphs, parity against the same precision eager)")
    p.add_argument("--candidates", default=str(DEFAULT_CANDIDATES),
                   help="comma list of candidate counts timed for MeanFlow NFE 1 with a guide (coherent sampling: "
                        "the closest of K draws), beside the single-draw variants; empty: none")
    p.add_argument("--rtc-guided", action="store_true",
                   help="also time one draw steered onto the previous chunk (rtc guidance, the node's rtc_guidance): "
                        "MeanFlow NFE 1 by noise-space guidance, flow matching NFE 10 by the RTC paper's guided Euler "
                        "steps (variants *_rtc_guided)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    try:
        args.candidates = [int(x) for x in args.candidates.split(",") if x.strip()]
    except ValueError:
        p.error(f"--candidates: {args.candidates!r} is not a comma list of integers")
    if any(k < 2 for k in args.candidates):
        p.error("--candidates: each count must be >= 2 (1 is the plain meanflow_1 variant)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch sees no CUDA device")
    cuda = args.device.startswith("cuda")
    if args.precisions == "default":
        args.precisions = "auto" if cuda else "float32,auto"
    fastest = fastest_precision("cuda" if cuda else "cpu", torch.cpu.get_capabilities(),
                                cuda and torch.cuda.is_bf16_supported())
    args.precisions = list(dict.fromkeys(fastest if x.strip() == AUTO_PRECISION else x.strip()
                                         for x in args.precisions.split(",") if x.strip()))
    unknown = [x for x in args.precisions if x not in BACKBONE_PRECISIONS]
    if unknown or not args.precisions:
        p.error(f"--precisions: {unknown or 'none'} not in {', '.join(BACKBONE_PRECISIONS)}")
    if args.cuda_graphs and not cuda:
        p.error("--cuda-graphs needs --device cuda")
    if args.compile and not args.cuda_graphs:
        p.error("--compile needs --cuda-graphs")
    if "int8" in args.precisions and args.device != "cpu":
        p.error("--precisions int8 runs on the CPU only")
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
