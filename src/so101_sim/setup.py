from setuptools import find_packages, setup

PACKAGE = "so101_sim"

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
    description="MuJoCo SO-101 pick-place simulation, scripted expert, sim node and closed-loop evaluation.",
    license="Apache-2.0",
    entry_points={"console_scripts": [
        "so101-sim-demos = so101_sim.demos:main",
        "so101-sim-recovery = so101_sim.recovery:main",
        "so101-eval = so101_sim.evaluate:main",
        "so101-results-table = so101_sim.results_table:main",
        "so101-eval-realtime = so101_sim.realtime:main",
        "sim_node = so101_sim.sim_node:main",
        "so101-sim-bench = so101_sim.bench:main",
        "so101-sim-sheet = so101_sim.contact_sheet:main",
        "so101-demo = so101_sim.closed_loop_demo:main",
    ]},
)
