"""CUDA-graph replay of a chunk (model/cuda_graphs.py): same chunks as eager, re-capture where addresses change.

The replay tests need a CUDA device and skip without one (this project's CI machine has none); the GPU session's
script runs them (docs/method.md, "GPU path")."""
import numpy as np
import pytest
import torch

from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.testing import make_tiny_checkpoint, random_observation

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
# Graph replay runs the very kernels eager mode runs, on the same noise: the chunks agree to float rounding.
PARITY_RAD = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def test_cpu_policy_refuses_cuda_graphs(ckpt):
    policy = MeanFlowPolicy.load(ckpt)
    with pytest.raises(ValueError, match="CUDA device"):
        policy.use_cuda_graphs()
    assert not policy.cuda_graphs


def _chunks(policy, observations, **kwargs):
    out = []
    for i, obs in enumerate(observations):
        generator = torch.Generator(device=policy.device).manual_seed(i)
        out.append(policy.sample(obs, generator=generator, **kwargs))
    return out


@needs_cuda
@pytest.mark.parametrize("nfe", [1, 3])
def test_graphed_chunks_match_eager(ckpt, nfe):
    policy = MeanFlowPolicy.load(ckpt, device="cuda")
    observations = [random_observation(policy.config, seed=s, size=(48, 80)) for s in range(3)]
    eager = _chunks(policy, observations, nfe=nfe)
    policy.use_cuda_graphs()
    graphed = _chunks(policy, observations, nfe=nfe)
    assert policy.last_timing["cuda_graphs"] is True
    for a, b in zip(eager, graphed):
        assert np.abs(a - b).max() < PARITY_RAD
    # Different observations really went through the replayed graphs (not one stale output).
    assert np.abs(graphed[0] - graphed[1]).max() > 10 * PARITY_RAD


@needs_cuda
def test_graphed_candidates_match_eager(ckpt):
    policy = MeanFlowPolicy.load(ckpt, device="cuda")
    obs = random_observation(policy.config, seed=0, size=(48, 80))
    previous = policy.sample(obs, generator=torch.Generator(device="cuda").manual_seed(9))
    guide = (previous[:12], np.ones_like(previous[:12]))
    eager = _chunks(policy, [obs, obs], guide=guide, candidates=4, average=2)
    policy.use_cuda_graphs()
    graphed = _chunks(policy, [obs, obs], guide=guide, candidates=4, average=2)
    assert policy.last_timing["cuda_graphs"] is True and policy.last_timing["candidates"] == 4
    for a, b in zip(eager, graphed):
        assert np.abs(a - b).max() < PARITY_RAD


@needs_cuda
def test_new_instruction_recaptures_and_old_one_still_replays(ckpt):
    policy = MeanFlowPolicy.load(ckpt, device="cuda")
    a = random_observation(policy.config, seed=0, size=(48, 80))
    b = dict(a, instruction="put the green cube in the left box")
    eager_a, eager_b = _chunks(policy, [a]), _chunks(policy, [b])
    policy.use_cuda_graphs()
    assert _chunks(policy, [a])[0] == pytest.approx(eager_a[0], abs=PARITY_RAD)
    assert _chunks(policy, [b])[0] == pytest.approx(eager_b[0], abs=PARITY_RAD)
    # Back to the first instruction: its graphs read its own cached keys/values, not the second's.
    assert _chunks(policy, [a])[0] == pytest.approx(eager_a[0], abs=PARITY_RAD)
    captures = policy._graphs.captures
    _chunks(policy, [a, b])
    assert policy._graphs.captures == captures  # replayed, not captured again


@needs_cuda
def test_eager_fallbacks_and_invalidation(ckpt):
    policy = MeanFlowPolicy.load(ckpt, device="cuda")
    policy.use_cuda_graphs()
    obs = random_observation(policy.config, seed=0, size=(48, 80))
    previous = policy.sample(obs)
    # One candidate with a guide is the gradient-guided sampler: eager.
    policy.sample(obs, guide=(previous[:5], np.ones_like(previous[:5])))
    assert policy.last_timing["cuda_graphs"] is False
    reference = _chunks(policy, [obs])[0]
    policy.to(torch.float64).to(torch.float32)  # moves/casts drop graphs that read the old weights' addresses
    assert policy._graphs.captures > 0 and not policy._graphs._prefixes
    assert _chunks(policy, [obs])[0] == pytest.approx(reference, abs=PARITY_RAD)


@needs_cuda
def test_compiled_kernels_under_graphs_match_eager(ckpt):
    policy = MeanFlowPolicy.load(ckpt, device="cuda")
    observations = [random_observation(policy.config, seed=s, size=(48, 80)) for s in range(2)]
    eager = _chunks(policy, observations)
    policy.compile_kernels()
    policy.use_cuda_graphs()
    compiled = _chunks(policy, observations)
    assert policy.last_timing["cuda_graphs"] is True
    for a, b in zip(eager, compiled):
        assert np.abs(a - b).max() < 1e-3  # fused kernels round differently
