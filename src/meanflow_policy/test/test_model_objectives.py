"""Expert and objectives: JVP correctness, flow ratio, adaptive weight, r = t equivalence, masking, samplers."""
import dataclasses

import pytest
import torch

from meanflow_policy.model import objectives as O
from meanflow_policy.model.configuration import OBJECTIVES, MeanFlowConfig
from meanflow_policy.model.action_expert import ActionExpert
from meanflow_policy.model.policy import MeanFlowPolicy
from meanflow_policy.testing import random_batch, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _random_expert(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    expert = ActionExpert(action_dim=3, chunk_size=5, width=32, depth=2, heads=4).to(dtype)
    for p in expert.parameters():  # leave adaLN-Zero's zero init: a zero network has a trivial derivative
        torch.nn.init.normal_(p, std=0.2)
    prefix = torch.randn(2, 7, 32, dtype=dtype)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    return expert, expert.prepare(prefix, mask)


def test_expert_shapes_and_prefix_mask():
    expert, ctx = _random_expert()
    z = torch.randn(2, 5, 3)
    t = torch.tensor([0.9, 0.4])
    u = expert(z, t * 0.5, t, ctx)
    assert u.shape == (2, 5, 3) and u.dtype == torch.float32
    assert ctx.attn_mask is not None and ctx.attn_mask.shape == (2, 1, 1, 7)
    with pytest.raises(ValueError, match=r"\(B, 5, 3\)"):
        expert(torch.randn(2, 4, 3), t, t, ctx)


def test_jvp_matches_central_finite_difference_float64():
    expert, ctx = _random_expert(torch.float64)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.8, 0.55], dtype=torch.float64)
    r = torch.tensor([0.3, 0.55], dtype=torch.float64)
    fn = lambda z_, r_, t_: expert(z_, r_, t_, ctx)  # noqa: E731
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        u, dudt = torch.func.jvp(fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    eps = 1e-6
    with torch.no_grad():
        fd = (fn(z + eps * v, r, t + eps) - fn(z - eps * v, r, t - eps)) / (2 * eps)
    assert dudt.abs().max() > 1e-3  # a non-trivial derivative
    torch.testing.assert_close(dudt, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(u, fn(z, r, t))


@pytest.mark.parametrize("n,ratio", [(32, 0.2), (10, 0.2), (7, 0.0), (8, 1.0), (100, 0.25)])
def test_flow_ratio_is_honoured_per_batch(n, ratio):
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        t, r = O.sample_meanflow_times(n, ratio, -0.4, 1.0, g, torch.device("cpu"))
        assert int((r == t).sum()) == round(ratio * n)
        assert bool((r <= t).all()) and bool(((t > 0) & (t < 1)).all())


def test_logit_normal_time_sampler_moments():
    g = torch.Generator().manual_seed(0)
    t = O.logit_normal(20000, -0.4, 1.0, g, torch.device("cpu"))
    logits = torch.log(t / (1 - t))
    assert logits.mean().item() == pytest.approx(-0.4, abs=0.03)
    assert logits.std().item() == pytest.approx(1.0, abs=0.03)


def test_adaptive_weight_formula():
    per = torch.tensor([0.0, 0.5, 4.0], requires_grad=True)
    w = O.adaptive_weight(per, gamma=0.5, c=1e-3)
    torch.testing.assert_close(w, 1 / torch.sqrt(per.detach() + 1e-3))
    assert not w.requires_grad  # stop-gradient on the weight
    torch.testing.assert_close(O.adaptive_weight(per, 1.0, 1e-3), torch.ones(3))
    torch.testing.assert_close(O.adaptive_weight(per, 0.0, 1e-3), 1 / (per.detach() + 1e-3))


def test_masked_error_ignores_padding():
    pred, target = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    target[0, 2:] = 100.0
    valid = torch.ones(2, 4, dtype=torch.bool)
    valid[0, 2:] = False
    torch.testing.assert_close(O.masked_sq_error(pred, target, valid), torch.tensor([3.0, 3.0]) / 3)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    mf = MeanFlowPolicy(MeanFlowConfig.tiny())
    for p in mf.expert.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fm = MeanFlowPolicy(MeanFlowConfig.tiny(objective="flow_matching"))
    fm.load_state_dict(mf.state_dict())
    return mf, fm


def test_meanflow_with_r_equal_t_is_flow_matching_exactly(pair):
    mf, fm = pair
    batch = random_batch(mf.config, 6, seed=3)
    noise = torch.randn(6, 20, 6, generator=torch.Generator().manual_seed(4))
    t = torch.rand(6, generator=torch.Generator().manual_seed(5))
    loss_mf, _ = mf.compute_loss(batch, noise=noise, t=t, r=t.clone())
    loss_fm, _ = fm.compute_loss(batch, noise=noise, t=t)
    assert loss_mf.item() == loss_fm.item()
    loss_gap, _ = mf.compute_loss(batch, noise=noise, t=t, r=t * 0.5)
    assert loss_gap.item() != loss_fm.item()  # the JVP term matters once r < t


def test_only_expert_and_projections_get_gradients(pair):
    mf, _ = pair
    loss, info = mf.compute_loss(random_batch(mf.config, 4, seed=6), generator=torch.Generator().manual_seed(0))
    mf.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in mf.backbone.parameters())
    for module in (mf.expert, mf.state_proj, mf.prefix_proj):
        assert all(p.grad is not None for p in module.parameters())
    assert mf.state_proj.weight.grad.abs().sum() > 0
    assert info["frac_r_eq_t"] == pytest.approx(1 / 4)  # round(0.2 * 4) = 1 of 4


def test_loss_ignores_padded_steps(pair):
    """Padded steps still enter the expert (as LeRobot-style padding copies), but their error gets no gradient."""
    _, fm = pair
    batch = random_batch(fm.config, 4, seed=7)
    assert batch["action_is_pad"][0, 10:].all() and not batch["action_is_pad"][1:].any()
    outputs = []

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)

    handle = fm.expert.register_forward_hook(keep)
    try:
        loss, _ = fm.compute_loss(batch, noise=torch.randn(4, 20, 6), t=torch.full((4,), 0.7))
        loss.backward()
    finally:
        handle.remove()
    grad = outputs[0].grad
    assert torch.all(grad[0, 10:] == 0)
    assert torch.all(grad[0, :10].abs().sum(-1) > 0) and torch.all(grad[1:].abs().sum(-1) > 0)


