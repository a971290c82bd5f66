"""Which packages and files go into the wheel (the metadata lives in pyproject.toml).

configs/ stays at the top of the repository as the one copy of the YAML configs; the wheel ships it as the package
data nnctl/configs, which nnctl.commands finds when nnctl runs without its source tree.
"""
from setuptools import find_namespace_packages, find_packages, setup

# every config group dir is a (data-only) package of its own, so setuptools neither skips nor warns about it
CONFIG_PACKAGES = ["nnctl.configs", *(f"nnctl.configs.{p}" for p in find_namespace_packages(where="configs"))]

setup(
    packages=[*find_packages(include=["nnctl", "nnctl.*"]), *CONFIG_PACKAGES],
    package_dir={"nnctl.configs": "configs"},
    package_data={"nnctl": ["py.typed"], **{p: ["*.yaml"] for p in CONFIG_PACKAGES}},
)
