"""meanflow-train --resume continues a run exactly: a run stopped (by --stop-after or --time-limit) and resumed ends
with the same weights, EMA weights and losses as the same run in one go; a broken progress or state file is one
clear error."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meanflow_policy.tools import train as train_cli
from meanflow_policy.model.configuration import TrainConfig
from meanflow_policy.data.demo_bags import synthetic_episode, write_bag
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.train.trainer import STATE_FILE, STATE_TENSORS_FILE, TRAIN_CONFIG_FILE


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demos")
    for i in range(3):
        write_bag(root / f"episode_{i}", synthetic_episode(seed=i, duration_s=1.0, height=48, width=64),
                  instruction="reach the yellow square")
    return root


def _train(bags: Path, out: Path, *extra: str) -> int:
    # EMA on, validation every 4 steps: the stopped run validates at step 6 too, which must not change anything.
    return train_cli.main(["--bags", str(bags), "--out", str(out), "--preset", "tiny", "--batch-size", "4",
                           "--lr", "1e-3", "--warmup-steps", "3", "--ema-decay", "0.8", "--val-every", "4",
                           "--val-batches", "1", "--val-fraction", "0.34", "--log-every", "1",
                           "--cache-dir", str(bags.parent / "cache"), "--device", "cpu", "--cpu-threads", "1",
                           "--no-progress", *extra])


@pytest.fixture(scope="module")
def one_go(bags: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one_go")
    assert _train(bags, out, "--steps", "12") == 0
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ema_a, ema_b = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    raw_a = load_file(str(a / "last" / STATE_TENSORS_FILE))
    raw_b = load_file(str(b / "last" / STATE_TENSORS_FILE))
    assert ema_a.keys() == ema_b.keys() and raw_a.keys() == raw_b.keys()
    for key in ema_a:
        torch.testing.assert_close(ema_b[key], ema_a[key], rtol=1e-5, atol=1e-6, msg=f"EMA weights {key}")
    for key in raw_a:
        if key.startswith(("model.", "optim.", "ema.")):
            torch.testing.assert_close(raw_b[key], raw_a[key], rtol=1e-5, atol=1e-6, msg=f"state {key}")
    # the EMA really is a different set of weights than the raw ones (else the comparison above proves less)
    assert not torch.equal(ema_a["expert.out.weight"], raw_a["model.expert.out.weight"])
    losses_a = {r["step"]: r["loss"] for r in json.loads((a / "log.json").read_text()) if "loss" in r}
    losses_b = {r["step"]: r["loss"] for r in json.loads((b / "log.json").read_text()) if "loss" in r}
    assert list(losses_b) == list(range(1, 13)) and losses_b == pytest.approx(losses_a, rel=1e-5)
    assert json.loads((b / "progress.json").read_text())["step"] == 12


def test_stop_after_then_resume_equals_one_go(bags: Path, one_go: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    assert _train(bags, out, "--steps", "12", "--stop-after", "6") == 0
    assert json.loads((out / "progress.json").read_text())["step"] == 6
    state = json.loads((out / "last" / STATE_FILE).read_text())
    assert state["step"] == 6 and state["data_position"] == 6
    # the resolved training config travels with the checkpoint
    saved = json.loads((out / "last" / TRAIN_CONFIG_FILE).read_text())["train"]
    assert TrainConfig.from_dict(saved).lr == 1e-3 and saved["warmup_steps"] == 3 and saved["ema_decay"] == 0.8
    # training options are the run's own on --resume: a different --lr is ignored (with a warning)
    assert _train(bags, out, "--steps", "12", "--resume", "--lr", "5e-2") == 0
    _assert_same_run(one_go, out)


def test_time_limit_then_resume_equals_one_go(bags: Path, one_go: Path, tmp_path: Path) -> None:
    out = tmp_path / "timed"
    assert _train(bags, out, "--steps", "12", "--time-limit", "1e-9") == 0  # stops after the first step
    log = json.loads((out / "log.json").read_text())
    assert {"step": 1, "stopped_by_time_limit_s": 1e-9} in log
    assert json.loads((out / "progress.json").read_text())["step"] == 1
    assert _train(bags, out, "--resume") == 0  # --steps defaults to the run's own 12
    _assert_same_run(one_go, out)


def test_a_signal_stops_after_the_step_saving_state_and_resume_equals_one_go(bags: Path, one_go: Path,
                                                                             tmp_path: Path) -> None:
    """SIGTERM (or SIGINT) in the middle of a run: the step finishes, last/ is saved, exit 130; nothing is lost."""
    out = tmp_path / "signalled"

    class TermAtStep5(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("step 5/"):
                os.kill(os.getpid(), signal.SIGTERM)

    handler, logger = TermAtStep5(), logging.getLogger("meanflow_train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the per-step lines are INFO
    try:
        assert _train(bags, out, "--steps", "12") == 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the run left its signal handler installed"
    assert {"step": 5, "stopped_by_request": True} in json.loads((out / "log.json").read_text())
    assert json.loads((out / "last" / STATE_FILE).read_text())["step"] == 5
    assert _train(bags, out, "--resume") == 0
    _assert_same_run(one_go, out)


def test_resume_can_lengthen_the_run_and_stops_when_done(bags: Path, one_go: Path, tmp_path: Path) -> None:
    out = tmp_path / "longer"
    shutil.copytree(one_go, out)
    assert _train(bags, out, "--resume") == 0  # already at 12 of 12: nothing to do
    assert _train(bags, out, "--resume", "--steps", "14") == 0
    log = json.loads((out / "log.json").read_text())
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 15))
    state = json.loads((out / "last" / STATE_FILE).read_text())
    assert state["step"] == 14 and state["train_config"]["steps"] == 14


@pytest.mark.parametrize("target, content, match", [
    ("progress.json", "", "progress.json is empty or corrupt"),
    ("progress.json", '{"step": 12}', "progress.json is empty or corrupt"),
    ("last/" + STATE_FILE, "", f"{STATE_FILE} is empty or corrupt"),
    ("last/" + STATE_FILE, None, f"{STATE_FILE} is missing"),
    ("last/" + STATE_TENSORS_FILE, b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage", f"{STATE_TENSORS_FILE} is corrupt"),
])
def test_broken_resume_files_are_one_clear_error(bags: Path, one_go: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture, target: str,
                                                 content: str | bytes | None, match: str) -> None:
    out = tmp_path / "broken"
    shutil.copytree(one_go, out)
    path = out / target
    if content is None:
        path.unlink()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with caplog.at_level(logging.ERROR, logger="meanflow_train"):
        assert _train(bags, out, "--resume", "--steps", "14") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and match in errors[0] and str(path) in errors[0], errors


SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "sim_pick_place"


def test_shipped_checkpoint_loads_fine_tunes_and_is_no_resumable_run(bags: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints written before training states existed still load and fine-tune; --resume on one names the
    missing state file instead of silently restarting the optimizer."""
    MeanFlowPolicy.load(SHIPPED)
    out = tmp_path / "old_run"
    shutil.copytree(SHIPPED, out / "last")
    (out / "progress.json").write_text('{"step": 100, "best_action_mae_rad": 0.1}\n')
    with caplog.at_level(logging.ERROR, logger="meanflow_train"):
        assert _train(bags, out, "--resume", "--steps", "102") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(out / "last" / STATE_FILE) in errors[0] and "--init-from" in errors[0]
    assert _train(bags, tmp_path / "tuned", "--init-from", str(SHIPPED), "--steps", "2") == 0
    assert json.loads((tmp_path / "tuned" / "last" / STATE_FILE).read_text())["step"] == 2


