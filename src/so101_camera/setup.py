from setuptools import find_packages, setup

PACKAGE = "so101_camera"

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
    description="Camera node for the SO-101 (V4L2 device, video file or test pattern), one instance per camera.",
    license="Apache-2.0",
    entry_points={"console_scripts": ["camera_node = so101_camera.camera_node:main"]},
)
