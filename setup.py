"""Package layout that pyproject.toml cannot express on its own.

The presets and monitoring files live in the top-level ``configs/`` directory (where scripts, Slurm
jobs and the docs point), and are shipped inside the package as ``spade_dist.configs`` so that an
installed wheel finds them through ``importlib.resources`` (see ``spade_dist/resources.py``).
Folders that hold only data (``configs/monitoring/...``, ``spade_dist/serve/static``) are listed as
packages too: Python can import them as namespace packages, and setuptools warns about (and will one
day drop) every importable folder that is not in ``packages``. Code packages are discovered, so a new
subpackage needs no edit here.
"""
from setuptools import find_namespace_packages, find_packages, setup

CODE = find_packages(include=["spade_dist", "spade_dist.*", "data_tools", "data_tools.*"],
                     exclude=["spade_dist.configs", "spade_dist.configs.*"])
STATIC = ["spade_dist.serve.static"]  # the spade-serve page
CONFIGS = ["spade_dist.configs"] + [f"spade_dist.configs.{name}" for name in
                                    find_namespace_packages(where="configs", exclude=["*__pycache__*"])]
DATA_FILES = ["*.yaml", "*.yml", "*.json"]

setup(
    packages=CODE + STATIC + CONFIGS,
    package_dir={"spade_dist.configs": "configs"},
    package_data={**{name: DATA_FILES for name in CONFIGS}, "spade_dist.serve.static": ["*.html", "*.js", "*.css"]},
)
