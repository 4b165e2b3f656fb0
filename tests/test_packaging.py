"""What users install: the built wheel and sdist carry every file of the source tree's packages.

The expected contents come from walking plugin/, predictor/ and dashboards/ in this checkout, not
from setup.py's own list, so a data folder that the build misses fails here. `make test` builds the
artifacts (`python -m build`, the sdist and the wheel built from it) into MOE_REUSE_DIST_DIR and
installs the wheel; without that variable the artifacts are built here (needs `build`).
MOE_REUSE_EXPECT_INSTALLED=1 (set by `make test`) also asserts that the suite imports the
installed wheel, not the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib import metadata, resources
from pathlib import Path

import pytest

from moe_reuse.predictor.errors import SpecError
from moe_reuse.predictor.loading import MissingDataError, packaged_data

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("plugin", "predictor", "dashboards")
DIST = "vllm-moe-reuse"
SKIP_SUFFIXES = (".pyc", ".pyo")


def _source_files() -> set[str]:
    """Every file under the package folders, as `moe_reuse/<folder>/<path>`."""
    found = set()
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*"):
            rel = path.relative_to(REPO)
            if (
                path.is_file()
                and path.suffix not in SKIP_SUFFIXES
                and not any(p == "__pycache__" or p.startswith(".") for p in rel.parts)
            ):
                found.add("moe_reuse/" + rel.as_posix())
    return found


def _data_files() -> set[str]:
    return {f for f in _source_files() if not f.endswith(".py")}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist): `make test`'s, or built here from this checkout."""
    given = os.environ.get("MOE_REUSE_DIST_DIR")
    if given:
        out = Path(given)
        if not out.is_absolute():
            out = REPO / out
    else:
        pytest.importorskip("build", reason="`pip install build` (the test extra) to build here")
        out = tmp_path_factory.mktemp("dist")
        subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
            check=True,
            capture_output=True,
        )
    wheels = sorted(out.glob("vllm_moe_reuse-*.whl"))
    sdists = sorted(out.glob("vllm_moe_reuse-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in {out}"
    return wheels[0], sdists[0]


def test_the_tree_has_data_folders() -> None:
    # guards the comparisons below against an empty walk (a moved checkout, a renamed folder)
    data = _data_files()
    assert "moe_reuse/predictor/data/table1.json" in data
    assert "moe_reuse/plugin/live/data/cpu-generic.json" in data
    assert "moe_reuse/plugin/harness/model_specs.json" in data
    assert len([f for f in data if f.startswith("moe_reuse/predictor/data/models/")]) >= 8


def test_wheel_carries_every_source_and_data_file(artifacts: tuple[Path, Path]) -> None:
    wheel, _ = artifacts
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_files() - names)
    assert not missing, f"{wheel.name} lacks {missing}"
    stray = sorted(n for n in names if not n.startswith(("moe_reuse/", "vllm_moe_reuse-")))
    assert not stray, f"{wheel.name} installs outside moe_reuse/: {stray}"


def test_wheel_metadata_declares_the_entry_points(artifacts: tuple[Path, Path]) -> None:
    wheel, _ = artifacts
    with zipfile.ZipFile(wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(info).decode()
    assert "moe-reuse = moe_reuse.plugin.cli:main" in text
    assert "[vllm.general_plugins]" in text and "moe_reuse = moe_reuse.plugin:register" in text


def test_sdist_carries_every_source_file_and_the_tests(artifacts: tuple[Path, Path]) -> None:
    _, sdist = artifacts
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
    top = names[0].split("/")[0]
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    missing = sorted(f.removeprefix("moe_reuse/") for f in _source_files()
                     if f.removeprefix("moe_reuse/") not in rel)
    assert not missing, f"{sdist.name} lacks {missing}"
    for needed in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "tests/test_packaging.py"):
        assert needed in rel, f"{sdist.name} lacks {top}/{needed}"


def _under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


@pytest.mark.skipif(
    os.environ.get("MOE_REUSE_EXPECT_INSTALLED") != "1",
    reason="only under `make test`, which installs the built wheel (set MOE_REUSE_EXPECT_INSTALLED=1)",
)
def test_suite_runs_against_the_installed_wheel() -> None:
    import moe_reuse.dashboards
    import moe_reuse.plugin
    import moe_reuse.predictor

    site = Path(sysconfig.get_paths()["purelib"])
    for mod in (moe_reuse.plugin, moe_reuse.predictor, moe_reuse.dashboards):
        where = Path(mod.__file__ or "")
        assert _under(where, site), f"{mod.__name__} imported from {where}, not {site}"
        folder = REPO / mod.__name__.split(".")[1]
        assert not _under(where, folder), f"{mod.__name__} imported from the checkout: {where}"
    # one vllm-moe-reuse on the path (a checkout's leftover *.egg-info would shadow its metadata)
    dists = [d for d in metadata.distributions() if d.metadata["Name"] == DIST]
    assert len(dists) == 1, [str(d.locate_file("")) for d in dists]
    direct = json.loads(dists[0].read_text("direct_url.json") or "{}")
    assert not direct.get("dir_info", {}).get("editable"), f"{DIST} is an editable install: {direct}"
    assert direct.get("url", "").endswith(".whl"), f"{DIST} was not installed from a wheel: {direct}"
    given = os.environ.get("MOE_REUSE_DIST_DIR")
    if given:  # the very wheel `make test` built, at its version
        wheel = next((REPO / given).glob("vllm_moe_reuse-*.whl"))
        assert metadata.version(DIST) == wheel.name.split("-")[1]
        assert Path(direct["url"].removeprefix("file://")).name == wheel.name


def test_packaged_data_is_found_through_the_import_system() -> None:
    table = packaged_data("moe_reuse.predictor", "data", "table1.json")
    assert json.loads(table.read_text())["rows"]
    assert packaged_data("moe_reuse.plugin.live", "data", "cpu-generic.json").is_file()


def test_missing_data_names_the_file_and_the_fix() -> None:
    with pytest.raises(MissingDataError) as err:
        packaged_data("moe_reuse.predictor", "data", "models", "no-such-model.json")
    assert isinstance(err.value, SpecError)  # the CLIs print SpecErrors as one line, status 2
    text = str(err.value)
    assert "moe_reuse/predictor/data/models/no-such-model.json" in text
    assert "python -m build" in text and "pip install --force-reinstall" in text


def test_cli_reports_missing_data_without_a_traceback(tmp_path: Path) -> None:
    """A copy of the installed predictor without its data/, first on the path: what a broken
    install looks like to `moe-reuse predict` and `moe-reuse models`."""
    broken = tmp_path / "moe_reuse" / "predictor"
    shutil.copytree(Path(str(resources.files("moe_reuse.predictor"))), broken,
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for args in (
        ["predict", "--model", "deepseek-v3", "--hardware", "h200", "--gpus", "8", "--context", "8k"],
        ["models"],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "moe_reuse.plugin.cli", *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith("moe-reuse: error: moe_reuse/predictor/data/models: is missing")
        assert str(broken) in run.stderr and "python -m build" in run.stderr
