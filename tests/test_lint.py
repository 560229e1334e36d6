"""The code's checked habits: ruff's lint (pyproject's [tool.ruff]: pycodestyle, pyflakes, import
order, a complexity limit) over the package, the tests and the benchmarks, and mypy over the package
(pyproject's [tool.mypy]), which ships its hints (py.typed)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "cxrtune", "tests", "bench"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_no_blanket_lint_ignores():
    """A `# noqa` names its rule (and, for complexity, why); no file-wide or bare ignores."""
    blanket = re.compile(r"#\s*noqa(?!:)|#\s*ruff:\s*noqa|#\s*type:\s*ignore(?!\[)")
    found = [f"{p.relative_to(ROOT)}:{i}" for d in ("cxrtune", "tests", "bench") for p in (ROOT / d).rglob("*.py")
             if p.name != "test_lint.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if blanket.search(line)]
    assert not found, found


def test_mypy_is_clean():
    r = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert (ROOT / "cxrtune" / "py.typed").exists()


def test_every_package_has_a_coverage_floor_and_a_package_under_it_fails():
    from tests.coverage_floor import PACKAGE, below_floor, floors, package_of

    floor = floors()
    packages = {package_of(p) for p in PACKAGE.rglob("*.py")}
    assert packages == set(floor), "every package (and only those) has a floor in [tool.cxrtune.coverage-floor]"
    assert package_of(PACKAGE / "cli.py") == "cli" and package_of(PACKAGE / "zones.py") == "bottom"
    at_floor = {p: (1000, int(10 * f)) for p, f in floor.items()}
    assert below_floor(at_floor, floor) == []
    under = {**at_floor, "data": (1000, int(10 * floor["data"]) - 1)}
    assert below_floor(under, floor) == [f"data: {floor['data'] - 0.1:.1f} % of statements, under its floor of "
                                         f"{floor['data']:.0f} %"]
    assert "no floor" in below_floor({**at_floor, "new": (10, 10)}, floor)[0]
