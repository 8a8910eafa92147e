"""meanflow-eval-bag on an unusable checkpoint: one error line naming the file and field, exit code 2."""
import logging

import pytest

from meanflow_policy.tools import eval_bag as eval_bag_cli
from meanflow_policy.testing import corrupt_checkpoint, make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.mark.parametrize("kind,named", [
    ("truncated_weights", "model.safetensors: not a readable safetensors file"),
    ("empty_weights", "model.safetensors: not a readable safetensors file"),
    ("bad_tokenizer", "tokenizer.json: not a valid tokenizer file"),
    ("chunk_size_string", "config.json: field chunk_size must be an integer, got str '20'"),
    ("zero_std", "stats.json: field action.std is below 0.001"),
])
def test_unusable_checkpoint_is_one_line_and_exit_2(ckpt, tmp_path, caplog, capsys, kind, named):
    bad = corrupt_checkpoint(ckpt, tmp_path / kind, kind)
    with caplog.at_level(logging.ERROR):
        code = eval_bag_cli.main(["--checkpoint", str(bad), "--bags", str(tmp_path / "no_bags"),
                                  "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and named in errors[0] and str(bad) in errors[0], errors
    assert "Traceback" not in capsys.readouterr().err
