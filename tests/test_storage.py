import os

import boto3
import pytest

from cxrtune import storage
from cxrtune.errors import CxrtuneError


def test_local_write_is_atomic_and_readable(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(target), b"hello")
    assert storage.read_bytes(str(target)) == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]  # no temporary left behind
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(CxrtuneError, match="nope.png: file not found"):
        storage.read_bytes(str(tmp_path / "nope.png"))


def test_s3_roundtrip_over_http(bucket):
    uri = f"s3://{bucket}/x/y.txt"
    storage.write_text(uri, "payload")
    assert storage.read_text(uri) == "payload"
    assert storage.exists(uri) and not storage.exists(f"s3://{bucket}/x/z.txt")
    assert list(storage.list_keys(f"s3://{bucket}/x/")) == [uri]
    # the same object seen by a plain boto3 client on the same endpoint
    s3 = boto3.client("s3", endpoint_url=os.environ["CXRTUNE_S3_ENDPOINT_URL"])
    assert s3.get_object(Bucket=bucket, Key="x/y.txt")["Body"].read() == b"payload"


def test_s3_missing_key_is_a_clear_error(bucket):
    with pytest.raises(CxrtuneError, match="not found on S3"):
        storage.read_bytes(f"s3://{bucket}/missing.png")


def test_existing_uses_listing(bucket):
    for k in ("a/1", "a/2", "b/3"):
        storage.write_bytes(f"s3://{bucket}/{k}", b"x")
    wanted = [f"s3://{bucket}/a/1", f"s3://{bucket}/b/3", f"s3://{bucket}/a/9"]
    storage.s3_stats.reset()
    assert storage.existing(wanted) == set(wanted[:2])
    assert storage.s3_stats.requests == 1  # one listing, not a request per object


def test_pyarrow_filesystem_reads_what_boto3_wrote(bucket):
    storage.write_bytes(f"s3://{bucket}/tune/obj", b"abc")
    fs, path = storage.pyarrow_filesystem(f"s3://{bucket}/tune")
    assert path == f"{bucket}/tune"
    with fs.open_input_stream(f"{path}/obj") as f:
        assert f.read() == b"abc"


def test_cache_second_read_makes_no_request(bucket, tmp_path):
    uri = f"s3://{bucket}/img.png"
    storage.write_bytes(uri, b"\x89PNG" + b"0" * 100)
    cache = storage.ContentCache(tmp_path / "c")
    storage.s3_stats.reset()
    first = cache.read_bytes(uri)
    assert storage.s3_stats.gets == 1
    storage.s3_stats.reset()
    assert cache.read_bytes(uri) == first
    assert storage.s3_stats.requests == 0
    assert not list((tmp_path / "c").rglob("*.part"))


def test_an_object_overwritten_under_its_name_is_fetched_anew(bucket, tmp_path):
    """A manifest written by hand over a bucket names objects that may be replaced (a corrected
    mask): the next cache reads the new version, not the old copy. A pushed, content-addressed key
    cannot change, and is read without asking for its version."""
    uri = f"s3://{bucket}/masks/p1.png"
    storage.write_bytes(uri, b"version 1")
    assert storage.ContentCache(tmp_path / "c").read_bytes(uri) == b"version 1"
    storage.write_bytes(uri, b"version 2, corrected")
    cache = storage.ContentCache(tmp_path / "c")  # a new run on the same node
    assert cache.read_bytes(uri) == b"version 2, corrected"
    storage.s3_stats.reset()
    assert cache.read_bytes(uri) == b"version 2, corrected" and storage.s3_stats.requests == 0  # asked once

    digest = "ab" + "0" * 62
    pushed = f"s3://{bucket}/data/masks/ab/{digest}.png"
    assert storage.content_addressed(pushed) and not storage.content_addressed(uri)
    storage.write_bytes(pushed, b"mask")
    storage.s3_stats.reset()
    assert storage.ContentCache(tmp_path / "c").read_bytes(pushed) == b"mask"
    assert storage.s3_stats.requests == storage.s3_stats.gets == 1  # no HEAD


def test_retries_transient_errors_then_succeeds():
    from botocore.exceptions import ConnectionClosedError

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionClosedError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert storage.with_retries(flaky, "test", attempts=5, base_delay=0.01) == "ok"
    assert len(calls) == 3


def test_unreachable_endpoint_is_a_clear_error(monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("CXRTUNE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("CXRTUNE_S3_RETRIES", "1")
    with pytest.raises(CxrtuneError, match="could not read"):
        storage.read_bytes("s3://b/k")


def test_create_local_never_overwrites(tmp_path):
    """The importers' no-overwrite guarantee, even between the existence check and the write
    (two imports at once): create_local refuses an existing path and leaves it as it was."""
    target = tmp_path / "sub" / "a.png"
    assert storage.create_local(target, b"first") is True
    assert target.read_bytes() == b"first" and (target.stat().st_mode & 0o777) == 0o666 & ~storage.UMASK
    assert storage.create_local(target, b"second") is False
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["a.png"]  # no temporary file left behind


def test_s3_is_https_only_off_this_machine(monkeypatch):
    """Radiographs and bundles travel to S3: a plain-HTTP endpoint on another host is refused
    unless allowed on purpose; a local test server (127.0.0.1) is fine."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "CXRTUNE_S3_ALLOW_HTTP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CXRTUNE_S3_ENDPOINT_URL", "http://minio.hospital.example:9000")
    with pytest.raises(CxrtuneError, match="plain HTTP: use https://"):
        storage.endpoint_url()
    monkeypatch.setenv("CXRTUNE_S3_ALLOW_HTTP", "1")
    assert storage.endpoint_url() == "http://minio.hospital.example:9000"
    monkeypatch.delenv("CXRTUNE_S3_ALLOW_HTTP")
    for fine in ("https://minio.hospital.example:9000", "http://127.0.0.1:5000"):
        monkeypatch.setenv("CXRTUNE_S3_ENDPOINT_URL", fine)
        assert storage.endpoint_url() == fine
