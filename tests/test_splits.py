import numpy as np
import pandas as pd
import pytest

from cxrtune.data.manifest import new_manifest
from cxrtune.data.splits import assign_splits
from cxrtune.errors import CxrtuneError


def many_images_per_patient(n_patients: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for p in range(n_patients):
        label = ["normal", "covid", "other_pneumonia"][p % 3]
        for k in range(int(rng.integers(1, 4))):
            rows.append({"image": f"/x/{p}_{k}.png", "label": label, "patient_id": f"p{p}"})
    return new_manifest(rows)


def test_patient_level_stratified_and_reproducible():
    df = many_images_per_patient()
    a = assign_splits(df, val=0.1, test=0.2, folds=5, seed=0, tuning_fraction=0.5)
    b = assign_splits(df, val=0.1, test=0.2, folds=5, seed=0, tuning_fraction=0.5)
    pd.testing.assert_frame_equal(a, b)
    assert (a.groupby("patient_id")["split"].nunique() == 1).all()
    assert (a.groupby("patient_id")["fold"].nunique() == 1).all()
    assert set(a.loc[a.split == "test", "fold"]) == {-1}
    assert set(a.loc[a.split != "test", "fold"]) == {0, 1, 2, 3, 4}
    per = a.drop_duplicates("patient_id").groupby(["label", "split"]).size().unstack()
    assert (per["test"] == 8).all() and (per["val"] == 4).all()  # 40 patients per label
    tuning = a.drop_duplicates("patient_id")
    assert not tuning.loc[tuning.split == "test", "tuning"].any()
    assert tuning.loc[tuning.split != "test", "tuning"].mean() == pytest.approx(0.5, abs=0.03)
    c = assign_splits(df, val=0.1, test=0.2, seed=1)
    assert not (c["split"] == a["split"]).all()


def test_keep_test():
    df = assign_splits(many_images_per_patient(), test=0.2, seed=0)
    again = assign_splits(df, val=0.2, test=0.2, seed=5, keep_test=True)
    assert (again.split == "test").equals(df.split == "test")


def test_bad_fractions_are_plain_errors():
    df = many_images_per_patient(10)
    with pytest.raises(CxrtuneError, match="--val"):
        assign_splits(df, val=0.6, test=0.5)
    with pytest.raises(CxrtuneError, match="--folds"):
        assign_splits(df, folds=1)


def test_a_manifests_row_order_never_changes_a_split():
    """Patients with two disease labels in equal numbers (a tie): listing the rows in another order
    (a glob, an S3 listing) leaves every patient's split, fold and tuning membership as it was."""
    rows = []
    for p in range(120):
        labels = [["covid", "other_pneumonia"], ["normal"], ["covid"], ["other_pneumonia", "covid"]][p % 4]
        rows += [{"image": f"/x/{p}_{k}.png", "label": label, "patient_id": f"p{p}"} for k, label in enumerate(labels)]
    df = new_manifest(rows)
    a = assign_splits(df, val=0.1, test=0.2, folds=5, seed=0, tuning_fraction=0.5)
    b = assign_splits(new_manifest(rows[::-1]), val=0.1, test=0.2, folds=5, seed=0, tuning_fraction=0.5)
    per_patient = [x.drop_duplicates("patient_id").set_index("patient_id")[["split", "fold", "tuning"]].sort_index()
                   for x in (a, b)]
    pd.testing.assert_frame_equal(*per_patient)
