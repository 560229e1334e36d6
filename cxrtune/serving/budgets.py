"""The ingress's two budgets: what an upload may cost before it is scored, and how much scoring runs at once.

**Upload budget.** A request body is read as it arrives, never spooled to disk (a radiograph is
patient data: Starlette's form parser writes parts over 1 MB to temporary files) and never past its
caps: the whole body (chunked bodies included), each file part, each non-file field, the number of
parts, and the bytes all uploads of the replica hold at once. A body must also arrive at a minimum
rate (after a grace period) and within a timeout, so trickling clients are cut off instead of
holding memory. After a request whose body reached 16 MiB, the heap pages it leaves go back to the
system (:class:`ReturnFreedHeap`). Multipart is parsed by python-multipart's streaming
parser; the caps around it are written here because no library enforces them while streaming.

**Scoring budget.** At most ``max_in_flight`` images are scored at once. A request holds its slots
until every thread it started has ended: a client that hangs up cancels the rest of its work (Serve
cancels the request), but a decode already running keeps its slot until it returns, so the count
never understates the work in progress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .api import RequestError
from .settings import ServeSettings

T = TypeVar("T")
MAX_PART_HEADER_BYTES = 16 * 1024  # one part's headers (Content-Disposition, Content-Type)


@dataclass(frozen=True)
class UploadLimits:
    """The caps of one request body (from :class:`ServeSettings`)."""
    max_file_bytes: int
    max_files: int
    max_field_bytes: int
    max_parts: int
    timeout_s: float
    min_bytes_per_s: float
    grace_s: float

    @classmethod
    def of(cls, s: ServeSettings) -> "UploadLimits":
        return cls(s.max_upload_bytes, s.max_files_per_batch, s.max_field_bytes, s.max_parts,
                   s.upload_timeout_s, s.min_upload_bytes_per_s, s.upload_grace_s)

    @property
    def max_body_bytes(self) -> int:
        """The whole body: every file and field at its cap, and their part headers."""
        return (self.max_files * self.max_file_bytes + self.max_parts * (self.max_field_bytes + MAX_PART_HEADER_BYTES))


log = logging.getLogger("ray.serve.cxrtune")  # under ray.serve: lands in the replica's Serve log
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only: None on musl or macOS
if _MALLOC_TRIM is not None:
    _MALLOC_TRIM.argtypes, _MALLOC_TRIM.restype = [ctypes.c_size_t], ctypes.c_int


def return_freed_heap() -> None:
    """Give the pages of freed heap memory back to the system (glibc's ``malloc_trim``); nothing
    to do off glibc. Written by hand: no library wraps ``malloc_trim``."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ReturnFreedHeap:
    """ASGI middleware: once the app has answered a request whose body reached ``after_bytes``, the
    freed heap goes back to the system, in a thread of its own: one trim at a time, and at most one
    waiting behind it, so a request that ends during a trim still gets one after it.

    Serve's proxy hands a body to the ingress replica as a series of Ray replies, kept inline by
    :func:`cxrtune.cluster.ray_system_config`; glibc kept the freed pages of those allocations, and
    a few oversized uploads left the replica up to 205 MB larger to the end of a hostile-input run
    (docs/BENCHMARKS.md). Only the bytes the app reads are counted: what Serve queued for a request
    that was refused early is not. A trim holds each glibc arena while it walks it, so it is kept
    off ordinary uploads: a PNG or JPEG CXR is far below 16 MiB, though an uncompressed DX of 3000 x
    3000 at 16 bits, or a batch of three 7 MB CRs, reaches it."""

    def __init__(self, app, after_bytes: int = 16 * 1024 * 1024, trim: Callable[[], None] = return_freed_heap):
        self.app, self.after_bytes, self.trim = app, after_bytes, trim
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrtune-trim")
        self.lock = threading.Lock()
        self.scheduled = 0  # trims running or waiting: at most 2

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def counting() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counting, send)
        finally:
            if received >= self.after_bytes:
                self._schedule(received)

    def _schedule(self, received: int) -> None:
        with self.lock:
            if self.scheduled >= 2:  # one waiting already: it runs after this request's buffers are freed
                return
            self.scheduled += 1
        try:
            self.pool.submit(self._trim, received)
        except RuntimeError:  # the pool is shut down (the interpreter is exiting): nothing to return
            with self.lock:
                self.scheduled -= 1

    def _trim(self, received: int) -> None:
        start = time.perf_counter()
        try:
            self.trim()
            log.info("returned freed heap to the system after a %.0f MB body in %.1f ms",
                     received / 1e6, 1000 * (time.perf_counter() - start))
        except Exception:  # a failed trim costs memory, never a request
            log.exception("returning freed heap failed")
        finally:
            with self.lock:
                self.scheduled -= 1


@dataclass
class UploadBudget:
    """Bytes of request bodies one ingress replica holds at once (received and not yet released);
    a request that would pass ``limit`` is refused with a retriable 503."""
    limit: int
    held: int = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[Callable[[int], None]]:
        """``add(n)`` for one request's bytes as they arrive; all of them are released at exit."""
        mine = 0

        def add(n: int) -> None:
            nonlocal mine
            if self.held + n > self.limit:
                raise RequestError(503, "the scorer is holding as many uploads as it may; retry shortly")
            self.held += n
            mine += n

        try:
            yield add
        finally:
            self.held -= mine


async def paced(stream: AsyncIterator[bytes], limits: UploadLimits,
                clock: Callable[[], float] = time.monotonic) -> AsyncIterator[bytes]:
    """The body's chunks, as long as they keep up: after ``grace_s`` the bytes received must stay
    at ``min_bytes_per_s`` on average, and the whole body must arrive within ``timeout_s``.

    Raises:
        RequestError: 408 for a body that falls behind (no chunk arrived in time)."""
    start, received = clock(), 0
    chunks = stream.__aiter__()
    while True:
        due = min(start + limits.timeout_s, start + limits.grace_s + received / limits.min_bytes_per_s)
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, due - clock()))
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestError(408, f"upload too slow: {received} bytes in {clock() - start:.1f} s; a body must "
                                    f"arrive at {limits.min_bytes_per_s / 1000:.0f} kB/s or more after "
                                    f"{limits.grace_s:.0f} s, within {limits.timeout_s:.0f} s") from None
        received += len(chunk)
        yield chunk


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    field_name: bytes = b""
    value: bytes = b""
    header_bytes: int = 0
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Form:
    """python-multipart's callbacks, with every cap checked as each piece arrives."""

    def __init__(self, limits: UploadLimits, add: Callable[[int], None]):
        self.limits, self.add = limits, add
        self.files: list[tuple[str, bytes]] = []
        self.parts = 0
        self.part = _Part()
        self.ended = False

    def callbacks(self) -> dict[str, Callable]:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.data,
                "on_part_end": self.part_end, "on_end": self.end}

    def begin(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise RequestError(413, f"more than {self.limits.max_parts} parts in one request")
        self.part = _Part()

    def _header_bytes(self, n: int) -> None:
        self.part.header_bytes += n
        if self.part.header_bytes > MAX_PART_HEADER_BYTES:
            raise RequestError(413, f"a part's headers are over {MAX_PART_HEADER_BYTES // 1024} kB")

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.part.field_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.part.value += data[start:end]

    def header_end(self) -> None:
        self.part.headers.append((self.part.field_name.lower(), self.part.value))
        self.part.field_name, self.part.value = b"", b""

    def headers_finished(self) -> None:
        disposition = dict(self.part.headers).get(b"content-disposition")
        _, options = parse_options_header(disposition)
        name = options.get(b"filename")
        self.part.filename = None if name is None else name.decode("utf-8", "replace")
        if self.part.filename is not None and len(self.files) >= self.limits.max_files:
            raise RequestError(413, f"more than {self.limits.max_files} files in one request")

    def data(self, data: bytes, start: int, end: int) -> None:
        part, n = self.part, end - start
        if part.filename is not None and len(part.data) + n > self.limits.max_file_bytes:
            raise RequestError(413, f"a file is over the limit of {self.limits.max_file_bytes / 1e6:.0f} MB")
        if part.filename is None and len(part.data) + n > self.limits.max_field_bytes:
            raise RequestError(413, f"a form field is over the limit of {self.limits.max_field_bytes // 1024} kB")
        self.add(n)
        part.data += data[start:end]

    def part_end(self) -> None:
        if self.part.filename is not None:
            self.files.append((self.part.filename or "file", bytes(self.part.data)))
        self.part = _Part()  # a field's value is not used: drop it

    def end(self) -> None:
        self.ended = True


async def read_upload(content_type: str, content_length: str | None, body: AsyncIterator[bytes],
                      limits: UploadLimits, add: Callable[[int], None]) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each uploaded file: the multipart parts with a filename, or the raw body
    (named ``body``). Every cap is checked before the bytes that would pass it are kept.

    Args:
        add: the request's :meth:`UploadBudget.hold` counter.

    Raises:
        RequestError: 413 past a cap, 400 for a malformed multipart body, 422 for no file or an
            empty one (and 408 from :func:`paced` bodies)."""
    if content_length and content_length.isdigit() and int(content_length) > limits.max_body_bytes:
        raise RequestError(413, f"request is {int(content_length) / 1e6:.1f} MB, over the limit")
    received = 0

    def counted(n: int) -> None:
        nonlocal received
        received += n
        if received > limits.max_body_bytes:
            raise RequestError(413, f"request is over the limit of {limits.max_body_bytes / 1e6:.0f} MB")

    if content_type.startswith("multipart/form-data"):
        _, options = parse_options_header(content_type)
        if not options.get(b"boundary"):
            raise RequestError(400, "multipart request without a boundary")
        form = _Form(limits, add)
        parser = MultipartParser(options[b"boundary"], form.callbacks())  # type: ignore[arg-type]  # a plain dict of them
        try:
            async for chunk in body:
                counted(len(chunk))
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError:
            raise RequestError(400, "malformed multipart body") from None
        if not form.ended:
            raise RequestError(400, "multipart body ends before its closing boundary")
        files = form.files
        if not files:
            raise RequestError(422, "multipart request has no file field")
    else:
        data = bytearray()
        async for chunk in body:
            counted(len(chunk))
            if len(data) + len(chunk) > limits.max_file_bytes:
                raise RequestError(413, f"upload over the limit of {limits.max_file_bytes / 1e6:.0f} MB")
            add(len(chunk))
            data += chunk
        files = [("body", bytes(data))]
    for name, content in files:
        if not content:
            raise RequestError(422, f"{name}: empty upload")
    return files


class ScoringBudget:
    """At most ``limit`` images scored at once, counted until the last thread of a request ends."""

    def __init__(self, limit: int, retry_after_s: int, threads: int | None = None):
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cxrtune-score")

    @contextlib.contextmanager
    def admitted(self, images: int = 1) -> Iterator["Ticket"]:
        """A :class:`Ticket` for ``images`` slots, or a 503 with Retry-After when they are not free."""
        if self.in_flight + images > self.limit:
            raise RequestError(503, f"the scorer is at capacity ({self.in_flight} images in flight, at most "
                                    f"{self.limit}); retry shortly", self.retry_after_s)
        self.in_flight += images
        ticket = Ticket(self, images, asyncio.get_running_loop())
        try:
            yield ticket
        finally:
            ticket.close()


class Ticket:
    """One request's slots; released when the request has ended and so have its threads."""

    def __init__(self, budget: ScoringBudget, images: int, loop: asyncio.AbstractEventLoop):
        self.budget, self.images, self.loop = budget, images, loop
        self.threads, self.closed, self.released = 0, False, False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the budget's threads. Cancelling the caller (the client hung up) does
        not stop a running thread, so the slots stay taken until it returns; a call still waiting
        for a thread is cancelled with it."""
        future = self.budget._pool.submit(fn, *args)
        self.threads += 1
        try:
            return await asyncio.wrap_future(future)
        finally:
            if future.done():  # returned, raised, or cancelled before it started: its thread is free
                self._thread_ended()
            else:  # the caller was cancelled while the thread runs: counted until it returns
                future.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self._thread_ended))

    def _thread_ended(self) -> None:
        self.threads -= 1
        self._release_when_idle()

    def close(self) -> None:
        self.closed = True
        self._release_when_idle()

    def _release_when_idle(self) -> None:
        if self.closed and self.threads == 0 and not self.released:
            self.released = True
            self.budget.in_flight -= self.images
