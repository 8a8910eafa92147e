"""The training loop: AdamW, warm-up + cosine schedule, gradient clipping, optional EMA, checkpoints that resume.

``Trainer`` holds the whole state of a run (weights, optimizer moments, LR schedule, EMA weights, RNG states, data
position, step, history) and saves it beside each checkpoint as safetensors + JSON (no pickle), so a stopped run
continues exactly where it stopped. ``train(policy, batches, cfg, out_dir)`` is the one-call form; ``make_loader``
gives the resumable data stream (a DataLoader over a map-style dataset with a seeded, positioned sampler).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from meanflow_policy.model.configuration import TrainConfig
from meanflow_policy.model.checkpoint import BACKBONE_PREFIX, LANGUAGE_PREFIX
from meanflow_policy.model.policy import MeanFlowPolicy

LOG = logging.getLogger("meanflow_train")

HISTORY_FILE = "history.json"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_CONFIG_FILE = "train_config.json"
STATE_FILE = "train_state.json"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_FORMAT = "meanflow_policy train state"
STATE_VERSION = 1

ValFn = Callable[[MeanFlowPolicy, int], Mapping[str, float]]
# A training loss other than the policy's own objective: (batch on the device, generator) -> (loss, info with "loss").
LossFn = Callable[[Mapping[str, Any], torch.Generator], tuple[torch.Tensor, dict[str, float]]]
CheckpointFn = Callable[[int, Mapping[str, float]], None]


class TrainStateError(ValueError):
    """A saved training state that cannot be resumed; the message names the file."""


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr_ratio * lr at cfg.steps
    (transformers' schedule: closed form in the step, so a resumed or lengthened run recomputes it exactly)."""
    # warmup_steps is never None here: TrainConfig resolves it on construction
    return get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps,  # type: ignore[arg-type]
                                                       min_lr_rate=cfg.min_lr_ratio)


class EMA:
    """Exponential moving average of the trainable parameters: torch's AveragedModel with get_ema_multi_avg_fn over
    a ParameterList view of them, so a frozen backbone is not copied."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        self.live = nn.ParameterList(params)
        self.averaged = AveragedModel(self.live, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def update(self) -> None:
        self.averaged.update_parameters(self.live)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange model and EMA weights (call twice to restore)."""
        for s, p in zip(self.averaged.module.parameters(), self.live.parameters()):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