def test_meanflow_rejects_r_greater_than_t(pair):
    mf, _ = pair
    with pytest.raises(ValueError, match="r <= t"):
        mf.compute_loss(random_batch(mf.config, 2), t=torch.full((2,), 0.2), r=torch.full((2,), 0.5))


def test_samplers_step_counts_and_one_step_formula():
    calls = []

    def u_fn(z, r, t):
        calls.append((float(r[0]), float(t[0])))
        return torch.full_like(z, 2.0)

    e = torch.randn(3, 4, 2)
    torch.testing.assert_close(O.meanflow_sample(u_fn, e, 1), e - 2.0)
    assert calls == [(0.0, 1.0)]
    calls.clear()
    O.meanflow_sample(u_fn, e, 4)
    assert calls == [(0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)]
    calls.clear()
    O.euler_sample(u_fn, e, 2)
    assert calls == [(1.0, 1.0), (0.5, 0.5)]


def test_ddpm_schedule_and_ancestral_sampler_recover_a_point():
    sched = O.DDPMSchedule(100)
    ab = sched.alphas_cumprod
    assert ab.shape == (100,) and bool((ab[1:] < ab[:-1]).all()) and ab[-1] < 1e-3 and ab[0] > 0.99
    target = torch.tensor([0.5, -1.0])

    def eps_fn(x, r, t):  # the exact noise predictor of a point-mass data distribution at `target`
        k = (t[0] * 100 - 1).round().long()
        a = ab[k]
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    g = torch.Generator().manual_seed(0)
    for eta, nfe in ((1.0, 100), (0.0, 10)):
        x = O.ddpm_sample(eps_fn, torch.randn(4, 3, 2, generator=g), nfe, sched, eta, g)
        torch.testing.assert_close(x, target.expand(4, 3, 2), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="nfe"):
        O.ddpm_sample(eps_fn, torch.randn(1, 3, 2), 101, sched, 1.0, g)


def test_objective_is_chosen_once_from_the_config_by_a_registry():
    assert set(O.registered_objectives()) == set(OBJECTIVES)
    for name, cls in (("meanflow", O.MeanFlowObjective), ("flow_matching", O.FlowMatchingObjective),
                      ("ddpm", O.DDPMObjective)):
        assert type(O.make_objective(MeanFlowConfig.tiny(objective=name))) is cls
        assert type(MeanFlowPolicy(MeanFlowConfig.tiny(objective=name)).objective) is cls
    assert O.make_objective(MeanFlowConfig.tiny(objective="ddpm", ddpm_train_steps=30)).max_nfe == 30
    assert O.make_objective(MeanFlowConfig.tiny()).max_nfe is None
    config = MeanFlowConfig.tiny()
    config.objective = "consistency"  # past validation: the registry still names the field's bad value
    with pytest.raises(ValueError, match="objective 'consistency'"):
        O.make_objective(config)


