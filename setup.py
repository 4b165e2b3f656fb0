"""Maps the top-level folders onto the `moe_reuse` namespace, with their data files.

The design card wants `plugin/`, `predictor/` and `dashboards/` at the top level, while the import
names must not be generic top-level names; setuptools' package_dir does the mapping, and this file
only exists because the mapping of every subpackage has to be computed.

Data travels the same way: every file in a package folder that is not Python source (py.typed,
model_specs.json) and every file in a folder below it that is not a package itself (predictor/data/,
plugin/live/data/, dashboards/generated/) becomes package data. A pattern list would miss the next
data folder someone adds; tests/test_packaging.py checks the built wheel and sdist against the tree.
"""

from pathlib import Path

from setuptools import find_packages, setup

FOLDERS = ("plugin", "predictor", "dashboards")
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = {".py", ".pyc", ".pyo"}


def _is_package(folder: Path) -> bool:
    return (folder / "__init__.py").is_file()


def _data_files(package_folder: Path) -> list[str]:
    """Package-relative paths of the data files that belong to this package."""
    found = [
        f.name
        for f in package_folder.iterdir()
        if f.is_file() and f.suffix not in SKIP_SUFFIXES and not f.name.startswith(".")
    ]
    pending = [d for d in package_folder.iterdir() if d.is_dir() and not _is_package(d)]
    while pending:
        folder = pending.pop()
        if folder.name in SKIP_DIRS or folder.name.startswith("."):
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                pending.append(entry)
            elif entry.suffix not in (".pyc", ".pyo") and not entry.name.startswith("."):
                found.append(entry.relative_to(package_folder).as_posix())
    return sorted(found)


packages: list[str] = []
package_dir: dict[str, str] = {}
package_data: dict[str, list[str]] = {}
for folder in FOLDERS:
    for sub in [""] + ["." + p for p in find_packages(folder)]:
        name = f"moe_reuse.{folder}{sub}"
        path = folder + sub.replace(".", "/")
        packages.append(name)
        package_dir[name] = path
        files = _data_files(Path(path))
        if files:
            package_data[name] = files

setup(
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    include_package_data=False,  # package_data above is the whole list; MANIFEST.in is sdist-only
)
