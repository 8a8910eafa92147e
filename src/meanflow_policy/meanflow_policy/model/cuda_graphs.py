"""CUDA-graph replay of a policy's per-chunk work (GPU only).

At batch 1 a chunk is a few thousand small kernels (vision encoder, LM layers over the image tokens, expert
blocks), and on a GPU their launch cost, not their arithmetic, sets the latency (docs/method.md). A captured graph
launches them all in one call. Two graphs per chunk keep the prefix / expert split of ``last_timing``: the prefix
graph (images, state -> expert context) is captured once per instruction, since it reads that instruction's cached
LM keys/values by address, and the expert graph (noise, guide -> chunk) once per sampler, step count and candidate
count, reading the prefix graph's outputs. Inputs are copied into the graphs' static buffers before each replay.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
C = TypeVar("C")
# Instructions whose prefix graph (and its expert graphs) is kept; the least recently used goes first.
MAX_INSTRUCTIONS = 4
# Eager runs on a side stream before a capture (lazy initialisation, cuBLAS workspaces, autotuning happen there).
WARMUP_RUNS = 2


def capture(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """Warm ``fn`` up on a side stream, then capture one call of it; returns the graph and that call's outputs,
    which every replay overwrites in place."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@dataclass
class _Prefix(Generic[C]):
    graph: torch.cuda.CUDAGraph
    images: torch.Tensor
    state: torch.Tensor
    context: C
    # What the graph reads by address besides its buffers (the instruction's cached LM keys/values): kept alive.
    keep: object
    experts: dict[Hashable, _Expert] = field(default_factory=dict)


@dataclass
class _Expert:
    graph: torch.cuda.CUDAGraph
    noise: torch.Tensor
    guide: tuple[torch.Tensor, torch.Tensor] | None
    chunk: torch.Tensor


class ChunkGraphs(Generic[C]):
    """Captured prefix and expert graphs of one policy, keyed by what changes their kernels or their addresses."""

    def __init__(self) -> None:
        self._prefixes: OrderedDict[Hashable, _Prefix[C]] = OrderedDict()
        self.captures = 0

    def clear(self) -> None:
        """Forget every graph (weights moved or changed dtype: the captured addresses are stale)."""
        self._prefixes.clear()

    def prefix(self, key: Hashable, images: torch.Tensor, state: torch.Tensor,
               build: Callable[[torch.Tensor, torch.Tensor], C], prepare: Callable[[], object]) -> C:
        """Replay (capturing first if new) ``build(images, state)`` -> the expert context, in static tensors.
        ``prepare`` runs eagerly before a capture; what it returns (the instruction's cached keys/values, which the
        graph reads by address) is kept alive with the graph."""
        entry = self._prefixes.get(key)
        if entry is None:
            kept = prepare()
            static_images, static_state = images.clone(), state.clone()
            graph, context = capture(lambda: build(static_images, static_state))
            entry = _Prefix(graph, static_images, static_state, context, kept)
            self._prefixes[key] = entry
            self.captures += 1
            while len(self._prefixes) > MAX_INSTRUCTIONS:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        entry.images.copy_(images)
        entry.state.copy_(state)
        entry.graph.replay()
        return entry.context

    def expert(self, prefix_key: Hashable, key: Hashable, noise: torch.Tensor,
               guide: tuple[torch.Tensor, torch.Tensor] | None,
               build: Callable[[C, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None], torch.Tensor]
               ) -> torch.Tensor:
        """Replay (capturing first if new) ``build(context, noise, guide)`` -> the chunk, on the context of the
        prefix graph ``prefix_key`` (replayed just before). The returned tensor is overwritten by the next replay."""
        prefix = self._prefixes[prefix_key]
        entry = prefix.experts.get(key)
        if entry is None:
            static_noise = noise.clone()
            static_guide = None if guide is None else (guide[0].clone(), guide[1].clone())
            graph, chunk = capture(lambda: build(prefix.context, static_noise, static_guide))
            entry = _Expert(graph, static_noise, static_guide, chunk)
            prefix.experts[key] = entry
            self.captures += 1
        entry.noise.copy_(noise)
        if entry.guide is not None and guide is not None:
            entry.guide[0].copy_(guide[0])
            entry.guide[1].copy_(guide[1])
        entry.graph.replay()
        return entry.chunk
