"""The registry of ``cxrtune data import --format`` importers (like SMP's architectures) and what
every importer returns. Its own module so that importers living in other modules (reader grades,
:mod:`cxrtune.data.readers`) register without importing :mod:`cxrtune.data.importers`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class ImportResult:
    manifest: pd.DataFrame
    excluded: list[dict] = field(default_factory=list)  # {"file", "reason"}
    failed: list[dict] = field(default_factory=list)  # unreadable files, also in excluded

    def summary(self) -> str:
        return (f"imported {len(self.manifest)}, excluded {len(self.excluded) - len(self.failed)}, "
                f"failed {len(self.failed)}")


IMPORTERS: dict[str, Callable[..., ImportResult]] = {}


def importer(name: str):
    """Register the decorated function as the ``--format name`` importer of ``cxrtune data import``."""
    def register(fn):
        IMPORTERS[name] = fn
        return fn
    return register
