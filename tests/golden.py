"""Characterisation ("golden") checks: the shape of what users read stays as it was.

A record's *shape* keeps every key and the kind of every value (``number``, ``str``, ``bool``,
``null``) but not the numbers themselves, which move with training; lists keep the distinct shapes
of their items. Agreement statistics that are undefined when one rater is constant (a
correlation, a kappa; NaN, written as null) have the kind ``number|null``: whether a phantom
model's scores vary is training's luck, not a change of shape. ``check(name, value)`` compares
against ``tests/golden/NAME.json``; with ``CXRTUNE_GOLDEN=update`` it rewrites the file instead
(review the diff: that is a change users see).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"
# cxrtune.scoring.agreement's statistics that a constant rater leaves undefined (n > 0).
MAYBE_UNDEFINED = frozenset({"pearson", "spearman", "kappa_linear", "kappa_quadratic", "spearman_ci",
                             "kappa_quadratic_ci"})


def shape(value, key: str | None = None):
    """The key tree of ``value`` with each leaf replaced by its kind."""
    if key in MAYBE_UNDEFINED:
        if shape(value) in ("number", "null"):
            return "number|null"
        if isinstance(value, (list, tuple)) and all(shape(v) in ("number", "null") for v in value):
            return ["number|null"] if value else []
    if isinstance(value, dict):
        return {str(k): shape(v, str(k)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        seen = []
        for item in value:
            s = shape(item)
            if s not in seen:
                seen.append(s)
        return sorted(seen, key=lambda s: json.dumps(s, sort_keys=True))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "str"


def check(name: str, value, exact: bool = False) -> None:
    """Assert ``value``'s shape (or, with ``exact``, ``value`` itself) equals the golden file's."""
    got = json.loads(json.dumps(value)) if exact else shape(value)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("CXRTUNE_GOLDEN") == "update":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return
    assert path.exists(), f"{path} missing: run once with CXRTUNE_GOLDEN=update and review it"
    want = json.loads(path.read_text())
    assert got == want, f"{name} changed shape:\n{_diff(want, got)}"


def _diff(want, got, at: str = "") -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        lines = [f"{at}.{k}: removed" for k in want.keys() - got.keys()]
        lines += [f"{at}.{k}: added" for k in got.keys() - want.keys()]
        lines += [_diff(want[k], got[k], f"{at}.{k}") for k in want.keys() & got.keys() if want[k] != got[k]]
        return "\n".join(x for x in lines if x)
    return f"{at}: {json.dumps(want)} -> {json.dumps(got)}"
