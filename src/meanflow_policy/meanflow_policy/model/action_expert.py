"""The action expert: a Transformer over the action chunk (one token per step) that attends to the prefix.

It predicts the mean velocity u(z, r, t) (the instantaneous velocity when r = t, the noise for DDPM), conditioned
on t and t - r through sinusoidal embeddings and an MLP, applied with adaLN-Zero modulation. The prefix's
cross-attention keys/values are computed once per chunk (``prepare``) and reused by every sampling step; inside a
JVP they are constants, exactly as the MeanFlow identity requires. An expert built with ``known_rows`` also reads
committed rows of its chunk as clean actions (``ActionExpertContext.known``, real-time chunking by training): a
per-row input added to those rows' tokens, constant inside the JVP as the prefix is; the policy also starts those
rows at their actions instead of noise (MeanFlowPolicy._committed_start).

("Action expert" is the paper's name for this network; so101_sim's scripted expert is the demonstrator.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

# t in [0, 1] is stretched by this before the sinusoids; 10 learned faster than the usual 1000 on the toy test.
TIME_SCALE = 10.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) sinusoidal features (differentiable, so JVPs see dt)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = (TIME_SCALE * t)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


@dataclass
class ActionExpertContext:
    """What the expert needs from one prefix: per-block cross-attention K/V, the prefix mask and, when the policy
    has one, a (B, width) term added to the time conditioning of every adaLN modulation (the instruction's FiLM)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    attn_mask: torch.Tensor | None
    cond: torch.Tensor | None = None
    # Committed rows: (B, T, D) normalised actions and (B, T, 1) 1.0 where a row is committed, 0.0 elsewhere.
    known: torch.Tensor | None = None
    known_mask: torch.Tensor | None = None


class ExpertBlock(nn.Module):
    """Self-attention over the chunk, cross-attention to the prefix, MLP; adaLN-Zero on self-attn and MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm_cross = nn.LayerNorm(width, eps=1e-6)
        self.q_cross = nn.Linear(width, width)
        self.kv_cross = nn.Linear(width, 2 * width)
        self.cross_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)

    def cross_kv(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_cross(prefix).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, w = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond)).chunk(6, dim=-1)
        q, k, v = self.qkv(_modulate(self.norm1(x), shift1, scale1)).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        x = x + gate1[:, None] * self.attn_out(h.transpose(1, 2).reshape(b, n, w))
        q = self._heads(self.q_cross(self.norm_cross(x)))
        h = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask)
        x = x + self.cross_out(h.transpose(1, 2).reshape(b, n, w))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class ActionExpert(nn.Module):
    """u_theta(z, r, t | prefix) for a (B, chunk_size, action_dim) noisy chunk z."""

    def __init__(self, action_dim: int, chunk_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, time_dim: int = 128, known_rows: bool = False) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.action_dim = action_dim
        self.time_dim = time_dim
        self.in_proj = nn.Linear(action_dim, width)
        self.pos = nn.Parameter(torch.randn(1, chunk_size, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(2 * time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ExpertBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, action_dim)
        for layer in (self.final_ada, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # Committed rows in: their actions and a "committed" flag, added to those rows' tokens. Zero-initialised, so
        # a trained expert given this path acts exactly as before until it is trained with it.
        self.known_in: nn.Linear | None = None
        self.known_flag: nn.Parameter | None = None
        if known_rows:
            self.known_in = nn.Linear(action_dim, width)
            nn.init.zeros_(self.known_in.weight)
            nn.init.zeros_(self.known_in.bias)
            self.known_flag = nn.Parameter(torch.zeros(width))

    def prepare(self, prefix: torch.Tensor, prefix_mask: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> ActionExpertContext:
        """Per-chunk work: cross-attention K/V of every block for a (B, P, width) prefix; mask (B, P) True=valid;
        ``cond`` (B, width) joins the time conditioning."""
        kv = [cast(ExpertBlock, block).cross_kv(prefix) for block in self.blocks]
        attn_mask = None
        if prefix_mask is not None and not bool(prefix_mask.all()):
            attn_mask = prefix_mask[:, None, None, :]
        return ActionExpertContext(kv, attn_mask, cond)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, ctx: ActionExpertContext) -> torch.Tensor:
        if z.shape[1:] != (self.chunk_size, self.action_dim):
            raise ValueError(f"expert input must be (B, {self.chunk_size}, {self.action_dim}), got {tuple(z.shape)}")
        temb = torch.cat([timestep_embedding(t, self.time_dim), timestep_embedding(t - r, self.time_dim)], dim=-1)
        cond = self.time_mlp(temb)
        if ctx.cond is not None:
            cond = cond + ctx.cond
        x = self.in_proj(z) + self.pos
        if ctx.known is not None and ctx.known_mask is not None:
            if self.known_in is None or self.known_flag is None:
                raise ValueError("this expert reads no committed rows (built without known_rows)")
            x = x + ctx.known_mask * (self.known_in(ctx.known) + self.known_flag)
        for block, kv in zip(self.blocks, ctx.kv):
            x = block(x, cond, kv, ctx.attn_mask)
        shift, scale = self.final_ada(F.silu(cond)).chunk(2, dim=-1)
        return self.out(_modulate(self.final_norm(x), shift, scale))