def test_favoured_episode_starts_are_drawn_more_and_resume_exactly(bags: Path, tmp_path: Path) -> None:
    """--start-repeat K: each epoch draws every sample of an episode's first --start-window seconds K times, the
    others once; a run stopped and resumed with it equals the run in one go."""
    favour = ("--start-repeat", "3", "--start-window", "0.2")
    assert _train(bags, tmp_path / "go", "--steps", "12", *favour) == 0
    assert _train(bags, tmp_path / "split", "--steps", "12", "--stop-after", "6", *favour) == 0
    assert _train(bags, tmp_path / "split", "--steps", "12", "--resume") == 0
    _assert_same_run(tmp_path / "go", tmp_path / "split")
    saved = TrainConfig.from_dict(json.loads((tmp_path / "split" / "last" / STATE_FILE).read_text())["train_config"])
    assert (saved.start_repeat, saved.start_window_s) == (3, 0.2)


def test_anchored_fine_tune_resumes_pulling_to_its_own_start_weights(bags: Path, one_go: Path,
                                                                      tmp_path: Path) -> None:
    """The start weights of --anchor-decay are part of the training state: a resumed fine-tune pulls towards the
    weights it started from (not towards its own last checkpoint) and equals the run in one go."""
    anchored = ("--init-from", str(one_go / "last"), "--anchor-decay", "100")
    assert _train(bags, tmp_path / "go", "--steps", "12", *anchored) == 0
    assert _train(bags, tmp_path / "split", "--steps", "12", "--stop-after", "6", *anchored) == 0
    assert _train(bags, tmp_path / "split", "--steps", "12", "--resume") == 0
    _assert_same_run(tmp_path / "go", tmp_path / "split")
    state = load_file(str(tmp_path / "split" / "last" / STATE_TENSORS_FILE))
    start = MeanFlowPolicy.load(one_go / "last").trainable_parameters()
    assert len(start) == sum(k.startswith("anchor.") for k in state) > 0
    for i, weight in enumerate(start):
        assert torch.equal(state[f"anchor.{i}"], weight.detach()), f"anchor.{i} is not the start weight"


def test_bfloat16_steps_keep_float32_weights_change_the_losses_a_little_and_resume_exactly(
        bags: Path, one_go: Path, tmp_path: Path) -> None:
    """--mixed-precision bfloat16: the step's products run in bf16 (its losses differ from the float32 run's, by
    little), the weights, optimizer and EMA stay float32, the setting travels with the run, and a stopped run
    resumes to the run in one go; an unknown precision is one clear error."""
    bf16 = ("--mixed-precision", "bfloat16")
    assert _train(bags, tmp_path / "go", "--steps", "12", *bf16) == 0
    assert _train(bags, tmp_path / "split", "--steps", "12", "--stop-after", "6", *bf16) == 0
    assert _train(bags, tmp_path / "split", "--steps", "12", "--resume") == 0
    _assert_same_run(tmp_path / "go", tmp_path / "split")
    saved = TrainConfig.from_dict(json.loads((tmp_path / "split" / "last" / STATE_FILE).read_text())["train_config"])
    assert saved.mixed_precision == "bfloat16"
    weights = load_file(str(tmp_path / "go" / "last" / STATE_TENSORS_FILE))
    assert {t.dtype for k, t in weights.items() if k.startswith(("model.", "optim.", "ema."))} <= {torch.float32,
                                                                                                 torch.int64}
    losses = [r["loss"] for r in json.loads((tmp_path / "go" / "log.json").read_text()) if "loss" in r]
    reference = [r["loss"] for r in json.loads((one_go / "log.json").read_text()) if "loss" in r]
    assert losses != reference and losses[0] == pytest.approx(reference[0], rel=0.05)
    with pytest.raises(ValueError, match="mixed_precision must be one of float32, bfloat16, got 'float16'"):
        TrainConfig(mixed_precision="float16")
