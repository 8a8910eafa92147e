"""Checkpoint policies for the sim tools come from plugins, so so101_sim never imports a policy package.

A policy package registers a module under the entry-point group ``so101_sim.policies`` (meanflow_policy:
``meanflow = meanflow_policy.tools.sim_adapter``). The module provides ``load(checkpoint, device)`` returning an object
that meets :class:`CheckpointPolicy`, ``default_checkpoint(name=None)`` (a checkpoint it ships, found in its share
directory; None: its default one) and ``NODE_MODULE`` (the module of its ROS node, for the closed-loop demo). The
dependency then points from the policy to the sim's protocol, never back, and the package graph has no cycle.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

ENTRY_POINT_GROUP = "so101_sim.policies"
DEFAULT_PLUGIN = "meanflow"
SHIPPED = "shipped"  # --checkpoint shipped: the plugin package's default checkpoint; shipped:NAME another it installs
# How the tools' --checkpoint help names the two forms.
SHIPPED_HELP = ("'shipped': the policy plugin's default installed checkpoint (meanflow_policy: the multi-task "
                "sim_multitask); 'shipped:NAME': another it installs (e.g. shipped:sim_pick_place, "
                "shipped:sim_pick_place_rtc)")


class CheckpointPolicy(Protocol):
    """What so101-eval, recovery and the demo need from a loaded checkpoint (a rollout Policy plus NFE/noise and
    the chunks drawn per inference when an observation carries a ``guide``; ``steer`` true in it: rtc guidance)."""

    nfe: int
    candidates: int
    average: int
    input_size: int  # camera size read (px; 0: the trained size); setting a size it cannot read: ValueError

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


def default_checkpoint(name: str = DEFAULT_PLUGIN, shipped: str | None = None) -> Path:
    """The checkpoint ``shipped`` (None: the default one) that the plugin's package installs, from its share
    directory; ValueError naming the ones it ships for another name."""
    return Path(plugin(name).default_checkpoint(shipped))


def resolve_checkpoint(argument: Path | None, name: str = DEFAULT_PLUGIN) -> Path:
    """A tool's --checkpoint: a directory as given; None / ``shipped``: the plugin's default installed checkpoint;
    ``shipped:NAME``: the installed checkpoint NAME (e.g. ``shipped:sim_pick_place``)."""
    text = SHIPPED if argument is None else str(argument)
    if text == SHIPPED:
        return default_checkpoint(name)
    if text.startswith(SHIPPED + ":"):
        return default_checkpoint(name, text[len(SHIPPED) + 1:])
    return Path(text)


def node_module(name: str = DEFAULT_PLUGIN) -> str:
    """The Python module of the plugin's policy node (started with ``python -m``)."""
    return str(plugin(name).NODE_MODULE)
