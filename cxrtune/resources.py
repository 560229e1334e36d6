"""The files cxrtune ships beside the package: ``serve/`` (Serve configs), ``search_spaces/``
(sweep spaces) and ``configs/`` (training configs).

In a source checkout they are the top-level folders; the wheel that cluster.yaml installs carries
them as data files under ``<prefix>/share/cxrtune/`` (pyproject.toml, ``data-files``), so
``cxrtune serve``, ``cxrtune tune --space lung_segmentation`` and the rest find them either way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import CxrtuneError

KINDS = ("serve", "search_spaces", "configs")


def roots() -> list[Path]:
    """Where shipped files are looked for, in order: the source tree; the prefix the wheel was
    installed into (``PREFIX/lib/pythonX.Y/site-packages/cxrtune`` -> ``PREFIX/share/cxrtune``);
    the running interpreter's prefix."""
    package = Path(__file__).resolve().parent
    found = [package.parent]
    if len(package.parents) > 3:
        found.append(package.parents[3] / "share" / "cxrtune")
    return found + [Path(sys.prefix) / "share" / "cxrtune"]


def shipped(kind: str, name: str) -> Path:
    """The shipped file ``kind/name`` (``.yaml`` may be left out)."""
    if kind not in KINDS:
        raise CxrtuneError(f"kind must be one of {', '.join(KINDS)}")
    names = [name] if name.endswith((".yaml", ".yml")) else [name, name + ".yaml"]
    for root in roots():
        for n in names:
            path = root / kind / n
            if path.is_file():
                return path
    available = sorted({p.name for r in roots() if (r / kind).is_dir() for p in (r / kind).glob("*.yaml")})
    raise CxrtuneError(f"no shipped {kind}/{name}; shipped: {', '.join(available) or 'none found'}")


def shipped_or(uri: str, kind: str) -> str:
    """``uri`` itself, or the shipped file's path when given a bare name (``lung_segmentation``)."""
    if "/" in uri or uri.endswith((".yaml", ".yml")):
        return uri
    return str(shipped(kind, uri))
