"""LeRobot's SmolVLA and Diffusion Policy timed like ``meanflow-bench`` times ours, for the ratios in docs/method.md.

LeRobot is not a dependency of this project: run this with LeRobot installed beside it (``pip install
lerobot==0.4.4``, which wants transformers < 5: use its own environment). Nothing is downloaded: SmolVLA is built
with random weights from a SmolVLM2 ``config.json`` directory (``--vlm-config``; write ours with ``python -c "from
meanflow_policy.model.backbone import smolvlm2_500m_config as c; c(32).save_pretrained('DIR')"``), and LeRobot's
processor lookup, which only supplies two image-marker token ids that SmolVLA does not use by default, is answered
in-process. Each chunk is one ``predict_action_chunk`` (SmolVLA: the prefix over 2 cameras at 512 px + the
instruction, then ``--smolvla-steps`` flow-matching steps of its expert; Diffusion Policy: the ResNet-18 image
encoder, then its U-Net ``--dp-steps`` times), on 2 camera frames of 480x640 and a 6-joint state, batch 1. With
``--ours`` (``meanflow-bench``'s JSON) the LAST printed line also holds our chunk over each of theirs.

    python -m meanflow_policy.tools.bench_peers --device cuda --vlm-config /tmp/smolvlm2 --ours ours.json
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from so101_common.provenance import provenance

CAMERAS = ("observation.images.top", "observation.images.wrist")
FRAME_SHAPE = (3, 480, 640)
JOINTS = 6
# Instruction length in tokens ("pick up the red cube and place it in the bowl" is 11-13 in SmolVLM2's tokenizer).
INSTRUCTION_TOKENS = 13
# SmolVLM2's image-marker token ids (<fake_token_around_image>, <global-img>): SmolVLA reads them from the processor.
FAKE_IMAGE_TOKEN_ID, GLOBAL_IMAGE_TOKEN_ID = 49189, 49152
# LeRobot imports its video I/O module at package import; inference never calls it. Where its
# binary package is missing (PyAV: the GPU machine has none), an empty module stands in for it.
IO_ONLY_MODULES = ("av",)


def _lerobot() -> types.SimpleNamespace:
    """Import what is timed from LeRobot, with a clear error where it is not installed."""
    if importlib.util.find_spec("lerobot") is None:
        raise SystemExit("meanflow-bench-peers: LeRobot is not installed here; install lerobot==0.4.4 in its own "
                         "environment (it wants transformers < 5)")
    for name in IO_ONLY_MODULES:
        try:
            __import__(name)
        except ImportError:
            stand_in = types.ModuleType(name)
            stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None)
            stand_in.logging = types.SimpleNamespace(  # type: ignore[attr-defined]  # read by a default argument
                ERROR=logging.ERROR, WARNING=logging.WARNING, INFO=logging.INFO, DEBUG=logging.DEBUG)
            sys.modules[name] = stand_in
    try:
        types_ = importlib.import_module("lerobot.configs.types")
        diffusion = importlib.import_module("lerobot.policies.diffusion.modeling_diffusion")
        smolvla = importlib.import_module("lerobot.policies.smolvla.modeling_smolvla")
        return types.SimpleNamespace(
            version=importlib.import_module("lerobot").__version__, FeatureType=types_.FeatureType,
            PolicyFeature=types_.PolicyFeature, DiffusionConfig=diffusion.DiffusionConfig,
            DiffusionPolicy=diffusion.DiffusionPolicy, SmolVLAConfig=smolvla.SmolVLAConfig,
            SmolVLAPolicy=smolvla.SmolVLAPolicy,
            smolvlm_with_expert=importlib.import_module("lerobot.policies.smolvla.smolvlm_with_expert"))
    except ImportError as exc:
        raise SystemExit(f"meanflow-bench-peers: LeRobot is not importable here ({exc}); install lerobot==0.4.4 in "
                         "its own environment (it wants transformers < 5)") from exc


def _features(lr: types.SimpleNamespace, image_shape: tuple[int, int, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    inputs = {cam: lr.PolicyFeature(type=lr.FeatureType.VISUAL, shape=image_shape) for cam in CAMERAS}
    inputs["observation.state"] = lr.PolicyFeature(type=lr.FeatureType.STATE, shape=(JOINTS,))
    return inputs, {"action": lr.PolicyFeature(type=lr.FeatureType.ACTION, shape=(JOINTS,))}


def build_smolvla(lr: types.SimpleNamespace, vlm_config: str, device: str, layers: int, steps: int,
                  chunk: int) -> torch.nn.Module:
    """SmolVLA as LeRobot's defaults build it (16 VLM layers, 10 steps, chunk 50), random weights."""
    tokenizer = types.SimpleNamespace(fake_image_token_id=FAKE_IMAGE_TOKEN_ID,
                                      global_image_token_id=GLOBAL_IMAGE_TOKEN_ID)
    lr.smolvlm_with_expert.AutoProcessor = types.SimpleNamespace(
        from_pretrained=lambda *_a, **_k: types.SimpleNamespace(tokenizer=tokenizer))
    inputs, outputs = _features(lr, FRAME_SHAPE)
    config = lr.SmolVLAConfig(vlm_model_name=vlm_config, load_vlm_weights=False, num_vlm_layers=layers,
                              num_steps=steps, chunk_size=chunk, n_action_steps=chunk, input_features=inputs,
                              output_features=outputs, device=device)
    torch.manual_seed(0)
    return lr.SmolVLAPolicy(config).to(device).eval()


