"""The method's claim on a toy: one-step MeanFlow samples beat one-step flow-matching samples.

Conditional multimodal data: for condition c in {0, 1}, a ring of 8 Gaussians (radius 1.5, std 0.1) rotated by
c * pi / 8. The same expert (with a learned condition token as its prefix) is trained the same number of steps
with each objective; one-step samples are compared with fresh data by energy distance.
"""
import pytest
import torch
from torch import nn

from meanflow_policy.model import objectives as O
from meanflow_policy.model.action_expert import ActionExpert
from meanflow_policy.testing import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


CPU = torch.device("cpu")


def _data(c: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, 8, c.shape, generator=g).float()
    angle = k * torch.pi / 4 + c.float() * torch.pi / 8
    centers = 1.5 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return (centers + 0.1 * torch.randn(centers.shape, generator=g))[:, None, :]


def _energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def _train_and_score(objective: str, steps: int = 300, batch: int = 128) -> list[float]:
    torch.manual_seed(0)
    expert = ActionExpert(action_dim=2, chunk_size=1, width=64, depth=2, heads=2)
    cond = nn.Embedding(2, 64)
    opt = torch.optim.Adam([*expert.parameters(), *cond.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(batch, 1, dtype=torch.bool)
    for _ in range(steps):
        c = torch.randint(0, 2, (batch,), generator=g)
        actions = _data(c, g)
        noise = torch.randn(actions.shape, generator=g)
        ctx = expert.prepare(cond(c)[:, None])
        u_fn = lambda z, r, t, ctx=ctx: expert(z, r, t, ctx)  # noqa: E731
        if objective == "meanflow":
            t, r = O.sample_meanflow_times(batch, 0.25, -0.4, 1.0, g, CPU)
            loss, _ = O.meanflow_loss(u_fn, actions, noise, t, r, valid, 0.5, 1e-3)
        else:
            t = O.logit_normal(batch, -0.4, 1.0, g, CPU)
            loss, _ = O.flow_matching_loss(u_fn, actions, noise, t, valid, 0.5, 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = []
    g = torch.Generator().manual_seed(123)
    sampler = O.meanflow_sample if objective == "meanflow" else O.euler_sample
    with torch.no_grad():
        for value in (0, 1):
            c = torch.full((1000,), value)
            ctx = expert.prepare(cond(c)[:, None])
            samples = sampler(lambda z, r, t, ctx=ctx: expert(z, r, t, ctx), torch.randn(1000, 1, 2, generator=g), 1)
            scores.append(_energy_distance(samples[:, 0], _data(c, g)[:, 0]))
    return scores


def test_one_step_meanflow_is_closer_to_the_data_than_one_step_flow_matching():
    mf = _train_and_score("meanflow")
    fm = _train_and_score("flow_matching")
    for c in (0, 1):
        assert mf[c] < 0.5 * fm[c], f"condition {c}: meanflow {mf[c]:.3f} vs flow matching {fm[c]:.3f}"
        assert mf[c] < 0.15, f"condition {c}: one-step meanflow energy distance {mf[c]:.3f} too large"
