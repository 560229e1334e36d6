"""What the real-data benches share: COVID-QU-Ex as a manifest, and seeded label-stratified samples."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def covid_qu_ex(data: str | Path, out: Path) -> pd.DataFrame:
    """Import ``DATA/covid-qu-ex`` into ``OUT/cqe.parquet`` and load it (official Train/Val splits)."""
    from cxrtune.data import manifest
    from cxrtune.data.importers import run_import

    run_import("covid-qu-ex", str(Path(data) / "covid-qu-ex"), str(out / "cqe.parquet"), progress=False)
    return manifest.load_manifest(str(out / "cqe.parquet"))


def stratified(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """About ``n`` of ``rows``, the same fraction of each label (seeded), grouped by label."""
    return rows.groupby("label").sample(frac=min(1.0, n / len(rows)), random_state=0)
