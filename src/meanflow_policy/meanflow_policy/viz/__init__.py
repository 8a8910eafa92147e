"""Rerun views of the stack: an episode bag (``so101-viz``) and the live graph (``viz_node``), one mapping."""

# s: how long a viewer is given to take a whole recording before it counts as unreachable (so101-viz --viewer-timeout,
# viz_node on shutdown): long enough for a viewer across a slow link, short enough that a wrong URL is one error.
VIEWER_TIMEOUT_S = 10.0
