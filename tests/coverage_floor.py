"""A coverage floor per package for the inner loop (``pytest -m "not slow" --cov=cxrtune``).

pytest-cov's ``--cov-fail-under`` holds one total, which a well-covered package can carry for an
untested one. This plugin (loaded by ``tests/conftest.py``) groups the measured lines by package
(``bottom`` is the bottom layer: the modules at the package root), prints a table, and fails the
session when a package falls under its floor in pyproject's ``[tool.cxrtune.coverage-floor]``.

It checks only when the session measured coverage over the whole inner loop (the default test
paths, ``-m "not slow"``, no ``-k``): the full suite runs Ray workers and CLI subprocesses that
coverage does not follow, so its numbers mean something else, and a subset's say nothing.
Raise a floor when a package's tests grow; lower one only on purpose, in the same commit.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cxrtune"


def floors() -> dict[str, float]:
    """The per-package floors (percent of statements) from pyproject.toml."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {str(k): float(v) for k, v in data["tool"]["cxrtune"]["coverage-floor"].items()}


def package_of(path: Path) -> str:
    """``data`` for cxrtune/data/x.py; ``cli`` for cli.py; ``bottom`` for the other modules at the package root."""
    rel = path.resolve().relative_to(PACKAGE.resolve())
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "cli" if rel.name == "cli.py" else "bottom"


def package_coverage(cov) -> dict[str, tuple[int, int]]:
    """Statements and executed statements per package, over every module of the package (a module
    no test imported counts with all its statements missed)."""
    totals: dict[str, tuple[int, int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        _, statements, _, missing, _ = cov.analysis2(str(path))
        n, hit = totals.get(package_of(path), (0, 0))
        totals[package_of(path)] = (n + len(statements), hit + len(statements) - len(missing))
    return totals


def below_floor(totals: dict[str, tuple[int, int]], floor: dict[str, float]) -> list[str]:
    """One line per package under its floor (or without one: a new package needs a floor)."""
    problems = []
    for package, (n, hit) in sorted(totals.items()):
        percent = 100.0 * hit / n if n else 100.0
        if package not in floor:
            problems.append(f"{package}: no floor in [tool.cxrtune.coverage-floor] (measured {percent:.1f} %)")
        elif percent < floor[package]:
            problems.append(f"{package}: {percent:.1f} % of statements, under its floor of {floor[package]:.0f} %")
    return problems


def _measured_fast_loop(config: pytest.Config) -> bool:
    """The whole inner loop under coverage: ``-m "not slow" --cov``, the default test paths, no
    ``-k`` (a subset of the tests says nothing about a package's floor)."""
    return (bool(getattr(config.option, "cov_source", None)) and "not slow" in (config.option.markexpr or "")
            and config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _measured_fast_loop(session.config):
        return
    plugin = session.config.pluginmanager.getplugin("_cov")
    cov = plugin.cov_controller.cov if plugin and plugin.cov_controller else None
    if cov is None:
        return
    totals = package_coverage(cov)
    lines = [f"{'package':<10} {'statements':>10} {'covered':>8} {'floor':>6}"]
    floor = floors()
    for package, (n, hit) in sorted(totals.items()):
        lines.append(f"{package:<10} {n:>10} {100.0 * hit / max(n, 1):>7.1f}% {floor.get(package, float('nan')):>5.0f}%")
    problems = below_floor(totals, floor)
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    if reporter:
        reporter.write_sep("-", "coverage per package (tests/coverage_floor.py)")
        reporter.write_line("\n".join(lines + problems))
    if problems and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
