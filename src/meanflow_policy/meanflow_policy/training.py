"""The training loop: AdamW, linear warmup + cosine decay, gradient clipping, optional EMA, periodic checkpoints.

``train(policy, batches, cfg, out_dir)`` drives ``policy.compute_loss``; the bag-training CLI supplies batches.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from meanflow_policy.modeling import MeanFlowPolicy

HISTORY_FILE = "history.json"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class TrainConfig:
    """Optimisation settings of one run."""

    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA; checkpoints hold the EMA weights when enabled
    log_every: int = 10
    val_every: int = 0  # 0: validate only at the end (when val_fn is given)
    checkpoint_every: int = 0  # 0: only the final checkpoint
    seed: int = 0
    progress: bool = True
    time_limit_s: float = 0.0  # > 0: stop after this much wall time, finishing as after the last step


    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.time_limit_s < 0:
            raise ValueError(f"time_limit_s must be >= 0, got {self.time_limit_s}")
        if self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("warmup_steps must be >= 0 and grad_clip > 0")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the trainable parameters, swappable into the model for saving/eval."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange model and EMA weights (call twice to restore)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batches_forever(batches: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Cycle a re-iterable (e.g. a DataLoader) epoch after epoch; a one-shot iterator ends the run when spent."""
    while True:
        it = iter(batches)
        got_any = False
        for batch in it:
            got_any = True
            yield batch
        if it is batches or not got_any:
            return


def train(policy: MeanFlowPolicy, batches: Iterable[Mapping[str, Any]], cfg: TrainConfig, out_dir: str | Path,
          val_fn: Callable[[MeanFlowPolicy, int], Mapping[str, float]] | None = None) -> list[dict[str, Any]]:
    """Train in place; write checkpoints under out_dir (final/ and checkpoints/step_N/) and history.json.

    Returns the history: one dict per logged step (step, loss, mse, lr, grad_norm, step_s, ...) and one per
    validation (step, val_* keys from ``val_fn(policy, step)``, evaluated with EMA weights if enabled).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = policy.device
    params = policy.trainable_parameters()
    if not params:
        raise ValueError("the policy has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def run_val(step: int) -> None:
        if val_fn is None:
            return
        if ema:
            ema.swap()
        policy.eval()
        try:
            with torch.no_grad():
                metrics = {f"val_{k}": float(v) for k, v in val_fn(policy, step).items()}
        finally:
            policy.train()
            if ema:
                ema.swap()
        history.append({"step": step, **metrics})

    def save(path: Path) -> None:
        if ema:
            ema.swap()
        try:
            policy.save(path)
        finally:
            if ema:
                ema.swap()

    policy.train()
    bar = tqdm(total=cfg.steps, disable=not cfg.progress, desc="train", dynamic_ncols=True)
    step = 0
    started = time.perf_counter()
    for batch in _batches_forever(batches):
        start = time.perf_counter()
        loss, info = policy.compute_loss(_to_device(batch, device), generator=generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        sched.step()
        if ema:
            ema.update()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, **info, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm,
                     "step_s": time.perf_counter() - start}
            history.append(entry)
            bar.set_postfix(loss=f"{info['loss']:.4f}")
        if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            run_val(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save(out / CHECKPOINTS_DIR / f"step_{step:07d}")
        if step >= cfg.steps:
            break
        if cfg.time_limit_s and time.perf_counter() - started >= cfg.time_limit_s:
            history.append({"step": step, "stopped_by_time_limit_s": cfg.time_limit_s})
            break
    bar.close()
    if step == 0:
        raise ValueError("no batches: the training data is empty")
    run_val(step)
    policy.eval()
    save(out / FINAL_DIR)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
    return history
