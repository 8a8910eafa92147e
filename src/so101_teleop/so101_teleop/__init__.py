"""Joy-Con teleoperation of the SO-101 and the rosbag2 episode recorder."""
