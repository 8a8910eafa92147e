"""meanflow-train and meanflow-eval-bag end to end on real bags with the tiny preset (CPU)."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow_policy.tools import eval_bag as eval_bag_cli, train as train_cli
from meanflow_policy.data.bag_reader import BagError
from meanflow_policy.model.configuration import MeanFlowConfig, TrainConfig
from meanflow_policy.data.cache import load_episodes
from meanflow_policy.data.samples import SampleSet, idle_horizon, idle_start, idle_steps
from meanflow_policy.data.sync import SyncConfig
from meanflow_policy.data.demo_bags import synthetic_episode, write_bag
from meanflow_policy.data.prefetch import Prefetcher
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.train.trainer import SeededBatchSampler



@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demos")
    for i in range(3):
        write_bag(root / f"episode_{i}", synthetic_episode(seed=i, duration_s=1.5, height=48, width=64),
                  instruction="reach the yellow square")
    return root


@pytest.fixture(scope="module")
def trained(bags: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = train_cli.main(["--bags", str(bags), "--out", str(out), "--preset", "tiny", "--steps", "40",
                           "--batch-size", "8", "--lr", "1e-3", "--val-every", "20", "--val-batches", "1",
                           "--val-fraction", "0.34", "--log-every", "1", "--cache-dir", str(out / "cache"),
                           "--device", "cpu", "--cpu-threads", "1", "--no-progress"])
    assert code == 0
    return out


def _fixed_draw_loss(policy: MeanFlowPolicy, batches: list[dict]) -> float:
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(np.mean([float(policy.compute_loss(b, generator=generator)[0]) for b in batches]))


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(trained: Path, bags: Path) -> None:
    for name in ("best", "last"):
        assert (trained / name / "model.safetensors").is_file()
    for name in ("log.json", "log.csv", "loss.png", "dataset.json", "progress.json"):
        assert (trained / name).is_file(), name
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((trained / "log.json").read_text())
    train_rows = [r for r in log if "loss" in r]
    val_rows = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    assert [r["step"] for r in val_rows] == [0, 20, 40]
    assert all(np.isfinite(r["val_action_mae_rad"]) and r["val_action_mae_rad"] > 0 for r in val_rows)
    with open(trained / "log.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(log)

    dataset = json.loads((trained / "dataset.json").read_text())
    assert len(dataset["train_episodes"]) == 2 and len(dataset["val_episodes"]) == 1
    policy = MeanFlowPolicy.load(trained / "last")
    np.testing.assert_allclose(policy.get_stats()["action"]["mean"], dataset["stats"]["action"]["mean"], rtol=1e-6)

    # the loss on fixed training batches with fixed noise and times fell from the initial weights
    sync = SyncConfig.from_policy_config(policy.config)
    train_names = {e["name"] for e in dataset["train_episodes"]}
    episodes, _ = load_episodes([bags / n for n in sorted(train_names)], sync, trained / "cache")
    samples = SampleSet(episodes, sync)
    batches = [samples.batch(np.arange(i, len(samples), 20)[:8]) for i in range(3)]
    torch.manual_seed(0)
    initial = MeanFlowPolicy(MeanFlowConfig.tiny(objective="meanflow", backbone_seed=0))
    initial.set_stats(dataset["stats"])
    before, after = _fixed_draw_loss(initial, batches), _fixed_draw_loss(policy, batches)
    assert after < before - 0.02, f"loss on training batches {before:.4f} -> {after:.4f}"

    chunk = policy.sample(samples.observation(0), nfe=1)
    assert chunk.shape == (20, 6) and np.all(np.isfinite(chunk))


def test_init_from_fine_tunes_a_checkpoint_in_a_new_run(trained: Path, bags: Path, tmp_path: Path) -> None:
    out = tmp_path / "finetuned"
    # --chunk-size differs from the checkpoint's: the checkpoint's config wins. --objective switches the objective
    # on the same weights (a flow-matching baseline started from a meanflow checkpoint).
    code = train_cli.main(["--bags", str(bags), "--out", str(out), "--init-from", str(trained / "last"),
                           "--objective", "flow_matching", "--chunk-size", "8", "--steps", "4", "--batch-size", "4",
                           "--val-every", "4", "--val-batches", "1", "--val-fraction", "0.34", "--log-every", "1",
                           "--cache-dir", str(trained / "cache"), "--device", "cpu", "--cpu-threads", "1",
                           "--no-progress"])
    assert code == 0
    log = json.loads((out / "log.json").read_text())
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    source, tuned = MeanFlowPolicy.load(trained / "last"), MeanFlowPolicy.load(out / "last")
    assert source.config.objective == "meanflow" and source.config.default_nfe == 1
    assert tuned.config.objective == "flow_matching" and tuned.config.default_nfe == 10
    assert tuned.objective.name == "flow_matching"
    unchanged = {k: v for k, v in source.config.to_dict().items() if k not in ("objective", "default_nfe")}
    assert {k: tuned.config.to_dict()[k] for k in unchanged} == unchanged
    assert tuned.get_stats() == source.get_stats()
    # Step 0 validates the loaded weights: the same one-step error the source run measured at its end.
    start = next(r for r in log if r["step"] == 0)
    assert np.isfinite(start["val_action_mae_rad"])
    changed = [k for k, v in tuned.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, source.state_dict()[k])]
    assert changed, "four optimizer steps left every weight unchanged"
    assert train_cli.main(["--bags", str(bags), "--out", str(out), "--init-from", str(trained / "last"),
                           "--resume", "--steps", "8", "--cache-dir", str(trained / "cache")]) == 2
    # --instruction-film adds the FiLM path to a checkpoint without it; the fine-tune trains it.
    assert train_cli.main(["--bags", str(bags), "--out", str(tmp_path / "film"), "--init-from", str(trained / "last"),
                           "--instruction-film", "--steps", "2", "--batch-size", "4", "--val-fraction", "0.34",
                           "--cache-dir", str(trained / "cache"), "--device", "cpu", "--no-progress"]) == 0
    film = MeanFlowPolicy.load(tmp_path / "film" / "last")
    assert film.config.instruction_film and not source.config.instruction_film
    assert film.instruction_film is not None and film.instruction_film.image.weight.abs().sum() > 0
    # --action-prefix-rows likewise adds the committed-rows input; the fine-tune trains it.
    assert train_cli.main(["--bags", str(bags), "--out", str(tmp_path / "prefix"), "--init-from",
                           str(trained / "last"), "--action-prefix-rows", "6", "--steps", "2", "--batch-size", "4",
                           "--val-fraction", "0.34", "--cache-dir", str(trained / "cache"), "--device", "cpu",
                           "--no-progress"]) == 0
    prefix = MeanFlowPolicy.load(tmp_path / "prefix" / "last")
    assert prefix.config.action_prefix_rows == 6 and not source.config.action_prefix_rows
    assert prefix.expert.known_in is not None and prefix.expert.known_in.weight.abs().sum() > 0
    # ddpm predicts the noise, not a velocity: a meanflow checkpoint is no start for it.
    assert train_cli.main(["--bags", str(bags), "--out", str(tmp_path / "ddpm"), "--init-from", str(trained / "last"),
                           "--objective", "ddpm", "--steps", "2", "--cache-dir", str(trained / "cache"),
                           "--device", "cpu", "--no-progress"]) == 2

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "sim_pick_place"


def test_backbone_from_trains_a_new_expert_on_a_checkpoints_backbone(trained: Path, bags: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The ablations' start: the shipped checkpoint's frozen backbone, a fresh expert of another shape and objective
    settings, the stats of the new data; the backbone is unchanged after training on its cached features."""
    out = tmp_path / "on_shipped"
    code = train_cli.main(["--bags", str(bags), "--out", str(out), "--backbone-from", str(SHIPPED),
                           "--freeze-backbone", "--chunk-size", "8", "--flow-ratio", "0.5", "--adaptive-gamma", "1.0",
                           "--tiny-patch-size", "4", "--steps", "3", "--batch-size", "4", "--val-every", "3",
                           "--val-batches", "1", "--val-fraction", "0.34", "--cache-dir", str(trained / "cache"),
                           "--device", "cpu", "--cpu-threads", "1", "--no-progress"])
    assert code == 0
    source, policy = MeanFlowPolicy.load(SHIPPED), MeanFlowPolicy.load(out / "last")
    config, shipped = policy.config, source.config
    assert (config.chunk_size, config.flow_ratio, config.adaptive_gamma) == (8, 0.5, 1.0)
    assert not config.train_backbone and shipped.train_backbone
    for field in train_cli.BACKBONE_FIELDS:  # the checkpoint's backbone settings win (--tiny-patch-size 4 ignored)
        assert getattr(config, field) == getattr(shipped, field), field
    weights, shipped_weights = policy.state_dict(), source.state_dict()
    backbone = [k for k in weights if k.startswith("backbone.")]
    assert backbone and all(torch.equal(weights[k], shipped_weights[k]) for k in backbone)
    assert weights["expert.pos"].shape[1] == 8 != shipped_weights["expert.pos"].shape[1]
    assert policy.backbone.tokenizer.backend_tokenizer.to_str() == source.backbone.tokenizer.backend_tokenizer.to_str()
    dataset = json.loads((out / "dataset.json").read_text())
    assert policy.get_stats()["action"]["mean"] == pytest.approx(dataset["stats"]["action"]["mean"], rel=1e-6)
    assert json.loads((out / "last" / "train_config.json").read_text())["prefix_feature_cache"] is True
    for start in (["--resume"], ["--init-from", str(trained / "last")]):
        assert train_cli.main(["--bags", str(bags), "--out", str(tmp_path / "x"), "--backbone-from", str(SHIPPED),
                               *start, "--cache-dir", str(trained / "cache")]) == 2
    # An image size the start cannot take is one clear error, never silently ignored.
    for start in (["--backbone-from", str(SHIPPED)], ["--resume"]):
        out = tmp_path / "size" if start[0] != "--resume" else trained
        assert train_cli.main(["--bags", str(bags), "--out", str(out), *start, "--image-size", "128",
                               "--steps", "3", "--cache-dir", str(trained / "cache"), "--no-progress"]) == 2
    assert "--image-size 128 with --backbone-from" in caplog.text and "--image-size 128 with --resume" in caplog.text