def test_the_policy_samples_and_trains_through_its_objective(pair):
    """Same weights: handing the meanflow policy the flow-matching Objective gives exactly the flow-matching
    policy's chunks and loss, so nothing else in the policy looks at the objective's name."""
    mf, fm = pair
    batch = random_batch(mf.config, 3, seed=8)
    one_step_mf = mf.sample_batch(batch, nfe=1, generator=torch.Generator().manual_seed(0))
    one_step_fm = fm.sample_batch(batch, nfe=1, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(one_step_mf, one_step_fm)  # u(e, 0, 1) vs u(e, 1, 1)
    saved = mf.objective
    mf.objective = O.make_objective(fm.config)
    try:
        swapped = mf.sample_batch(batch, nfe=1, generator=torch.Generator().manual_seed(0))
        noise, t = torch.randn(3, 20, 6, generator=torch.Generator().manual_seed(9)), torch.full((3,), 0.6)
        loss_swapped, info = mf.compute_loss(batch, noise=noise, t=t)
    finally:
        mf.objective = saved
    torch.testing.assert_close(swapped, one_step_fm, rtol=0, atol=0)
    assert loss_swapped.item() == fm.compute_loss(batch, noise=noise, t=t)[0].item()
    assert "frac_r_eq_t" not in info  # a meanflow-only log value


def _guided_case(objective: str, u_fn, nfe: int) -> tuple:
    """The guidance tests' case, 8 rows x 3 joints: (objective, noise, plain chunk, a target 0.5 away from it,
    weights 1 on the first rows fading to 0 with joint 2 exempt (left to the model), the guided chunk)."""
    obj = O.make_objective(MeanFlowConfig(objective=objective))
    noise = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(0))
    plain = obj.sample(u_fn, noise, nfe, None)
    target = plain + 0.5
    weights = torch.tensor([1.0, 1.0, 1.0, 0.5, 0, 0, 0, 0])[:, None].repeat(1, 3)
    weights[:, 2] = 0.0
    return obj, noise, plain, target, weights, obj.guided_sample(u_fn, noise, nfe, target, weights)


def test_guidance_steers_the_weighted_rows_and_leaves_a_free_chunk_alone():
    """A one-step map that is linear in the noise (u = -0.2 e - c): guidance must pull the weighted rows onto the
    target, leave a chunk with zero weights exactly as sampled, and refuse a sampler that draws its own noise."""
    c = torch.linspace(-1, 1, 8 * 3).view(1, 8, 3)
    u_fn = lambda z, r, t: -0.2 * z - c  # noqa: E731 - a = 1.2 e + c
    mf, noise, plain, target, weights, guided = _guided_case("meanflow", u_fn, 1)
    before = ((plain - target)[:, :3, :2] ** 2).sum()
    after = ((guided - target)[:, :3, :2] ** 2).sum()
    assert after < 0.01 * before
    torch.testing.assert_close(guided[..., 2], plain[..., 2])  # each value depends on its own noise here
    # The noise moves at most GUIDE_MAX_SHIFT per value: so does this chunk (1.2 per unit of noise).
    assert float((guided - plain).abs().max()) <= 1.2 * O.GUIDE_MAX_SHIFT + 1e-5
    torch.testing.assert_close(mf.guided_sample(u_fn, noise, 1, target, torch.zeros(8, 3)), plain)
    ddpm = O.make_objective(MeanFlowConfig(objective="ddpm", ddpm_sampler="ddpm"))
    with pytest.raises(ValueError, match="deterministic sampler"):
        ddpm.guided_sample(u_fn, noise, 2, target, weights)


