"""Reproducible installs: every dependency the package declares is pinned to one exact version in
constraints.txt, and the environment running the tests has those versions (make and CI install with
`-c constraints.txt`)."""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not an exact pin"
            found[canonical(name)] = pinned.strip()
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["test"] + extras["gemma"]]


def test_every_declared_dependency_is_pinned_within_its_range():
    pinned = pins()
    for requirement in declared():
        name = canonical(requirement.name)
        assert name in pinned, f"{requirement.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside the declared {requirement.specifier}"


def test_the_environment_has_the_pinned_versions():
    pinned = pins()
    for requirement in declared():
        installed = version(requirement.name).split("+")[0]  # torch's CPU wheel is 2.13.0+cpu
        assert installed == pinned[canonical(requirement.name)], \
            f"{requirement.name} {installed} is installed, constraints.txt pins {pinned[canonical(requirement.name)]}"
