"""One place to read and write local paths and ``s3://bucket/key`` URIs.

The S3 endpoint comes from ``CXRTUNE_S3_ENDPOINT_URL`` (or boto3's own ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``), so MinIO, a local test server and AWS work alike. Credentials and region come
from the usual AWS environment or config files; none are ever logged.

Reads for training go through :class:`ContentCache`: objects are fetched once into a local cache
directory and every later read is a local file read. Keys written by ``cxrtune data push`` are
content-addressed (their name is the SHA-256 of their bytes), so a cached copy can never be stale;
any other key is cached under its ETag, asked once per cache object.
Every write lands under a temporary name first and is renamed into place, so no reader ever sees a
partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlparse

from urllib3.exceptions import ProtocolError

from .errors import CxrtuneError

log = logging.getLogger(__name__)
T = TypeVar("T")

ENDPOINT_ENV = "CXRTUNE_S3_ENDPOINT_URL"
UMASK = os.umask(0o022)  # the process's, read once at import: umask() can only be read by setting it,
os.umask(UMASK)  # which other threads would see for a moment
CACHE_ENV = "CXRTUNE_CACHE_DIR"
RETRIES_ENV = "CXRTUNE_S3_RETRIES"


def retry_attempts() -> int:
    """Attempts per S3 call, for botocore's own retries and for ours on broken streams."""
    return max(1, int(os.environ.get(RETRIES_ENV, "5")))


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(str(uri))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise CxrtuneError(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI."""
    if is_s3(base):
        out = str(base).rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return str(Path(base, *parts))


def resolve(uri: str, base: str | None) -> str:
    """Resolve a manifest entry: absolute paths and S3 URIs stay, relative ones join ``base``."""
    if not uri or is_s3(uri) or os.path.isabs(uri) or base is None:
        return uri
    return join(base, uri)


def parent(uri: str) -> str:
    if is_s3(uri):
        return str(uri).rstrip("/").rsplit("/", 1)[0]
    return str(Path(uri).resolve().parent)


# --------------------------------------------------------------------------------------------- S3

def endpoint_url() -> str | None:
    """The S3 endpoint override, if any (``None`` means AWS itself).

    Raises:
        CxrtuneError: a plain-HTTP endpoint on another machine: radiographs and bundles travel
            over it, so S3 is HTTPS only, except on this machine (a local test server) or with
            ``CXRTUNE_S3_ALLOW_HTTP=1`` on purpose."""
    url = (os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3")
           or os.environ.get("AWS_ENDPOINT_URL") or None)
    if url and url.lower().startswith("http://") and os.environ.get("CXRTUNE_S3_ALLOW_HTTP") != "1":
        host = (urlparse(url).hostname or "").lower()
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise CxrtuneError(f"the S3 endpoint {url} is plain HTTP: use https:// (docs/cluster.md), or set "
                               "CXRTUNE_S3_ALLOW_HTTP=1 to allow it on a network you trust")
    return url


@dataclass
class S3Stats:
    """Counts the HTTP requests this process sent to S3 (retries included); tests read it."""

    requests: int = 0
    gets: int = 0

    def reset(self) -> None:
        self.requests = 0
        self.gets = 0


s3_stats = S3Stats()
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _count_request(request=None, **_kwargs) -> None:
    s3_stats.requests += 1
    if request is not None and getattr(request, "method", "") == "GET":
        s3_stats.gets += 1


def s3_client():
    """A boto3 S3 client for this process (DataLoader workers each build their own)."""
    import boto3
    from botocore.config import Config

    key = (os.getpid(), endpoint_url(), retry_attempts())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(retries={"max_attempts": retry_attempts(), "mode": "standard"},
                            connect_timeout=10, read_timeout=60, max_pool_connections=32)
            client = boto3.session.Session().client("s3", endpoint_url=key[1], config=config)
            client.meta.events.register("before-send.s3", _count_request)
            _clients[key] = client
    return client


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
    return False


def _transient(exc: Exception) -> bool:
    """Errors worth another try: broken connections and truncated bodies (botocore already
    retries throttling and 5xx answers on the request itself)."""
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    return isinstance(exc, (ConnectionClosedError, EndpointConnectionError, IncompleteReadError,
                            ReadTimeoutError, ResponseStreamingError, ProtocolError,
                            ConnectionError))


def with_retries(fn: Callable[[], T], what: str, attempts: int | None = None,
                 base_delay: float = 0.2) -> T:
    """Call ``fn`` again on transient network errors, with exponential back-off."""
    attempts = attempts or retry_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # classified below
            if not _transient(exc) or attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("transient error on %s (%s), retry %d/%d in %.1fs",
                        what, type(exc).__name__, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _wrap_s3_error(exc: Exception, uri: str, action: str) -> CxrtuneError:
    from botocore.exceptions import ClientError, NoCredentialsError

    if _is_not_found(exc):
        return CxrtuneError(f"{uri}: not found on S3 (check the bucket and key)")
    if isinstance(exc, NoCredentialsError):
        return CxrtuneError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or an AWS profile)")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        return CxrtuneError(f"{uri}: S3 refused to {action} ({code}); check permissions and "
                            f"the endpoint ({ENDPOINT_ENV}={endpoint_url() or 'AWS'})")
    return CxrtuneError(f"{uri}: could not {action} ({type(exc).__name__}: {exc})")


# ---------------------------------------------------------------------------------- read / write

def read_bytes(uri: str) -> bytes:
    """The whole object or file. Raises :class:`CxrtuneError` naming the URI on failure."""
    if is_s3(uri):
        bucket, key = split_s3(uri)

        def fetch() -> bytes:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()

        try:
            return with_retries(fetch, uri)
        except CxrtuneError:
            raise
        except Exception as exc:
            raise _wrap_s3_error(exc, uri, "read") from exc
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise CxrtuneError(f"{uri}: file not found") from None
    except OSError as exc:
        raise CxrtuneError(f"{uri}: cannot read ({exc.strerror})") from None


def _staged(path: Path, data: bytes) -> str:
    """``data`` in a temporary file beside ``path``, with a finished file's permissions; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; finished files follow the umask
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _atomic_local_write(path: Path, data: bytes) -> None:
    tmp = _staged(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_local(path: Path, data: bytes) -> bool:
    """Create ``path`` whole, never overwriting: False if it already exists (hard link of a
    finished temporary file; a plain rename where the filesystem has no hard links)."""
    tmp = _staged(path, data)
    try:
        try:
            os.link(tmp, path)  # fails if path exists
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a reader sees the old content or the new, never a partial file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:  # a PUT is atomic on S3: the object appears whole or not at all
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise _wrap_s3_error(exc, uri, "write") from exc
        return
    try:
        _atomic_local_write(Path(uri), data)
    except OSError as exc:
        raise CxrtuneError(f"{uri}: cannot write ({exc.strerror})") from None


def delete(uri: str) -> None:
    """Remove one file or object; a missing one is not an error."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if not _is_not_found(exc):
                raise _wrap_s3_error(exc, uri, "delete") from exc
        return
    Path(uri).unlink(missing_ok=True)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise _wrap_s3_error(exc, uri, "look up") from exc
    return Path(uri).exists()


def list_keys(prefix_uri: str) -> Iterator[str]:
    """Every object URI under an S3 prefix, or every file under a local folder."""
    if is_s3(prefix_uri):
        bucket, prefix = split_s3(prefix_uri)
        paginator = s3_client().get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield f"s3://{bucket}/{obj['Key']}"
        except Exception as exc:
            raise _wrap_s3_error(exc, prefix_uri, "list") from exc
        return
    root = Path(prefix_uri)
    if root.is_file():
        yield str(root)
    elif root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                yield str(p)


def existing(uris: Iterable[str]) -> set[str]:
    """Which of ``uris`` exist, answered with one listing per S3 bucket rather than a request
    per object (a manifest of thousands of rows validates in a few requests)."""
    uris = [u for u in uris if u]
    found: set[str] = {u for u in uris if not is_s3(u) and os.path.exists(u)}
    by_bucket: dict[str, list[str]] = {}
    for u in uris:
        if is_s3(u):
            by_bucket.setdefault(split_s3(u)[0], []).append(u)
    for bucket, group in by_bucket.items():
        keys = [split_s3(u)[1] for u in group]
        prefix = os.path.commonprefix(keys)
        listed = set(list_keys(f"s3://{bucket}/{prefix}"))
        found.update(u for u in group if u in listed)
    return found


def require_bucket(uri: str) -> None:
    """Check that the bucket of an S3 URI exists and answers (local paths: nothing to do). It is
    never created here: a mistyped name would get a new bucket without the site's policies
    (docs/cluster.md), and the radiographs pushed there with it.

    Raises:
        CxrtuneError: no such bucket, or S3 refused to say (permissions, endpoint)."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as exc:
        if _is_not_found(exc):
            raise CxrtuneError(f"{uri}: there is no bucket {bucket!r} on S3 ({ENDPOINT_ENV}="
                               f"{endpoint_url() or 'AWS'}); cxrtune creates none: check the name, or create it "
                               "with the site's policies (docs/cluster.md)") from None
        raise _wrap_s3_error(exc, uri, "open the bucket") from exc


def pyarrow_filesystem(uri: str):
    """``(filesystem, path)`` for pyarrow consumers such as Ray Tune's ``storage_filesystem``.

    For S3 the endpoint override is the one boto3 uses, so Tune writes to the same server as
    everything else. Credentials are never put in the object: Tune pickles it into the experiment
    (``tuner.pkl``, the experiment state), so anyone who could read the experiment would get the
    writer's keys. pyarrow resolves them itself, on each node, from that node's environment,
    profile or instance role, as boto3 does. The returned path has no ``s3://`` scheme, as Tune
    expects.
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    bucket, key = split_s3(uri)
    kwargs: dict = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"}
    ep = endpoint_url()
    if ep:
        parsed = urlparse(ep)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


# ----------------------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    """cxrtune's local cache (``$CXRTUNE_CACHE_DIR``, else ``~/.cache/cxrtune``): remote copies, phantoms."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cxrtune")


def content_key(prefix: str, kind: str, data: bytes, suffix: str) -> str:
    """The key ``cxrtune data push`` stores ``data`` under: ``PREFIX/KIND/<sha256[:2]>/<sha256><suffix>``,
    a name that says what it holds (:func:`content_addressed` recognises it)."""
    digest = hashlib.sha256(data).hexdigest()
    return join(prefix, kind, digest[:2], digest + suffix)


def content_addressed(uri: str) -> bool:
    """Whether an S3 key names its own content, as :func:`content_key` writes them: what it holds
    cannot change under that name."""
    key = PurePosixPath(split_s3(uri)[1]) if is_s3(uri) else PurePosixPath(uri)
    stem = key.name.split(".", 1)[0]
    return len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) and key.parent.name == stem[:2]


class ContentCache:
    """A local copy of remote objects, keyed by endpoint, URI and version.

    The first read of an ``s3://`` URI downloads it under a temporary name and renames it into
    the cache; later reads (the second epoch, another trial on the same node) are local reads and
    make no S3 request. A key that does not name its own content (:func:`content_addressed`:
    a manifest written by hand over a bucket) may be overwritten, so its version (ETag) is asked
    once per cache object (each process holds its own copy: a data-loading worker too), one HEAD
    request, and a new version is fetched anew; within one cache object an object is read as it
    was first read. Local paths are read directly and never copied.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self._versions: dict[str, str] = {}

    def local_path(self, uri: str) -> Path:
        version = "" if not is_s3(uri) or content_addressed(uri) else self._version(uri)
        digest = hashlib.sha256(f"{endpoint_url() or ''}|{uri}|{version}".encode("utf-8")).hexdigest()
        suffix = Path(split_s3(uri)[1]).suffix[:8] if is_s3(uri) else ""
        return self.root / digest[:2] / f"{digest}{suffix}"

    def _version(self, uri: str) -> str:
        if uri not in self._versions:
            bucket, key = split_s3(uri)
            try:
                head = with_retries(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri)
            except CxrtuneError:
                raise
            except Exception as exc:
                raise _wrap_s3_error(exc, uri, "look up") from exc
            self._versions[uri] = str(head.get("ETag", ""))
        return self._versions[uri]

    def fetch(self, uri: str) -> str:
        """A local file path holding the object's bytes."""
        if not is_s3(uri):
            return uri
        path = self.local_path(uri)
        if not path.exists():
            _atomic_local_write(path, read_bytes(uri))
        return str(path)

    def read_bytes(self, uri: str) -> bytes:
        if not is_s3(uri):
            return read_bytes(uri)
        return Path(self.fetch(uri)).read_bytes()
