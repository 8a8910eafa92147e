#!/usr/bin/env bash
# Source the distro and the workspace, then run the command.
set -e
source "/opt/ros/${ROS_DISTRO:-kilted}/setup.bash"
source /ws/install/setup.bash
exec "$@"
