"""What pyproject.toml declares is what the code imports, and the lock file pins what a fresh
install gets: every installed distribution at its locked version, every pin inside pyproject's
ranges, and CI installing exactly as README says."""

from __future__ import annotations

import ast
import re
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

LOCK = ROOT / ".ci" / "constraints.txt"

# Declared, never imported by name: each is found by another package at run time.
PLUGINS = {
    "timm": "SMP's `tu-` encoders (tu-regnetx_064 in the search spaces)",
    "pylibjpeg": "pydicom's pixel-data handlers for compressed transfer syntaxes",
    "pylibjpeg-libjpeg": "pylibjpeg's JPEG baseline/lossless and JPEG-LS decoder",
    "pylibjpeg-openjpeg": "pylibjpeg's JPEG 2000 decoder",
    "wandb": "Ray's WandbLoggerCallback imports it",
    "onnx": "torch.onnx.export writes the model through it",
}
TEST_PLUGINS = {
    "pytest-timeout": "a pytest plugin (the `timeout` ini option)",
    "pydicom-data": "pydicom.data.get_testdata_file finds its files",
    "setuptools": "the build backend test_packaging builds the wheel with (no build isolation)",
    "wheel": "the same wheel build",
    "import-linter": "its lint-imports command checks the layer contracts (test_architecture)",
    "ruff": "its command lints the code (test_lint)",
    "mypy": "its command type-checks the package (test_lint)",
    "types-pyyaml": "stubs mypy reads",
    "types-requests": "stubs mypy reads",
    "pytest-cov": "a pytest plugin: the inner loop's coverage, checked per package by tests/coverage_floor.py",
}
NOT_LOCKED = {"pip": "the installer the virtual environment brings", "cxrtune": "this project, installed editable"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(group: str | None = None) -> dict[str, Requirement]:
    project = pyproject()["project"]
    reqs = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def imported_modules(paths: list[Path]) -> set[str]:
    """Top-level names of the absolute imports (module level or local) in these files, and of
    the modules named by literal ``pytest.importorskip``, ``importlib.import_module`` and
    ``__import__`` calls."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
                  in ("importorskip", "import_module", "__import__")):
                names.add(str(node.args[0].value).split(".")[0])
    return names - set(sys.stdlib_module_names) - {"cxrtune", "tests", "__future__"}


def distributions_of(modules: set[str], declared: set[str]) -> set[str]:
    """The distribution that provides each module (the declared one where several do)."""
    provided = metadata.packages_distributions()
    out = set()
    for module in modules:
        dists = {canonicalize_name(d) for d in provided.get(module, [])}
        assert dists, f"no installed distribution provides the imported module {module!r}"
        out.add(min(dists & declared) if dists & declared else min(dists))
    return out


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9._-]+)==(\S+)$", line.strip()):
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def test_declared_dependencies_are_the_imported_ones():
    core = requirements()
    used = distributions_of(imported_modules(sorted((ROOT / "cxrtune").rglob("*.py"))), set(core))
    assert used - set(core) == set(), "imported by cxrtune but not declared in pyproject's dependencies"
    assert set(core) - used - set(PLUGINS) == set(), "declared but never imported (a plugin? name it in PLUGINS)"
    assert set(PLUGINS) <= set(core) and not set(PLUGINS) & used  # a plugin that is imported leaves the list


def test_test_dependencies_are_declared():
    declared = set(requirements()) | set(requirements("test"))
    used = distributions_of(imported_modules(sorted((ROOT / "tests").glob("*.py"))), declared)
    assert used - declared == set(), "imported by the tests but declared nowhere"
    unused = set(requirements("test")) - used - set(TEST_PLUGINS)
    assert unused == set(), "in the test extra but never imported by a test"


def test_every_pin_satisfies_pyproject():
    pins = locked()
    for name, req in {**requirements(), **requirements("test")}.items():
        assert name in pins, f"{name} is declared but has no pin in {LOCK.name}: run `bash .ci/lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    assert "bash .ci/lock" in LOCK.read_text().split("\n\n")[0]  # made by the documented command


def test_every_installed_distribution_is_locked():
    """Holds in an environment installed as README says (CI's); a failure names what an
    install without the lock file brought in, or what changed since the lock was made. Only
    what pip installed into the environment counts, not copies vendored inside a package (Ray
    puts its own colorama and psutil on sys.path when imported)."""
    pins = locked()
    off = {}
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in metadata.distributions(path=site_packages):
        name = canonicalize_name(dist.metadata["Name"])
        if name not in NOT_LOCKED and pins.get(name) != Version(dist.version):
            off[name] = (dist.version, str(pins.get(name, "not in the lock")))
    assert off == {}, f"installed (version, locked): {off}; install with `-c .ci/constraints.txt`"


def test_ci_installs_and_tests_exactly_as_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = "python3 -m venv .venv && .venv/bin/pip install -q -c .ci/constraints.txt -e '.[test]'"
    test = ".venv/bin/python -m pytest"
    for command in (install, test):
        assert f"\n    {command}\n" in readme, command
        assert f"\n{command}\n" in ci, command


@pytest.mark.parametrize("name", ["torch", "starlette", "python-multipart", "pillow", "urllib3"])
def test_cve_floors_hold_in_pyproject(name):
    """Floors at the first releases that fix the published CVEs on cxrtune's paths
    (docs/dependencies.md): a range that admits an older release fails here."""
    floors = {"torch": "2.10", "starlette": "1.3.1", "python-multipart": "0.0.32", "pillow": "12.3",
              "urllib3": "2.6.3"}
    spec = requirements()[name].specifier
    below = Version(floors[name]).release
    older = Version(".".join(map(str, (*below[:-1], below[-1] - 1))) if below[-1] else "0")
    assert not spec.contains(older, prereleases=True) and spec.contains(floors[name])
