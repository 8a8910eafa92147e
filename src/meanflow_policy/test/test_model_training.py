"""The training loop: it learns, schedules the LR, clips, keeps an EMA, validates and checkpoints."""
import json

import pytest
import torch

from meanflow_policy.model.configuration import MeanFlowConfig
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.testing import random_batch, torch_threads
from meanflow_policy.train.trainer import TrainConfig, make_scheduler, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1, lr=2.0, progress=False)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"] / cfg.lr)
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1)
    assert all(lrs[s] >= lrs[s + 1] for s in range(10, 110))
    # one place holds the defaults: warm-up is 5 % of the steps, at most 200
    assert TrainConfig(steps=1000).warmup_steps == 50 and TrainConfig(steps=10_000).warmup_steps == 200


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="time_limit_s"):
        TrainConfig(time_limit_s=-1)
    with pytest.raises(ValueError, match="idle_start_rad"):
        TrainConfig(idle_start_rad=-0.1)
    with pytest.raises(ValueError, match="instruction_contrast must be >= 0, and > 0 only with instruction_variety"):
        TrainConfig(instruction_contrast=0.1)


def test_a_run_saved_before_idle_starts_were_left_out_resumes_on_every_sample():
    saved = TrainConfig(steps=10).to_dict()
    assert TrainConfig.from_dict(saved).idle_start_rad == TrainConfig().idle_start_rad > 0
    del saved["idle_start_rad"]
    assert TrainConfig.from_dict(saved).idle_start_rad == 0.0


def test_time_limit_stops_early_and_still_saves(tmp_path):
    config = MeanFlowConfig.tiny(num_vlm_layers=1, expert_width=32, expert_depth=1, expert_heads=2)
    policy = MeanFlowPolicy(config)
    batch = random_batch(config, 2, seed=0)
    history = train(policy, [batch], TrainConfig(steps=10_000, time_limit_s=1e-9, progress=False), tmp_path)
    assert history[-1] == {"step": 1, "stopped_by_time_limit_s": 1e-9}
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_shift_augmentation_applies_in_training_only():
    config = MeanFlowConfig.tiny(num_vlm_layers=1, expert_width=32, expert_depth=1, expert_heads=2,
                                 image_shift_px=4)
    policy = MeanFlowPolicy(config).eval()
    batch = random_batch(config, 4, seed=1)
    seen: list[torch.Tensor] = []
    policy.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))

    def backbone_input(seed: int) -> torch.Tensor:
        with torch.no_grad():
            policy.compute_loss(batch, generator=torch.Generator().manual_seed(seed))
        return seen[-1]

    assert torch.equal(backbone_input(0), batch["images"])  # eval: images untouched
    policy.train()
    a, b = backbone_input(0), backbone_input(1)
    assert not torch.equal(a, batch["images"]) and not torch.equal(a, b)
    assert torch.equal(a, backbone_input(0))  # same generator seed, same shifts


def test_train_learns_a_fixed_batch_and_writes_checkpoints(tmp_path):
    torch.manual_seed(0)
    config = MeanFlowConfig.tiny(num_vlm_layers=2, expert_width=64, expert_depth=2)
    policy = MeanFlowPolicy(config)
    batch = random_batch(config, 8, seed=0)
    frozen_before = {k: v.clone() for k, v in policy.backbone.state_dict().items()}
    val_calls = []

    def val_fn(p, step):
        val_calls.append((step, p.training))
        loss, _ = p.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        return {"loss": float(loss)}

    with torch.no_grad():
        initial = val_fn(policy, 0)["loss"]
    val_calls.clear()

    cfg = TrainConfig(steps=40, lr=3e-3, warmup_steps=5, log_every=5, val_every=20, checkpoint_every=20,
                      ema_decay=0.9, progress=False)
    history = train(policy, [batch], cfg, tmp_path, val_fn=val_fn)
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8
    assert history[-1]["val_loss"] < 0.5 * initial
    assert all(h["grad_norm"] >= 0 and h["lr"] > 0 for h in history if "loss" in h)
    assert [c[0] for c in val_calls] == [20, 40] and not any(c[1] for c in val_calls)
    assert [h["step"] for h in history if "val_loss" in h] == [20, 40]
    for k, v in policy.backbone.state_dict().items():
        assert torch.equal(v, frozen_before[k]), f"frozen backbone changed: {k}"
    assert (tmp_path / "checkpoints" / "step_0000020" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "history.json").read_text()) == history
    final = MeanFlowPolicy.load(tmp_path / "final")
    # the final checkpoint holds the EMA weights, which differ from the raw weights left in the policy
    assert not torch.equal(final.expert.out.weight, policy.expert.out.weight)
    assert not policy.training
    # the image-feature normalisation learned running statistics, and the checkpoint carries them
    assert policy.image_norm.num_batches_tracked.item() == 40 and policy.image_norm.running_mean.abs().sum() > 0
    assert torch.equal(final.image_norm.running_mean, policy.image_norm.running_mean)


def test_train_with_trainable_backbone_updates_it(tmp_path):
    config = MeanFlowConfig.tiny(num_vlm_layers=1, expert_width=32, expert_depth=1, train_backbone=True)
    policy = MeanFlowPolicy(config)
    before = policy.backbone.vlm.connector.modality_projection.proj.weight.clone()
    history = train(policy, iter([random_batch(config, 2)] * 3), TrainConfig(steps=10, log_every=1, progress=False),
                    tmp_path)
    assert [h["step"] for h in history] == [1, 2, 3]  # a one-shot iterator ends the run when spent
    assert not torch.equal(before, policy.backbone.vlm.connector.modality_projection.proj.weight)
    with pytest.raises(ValueError, match="empty"):
        train(policy, [], TrainConfig(steps=2, progress=False), tmp_path / "empty")


def test_anchor_decay_keeps_a_fine_tune_near_its_start_weights(tmp_path):
    """--anchor-decay pulls trainable weights back to the start: at lr x decay = 1 every step ends on the start
    weights; at 0.2 a run drifts less than the same run without it, and still learns (the loss falls)."""
    config = MeanFlowConfig.tiny(num_vlm_layers=1, expert_width=32, expert_depth=1, expert_heads=2)
    batch = random_batch(config, 8, seed=0)

    def run(decay: float, name: str) -> tuple[float, list[dict]]:
        torch.manual_seed(0)
        policy = MeanFlowPolicy(config)
        start = [p.detach().clone() for p in policy.trainable_parameters()]
        cfg = TrainConfig(steps=30, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, log_every=1, anchor_decay=decay,
                          progress=False)
        history = train(policy, [batch], cfg, tmp_path / name)
        drift = sum(float((p.detach() - s).abs().sum()) for p, s in zip(policy.trainable_parameters(), start))
        return drift / sum(s.numel() for s in start), history

    free, free_history = run(0.0, "free")
    anchored, history = run(20.0, "anchored")
    snapped, _ = run(100.0, "snapped")
    assert snapped < 1e-7 < anchored < 0.5 * free
    assert history[-1]["anchor_dist"] == pytest.approx(anchored, rel=1e-4) and "anchor_dist" not in free_history[-1]
    assert history[-1]["loss"] < history[0]["loss"]
    with pytest.raises(ValueError, match="anchor_decay"):
        TrainConfig(lr=1e-2, anchor_decay=101.0)
    with pytest.raises(ValueError, match="anchor_decay"):
        TrainConfig(anchor_decay=-1.0)
