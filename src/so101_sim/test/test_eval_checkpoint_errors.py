"""so101-eval on an unusable checkpoint: one error line naming the file and field, exit code 2."""
import pytest

from so101_sim import evaluate

from meanflow_policy import testing


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.mark.parametrize("kind,named", [
    ("truncated_weights", "model.safetensors: not a readable safetensors file"),
    ("bad_tokenizer", "tokenizer.json: not a valid tokenizer file"),
    ("chunk_size_string", "config.json: field chunk_size must be an integer, got str '20'"),
    ("zero_std", "stats.json: field action.std is below 0.001"),
])
def test_unusable_checkpoint_is_one_line_and_exit_2(ckpt, tmp_path, capsys, kind, named):
    bad = testing.corrupt_checkpoint(ckpt, tmp_path / kind, kind)
    code = evaluate.main(["--checkpoint", str(bad), "--episodes", "1", "--image-size", "32",
                          "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("so101-eval: cannot load checkpoint") and named in err[0], err


def test_an_image_size_the_policy_cannot_read_is_one_error_naming_the_option(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(ckpt), "--episodes", "1", "--image-size", "32", "--policy-image-size", "40",
                       "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert ("--policy-image-size 40: image size 40 px cannot be read by this backbone (trained at 64 px): use one of "
            "[16, 32, 48, 64]") in capsys.readouterr().err
