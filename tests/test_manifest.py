
from pathlib import Path

import boto3
import pandas as pd
import pytest
from torch.utils.data import DataLoader

from cxrtune import storage
from cxrtune.data import manifest
from cxrtune.data.dataset import CXRDataset
from cxrtune.errors import CxrtuneError, ManifestError
from cxrtune.preprocessing import Preprocessing


def test_phantom_manifest_loads_with_relative_paths(phantom_dir):
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    assert len(df) == 24
    assert all(p.startswith(str(phantom_dir)) for p in df.image)
    assert set(df.split) <= {"train", "val", "test"}


def test_csv_is_accepted(phantom_dir, tmp_path):
    df = pd.read_parquet(phantom_dir / "manifest.parquet")
    csv = phantom_dir / "copy.csv"
    df.to_csv(csv, index=False)
    assert len(manifest.load_manifest(str(csv))) == 24


def test_every_bad_row_is_reported_at_once(phantom_dir, tmp_path):
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    bad = df.copy()
    bad.loc[0, "label"] = "covid19"
    bad.loc[1, "image"] = str(tmp_path / "gone.png")
    bad.loc[2, "image"] = bad.loc[3, "image"]
    bad.loc[4, "zone_A"] = 3
    path = tmp_path / "bad.csv"
    manifest.save_manifest(bad, str(path))
    with pytest.raises(ManifestError) as err:
        manifest.load_manifest(str(path))
    text = str(err.value)
    assert "unknown label 'covid19'" in text
    assert "image file not found" in text and "gone.png" in text
    assert "duplicate image" in text and "zone_A must be 0 or 1" in text
    assert len(err.value.problems) == 4

    split = df.copy()  # one patient (an identifying id) in two splits: named by rows, not by id
    split.loc[[0, 1], "patient_id"] = "DOE_JOHN_MRN123"
    split.loc[0, "split"], split.loc[1, "split"] = "train", "test"
    split.loc[0, "image"] = str(Path(split.loc[0, "image"]).with_name("DOE_JOHN_MRN123.png"))
    manifest.save_manifest(split, str(path))
    with pytest.raises(ManifestError) as err:
        manifest.load_manifest(str(path), check_files=False)
    assert "rows 2, 3: one patient in several splits (test, train)" in str(err.value)
    assert "DOE" not in str(err.value) and "MRN" not in str(err.value)


def test_missing_required_column(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("image,label\na.png,normal\n")
    with pytest.raises(ManifestError, match="patient_id"):
        manifest.load_manifest(str(p))


def test_push_then_train_reader_caches(phantom_dir, bucket, tmp_path):
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    out = f"s3://{bucket}/manifests/phantom.parquet"
    counts = manifest.push_manifest(df, f"s3://{bucket}/data", out, progress=False)
    n_files = len({u for c in manifest.URI_COLUMNS if c in df for u in df[c] if u})
    assert counts["files"] == n_files
    assert counts["uploaded"] == counts["objects"] < n_files  # the empty masks are one object
    s3 = boto3.client("s3", endpoint_url=storage.endpoint_url())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"]]
    assert len(keys) == counts["objects"] and all(k.endswith(".png") for k in keys)
    again = manifest.push_manifest(df, f"s3://{bucket}/data", out, progress=False)
    assert again["uploaded"] == 0 and again["skipped"] == counts["objects"]
    # a mistyped bucket is an error, not a new bucket without the site's policies holding the images
    buckets = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    with pytest.raises(CxrtuneError, match=f"there is no bucket '{bucket}x' on S3 .*cxrtune creates none"):
        manifest.push_manifest(df, f"s3://{bucket}x/data", f"s3://{bucket}x/m.parquet", progress=False)
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == buckets
    n_objects = counts["objects"]

    remote = manifest.load_manifest(out)
    assert remote.image.str.startswith(f"s3://{bucket}/data/images/").all()
    ds = CXRDataset(remote, Preprocessing(size=64), augment=True, cache=storage.ContentCache(tmp_path / "c"))
    storage.s3_stats.reset()
    first = [b["image"] for b in DataLoader(ds, batch_size=8)]
    assert storage.s3_stats.gets == n_objects
    storage.s3_stats.reset()
    second = [b["image"] for b in DataLoader(ds, batch_size=8)]
    assert storage.s3_stats.requests == 0
    assert len(first) == len(second) == 3


def test_empty_label_means_unlabelled(tmp_path):
    import numpy as np

    from cxrtune import images

    for name in ("a.png", "b.png"):
        images.write_png(str(tmp_path / name), np.full((8, 8), 9, np.uint8))
    p = tmp_path / "m.csv"
    p.write_text("image,label,patient_id\na.png,,p1\nb.png,normal,p2\n")
    df = manifest.load_manifest(str(p))
    assert list(df.label) == ["", "normal"]
    assert [manifest.is_labelled(v) for v in df.label] == [False, True]
    assert not manifest.is_labelled(None) and not manifest.is_labelled(float("nan"))
    assert not manifest.is_labelled("  ")
    p.write_text("image,label,patient_id\na.png,flu,p1\n")
    with pytest.raises(ManifestError, match="unknown label 'flu'.*leave it empty"):
        manifest.load_manifest(str(p))


def test_splits_and_folds_work_with_unlabelled_rows():
    from cxrtune.data.splits import _patient_strata, assign_splits, split_summary

    rows = [{"image": f"/x/{p}_{k}.png", "label": ["", "normal", "covid"][p % 3], "patient_id": f"p{p}"}
            for p in range(60) for k in range(2)]
    rows += [{"image": "/x/mixed_0.png", "label": "", "patient_id": "mixed"},
             {"image": "/x/mixed_1.png", "label": "", "patient_id": "mixed"},
             {"image": "/x/mixed_2.png", "label": "normal", "patient_id": "mixed"}]
    df = manifest.new_manifest(rows)
    strata = _patient_strata(df)
    assert strata["mixed"] == "normal"  # unlabelled images never outvote labelled ones
    assert strata["p0"] == "" and strata["p1"] == "normal" and strata["p2"] == "covid"
    out = assign_splits(df, val=0.2, test=0.2, folds=2, seed=0, tuning_fraction=0.5)
    patients = out.drop_duplicates("patient_id").set_index("patient_id").split
    per = patients.groupby(strata).value_counts().unstack(fill_value=0)
    assert per.loc[""].to_dict() == {"test": 4, "train": 12, "val": 4}  # 20 unlabelled patients
    assert per.loc["normal"].sum() == 21 and per.loc["covid"].to_dict() == {"test": 4, "train": 12, "val": 4}
    assert out.groupby("patient_id").split.nunique().max() == 1
    assert set(out.loc[out.split != "test", "fold"]) == {0, 1}
    manifest.validate(out, check_files=False)
    assert split_summary(out)["test"][""] == 8 + 2 * (patients["mixed"] == "test")  # images, not patients
