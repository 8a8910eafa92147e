from glob import glob

from setuptools import find_packages, setup

PACKAGE = "meanflow_policy"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        # Shipped checkpoints are package data: tools find them with get_package_share_directory.
        *[(f"share/{PACKAGE}/{d}", glob(f"{d}/*")) for d in sorted(glob("checkpoints/*"))],
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="so101-meanflow developers",
    maintainer_email="dev@so101-meanflow.invalid",
    description="Mean-Flow one-step Vision-Language-Action policy: model, training from rosbag2 demos, policy node.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "policy_node = meanflow_policy.policy_node:main",
            "meanflow-train = meanflow_policy.train_cli:main",
            "meanflow-eval-bag = meanflow_policy.eval_bag_cli:main",
            "meanflow-bench = meanflow_policy.bench:main",
            "meanflow-bench-node = meanflow_policy.bench_node:main",
            "so101-export-lerobot = meanflow_policy.lerobot_dataset:main",
        ]
    },
)
