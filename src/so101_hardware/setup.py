from setuptools import find_packages, setup

PACKAGE = "so101_hardware"

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
    description=(
        "Feetech STS3215 bus protocol, calibration and the SO-101 driver node"
        " (standalone or behind ros2_control's topic-based hardware)."
    ),
    license="Apache-2.0",
    entry_points={"console_scripts": [
        "driver_node = so101_hardware.driver_node:main",
        "so101-calibrate = so101_hardware.calibrate:main",
        "sts3215_emulator = so101_hardware.emulator:main",
        "so101-hw-bench = so101_hardware.bench:main",
    ]},
)
