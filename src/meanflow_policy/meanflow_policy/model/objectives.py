"""Training objectives and samplers: MeanFlow, flow matching (SmolVLA-style baseline) and DDPM (Diffusion-Policy
-style baseline), all over the same expert, in normalised action space.

Convention (DESIGN.md): t = 1 is noise, t = 0 is data, z_t = (1 - t) a + t e, v = e - a. ``u_fn(z, r, t)`` is the
expert with its prefix context bound; the prefix is a constant for every function here.

The objective is chosen once: ``make_objective(config)`` looks ``config.objective`` up in a registry of
``Objective`` classes (loss + sampler each); the policy holds the instance and never branches on the name.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow_policy.model.configuration import OBJECTIVES, MeanFlowConfig

UFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Noise-space guidance (Objective.guided_sample): descent steps per chunk, and how far (per value, in standard
# deviations) the guided noise may move from the drawn one.
GUIDE_STEPS = 3
GUIDE_MAX_SHIFT = 3.0
# The RTC paper's clip on its guidance weight (Black et al. 2025, beta = 5): the weight
# (1 - tau) / (tau r_tau^2) is unbounded at the start of the flow, where the predicted chunk is still a guess.
RTC_GUIDANCE_CLIP = 5.0


def draw_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise drawn on the generator's device (CPU generators stay usable with a CUDA model)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    return torch.sigmoid(draw_normal((n,), generator, device) * std + mean)


def sample_meanflow_times(n: int, flow_ratio: float, mean: float, std: float, generator: torch.Generator | None,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) with r <= t from two logit-normal draws; exactly round(flow_ratio * n) samples get r = t."""
    a = logit_normal(n, mean, std, generator, device)
    b = logit_normal(n, mean, std, generator, device)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    n_equal = int(round(flow_ratio * n))
    gen_device = generator.device if generator is not None else device
    idx = torch.randperm(n, generator=generator, device=gen_device)[:n_equal].to(device)
    r = r.clone()
    r[idx] = t[idx]
    return t, r


