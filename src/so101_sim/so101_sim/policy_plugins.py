"""Checkpoint policies for the sim tools come from plugins, so so101_sim never imports a policy package.

A policy package registers a module under the entry-point group ``so101_sim.policies`` (meanflow_policy:
``meanflow = meanflow_policy.tools.sim_adapter``). The module provides ``load(checkpoint, device)`` returning an object
that meets :class:`CheckpointPolicy`, ``default_checkpoint()`` (the checkpoint it ships, found in its share
directory) and ``NODE_MODULE`` (the module of its ROS node, for the closed-loop demo). The dependency then points
from the policy to the sim's protocol, never back, and the package graph has no cycle.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

ENTRY_POINT_GROUP = "so101_sim.policies"
DEFAULT_PLUGIN = "meanflow"
SHIPPED = "shipped"  # --checkpoint shipped: the checkpoint the plugin's package installs


class CheckpointPolicy(Protocol):
    """What so101-eval, recovery and the demo need from a loaded checkpoint (a rollout Policy plus NFE/noise)."""

    nfe: int

    @property
    def chunk_size(self) -> int: ...

    def __call__(self, observation: dict) -> np.ndarray: ...

    def reseed(self, seed: int) -> None: ...

    def last_latency_ms(self) -> float | None: ...


class PolicyPluginError(RuntimeError):
    """No installed package provides the requested policy plugin."""


def plugin(name: str = DEFAULT_PLUGIN) -> ModuleType:
    """The plugin module registered as ``name``; a one-line error naming what is installed when it is missing."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        installed = ", ".join(sorted(found)) or "none"
        raise PolicyPluginError(f"no policy plugin {name!r} in entry-point group {ENTRY_POINT_GROUP} (installed: "
                                f"{installed}); install the policy package, e.g. meanflow_policy")
    return found[name].load()


def load_checkpoint_policy(checkpoint: Path, device: str = "cpu", name: str = DEFAULT_PLUGIN) -> CheckpointPolicy:
    """Load ``checkpoint`` through the plugin ``name`` (ValueError/OSError for a bad checkpoint)."""
    return plugin(name).load(Path(checkpoint), device)


def default_checkpoint(name: str = DEFAULT_PLUGIN) -> Path:
    """The checkpoint the plugin's package ships, from its installed share directory."""
    return Path(plugin(name).default_checkpoint())


def resolve_checkpoint(argument: Path | None, name: str = DEFAULT_PLUGIN) -> Path:
    """A tool's --checkpoint: a directory as given, or (None / ``shipped``) the plugin's installed checkpoint."""
    if argument is None or str(argument) == SHIPPED:
        return default_checkpoint(name)
    return Path(argument)


def node_module(name: str = DEFAULT_PLUGIN) -> str:
    """The Python module of the plugin's policy node (started with ``python -m``)."""
    return str(plugin(name).NODE_MODULE)
