"""The same install everywhere: pyproject.toml pins only ray, torch and torchvision (the versions the
project is written against), and `make setup` installs every package at the version of
requirements.lock, so that CI and every machine run the pyarrow, AWS SDK and test tools the suite
ran with (the S3 behaviour depends on the pyarrow and AWS SDK build)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["dev"]]


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_pyproject_pins_exactly_ray_torch_and_torchvision():
    pinned = {
        canonicalize_name(req.name) for req in declared() if any(s.operator == "==" for s in req.specifier)
    }
    assert pinned == {"ray", "torch", "torchvision"}


def test_the_lock_pins_every_declared_dependency_at_a_version_pyproject_allows():
    pins = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock (run `make lock`)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


def test_this_environment_runs_exactly_the_locked_versions():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differing = {
        name: (version, installed.get(name))
        for name, version in locked().items()
        if installed.get(name) != version
    }
    assert differing == {}, f"locked vs installed (run `make setup`): {differing}"
