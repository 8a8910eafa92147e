"""Rerun views of the stack: an episode bag (``so101-viz``) and the live graph (``viz_node``), one mapping."""