class SeededBatchSampler(Sampler[list[int]]):
    """Endless shuffled batches of row indices. Epoch e is the permutation drawn from (seed, e) and every epoch
    ends with its partial batch, so the stream is a function of (seed, position) alone: starting at ``position``
    (batches already consumed) continues a run exactly, whatever was prefetched before it stopped. ``rows`` (default
    0..n-1) is what an epoch permutes; a row listed k times is drawn k times per epoch. A partial batch of one row
    joins the batch before it: the policy's feature normalisation trains on batch statistics, which one sample
    does not have."""

    def __init__(self, n: int, batch_size: int, seed: int, position: int = 0,
                 rows: np.ndarray | None = None) -> None:
        if n < 1 or batch_size < 1 or position < 0:
            raise ValueError(f"need n >= 1, batch_size >= 1, position >= 0; got {n}, {batch_size}, {position}")
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.size < 1 or self.rows.min() < 0 or self.rows.max() >= n:
            raise ValueError(f"rows must be a non-empty list of indices in [0, {n})")
        self.batch_size, self.seed, self.position = batch_size, seed, position
        self.per_epoch = max(1, math.ceil(self.rows.size / batch_size) - (self.rows.size % batch_size == 1))

    def __iter__(self) -> Iterator[list[int]]:
        position = self.position
        epoch, order = -1, np.empty(0, dtype=np.int64)
        while True:
            e, k = divmod(position, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.rows[np.random.default_rng([self.seed, e]).permutation(self.rows.size)]
            end = order.size if k == self.per_epoch - 1 else (k + 1) * self.batch_size
            yield order[k * self.batch_size:end].tolist()
            position += 1


class BatchSource(Protocol):
    """What make_loader needs: a sample count and a vectorised batch gather (dataset.SampleSet and the
    prefix-feature set of feature_cache both are)."""

    def __len__(self) -> int: ...

    def batch(self, rows: Sequence[int]) -> dict: ...


class BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches: index = a list of rows, gathered in one vectorised call."""

    def __init__(self, samples: BatchSource) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, rows: list[int]) -> dict:
        return self.samples.batch(rows)


def _as_is(batch: Any) -> Any:
    return batch


def make_loader(samples: BatchSource, batch_size: int, seed: int, position: int = 0,
                rows: np.ndarray | None = None) -> DataLoader:
    """Endless shuffled training batches starting after ``position`` consumed batches (the Trainer's
    ``data_position``); single process, its own RNG (the global torch RNG is not touched). ``rows``: see
    SeededBatchSampler (repeated rows are drawn more often)."""
    sampler = SeededBatchSampler(len(samples), batch_size, seed, position, rows)
    return DataLoader(BatchDataset(samples), sampler=sampler,
                      batch_size=None, collate_fn=_as_is, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def swap_in(new: Path, dst: Path) -> None:
    """Replace directory ``dst`` by ``new``; a crash leaves either the old or the new one under its name."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path``: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_state_meta(folder: Path) -> dict[str, Any]:
    """train_state.json of a checkpoint; TrainStateError naming the file when it is missing, empty or corrupt."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise TrainStateError(f"{path} is missing: this checkpoint has no training state to resume (written by an "
                              "older meanflow-train?); start a new run from its weights with --init-from")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainStateError(f"{path} is empty or corrupt ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise TrainStateError(f"{path} is not a version-{STATE_VERSION} meanflow training state")
    for key in ("step", "data_position", "param_groups", "scheduler", "numpy_rng", "train_config", "history"):
        if key not in meta:
            raise TrainStateError(f"{path} lacks {key!r}: the training state is corrupt")
    return meta


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batches_forever(batches: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Cycle a re-iterable (e.g. a list) epoch after epoch; a one-shot iterator ends the run when spent."""
    while True:
        it = iter(batches)
        got_any = False
        for batch in it:
            got_any = True
            yield batch
        if it is batches or not got_any:
            return


class Trainer:
    """One training run's complete state and loop (see module docstring)."""

    def __init__(self, policy: MeanFlowPolicy, cfg: TrainConfig, out_dir: str | Path,
                 run_info: Mapping[str, Any] | None = None, loss_fn: LossFn | None = None) -> None:
        self.policy, self.cfg, self.out = policy, cfg, Path(out_dir)
        # What each step minimises: the policy's objective unless given (language distillation: train/distill.py).
        self.loss_fn: LossFn = loss_fn or (lambda batch, generator: policy.compute_loss(
            batch, generator=generator, instruction_contrast=cfg.instruction_contrast))
        self.run_info = dict(run_info or {})  # saved in train_config.json beside the training config
        self.params = policy.trainable_parameters()
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.sched = make_scheduler(self.opt, cfg)
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # The start weights that cfg.anchor_decay pulls back to (a resumed run restores them from its state).
        self.anchor = [p.detach().clone() for p in self.params] if cfg.anchor_decay > 0 else None
        self.generator = torch.Generator(device=policy.device).manual_seed(cfg.seed)
        self.step = 0
        self.data_position = 0  # batches consumed: where make_loader must start to continue the data order
        self.history: list[dict[str, Any]] = []
        # Set (e.g. by a signal handler) to end fit() after the current step, through the usual final validation
        # and checkpoint: an interrupted run keeps every finished step and resumes exactly.
        self.stop_requested = threading.Event()

    def autocast(self) -> torch.autocast:
        """The step's forward pass in cfg.mixed_precision (float32: autocast off); the backward follows it."""
        bf16 = self.cfg.mixed_precision == "bfloat16"
        return torch.autocast(self.policy.device.type, dtype=torch.bfloat16, enabled=bf16)

    # ---- weights ----------------------------------------------------------------------------------------------
    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the policy for the block (validation, saving); the raw ones back afterwards."""
        if self.ema:
            self.ema.swap()
        try:
            yield
        finally:
            if self.ema:
                self.ema.swap()

    def _model_keys(self) -> list[str]:
        """State-dict entries training can change: everything but a frozen backbone (and language model)."""
        trained_backbone = self.policy.config.train_backbone
        return [k for k in self.policy.state_dict() if (trained_backbone or not k.startswith(BACKBONE_PREFIX))
                and not k.startswith(LANGUAGE_PREFIX)]

    @torch.no_grad()
    def _anchor_distance(self) -> dict[str, float]:
        """Mean absolute distance of the trainable weights from the start weights (logged when anchored)."""
        if not self.anchor:
            return {}
        total = sum(float((p - a).abs().sum()) for p, a in zip(self.params, self.anchor))
        return {"anchor_dist": total / sum(a.numel() for a in self.anchor)}

    # ---- state ------------------------------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                 "numpy": np.random.get_state()}
        if self.policy.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.policy.device)
        return state

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["generator"])
        np.random.set_state(state["numpy"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.policy.device)

    def save_state(self, folder: Path) -> None:
        """train_state.safetensors (raw weights, optimizer moments, EMA weights, RNG states) + train_state.json."""
        folder.mkdir(parents=True, exist_ok=True)
        model_state = self.policy.state_dict()
        tensors = {f"model.{k}": model_state[k] for k in self._model_keys()}
        opt_state = self.opt.state_dict()
        for idx, per_param in opt_state["state"].items():
            for name, value in per_param.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        if self.ema:
            tensors.update({f"ema.{k}": v for k, v in self.ema.averaged.state_dict().items()})
        if self.anchor:
            tensors.update({f"anchor.{i}": a for i, a in enumerate(self.anchor)})
        rng = self._rng_state()
        _, keys, pos, has_gauss, cached_gaussian = rng["numpy"]
        tensors["rng.torch"], tensors["rng.generator"] = rng["torch"], rng["generator"]
        tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        if "cuda" in rng:
            tensors["rng.cuda"] = rng["cuda"]
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  str(folder / STATE_TENSORS_FILE), metadata={"format": STATE_FORMAT})
        scheduler = {k: v for k, v in self.sched.state_dict().items() if k != "lr_lambdas"}
        meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step,
                "data_position": self.data_position, "param_groups": opt_state["param_groups"],
                "scheduler": scheduler, "numpy_rng": {"pos": int(pos), "has_gauss": int(has_gauss),
                                                      "cached_gaussian": float(cached_gaussian)},
                "train_config": self.cfg.to_dict(), "history": self.history}
        (folder / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def load_state(self, folder: Path) -> None:
        """Restore everything save_state wrote; TrainStateError naming the file when it is missing or corrupt."""
        meta = read_state_meta(folder)
        tensor_file = folder / STATE_TENSORS_FILE
        if not tensor_file.is_file():
            raise TrainStateError(f"{tensor_file} is missing: the training state is incomplete")
        try:
            tensors = load_file(str(tensor_file))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for any malformed file
            raise TrainStateError(f"{tensor_file} is corrupt ({exc})") from exc
        try:
            self._apply_state(meta, tensors)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise TrainStateError(f"{folder}: the training state does not fit this run ({exc!s})") from exc

    def _apply_state(self, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        model_state = self.policy.state_dict()
        restored = {}
        for key in self._model_keys():
            stored = tensors[f"model.{key}"]
            if stored.shape != model_state[key].shape:
                raise ValueError(f"model tensor {key} has shape {tuple(stored.shape)}, this model "
                                 f"{tuple(model_state[key].shape)}")
            restored[key] = stored
        self.policy.load_state_dict(restored, strict=False)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, idx, field = name.split(".", 2)
                state.setdefault(int(idx), {})[field] = value
        groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(self.sched.lr_lambdas)})
        # The learning rate of the next step from this run's schedule (the same value when --steps is unchanged;
        # a lengthened run continues on the stretched cosine).
        for group, base, fn in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            group["lr"] = base * fn(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        if self.ema:
            ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
            if not ema:
                raise ValueError("the run uses an EMA but the saved state has no EMA weights")
            self.ema.averaged.load_state_dict(ema)
        if self.anchor:
            anchor = [tensors.get(f"anchor.{i}") for i in range(len(self.anchor))]
            if any(a is None for a in anchor):
                raise ValueError("the run uses anchor_decay but the saved state has no start weights to pull to")
            for mine, saved in zip(self.anchor, anchor):
                mine.copy_(saved)  # type: ignore[arg-type]
        np_rng = meta["numpy_rng"]
        rng = {"torch": tensors["rng.torch"], "generator": tensors["rng.generator"],
               "numpy": ("MT19937", tensors["rng.numpy_keys"].numpy().astype(np.uint32), int(np_rng["pos"]),
                         int(np_rng["has_gauss"]), float(np_rng["cached_gaussian"]))}
        if "rng.cuda" in tensors and self.policy.device.type == "cuda":
            rng["cuda"] = tensors["rng.cuda"]
        self._set_rng_state(rng)
        self.step, self.data_position = int(meta["step"]), int(meta["data_position"])
        self.history = list(meta["history"])

    def save_checkpoint(self, path: Path) -> Path:
        """Policy (EMA weights when enabled) + training state + train_config.json, written beside ``path`` and
        swapped in, so a crash leaves the previous or the new checkpoint, never a mix."""
        tmp = path.with_name(path.name + ".saving")
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_state(tmp)
        with self.ema_weights():
            self.policy.save(tmp)
        (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps({"train": self.cfg.to_dict(), **self.run_info},
                                                        indent=2, default=str) + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        swap_in(tmp, path)
        return path

    # ---- loop -------------------------------------------------------------------------------------------------
    def validate(self, val_fn: ValFn | None, checkpoint_fn: CheckpointFn | None = None) -> dict[str, float]:
        """``val_fn(policy, step)`` with the EMA weights in eval mode, then ``checkpoint_fn(step, metrics)``.
        RNG-neutral: the random states are put back afterwards, so validating never changes the training."""
        rng = self._rng_state()
        was_training = self.policy.training
        metrics: dict[str, float] = {}
        if val_fn is not None:
            with self.ema_weights():
                self.policy.eval()
                try:
                    with torch.no_grad():
                        metrics = {f"val_{k}": float(v) for k, v in val_fn(self.policy, self.step).items()}
                finally:
                    self.policy.train(was_training)
            if metrics:
                self.history.append({"step": self.step, **metrics})
        self._set_rng_state(rng)
        if checkpoint_fn is not None:
            checkpoint_fn(self.step, metrics)
        return metrics

    def fit(self, batches: Iterable[Mapping[str, Any]], val_fn: ValFn | None = None,
            checkpoint_fn: CheckpointFn | None = None) -> list[dict[str, Any]]:
        """Train from ``self.step`` to cfg.steps, or until cfg.stop_after steps / cfg.time_limit_s have passed in
        this call or ``stop_requested`` is set; validate every cfg.val_every steps and at the end. ``batches`` must
        start at ``self.data_position`` (make_loader) for a resumed run to see the same data as an uninterrupted
        one."""
        cfg, policy, device = self.cfg, self.policy, self.policy.device
        first = self.step
        policy.train()
        bar = tqdm(total=cfg.steps, initial=first, disable=not cfg.progress, desc="train", dynamic_ncols=True)
        started = time.perf_counter()
        for batch in _batches_forever(batches):
            if self.step >= cfg.steps:
                break
            start = time.perf_counter()
            with self.autocast():
                loss, info = self.loss_fn(_to_device(batch, device), self.generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
            lr = self.opt.param_groups[0]["lr"]
            self.opt.step()
            if self.anchor:
                with torch.no_grad():
                    for param, origin in zip(self.params, self.anchor):
                        param.lerp_(origin, lr * cfg.anchor_decay)
            self.sched.step()
            if self.ema:
                self.ema.update()
            self.step += 1
            self.data_position += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.history.append({"step": self.step, **info, "lr": lr, "grad_norm": grad_norm,
                                     "step_s": time.perf_counter() - start, **self._anchor_distance()})
                bar.set_postfix(loss=f"{info['loss']:.4f}")
                if not cfg.progress:  # a log file (background run) still shows that training moves
                    drift = self.history[-1].get("anchor_dist")
                    LOG.info("step %d/%d: loss %.4f, lr %.2e, %.2f s/step%s", self.step, cfg.steps, info["loss"], lr,
                             self.history[-1]["step_s"], "" if drift is None else f", {drift:.2e} from start")
            if self.step >= cfg.steps:
                break
            if cfg.stop_after and self.step - first >= cfg.stop_after:
                self.history.append({"step": self.step, "stopped_after_steps": cfg.stop_after})
                break
            if cfg.time_limit_s and time.perf_counter() - started >= cfg.time_limit_s:
                self.history.append({"step": self.step, "stopped_by_time_limit_s": cfg.time_limit_s})
                break
            if self.stop_requested.is_set():
                self.history.append({"step": self.step, "stopped_by_request": True})
                break
            if cfg.val_every and self.step % cfg.val_every == 0:
                self.validate(val_fn, checkpoint_fn)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(self.out / CHECKPOINTS_DIR / f"step_{self.step:07d}")
        bar.close()
        if self.step == first and first < cfg.steps:
            raise ValueError("no batches: the training data is empty")
        self.validate(val_fn, checkpoint_fn)
        policy.eval()
        return self.history


def train(policy: MeanFlowPolicy, batches: Iterable[Mapping[str, Any]], cfg: TrainConfig, out_dir: str | Path,
          val_fn: ValFn | None = None) -> list[dict[str, Any]]:
    """Train in place; write checkpoints under out_dir (final/ and checkpoints/step_N/) and history.json.

    Returns the history: one dict per logged step (step, loss, mse, lr, grad_norm, step_s, ...) and one per
    validation (step, val_* keys from ``val_fn(policy, step)``, evaluated with EMA weights if enabled).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(policy, cfg, out)
    history = trainer.fit(batches, val_fn=val_fn)
    trainer.save_checkpoint(out / FINAL_DIR)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
    return history