def smolvla_batch(device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """What LeRobot's SmolVLA pre-processor hands the policy: frames in [0, 1], state, instruction token ids."""
    g = torch.Generator().manual_seed(seed)
    batch = {cam: torch.rand((1, *FRAME_SHAPE), generator=g) for cam in CAMERAS}
    batch["observation.state"] = torch.randn((1, JOINTS), generator=g)
    batch["observation.language.tokens"] = torch.randint(0, 49000, (1, INSTRUCTION_TOKENS), generator=g)
    batch["observation.language.attention_mask"] = torch.ones((1, INSTRUCTION_TOKENS), dtype=torch.bool)
    return {k: v.to(device) for k, v in batch.items()}


def build_diffusion(lr: types.SimpleNamespace, device: str, scheduler: str, steps: int) -> torch.nn.Module:
    """Diffusion Policy with LeRobot's defaults (ResNet-18, U-Net, horizon 16, 2 observation steps, 100 training
    timesteps) and the given inference scheduler and step count, random weights."""
    inputs, outputs = _features(lr, FRAME_SHAPE)
    config = lr.DiffusionConfig(input_features=inputs, output_features=outputs, noise_scheduler_type=scheduler,
                                num_inference_steps=steps, device=device)
    torch.manual_seed(0)
    return lr.DiffusionPolicy(config).to(device).eval()


def diffusion_batch(device: str, n_obs_steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diffusion Policy's model input: the last ``n_obs_steps`` observations stacked, cameras together."""
    g = torch.Generator().manual_seed(seed)
    return {"observation.state": torch.randn((1, n_obs_steps, JOINTS), generator=g).to(device),
            "observation.images": torch.rand((1, n_obs_steps, len(CAMERAS), *FRAME_SHAPE), generator=g).to(device)}


def time_chunks(fn: Callable[[], torch.Tensor], device: str, runs: int, warmup: int) -> dict[str, float]:
    """Median and p95 wall ms of ``fn`` (one chunk each), synchronised on a GPU."""
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    samples = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            if i >= warmup:
                samples.append((time.perf_counter() - start) * 1e3)
    if not torch.isfinite(out).all():
        raise RuntimeError("a peer's chunk is not finite")
    return {"chunk_ms": round(statistics.median(samples), 3),
            "chunk_p95_ms": round(float(np.percentile(samples, 95)), 3)}


def run(args: argparse.Namespace) -> dict[str, object]:
    lr = _lerobot()
    device_name = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads")
    summary: dict[str, object] = {**provenance(), "device": device_name, "lerobot": lr.version,
                                  "torch": torch.__version__, "runs": args.runs, "peers": {}}
    peers: dict[str, dict[str, object]] = {}
    if "smolvla" in args.peers:
        peers.update(_time_smolvla(lr, args))
    if "diffusion" in args.peers:
        peers.update(_time_diffusion(lr, args))
    summary["peers"] = peers
    if args.ours:
        summary["ours"] = ours = _our_chunks(args.ours)
        summary["ratios"] = {f"{peer}_over_{mine}": round(float(p["chunk_ms"]) / ms, 2)  # type: ignore[arg-type]
                             for mine, ms in ours.items() for peer, p in peers.items()}
    return summary


def _report(key: str, figures: dict[str, object]) -> None:
    print(f"{key:<36}{figures['chunk_ms']:>10.1f} ms (p95 {figures['chunk_p95_ms']:.1f})", flush=True)


def _time_smolvla(lr: types.SimpleNamespace, args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """SmolVLA at its step count and at 1 step (the prefix's share), float32 and with its VLM in bfloat16."""
    peers: dict[str, dict[str, object]] = {}
    smolvla = build_smolvla(lr, args.vlm_config, args.device, args.smolvla_layers, args.smolvla_steps,
                            args.smolvla_chunk)
    batch = smolvla_batch(args.device)
    params = round(sum(p.numel() for p in smolvla.parameters()) / 1e6, 1)
    # As built from a config SmolVLA runs in float32; loaded from pretrained weights its VLM is bfloat16 (LeRobot
    # loads it so) while the expert stays float32: both are timed.
    for dtype in ("float32", "vlm_bfloat16"):
        if dtype == "vlm_bfloat16":
            smolvla.model.vlm_with_expert.vlm.to(torch.bfloat16)
        for steps in sorted({args.smolvla_steps, 1}, reverse=True):
            smolvla.model.config.num_steps = steps
            key = f"smolvla_{args.smolvla_layers}layers_{steps}steps" + ("" if dtype == "float32" else f"_{dtype}")
            peers[key] = {**time_chunks(lambda: smolvla.predict_action_chunk(dict(batch)), args.device, args.runs,
                                        args.warmup), "params_m": params, "chunk": args.smolvla_chunk}
            _report(key, peers[key])
    return peers


def _time_diffusion(lr: types.SimpleNamespace, args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """Diffusion Policy with DDPM (its default) and with DDIM."""
    peers: dict[str, dict[str, object]] = {}
    for scheduler, steps in (("DDPM", args.dp_steps), ("DDIM", args.dp_ddim_steps)):
        policy = build_diffusion(lr, args.device, scheduler, steps)
        dp_batch = diffusion_batch(args.device, policy.config.n_obs_steps)
        key = f"diffusion_{scheduler.lower()}_{steps}"
        peers[key] = {**time_chunks(lambda p=policy, b=dp_batch: p.diffusion.generate_actions(dict(b)), args.device,
                                    max(3, args.runs // 4) if steps >= 50 else args.runs, args.warmup),
                      "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 1),
                      "chunk": policy.config.horizon}
        _report(key, peers[key])
    return peers


def _our_chunks(path: str) -> dict[str, float]:
    """Our meanflow-1 chunk per precision (and CUDA-graph variant) from ``meanflow-bench``'s JSON last line."""
    lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line.startswith("{")]
    if not lines:
        print(f"meanflow-bench-peers: {path} holds no meanflow-bench JSON line: no ratios", file=sys.stderr)
        return {}
    bench = json.loads(lines[-1])
    return {f"meanflow_1_{label}": float(fig["chunk_ms"]["meanflow_1"]) for label, fig in bench["precisions"].items()}


def plot(summary: dict[str, Any], path: str) -> None:
    """Chunk latency of ours and of each peer as horizontal bars on a log scale, the machine and commit named."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"ours: {k.replace('meanflow_1_', 'MeanFlow NFE 1, ').replace('+', ' + ')}", float(v), "tab:green")
            for k, v in summary.get("ours", {}).items()]
    bars += [("LeRobot " + k.replace("_", " "), float(v["chunk_ms"]), "tab:grey") for k, v in summary["peers"].items()]
    bars.sort(key=lambda bar: bar[1])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.2))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for i, (_, ms, _) in enumerate(bars):
        ax.text(ms * 1.05, i, f"{ms:.1f} ms", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("chunk latency, ms (log scale; batch 1, 2 cameras at 480x640)")
    ax.set_title(f"{summary['device']}, {summary.get('date_utc', '')[:10]}, commit {summary.get('commit', '?')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--vlm-config", default="", help="directory with the SmolVLM2 config.json SmolVLA is built on "
                   "(required unless --replot)")
    p.add_argument("--smolvla-layers", type=int, default=16, help="VLM layers SmolVLA keeps (LeRobot's default)")
    p.add_argument("--smolvla-steps", type=int, default=10, help="SmolVLA flow-matching steps (LeRobot's default; "
                   "1 step is timed too)")
    p.add_argument("--smolvla-chunk", type=int, default=50, help="SmolVLA chunk size (LeRobot's default)")
    p.add_argument("--dp-steps", type=int, default=100, help="Diffusion Policy DDPM steps (LeRobot's default)")
    p.add_argument("--dp-ddim-steps", type=int, default=10, help="Diffusion Policy DDIM steps")
    p.add_argument("--runs", type=int, default=20, help="timed chunks per model (a quarter for 50+ steps)")
    p.add_argument("--warmup", type=int, default=3, help="untimed chunks first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peers", default="smolvla,diffusion", help="comma list of the peers to time")
    p.add_argument("--ours", default="", help="meanflow-bench output (its last line is read) to compute ratios")
    p.add_argument("--plot", default="", help="also draw the chunk latencies to this PNG")
    p.add_argument("--replot", default="", help="draw --plot from this JSON (a previous run's last line) instead of "
                   "measuring")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch sees no CUDA device")
    if args.replot and not args.plot:
        p.error("--replot needs --plot")
    if not args.replot and not args.vlm_config:
        p.error("--vlm-config is required (or --replot)")
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = set(args.peers) - {"smolvla", "diffusion"}
    if unknown or not args.peers:
        p.error(f"--peers: {sorted(unknown) or 'none'} not in smolvla, diffusion")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot(json.loads(open(args.replot, encoding="utf-8").read().splitlines()[-1]), args.plot)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run(args)
    if args.plot:
        plot(summary, args.plot)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