def masked_sq_error(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the valid (not padded) chunk steps: (B, T, D) -> (B,)."""
    se = (pred - target).pow(2).sum(-1)
    count = (valid.sum(1) * pred.shape[-1]).clamp(min=1)
    return (se * valid).sum(1) / count


def adaptive_weight(per_sample: torch.Tensor, gamma: float, c: float) -> torch.Tensor:
    """MeanFlow's adaptive loss weight w = sg(1 / (||err||^2 + c)^(1 - gamma)); gamma = 1 gives plain MSE."""
    return 1.0 / (per_sample.detach() + c).pow(1.0 - gamma)


def meanflow_loss(u_fn: UFn, actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                  valid: torch.Tensor, gamma: float, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow: regress u(z, r, t) on sg(v - (t - r) du/dt), du/dt = JVP along (v, 0, 1).

    Returns (loss, per-sample error)."""
    tb = t[:, None, None]
    z = (1 - tb) * actions + tb * noise
    v = noise - actions
    with sdpa_kernel(SDPBackend.MATH):
        # torch's stub types jvp's result as a 3-tuple (its has_aux form); without aux it is (output, jvp)
        u, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))  # type: ignore[misc]
    target = (v - (t - r)[:, None, None] * dudt).detach()
    per = masked_sq_error(u, target, valid)
    return (adaptive_weight(per, gamma, c) * per).mean(), per


def flow_matching_loss(u_fn: UFn, actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, valid: torch.Tensor,
                       gamma: float, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow matching: u(z, t, t) regresses v, with the same weighting as MeanFlow (so r = t makes them equal)."""
    tb = t[:, None, None]
    z = (1 - tb) * actions + tb * noise
    with sdpa_kernel(SDPBackend.MATH):
        u = u_fn(z, t, t)
    per = masked_sq_error(u, noise - actions, valid)
    return (adaptive_weight(per, gamma, c) * per).mean(), per


def _time_grid(nfe: int) -> list[float]:
    """nfe + 1 evenly spaced times from 1 (noise) to 0 (data), as Python floats (no device scalars per step)."""
    return [1.0 - i / nfe for i in range(nfe)] + [0.0]


def _full(like: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((like.shape[0],), value, device=like.device, dtype=like.dtype)


def meanflow_sample(u_fn: UFn, noise: torch.Tensor, nfe: int) -> torch.Tensor:
    """k-step MeanFlow: z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z, t_{i+1}, t_i); nfe=1 is a = e - u(e, 0, 1)."""
    grid = _time_grid(nfe)
    z = noise
    for t, r in zip(grid[:-1], grid[1:]):
        z = z - (t - r) * u_fn(z, _full(z, r), _full(z, t))
    return z


def euler_sample(u_fn: UFn, noise: torch.Tensor, nfe: int) -> torch.Tensor:
    """k-step Euler integration of the instantaneous velocity u(z, t, t) from t = 1 to 0 (flow matching)."""
    grid = _time_grid(nfe)
    z = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        tt = _full(z, t)
        z = z - (t - t_next) * u_fn(z, tt, tt)
    return z


def rtc_guidance_weight(t: float) -> float:
    """The RTC paper's guidance weight min(beta, (1 - tau) / (tau r_tau^2)), r_tau^2 = (1 - tau)^2 / (tau^2 +
    (1 - tau)^2), written in this module's time (tau = 1 - t)."""
    if t >= 1.0:
        return RTC_GUIDANCE_CLIP
    return min(RTC_GUIDANCE_CLIP, ((1 - t) ** 2 + t**2) / ((1 - t) * t))


def rtc_guided_euler(u_fn: UFn, noise: torch.Tensor, nfe: int, target: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """Euler integration of u(z, t, t) with real-time-chunking guidance: at each step the clean chunk the step
    predicts, a = z - t u, is compared with ``target`` (B, T, D) under ``weights`` (T, D), and the velocity is
    corrected by rtc_guidance_weight(t) times the vector-Jacobian product W (target - a) da/dz. The expert is
    differentiated with respect to its input only (never its weights); zero weights give ``euler_sample``'s
    chunk exactly."""
    grid = _time_grid(nfe)
    z = noise.detach()
    for t, t_next in zip(grid[:-1], grid[1:]):
        tt = _full(z, t)
        with torch.enable_grad():
            zg = z.requires_grad_(True)
            u = u_fn(zg, tt, tt)
            predicted = zg - t * u
            (pull,) = torch.autograd.grad(predicted, zg, grad_outputs=weights[None] * (target - predicted))
        z = (z - (t - t_next) * (u - rtc_guidance_weight(t) * pull)).detach()
    return z


class DDPMSchedule:
    """Squared-cosine noise schedule over K training steps (Diffusion Policy's default)."""

    def __init__(self, steps: int, device: torch.device | str = "cpu") -> None:
        self.steps = steps
        s = 0.008
        x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
        f = torch.cos(((x / steps) + s) / (1 + s) * torch.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).to(device=device, dtype=torch.float32)

    def net_time(self, k: torch.Tensor) -> torch.Tensor:
        """Integer step k in [0, K) -> the expert's time input in (0, 1]."""
        return (k.float() + 1.0) / self.steps


def ddpm_loss(eps_fn: UFn, actions: torch.Tensor, noise: torch.Tensor, k: torch.Tensor, valid: torch.Tensor,
              schedule: DDPMSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Epsilon prediction: x_k = sqrt(ab_k) a + sqrt(1 - ab_k) e; plain masked MSE on e."""
    ab = schedule.alphas_cumprod.to(actions.device)[k][:, None, None]
    x = ab.sqrt() * actions + (1 - ab).sqrt() * noise
    t = schedule.net_time(k).to(actions.dtype)
    with sdpa_kernel(SDPBackend.MATH):
        pred = eps_fn(x, t, t)
    per = masked_sq_error(pred, noise, valid)
    return per.mean(), per


def ddpm_sample(eps_fn: UFn, noise: torch.Tensor, nfe: int, schedule: DDPMSchedule, eta: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """DDIM-family sampler over nfe evenly strided steps; eta = 1 with nfe = K is exactly ancestral DDPM."""
    if not 1 <= nfe <= schedule.steps:
        raise ValueError(f"ddpm nfe must be in [1, {schedule.steps}], got {nfe}")
    ab_all = schedule.alphas_cumprod.tolist()
    steps = torch.linspace(schedule.steps - 1, 0, nfe).round().long().tolist()
    x = noise
    for i, k in enumerate(steps):
        ab = ab_all[k]
        ab_prev = ab_all[steps[i + 1]] if i + 1 < len(steps) else 1.0
        tt = _full(x, (k + 1) / schedule.steps)
        eps = eps_fn(x, tt, tt)
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        sigma = eta * math.sqrt(max(0.0, (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(0.0, 1 - ab_prev - sigma**2)) * eps
        if sigma > 0 and i + 1 < len(steps):
            x = x + sigma * draw_normal(tuple(x.shape), generator, x.device, x.dtype)
    return x


# ---- the objective, chosen once from the config ---------------------------------------------------------------
class Objective(ABC):
    """A training objective with its sampler, over the expert in normalised action space."""

    name: ClassVar[str]

    def __init__(self, config: MeanFlowConfig) -> None:
        self.config = config

    @property
    def max_nfe(self) -> int | None:
        """The most network evaluations the sampler can use (None: any number)."""
        return None

    @abstractmethod
    def loss(self, u_fn: UFn, actions: torch.Tensor, noise: torch.Tensor, valid: torch.Tensor,
             generator: torch.Generator | None, t: torch.Tensor | None = None,
             r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(loss, per-sample error, extra log values); ``t``/``r`` override the random time draws."""

    @abstractmethod
    def sample(self, u_fn: UFn, noise: torch.Tensor, nfe: int, generator: torch.Generator | None) -> torch.Tensor:
        """Normalised actions from ``noise`` in ``nfe`` expert evaluations."""

    @property
    def deterministic(self) -> bool:
        """Whether ``sample`` is a function of its noise alone (guidance needs one to differentiate)."""
        return True

    def guided_sample(self, u_fn: UFn, noise: torch.Tensor, nfe: int, target: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
        """Real-time chunking by noise-space guidance: a chunk whose values follow ``target`` (B, T, D) where
        ``weights`` (T, D) is > 0 (the committed prefix), the rest the model's own continuation from there.

        ``GUIDE_STEPS`` steepest-descent steps on the noise of the weighted squared error between the sampled chunk and
        the target, each length found by a probe along the gradient (the error is near quadratic in the noise:
        the step lands on the minimum of the parabola through the two values; no step size to tune, whatever the
        scale of the model's noise-to-chunk map). A step costs one backpropagation through the sampler and one
        more sample (with a one-step sampler: three expert passes); one that does not lower the error ends the
        search. The noise stays within ``GUIDE_MAX_SHIFT`` of the drawn one per value (a plausible draw). This
        is the RTC paper's prefix inpainting where a one-step model has no intermediate denoising states to
        guide: only the noise it starts from.
        """
        if not self.deterministic:
            raise ValueError(f"guidance needs a deterministic sampler; {self.name} draws noise at every step")

        def error(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            actions = self.sample(u_fn, z, nfe, None)
            return (weights[None] * (actions - target) ** 2).sum(), actions

        def with_grad(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                loss, actions = error(z)
                (grad,) = torch.autograd.grad(loss, z)
            return loss.detach(), actions.detach(), grad

        z = noise.detach()
        loss, actions, grad = with_grad(z)
        for _ in range(GUIDE_STEPS):
            gg = float((grad * grad).sum())
            if gg <= 0.0:
                break
            probe = 1.0 / math.sqrt(gg)  # a unit step in noise space along the gradient
            curvature = (float(error(z - probe * grad)[0]) - float(loss) + probe * gg) / probe**2
            length = gg / (2 * curvature) if curvature > 0 else probe
            candidate = noise + (z - length * grad - noise).clamp(-GUIDE_MAX_SHIFT, GUIDE_MAX_SHIFT)
            c_loss, c_actions, c_grad = with_grad(candidate)
            if not c_loss < loss:
                break
            z, loss, actions, grad = candidate, c_loss, c_actions, c_grad
        return actions


_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` selectable by ``config.objective == cls.name``."""
    if cls.name not in OBJECTIVES:
        raise ValueError(f"objective class {cls.__name__} has name {cls.name!r}, not one of {OBJECTIVES}")
    _REGISTRY[cls.name] = cls
    return cls


def make_objective(config: MeanFlowConfig) -> Objective:
    """The Objective of ``config.objective`` (ValueError naming the field if none is registered under it)."""
    cls = _REGISTRY.get(config.objective)
    if cls is None:
        raise ValueError(f"objective {config.objective!r} is not one of {sorted(_REGISTRY)}")
    return cls(config)


def registered_objectives() -> tuple[str, ...]:
    return tuple(_REGISTRY)


@register_objective
class MeanFlowObjective(Objective):
    """MeanFlow (the paper): average velocity u(z, r, t), JVP target, one-step sampling."""

    name = "meanflow"

    def loss(self, u_fn: UFn, actions: torch.Tensor, noise: torch.Tensor, valid: torch.Tensor,
             generator: torch.Generator | None, t: torch.Tensor | None = None,
             r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        cfg, dev = self.config, actions.device
        if t is None or r is None:
            t, r = sample_meanflow_times(actions.shape[0], cfg.flow_ratio, cfg.time_mean, cfg.time_std, generator, dev)
        t, r = t.to(dev), r.to(dev)
        if bool((r > t).any()):
            raise ValueError("meanflow needs r <= t for every sample")
        loss, per = meanflow_loss(u_fn, actions, noise, t, r, valid, cfg.adaptive_gamma, cfg.adaptive_c)
        return loss, per, {"frac_r_eq_t": float((r == t).float().mean())}

    def sample(self, u_fn: UFn, noise: torch.Tensor, nfe: int, generator: torch.Generator | None) -> torch.Tensor:
        return meanflow_sample(u_fn, noise, nfe)


@register_objective
class FlowMatchingObjective(Objective):
    """Flow matching (SmolVLA-style baseline): instantaneous velocity u(z, t, t), Euler sampling; r is ignored."""

    name = "flow_matching"

    def loss(self, u_fn: UFn, actions: torch.Tensor, noise: torch.Tensor, valid: torch.Tensor,
             generator: torch.Generator | None, t: torch.Tensor | None = None,
             r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        cfg, dev = self.config, actions.device
        if t is None:
            t = logit_normal(actions.shape[0], cfg.time_mean, cfg.time_std, generator, dev)
        loss, per = flow_matching_loss(u_fn, actions, noise, t.to(dev), valid, cfg.adaptive_gamma, cfg.adaptive_c)
        return loss, per, {}

    def sample(self, u_fn: UFn, noise: torch.Tensor, nfe: int, generator: torch.Generator | None) -> torch.Tensor:
        return euler_sample(u_fn, noise, nfe)

    def guided_sample(self, u_fn: UFn, noise: torch.Tensor, nfe: int, target: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
        """The RTC paper's prefix inpainting itself (Black et al. 2025, Algorithm 1): a multi-step sampler has
        intermediate states, and each Euler step is guided by a vector-Jacobian product that pulls the chunk it
        predicts onto the weighted rows (rather than searching the noise, as the base class must for one step)."""
        return rtc_guided_euler(u_fn, noise, nfe, target, weights)


@register_objective
class DDPMObjective(Objective):
    """DDPM (Diffusion-Policy-style baseline): epsilon prediction on a cosine schedule; ``t`` holds integer steps k.

    ``ddpm_sampler`` "ddpm" samples ancestrally (eta 1), "ddim" deterministically (eta 0)."""

    name = "ddpm"

    def __init__(self, config: MeanFlowConfig) -> None:
        super().__init__(config)
        self.schedule = DDPMSchedule(config.ddpm_train_steps)
        self.eta = 1.0 if config.ddpm_sampler == "ddpm" else 0.0

    @property
    def max_nfe(self) -> int | None:
        return self.schedule.steps

    def loss(self, u_fn: UFn, actions: torch.Tensor, noise: torch.Tensor, valid: torch.Tensor,
             generator: torch.Generator | None, t: torch.Tensor | None = None,
             r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        dev = actions.device
        if t is None:
            gen_device = generator.device if generator is not None else dev
            t = torch.randint(0, self.schedule.steps, (actions.shape[0],), generator=generator, device=gen_device)
        loss, per = ddpm_loss(u_fn, actions, noise, t.to(dev), valid, self.schedule)
        return loss, per, {}

    @property
    def deterministic(self) -> bool:
        return self.eta == 0.0

    def sample(self, u_fn: UFn, noise: torch.Tensor, nfe: int, generator: torch.Generator | None) -> torch.Tensor:
        return ddpm_sample(u_fn, noise, nfe, self.schedule, self.eta, generator)
