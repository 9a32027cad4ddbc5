"""The repository's setup files agree with each other."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def conda_pip_requirements() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    return [line.strip()[2:] for line in lines[start + 1:] if line.strip().startswith("- ")]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert sorted(conda_pip_requirements()) == sorted(declared)


def test_the_tests_install_every_optional_tracker():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["wandb"] + extras["tensorboard"]) <= set(extras["dev"])


def test_torch_floor_excludes_the_sdpa_that_returns_nan_for_masked_rows():
    """torch < 2.5's GPU SDPA returns NaN for a fully masked row, which reaches real rows in HellaSwag and
    batched generation: neither setup file may admit it."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for listed in (project["dependencies"], conda_pip_requirements()):
        torch = next(Requirement(r) for r in listed if Requirement(r).name == "torch")
        assert not torch.specifier.contains("2.4.1") and torch.specifier.contains("2.5.0"), torch


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme

