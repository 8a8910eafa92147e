"""meanflow-average: the weighted mean of one model's checkpoints, and one clear error for checkpoints that differ."""
from __future__ import annotations

import numpy as np
import torch

from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.testing import make_tiny_checkpoint, random_observation
from meanflow_policy.tools import average


def _fine_tune(checkpoint, out, shift: float = 0.1):
    """A stand-in fine-tune of ``checkpoint``: every parameter moved, config, stats and tokenizer kept."""
    policy = MeanFlowPolicy.load(checkpoint)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(shift)
    return policy.save(out)


def test_the_mean_checkpoint_holds_the_weighted_mean_of_the_weights_and_runs(checkpoint, tmp_path):
    tuned = _fine_tune(checkpoint, tmp_path / "tuned")
    out = tmp_path / "mean"
    assert average.main([str(checkpoint), str(tuned), "--weights", "3,1", "--out", str(out)]) == 0
    a, b, mean = (MeanFlowPolicy.load(p) for p in (checkpoint, tuned, out))
    sa, sb, sm = a.state_dict(), b.state_dict(), mean.state_dict()
    moved = [k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], sb[k])]
    assert moved
    for key in moved:
        torch.testing.assert_close(sm[key], 0.75 * sa[key] + 0.25 * sb[key], rtol=0, atol=1e-6)
    assert mean.get_stats() == a.get_stats()
    chunk = mean.sample(random_observation(mean.config), generator=torch.Generator().manual_seed(0))
    assert np.isfinite(np.asarray(chunk)).all()


def test_checkpoints_of_different_models_are_refused_naming_what_differs(checkpoint, tmp_path, caplog):
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    assert average.main([str(checkpoint), str(other), "--out", str(tmp_path / "m1")]) == 2
    assert "config differs in backbone_seed" in caplog.text
    caplog.clear()
    restated = MeanFlowPolicy.load(checkpoint)
    stats = restated.get_stats()
    first = next(iter(stats))
    stats[first] = {k: [v + 0.5 for v in values] for k, values in stats[first].items()}
    restated.set_stats(stats)
    restated.save(tmp_path / "restated")
    assert average.main([str(checkpoint), str(tmp_path / "restated"), "--out", str(tmp_path / "m2")]) == 2
    assert "normalisation stats differ" in caplog.text
    caplog.clear()
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    assert average.main([str(checkpoint), "--out", str(tmp_path / "m3")]) == 2
    assert "at least two checkpoints" in caplog.text
    caplog.clear()
    assert average.main([str(checkpoint), str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "exists" in caplog.text
    caplog.clear()
