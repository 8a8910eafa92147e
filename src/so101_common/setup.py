from setuptools import find_packages, setup

PACKAGE = "so101_common"

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
    description="SO-101 graph contract, trajectory-following core and episode bag format.",
    license="Apache-2.0",
    # Node-test fixtures (node_process, ros_node) and the loopback guard, for every package's tests.
    entry_points={
        "pytest11": ["so101_common = so101_common.testing"],
        "console_scripts": ["so101-recover-episode = so101_common.recover_episode:main"],
    },
)
