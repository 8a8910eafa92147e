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
            "policy_node = meanflow_policy.ros.policy_node:main",
            "meanflow-train = meanflow_policy.tools.train:main",
            "meanflow-eval-bag = meanflow_policy.tools.eval_bag:main",
            "meanflow-average = meanflow_policy.tools.average:main",
            "meanflow-ground = meanflow_policy.tools.ground:main",
            "meanflow-bench = meanflow_policy.tools.bench:main",
            "meanflow-bench-node = meanflow_policy.tools.bench_node:main",
            "meanflow-bench-peers = meanflow_policy.tools.bench_peers:main",
            "so101-export-lerobot = meanflow_policy.tools.export_lerobot:main",
            "so101-viz = meanflow_policy.tools.viz:main",
            "viz_node = meanflow_policy.ros.viz_node:main",
        ],
        # so101_sim's tools evaluate a MeanFlow checkpoint through this plugin (so101_sim never imports us).
        "so101_sim.policies": ["meanflow = meanflow_policy.tools.sim_adapter"],
    },
)
