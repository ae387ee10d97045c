"""Packaging: pyproject.toml and the three requirements files keep one place for each pin.

requirements.txt is the runtime (plain requirement lines: pyproject.toml reads it as the package's
dependencies); requirements-dev.txt adds the tests' and CI's tools to it; requirements-gpu.txt
takes requirements.txt as constraints and swaps tensorflow-cpu for `tensorflow[and-cuda]`. The
resolver test asks the package index (PIP_INDEX_URL, else PyPI) and is skipped only when that
index cannot be reached.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TENSORFLOW = {"tensorflow", "tensorflow-cpu"}


def lines(name: str) -> list[str]:
    """A requirements file's lines without comments and blank lines."""
    text = (ROOT / name).read_text(encoding="utf-8")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.split(" #")[0].strip()
            and not line.lstrip().startswith("#")]


def requirements(name: str) -> list[Requirement]:
    return [Requirement(line) for line in lines(name) if not line.startswith("-")]


def test_pyproject_dependencies_are_requirements_txt():
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools calls `dynamic` file: dependencies a beta feature
        config = read_configuration(ROOT / "pyproject.toml")
    declared = [str(Requirement(line.split(" #")[0])) for line in config["project"]["dependencies"]]
    assert declared == [str(r) for r in requirements("requirements.txt")]
    assert config["project"]["requires-python"] == ">=3.11"
    assert config["project"]["dynamic"] == ["dependencies"]


def test_requirements_txt_is_plain_requirements_each_pinned_once():
    """pyproject.toml cannot read pip options (-r, -c): only requirement lines, each pinned with ==."""
    assert lines("requirements.txt") and not [line for line in lines("requirements.txt") if line.startswith("-")]
    reqs = requirements("requirements.txt")
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs)
    names = [r.name for r in reqs if r.name not in TENSORFLOW]
    assert len(names) == len(set(names)) and {r.name for r in reqs} >= TENSORFLOW


def test_dev_requirements_add_tools_to_the_runtime_without_repinning_it():
    assert lines("requirements-dev.txt")[0] == "-r requirements.txt"
    runtime = {r.name for r in requirements("requirements.txt")}
    tools = requirements("requirements-dev.txt")
    assert {"pytest", "ruff"} <= {r.name for r in tools} and not runtime & {r.name for r in tools}
    assert all(next(iter(r.specifier)).operator == "==" for r in tools)


def test_gpu_requirements_are_the_runtime_names_with_tensorflow_for_cuda():
    """The versions come from requirements.txt (constraints); only TensorFlow's line carries one."""
    assert lines("requirements-gpu.txt")[0] == "-c requirements.txt"
    gpu = requirements("requirements-gpu.txt")
    (tensorflow,) = [r for r in gpu if r.name in TENSORFLOW]
    assert (tensorflow.name, tensorflow.extras, str(tensorflow.specifier)) == ("tensorflow", {"and-cuda"}, "==2.21.0")
    runtime = {r.name for r in requirements("requirements.txt")} - TENSORFLOW
    assert sorted(r.name for r in gpu if r is not tensorflow) == sorted(runtime)
    assert not [r for r in gpu if r is not tensorflow and (r.specifier or r.extras or r.marker)]


def test_the_package_holds_every_stages_folder_and_the_serve_page():
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setuptools = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    folders = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stages").rglob("__init__.py"))
    assert sorted(setuptools["packages"]) == folders == ["stages", "stages.lib"]
    data = [p.relative_to(ROOT / "stages").as_posix() for p in (ROOT / "stages").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert setuptools["package-data"] == {"stages": data} == {"stages": ["serve.html"]}


def index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/").rstrip("/") + "/"


def test_gpu_requirements_resolve_to_tensorflow_with_cuda_not_tensorflow_cpu(tmp_path):
    """A resolver dry run (no download of the wheels, no install) of requirements-gpu.txt."""
    try:
        urllib.request.urlopen(index_url() + "tensorflow/", timeout=15).close()
    except OSError as err:  # URLError, a timeout, a refused connection: no index to ask
        pytest.skip(f"package index {index_url()} unreachable: {err}")
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                           "--only-binary=:all:", "--timeout", "60", "--quiet", "--report", str(report),
                           "-r", "requirements-gpu.txt"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {canonicalize_name(item["metadata"]["name"]): item for item in json.loads(report.read_text())["install"]}
    assert "tensorflow-cpu" not in chosen
    tensorflow = chosen["tensorflow"]
    assert tensorflow["metadata"]["version"] == "2.21.0" and tensorflow["requested_extras"] == ["and-cuda"]
    cuda = [r for r in tensorflow["metadata"]["requires_dist"] if re.search(r"""extra\s*==\s*["']and-cuda""", r)]
    assert any(r.startswith("nvidia-cudnn") for r in cuda), "the and-cuda extra brings cuDNN as a pip wheel"
    pins = {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in requirements("requirements.txt")
            if r.name not in TENSORFLOW}
    assert {name: chosen[name]["metadata"]["version"] for name in pins} == pins, "the same pins as requirements.txt"