def test_flow_matching_guidance_is_the_rtc_papers_guided_euler():
    """Flow matching is guided step by step (RTC's Algorithm 1). On the exact velocity field of Gaussian data
    (each value independent, so a value weighted 0 must come out exactly as sampled): ten guided steps bring the
    weighted rows onto a target 0.5 away from the sampled chunk; zero weights give the plain chunk bit for bit; one
    step cannot be guided (its predicted chunk does not depend on the noise); the weight is the paper's, clipped."""
    c, s2 = torch.linspace(-1, 1, 8 * 3).view(1, 8, 3), 0.25

    def u_fn(z, r, t):  # E[e - a | z_t] for a ~ N(c, s2), e ~ N(0, 1): (z - E[a | z_t]) / t
        tb = t[:, None, None]
        return (z - (c + (1 - tb) * s2 * (z - (1 - tb) * c) / ((1 - tb) ** 2 * s2 + tb**2))) / tb

    fm, noise, plain, target, weights, guided = _guided_case("flow_matching", u_fn, 10)
    assert ((guided - target)[:, :3, :2] ** 2).sum() < 0.05 * ((plain - target)[:, :3, :2] ** 2).sum()
    assert torch.equal(guided[:, 4:], plain[:, 4:]) and torch.equal(guided[..., 2], plain[..., 2])
    assert torch.equal(fm.guided_sample(u_fn, noise, 10, target, torch.zeros(8, 3)), plain)
    assert torch.equal(fm.guided_sample(u_fn, noise, 1, target, weights), fm.sample(u_fn, noise, 1, None))
    assert O.rtc_guidance_weight(1.0) == O.RTC_GUIDANCE_CLIP
    assert O.rtc_guidance_weight(0.5) == pytest.approx(2.0)  # (1 - tau) / (tau r^2) at tau = 0.5


def test_flow_matching_guidance_never_touches_the_experts_weights():
    """Guidance differentiates the expert with respect to its input only: no weight gradient is left behind."""
    torch.manual_seed(0)
    expert = ActionExpert(action_dim=3, chunk_size=5, width=32, depth=2, heads=4)
    for layer in (expert.out, expert.final_ada):  # zero-initialised: give the velocity some dependence on z
        torch.nn.init.normal_(layer.weight, std=0.1)
    ctx = expert.prepare(torch.randn(1, 4, 32))
    fm = O.make_objective(MeanFlowConfig(objective="flow_matching"))
    noise = torch.randn(1, 5, 3)
    u_fn = lambda z, r, t: expert(z, r, t, ctx)  # noqa: E731
    plain = fm.sample(u_fn, noise, 4, None)
    guided = fm.guided_sample(u_fn, noise, 4, plain + 0.3, torch.ones(5, 3))
    assert ((guided - plain - 0.3) ** 2).sum() < 0.5 * (0.3**2 * 15)
    assert all(p.grad is None for p in expert.parameters())


@pytest.mark.parametrize("objective", ["meanflow", "flow_matching"])
def test_the_expert_learns_to_continue_committed_rows(objective):
    """Ramps whose slope nothing in the prefix tells: given the first rows as committed (clean) actions, the
    trained expert's one-step chunk continues the ramp; without them it can only guess the mean slope."""
    torch.manual_seed(0)
    T, D, B = 8, 2, 64
    expert = ActionExpert(action_dim=D, chunk_size=T, width=32, depth=2, heads=4, known_rows=True)
    prefix = torch.randn(1, 3, 32).expand(B, 3, 32)
    obj = O.make_objective(MeanFlowConfig(objective=objective))
    ramp = (torch.arange(T) + 1.0)[None, :, None] / T
    optim = torch.optim.Adam(expert.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(B, T, dtype=torch.bool)

    for _ in range(400):
        actions = torch.randn(B, 1, D, generator=g) * ramp
        rows = torch.randint(0, 4, (B,), generator=g)
        mask = (torch.arange(T)[None] < rows[:, None])[..., None].float()
        c = dataclasses.replace(expert.prepare(prefix), known=actions, known_mask=mask)
        loss, _, _ = obj.loss(lambda z, r, t, c=c: expert(z, r, t, c), actions,
                              torch.randn(B, T, D, generator=g), valid, g)
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        actions = torch.randn(B, 1, D, generator=g) * ramp
        noise = torch.randn(B, T, D, generator=g)
        errors = []
        for rows in (0, 2):
            mask = (torch.arange(T)[None] < rows)[..., None].float().expand(B, T, 1)
            c = dataclasses.replace(expert.prepare(prefix), known=actions, known_mask=mask)
            chunk = obj.sample(lambda z, r, t, c=c: expert(z, r, t, c), noise, 1, None)
            errors.append(float(((chunk - actions)[:, 2:] ** 2).mean()))
    assert errors[1] < 0.25 * errors[0], errors
