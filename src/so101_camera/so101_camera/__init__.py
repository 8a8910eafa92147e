"""Camera node for the SO-101 (V4L2 device, video file or test pattern), one instance per camera."""
