from setuptools import find_packages, setup

PACKAGE = "so101_teleop"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="so101-meanflow developers",
    maintainer_email="dev@so101-meanflow.invalid",
    description="Joy-Con teleoperation of the SO-101 and the rosbag2 episode recorder.",
    license="Apache-2.0",
    entry_points={"console_scripts": [
        "teleop_node = so101_teleop.teleop_node:main",
        "episode_recorder = so101_teleop.recorder_node:main",
        "leader_node = so101_teleop.leader_node:main",
        "joy_evdev_node = so101_teleop.joy_evdev_node:main",
    ]},
)
