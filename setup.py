"""Package layout that pyproject.toml cannot express on its own.

The presets and monitoring files live in the top-level ``configs/`` directory (where scripts, Slurm
jobs and the docs point), and are shipped inside the package as ``spade_dist.configs`` so that an
installed wheel finds them through ``importlib.resources`` (see ``spade_dist/resources.py``).
Code packages are discovered, so a new subpackage needs no edit here.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["spade_dist", "spade_dist.*", "data_tools", "data_tools.*"])
    + ["spade_dist.configs"],
    package_dir={"spade_dist.configs": "configs"},
    package_data={"spade_dist.configs": ["*.yaml", "class_maps/*.yaml", "monitoring/*.yml", "monitoring/grafana/*.json",
                                         "monitoring/grafana/provisioning/*/*.yaml"],
                  "spade_dist.serve": ["static/*"]},  # the spade-serve page
)
