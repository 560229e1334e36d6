"""Patient-level, label-stratified, reproducible splits, folds and tuning subsets.

Every allocation works on patients, never images, so no patient lands in two splits or two folds.
Patients are stratified by their label (a patient with several labels counts under the most
frequent disease label). Written by hand because scikit-learn's group splitters either ignore
strata (GroupShuffleSplit) or only cut 1/k fractions (StratifiedGroupKFold); folds do use
StratifiedGroupKFold.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from ..errors import CxrtuneError


def _patient_strata(df: pd.DataFrame) -> pd.Series:
    """One label per patient: the most frequent non-normal label (of equally frequent ones, the
    first by name: a manifest's row order never changes a split), else ``normal``, else ``""``
    (unlabelled images form their own stratum and never outvote a patient's labelled ones)."""
    def pick(labels: pd.Series) -> str:
        labelled = labels[labels != ""]
        disease = labelled[labelled != "normal"]
        counts = (disease if len(disease) else labelled if len(labelled) else labels).value_counts()
        return sorted(counts.index[counts == counts.max()])[0]  # a tie goes by name, never by row order

    return df.groupby("patient_id")["label"].agg(pick)


def _allocate(patients: pd.Series, fractions: dict[str, float], rng: np.random.Generator) -> dict:
    """Map patient -> group name, each stratum cut by largest-remainder rounding."""
    out = {}
    for _, members in patients.groupby(patients):
        ids = np.array(sorted(members.index))
        rng.shuffle(ids)
        n = len(ids)
        raw = {k: f * n for k, f in fractions.items()}
        counts = {k: int(np.floor(v)) for k, v in raw.items()}
        for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
            counts[k] += 1
        start = 0
        for k, c in counts.items():
            for pid in ids[start:start + c]:
                out[pid] = k
            start += c
    return out


def assign_splits(df: pd.DataFrame, val: float = 0.1, test: float = 0.1, folds: int = 0,
                  seed: int = 0, tuning_fraction: float | None = None,
                  keep_test: bool = False) -> pd.DataFrame:
    """Return a copy with ``split``, ``fold`` and (optionally) ``tuning`` filled in.

    * ``split``: train/val/test by patient, stratified by label.
    * ``fold``: with ``folds >= 2``, cross-validation folds 0..k-1 over the non-test patients
      (test rows get -1).
    * ``tuning``: with ``tuning_fraction``, a stratified patient subset of the non-test rows
      (train and val both, so a tuning trial still validates).
    * ``keep_test``: rows already marked ``test`` stay there and are not re-drawn.
    """
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise CxrtuneError(f"--val {val} and --test {test} must be fractions in [0, 1) summing below 1")
    if folds == 1 or folds < 0:
        raise CxrtuneError(f"--folds {folds}: use 0 (no folds) or at least 2")
    if tuning_fraction is not None and not 0 < tuning_fraction <= 1:
        raise CxrtuneError(f"--tuning-fraction {tuning_fraction} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    out = df.copy()
    strata = _patient_strata(out)
    fixed_test: set = set()
    if keep_test:
        fixed_test = set(out.loc[out["split"] == "test", "patient_id"])
    pool = strata[~strata.index.isin(fixed_test)]
    rest = 1.0 - test
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    if keep_test:
        fractions = {"train": (rest - val) / rest, "val": val / rest, "test": 0.0}
    groups = _allocate(pool, fractions, rng)
    groups.update({pid: "test" for pid in fixed_test})
    out["split"] = out["patient_id"].map(groups)

    out["fold"] = -1
    if folds >= 2:
        from sklearn.model_selection import StratifiedGroupKFold

        cv_rows = out.index[out["split"] != "test"]
        n_patients = out.loc[cv_rows, "patient_id"].nunique()
        if n_patients < folds:
            raise CxrtuneError(f"--folds {folds} needs at least {folds} non-test patients, found {n_patients}")
        sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        sub = out.loc[cv_rows]
        for k, (_, idx) in enumerate(sgkf.split(sub, sub["label"], groups=sub["patient_id"])):
            out.loc[sub.index[idx], "fold"] = k

    if tuning_fraction is not None:
        non_test = strata[strata.index.isin(out.loc[out["split"] != "test", "patient_id"])]
        chosen = _allocate(non_test, {"in": tuning_fraction, "out": 1.0 - tuning_fraction}, rng)
        out["tuning"] = out["patient_id"].map(lambda p: chosen.get(p) == "in")
    return out


def split_summary(df: pd.DataFrame) -> dict:
    """Counts per split and label, for the CLI's closing line and the docs."""
    table = df.groupby(["split", "label"]).size().unstack(fill_value=0)
    summary: dict = {split: {k: int(v) for k, v in row.items() if v} for split, row in table.iterrows()}
    if "tuning" in df.columns:
        summary["tuning"] = int(df["tuning"].sum())
    return summary


def split_hash(df: pd.DataFrame) -> str:
    """SHA-256 (hex) of which image is in which split and tuning subset: the same for the same
    assignment wherever the manifest's files live (file names only, in a fixed order), different
    as soon as one row moves. Recorded with a promoted trial, so its figures can be tied to data."""
    tuning = df["tuning"].astype(bool) if "tuning" in df.columns else pd.Series(False, index=df.index)
    split = df["split"] if "split" in df.columns else pd.Series("", index=df.index)
    lines = sorted(f"{PurePosixPath(str(image)).name}\t{s}\t{int(t)}"
                   for image, s, t in zip(df["image"], split, tuning))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def patient_folds(rows: pd.DataFrame, grades: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold 0..k-1 per row: patient-level (no patient in two folds; each row its own patient
    without a ``patient_id`` column), stratified by ``grades`` (any class per row: a grade, a
    score) with scikit-learn's StratifiedGroupKFold."""
    from sklearn.model_selection import StratifiedGroupKFold

    patients = rows["patient_id"].astype(str).to_numpy() if "patient_id" in rows else np.arange(len(rows)).astype(str)
    if folds < 2:
        raise CxrtuneError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if len(set(patients)) < folds:
        raise CxrtuneError(f"{folds}-fold cross-validation needs at least {folds} patients, "
                           f"found {len(set(patients))}")
    out = np.full(len(rows), -1)
    for k, (_, held) in enumerate(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
                                   .split(np.zeros(len(rows)), grades, groups=patients)):
        out[held] = k
    return out
