"""Mean-Flow one-step Vision-Language-Action policy: model, training from rosbag2 demos, policy node."""
