"""Parameter declaration for the leader and evdev Joy nodes: with a description, and a wrong type as one clear line.

rclpy raises InvalidParameterTypeException (a traceback, not a ValueError) when ``-p rate_hz:=200`` meets a float
default; spin_node turns the ValueError raised here into ``<node>: invalid configuration: ...`` and exit 2.
"""
from __future__ import annotations

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.node import Node

_TYPE_WORDS = {bool: "a boolean (true/false)", int: "an integer", float: "a floating-point number (e.g. 1.0)",
               str: "a string"}


def declare(node: Node, name: str, default: object, description: str):
    """Declare ``name`` with ``description`` and return its value."""
    try:
        return node.declare_parameter(name, default, ParameterDescriptor(description=description)).value
    except InvalidParameterTypeException:
        given = node._parameter_overrides[name].value  # rclpy keeps the --ros-args values there
        raise ValueError(f"parameter {name} must be {_TYPE_WORDS[type(default)]} (like its default "
                         f"{name}:={default!r}), got {given!r}") from None
