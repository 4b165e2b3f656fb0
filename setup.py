"""Maps the top-level folders onto the `moe_reuse` namespace.

The design card wants `plugin/`, `predictor/` and `dashboards/` at the top level, while the import
names must not be generic top-level names; setuptools' package_dir does the mapping, and this file
only exists because the mapping of every subpackage has to be computed.
"""

from setuptools import find_packages, setup

FOLDERS = ("plugin", "predictor", "dashboards")

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder in FOLDERS:
    for sub in [""] + ["." + p for p in find_packages(folder)]:
        name = f"moe_reuse.{folder}{sub}"
        packages.append(name)
        package_dir[name] = folder + sub.replace(".", "/")

setup(packages=packages, package_dir=package_dir)
