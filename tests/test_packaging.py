"""The pip package (pyproject.toml): its dependency list, its package list and the wheel it builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from utils.config import DEFAULTS_PATH, load_config

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("multimae", "utils")  # the top-level packages the wheel installs


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements_txt() -> list[str]:
    """requirements.txt as pip reads it: one requirement a line, ``#`` starts a comment."""
    lines = (line.split(" #")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _canonical(reqs) -> list[str]:
    return sorted(str(Requirement(r)) for r in reqs)


def _source_packages() -> set[str]:
    """Dotted names of the folders under multimae/ and utils/ that hold Python files."""
    return {
        ".".join(py.parent.relative_to(REPO).parts)
        for top in PACKAGES for py in (REPO / top).rglob("*.py") if "__pycache__" not in py.parts
    }


def test_package_dependencies_are_requirements_txt():
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    dynamic = _pyproject()["project"].get("dynamic", [])
    assert "dependencies" in dynamic, "pyproject.toml must read its dependencies from requirements.txt"
    # What setuptools writes into the package metadata, requirement by requirement.
    install_requires = apply_configuration(Distribution(), REPO / "pyproject.toml").install_requires
    assert _canonical(install_requires) == _canonical(_requirements_txt())
    assert "deflate>=0.7" in install_requires  # its line in requirements.txt ends with a comment


def test_every_source_package_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = _source_packages() - listed
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}"
    assert "tests" not in listed and not any(p.startswith("tests.") for p in listed)


def test_source_tree_reads_its_own_defaults():
    # utils/cfgs/ exists only in an installed package; in the repository the defaults are cfgs/defaults.yaml.
    assert DEFAULTS_PATH == REPO / "cfgs" / "defaults.yaml"


@pytest.mark.slow
def test_wheel_contents_and_installed_defaults(tmp_path):
    """Build the wheel (no dependencies, no download), check its files, then import it from elsewhere."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel", reason="setuptools < 70.1 builds wheels only with the `wheel` package")
    # Build from a copy of the build's inputs (plus tests/, which must stay out): an in-tree build leaves
    # build/ behind, whose stale modules a later wheel would keep.
    src = tmp_path / "src"
    for folder in (*PACKAGES, "cfgs", "tests"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("multimae_eo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))

    expected_py = {str(py.relative_to(REPO)) for top in PACKAGES for py in (REPO / top).rglob("*.py")
                   if "__pycache__" not in py.parts}
    assert expected_py <= names, f"missing from the wheel: {sorted(expected_py - names)}"
    assert {n.split("/")[0] for n in names} == {*PACKAGES, dist_info}  # no tests/, cfgs/, scripts
    assert {n for n in names if not n.endswith(".py") and not n.startswith(dist_info)} == {"utils/cfgs/defaults.yaml"}
    assert (tmp_path / "site/utils/cfgs/defaults.yaml").read_bytes() == (REPO / "cfgs/defaults.yaml").read_bytes()
    metadata = (tmp_path / "site" / dist_info / "METADATA").read_text()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert _canonical(r for r in requires if "extra ==" not in r) == _canonical(_requirements_txt())

    # The extracted wheel is what site-packages holds; run from a folder that is neither the repo nor the wheel.
    probe = (
        "import json, multimae, utils.config as c\n"
        "from multimae import load_pretrained  # the export reader, importable from an installed package\n"
        "print(json.dumps([multimae.__file__, str(c.DEFAULTS_PATH), c.load_config(None, [])['model']]))\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    module_file, defaults_path, model_cfg = json.loads(proc.stdout.splitlines()[-1])
    assert Path(module_file).is_relative_to(tmp_path / "site")
    assert Path(defaults_path) == tmp_path / "site/utils/cfgs/defaults.yaml"
    assert model_cfg == load_config(None, [])["model"]  # the source tree's defaults, read from the wheel's copy