def test_eval_bag_nfe_sweep(trained: Path, bags: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    code = eval_bag_cli.main(["--checkpoint", str(trained / "last"), "--bags", str(bags / "episode_0"),
                              "--out", str(out), "--nfe", "1", "3", "--stride", "2", "--timing-samples", "2",
                              "--cache-dir", str(trained / "cache"), "--device", "cpu", "--cpu-threads", "1"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result["nfe"]) == {"1", "3"} and result["episodes"] == ["episode_0"]
    policy = MeanFlowPolicy.load(trained / "last")
    sync = SyncConfig.from_policy_config(policy.config)
    episodes, _ = load_episodes([bags / "episode_0"], sync, trained / "cache")
    samples = SampleSet(episodes, sync)
    rows = np.arange(0, len(samples), 2)
    assert result["steps"] == len(rows)
    for run in result["nfe"].values():
        per_step = np.array(run["per_step_mae_rad"])
        assert per_step.shape == (len(rows),) and np.all(per_step > 0)
        assert run["mae_rad"] == pytest.approx(per_step.mean(), rel=0.1)
        assert run["timing"]["median_total_ms"] > 0
        assert list(run["per_joint_mae_rad"]) == list(sync.joint_names)
    # recompute NFE 1 independently: same seed, same batches -> the same error
    generator = torch.Generator().manual_seed(0)
    batch = samples.batch(rows[:32])
    pred = policy.sample_batch(batch, nfe=1, generator=generator).numpy()
    err = np.abs(pred - batch["actions"].numpy()).mean(axis=2)
    valid = ~batch["action_is_pad"].numpy()
    expected = (err * valid).sum(axis=1) / valid.sum(axis=1)
    np.testing.assert_allclose(result["nfe"]["1"]["per_step_mae_rad"][:len(expected)], expected, atol=1e-5)


def test_eval_bag_checks_whether_the_instruction_is_read(trained: Path, bags: Path, tmp_path: Path) -> None:
    """--first-seconds keeps each episode's start; --other-instruction replays it with another sentence and the
    same noise: the report is that replay's error, its ratio to the recorded one and how far the chunks moved."""
    out = tmp_path / "check"
    other = "push the blue block left"
    code = eval_bag_cli.main(["--checkpoint", str(trained / "last"), "--bags", str(bags / "episode_0"),
                              "--out", str(out), "--nfe", "1", "--first-seconds", "0.5", "--timing-samples", "1",
                              "--other-instruction", other, "--cache-dir", str(trained / "cache"), "--device",
                              "cpu", "--cpu-threads", "1"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    policy = MeanFlowPolicy.load(trained / "last")
    sync = SyncConfig.from_policy_config(policy.config)
    samples = SampleSet(load_episodes([bags / "episode_0"], sync, trained / "cache")[0], sync)
    rows = np.flatnonzero(samples.sample_step < 15)  # 0.5 s at 30 Hz
    assert result["steps"] == len(rows) > 0 and max(result["nfe"]["1"]["step_time_s"]) < 0.5
    check = result["instruction_check"]
    batch = dict(samples.batch(rows[:32]), instruction=[other] * min(32, len(rows)))
    pred = policy.sample_batch(batch, nfe=1, generator=torch.Generator().manual_seed(0)).numpy()
    valid = ~batch["action_is_pad"].numpy()
    assert len(rows) <= 32  # one batch: the error with the other instruction is recomputed here
    expected = (np.abs(pred - batch["actions"].numpy()).mean(axis=2) * valid).sum() / valid.sum()
    assert check["mae_rad_other"] == pytest.approx(expected, rel=1e-4)
    assert check["other_instruction"] == other and check["chunk_change_rad"] > 0
    assert check["ratio"] == pytest.approx(check["mae_rad_other"] / check["mae_rad_recorded"])
    assert eval_bag_cli.main(["--checkpoint", str(trained / "last"), "--bags", str(bags / "episode_0"), "--out",
                              str(tmp_path / "none"), "--first-seconds", "0.001", "--cache-dir",
                              str(trained / "cache")]) == 2


def test_cli_bad_input(tmp_path: Path, bags: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = train_cli.main(["--bags", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--steps", "1",
                           "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_cli.main(["--bags", str(empty), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]) == 2
    assert train_cli.main(["--bags", str(bags), "--out", str(tmp_path / "o"), "--preset", "tiny", "--backbone",
                           "/some/dir", "--cache-dir", str(tmp_path)]) == 2
    assert eval_bag_cli.main(["--checkpoint", str(tmp_path / "nockpt"), "--bags", str(bags), "--out",
                              str(tmp_path / "e")]) == 2
    with pytest.raises(SystemExit):
        train_cli.main(["--out", str(tmp_path)])  # --bags is required
    assert train_cli.main(["--bags", str(bags), "--out", str(tmp_path / "o"), "--instruction-variety",
                           "--instruction-contrast", "0.1", "--cache-dir", str(tmp_path)]) == 2
    assert "--instruction-contrast shapes the instruction's sentence tokens" in caplog.text


def test_prefetcher_keeps_order_and_reraises_loader_errors() -> None:
    assert list(Prefetcher(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise BagError("episode_7: image 3 on /camera/top/image_raw cannot be decoded")

    fetched = Prefetcher(broken())
    with pytest.raises(BagError, match="episode_7"):
        list(fetched)


def test_start_weighted_rows_and_the_sampler_draw_episode_starts_k_times(trained: Path, bags: Path) -> None:
    policy = MeanFlowPolicy.load(trained / "last")
    sync = SyncConfig.from_policy_config(policy.config)
    episodes, _ = load_episodes([bags], sync, trained / "cache")
    samples = SampleSet(episodes, sync)
    rows = samples.start_weighted_rows(window_s=0.5, repeat=4)
    counts = np.bincount(rows, minlength=len(samples))
    start = samples.sample_step < 15  # 0.5 s at 30 Hz
    assert start.any() and (~start).any()
    assert np.all(counts[start] == 4) and np.all(counts[~start] == 1)
    batches = SeededBatchSampler(len(samples), 7, seed=3, rows=rows)
    sampler = iter(batches)
    epoch = [r for _ in range(batches.per_epoch) for r in next(sampler)]
    assert sorted(epoch) == sorted(rows.tolist())  # one epoch = every listed row, as often as listed
    with pytest.raises(ValueError, match="repeat"):
        samples.start_weighted_rows(window_s=1.0, repeat=0)


@pytest.mark.parametrize("n", [64, 65, 66, 1])
def test_an_epoch_never_ends_with_a_batch_of_one(n: int) -> None:
    """A lone last row would crash training (batch-statistics normalisation): it joins the batch before it."""
    sampler = SeededBatchSampler(n, 32, seed=0)
    stream = iter(sampler)
    for _ in range(3):  # three epochs, each every row once, no batch of one unless the data is one row
        epoch = [next(stream) for _ in range(sampler.per_epoch)]
        assert sorted(r for batch in epoch for r in batch) == list(range(n))
        assert all(len(batch) >= min(2, n) for batch in epoch)
    assert [len(b) for b in epoch] == {64: [32, 32], 65: [32, 33], 66: [32, 32, 2], 1: [1]}[n]


def test_training_rejects_a_batch_of_one() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        TrainConfig(batch_size=1)


def _with_idle_start(episode, idle_steps: int):
    """The episode with its first ``idle_steps`` commands held at the first moving one (an arm waiting to start)."""
    action = np.array(episode.action)
    action[:idle_steps] = action[idle_steps]
    return dataclasses.replace(episode, action=action)


def test_idle_starts_are_left_out_and_the_start_window_counts_from_the_first_kept_sample(trained: Path,
                                                                                        bags: Path) -> None:
    policy = MeanFlowPolicy.load(trained / "last")
    sync = SyncConfig.from_policy_config(policy.config)
    episodes, _ = load_episodes([bags], sync, trained / "cache")
    half = sync.chunk_size // 2
    idle = [_with_idle_start(e, 25) for e in episodes]
    for episode, held in zip(episodes, idle):
        # commands held for the first 25 steps: idle at least until the next half chunk reaches step 25
        assert idle_start(episode, half, 0.02) < 25 - half < idle_start(held, half, 0.02)
    every = SampleSet(idle, sync)
    kept = SampleSet(idle, sync, idle_start_rad=0.02)
    assert every.idle_samples == 0 and kept.idle_samples > 0
    assert len(kept) == len(every) - kept.idle_samples
    for i, episode in enumerate(idle):
        steps = kept.sample_step[kept.sample_episode == i]
        first = idle_start(episode, sync.chunk_size // 2, 0.02)
        assert steps.min() >= first
        # every kept sample's next half chunk moves: no "stay here" label is left at the start
        actions, _ = kept.chunk(np.flatnonzero(kept.sample_episode == i)[:1])
        assert np.abs(actions[0, :sync.chunk_size // 2 + 1] - actions[0, 0]).max() > 0.02
    rows = kept.start_weighted_rows(window_s=0.2, repeat=3)  # 6 steps at 30 Hz
    counts = np.bincount(rows, minlength=len(kept))
    first_kept = np.array([kept.sample_step[kept.sample_episode == i].min() for i in range(len(idle))])
    start = kept.sample_step - first_kept[kept.sample_episode] < 6
    assert np.all(counts[start] == 3) and np.all(counts[~start] == 1)
    with pytest.raises(ValueError, match="idle_start_rad"):
        SampleSet(idle, sync, idle_start_rad=-1.0)
    # One-step chunks (Table IV's chunk size 1): the next command alone decides, and moving samples are kept.
    single = SampleSet(idle, dataclasses.replace(sync, chunk_size=1), idle_start_rad=0.02)
    assert idle_horizon(1, sync.fps) == 9 and idle_horizon(sync.chunk_size, sync.fps) == half
    assert 0 < single.idle_samples < len(every) and all(
        single.sample_step[single.sample_episode == i].min() == idle_start(e, 9, 0.02) for i, e in enumerate(idle))
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        idle_start(idle[0], 0, 0.02)


def test_idle_anywhere_leaves_out_a_pause_in_the_middle_of_an_episode_too(trained: Path, bags: Path) -> None:
    """A policy's own pause mid-episode (self-imitation data: hovering over the cube before descending) labels a
    still state "stay here" just as an idle start does; ``idle_anywhere`` leaves out those samples as well, and
    keeps the still end (once the task is done, staying is right)."""
    policy = MeanFlowPolicy.load(trained / "last")
    sync = SyncConfig.from_policy_config(policy.config)
    episodes, _ = load_episodes([bags], sync, trained / "cache")
    half = sync.chunk_size // 2
    paused = []
    P0, P1 = 10, 25
    for e in episodes:
        action = np.array(e.action)
        action[P0:P1] = action[P0]  # held for half a second mid-episode
        action[-15:] = action[-15]  # and still at the end
        paused.append(dataclasses.replace(e, action=action))
    starts = SampleSet(paused, sync, idle_start_rad=0.02)
    anywhere = SampleSet(paused, sync, idle_start_rad=0.02, idle_anywhere=True)
    for i, episode in enumerate(paused):
        idle = idle_steps(episode, half, 0.02)
        pause = np.arange(P0, P1 - half)  # samples whose next half chunk lies within the pause
        assert idle[pause].all()
        kept = anywhere.sample_step[anywhere.sample_episode == i]
        assert not np.isin(pause, kept).any()
        last_move = np.flatnonzero(~idle)[-1]
        assert not idle[kept[kept < last_move]].any()  # before the last move every kept sample moves
        end = np.flatnonzero(idle[last_move:]) + last_move
        assert end.size and np.isin(end[np.isin(end, episode.sample_steps)], kept).all()  # the still end is kept
        assert np.isin(pause, starts.sample_step[starts.sample_episode == i]).all()  # kept by the start filter
    assert anywhere.idle_samples >= starts.idle_samples + len(paused) * (P1 - half - P0)
