"""The listener's spool: a folder (mode 0700) that is its only state, so that a restart loses
nothing and delivery is at least once.

    incoming/  instances received, each fsynced before its C-STORE success response (one the
               scorer deferred has a JSON sidecar of its tries, as an outbox item has)
    outbox/    results to send (the persistent outbound queue), each with a JSON sidecar holding
               its attempts, when to try next and the last error
    parked/    results that failed ``max_attempts`` times, and received instances that could not
               be scored, each with its reason (``pacs retry`` sends the one and scores the other again)

Files are named by a hash of their SOP Instance UID (no UID or patient data in a name) and written
to ``tmp/`` first, fsynced and renamed into place, so a crash leaves a whole file or none. Written
by hand: no library keeps a DICOM spool with these rules; the folder layout is the API.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CxrtuneError

FOLDERS = ("incoming", "outbox", "parked", "tmp")
RECEIVED_PREFIX = "received-"  # a parked received instance (an input), beside parked results
MAX_BACKOFF_S = 900.0


@dataclass(frozen=True)
class Attempts:
    """An outbox item's delivery state, or a deferred received instance's scoring tries (its
    ``.json`` sidecar)."""
    attempts: int = 0
    next_try: float = 0.0  # time.time() before which it is not retried
    last_error: str = ""


@dataclass(frozen=True)
class SpoolStatus:
    """What ``cxrtune pacs status`` prints, and the listener's gauges."""
    incoming: int
    outbox: int
    parked: int
    bytes: int
    parked_reasons: dict[str, int]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_name(sop_instance_uid: str) -> str:
    return hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()[:32] + ".dcm"


class Spool:
    """The folders under ``root``, created with mode 0700 (patient data at rest: owner only)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for name in FOLDERS:
            (self.root / name).mkdir(mode=0o700, exist_ok=True)

    def discard_partial_writes(self) -> None:
        """Remove what a crash left half-written in ``tmp/`` (never published). Only the process that
        writes the spool calls it, at its start: ``pacs status`` and ``pacs retry`` open the spool of
        a running listener, whose writes in flight are in ``tmp/``."""
        for part in (self.root / "tmp").glob("*.part"):
            part.unlink(missing_ok=True)

    def folder(self, name: str) -> Path:
        return self.root / name

    def _write(self, folder: str, name: str, data: bytes) -> Path:
        tmp = self.root / "tmp" / f"{name}.{uuid.uuid4().hex}.part"  # two writers of one name never share it
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)  # all of it, or an OSError (a full disk): never a short file
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        final = self.root / folder / name
        os.replace(tmp, final)
        _fsync_dir(self.root / folder)
        return final

    def write_state(self, name: str, data: bytes) -> None:
        """A state file at the spool's top (the poller's), replaced atomically."""
        self._write("", name, data)

    def used_bytes(self) -> int:
        total = 0
        for name in FOLDERS:
            for path in (self.root / name).iterdir():
                try:
                    total += path.stat().st_size
                except FileNotFoundError:  # renamed or removed by another thread meanwhile
                    pass
        return total

    # ------------------------------------------------------------------ incoming
    def receive(self, sop_instance_uid: str, data: bytes) -> Path:
        """Keep one received instance, durably (call before answering the C-STORE). Each arrival has
        its own file: a resend of an instance being scored (a corrected copy) is scored in turn,
        not removed with the copy before it."""
        return self._write("incoming", f"{file_name(sop_instance_uid)[:-4]}-{uuid.uuid4().hex[:12]}.dcm", data)

    @staticmethod
    def _oldest_first(paths) -> list[Path]:
        """``paths`` by modification time; one removed meanwhile (by another thread) is left out."""
        timed = []
        for path in paths:
            try:
                timed.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                pass
        return [path for _, path in sorted(timed)]

    def received(self, now: float | None = None) -> list[Path]:
        """Instances waiting to be scored whose next try has come (one deferred by the scorer
        waits its backoff: :meth:`failed`), oldest first."""
        return self._due("incoming", now)

    def park_received(self, incoming: Path, reason: str) -> None:
        """An instance that cannot be scored (undecodable, or an unexpected failure): kept in
        ``parked/`` with its reason, out of the worker's way, until ``pacs retry`` puts it back in
        ``incoming/`` (after a codec is installed or a fault mended)."""
        parked = self.root / "parked" / (RECEIVED_PREFIX + incoming.name)
        self._write("parked", parked.with_suffix(".json").name, json.dumps(asdict(Attempts(1, 0.0, reason))).encode())
        os.replace(incoming, parked)
        incoming.with_suffix(".json").unlink(missing_ok=True)
        _fsync_dir(self.root / "parked")

    def done(self, incoming: Path) -> None:
        """An instance handled (its results queued, or skipped with its reason logged)."""
        incoming.unlink(missing_ok=True)
        incoming.with_suffix(".json").unlink(missing_ok=True)
        _fsync_dir(incoming.parent)

    # ------------------------------------------------------------------ outbox
    def enqueue(self, objects: dict[str, bytes]) -> None:
        """Queue result objects (SOP Instance UID -> Part 10 bytes) to send. A resent result has the
        same UIDs, so it replaces its own queued copy."""
        for uid, data in objects.items():
            name = file_name(uid)
            self._write("outbox", name[:-4] + ".json", json.dumps(asdict(Attempts())).encode())
            self._write("outbox", name, data)

    def due(self, now: float | None = None) -> list[Path]:
        """Outbox items whose next try has come, oldest first."""
        return self._due("outbox", now)

    def _due(self, folder: str, now: float | None) -> list[Path]:
        now = time.time() if now is None else now
        return [p for p in self._oldest_first((self.root / folder).glob("*.dcm")) if self.attempts(p).next_try <= now]

    def attempts(self, item: Path) -> Attempts:
        try:
            return Attempts(**json.loads(item.with_suffix(".json").read_text()))
        except (OSError, ValueError, TypeError):
            return Attempts()

    def sent(self, item: Path) -> None:
        item.unlink(missing_ok=True)
        item.with_suffix(".json").unlink(missing_ok=True)
        _fsync_dir(item.parent)

    def failed(self, item: Path, reason: str, max_attempts: int, backoff_s: float) -> bool:
        """Record a failed try of an outbox item's delivery, or of a received instance's scoring:
        retried after ``backoff_s`` x 2^(attempts - 1), or parked after ``max_attempts`` (a
        received one as ``received-*``, which ``pacs retry`` puts back to be scored). Returns
        whether it was parked."""
        before = self.attempts(item)
        wait = min(MAX_BACKOFF_S, backoff_s * 2 ** before.attempts)
        after = Attempts(before.attempts + 1, time.time() + wait, reason)
        if after.attempts >= max_attempts:
            parked = self.root / "parked" / ((RECEIVED_PREFIX if item.parent.name == "incoming" else "") + item.name)
            self._write("parked", parked.with_suffix(".json").name, json.dumps(asdict(after)).encode())
            os.replace(item, parked)
            item.with_suffix(".json").unlink(missing_ok=True)
            _fsync_dir(self.root / "parked")
            return True
        self._write(item.parent.name, item.with_suffix(".json").name, json.dumps(asdict(after)).encode())
        return False

    # ------------------------------------------------------------------ parked
    def retry_parked(self) -> tuple[int, int]:
        """``pacs retry``: every parked result back to the outbox with its attempts reset, and every
        parked received instance (``received-*``, an input: never sent) back to ``incoming/``, to be
        scored again. Returns (results queued, instances to score)."""
        results = inputs = 0
        for item in sorted((self.root / "parked").glob("*.dcm")):
            # the sidecar first: once the item has moved, a worker may park it again with a new one
            if item.name.startswith(RECEIVED_PREFIX):
                item.with_suffix(".json").unlink(missing_ok=True)
                os.replace(item, self.root / "incoming" / item.name[len(RECEIVED_PREFIX):])
                inputs += 1
            else:
                self._write("outbox", item.with_suffix(".json").name, json.dumps(asdict(Attempts())).encode())
                item.with_suffix(".json").unlink(missing_ok=True)
                os.replace(item, self.root / "outbox" / item.name)
                results += 1
        _fsync_dir(self.root / "outbox")
        _fsync_dir(self.root / "incoming")
        return results, inputs

    def status(self) -> SpoolStatus:
        reasons: dict[str, int] = {}
        for item in (self.root / "parked").glob("*.dcm"):
            reason = self.attempts(item).last_error or "unknown"
            reasons[reason] = reasons.get(reason, 0) + 1
        return SpoolStatus(incoming=len(list((self.root / "incoming").glob("*.dcm"))),
                           outbox=len(list((self.root / "outbox").glob("*.dcm"))),
                           parked=len(list((self.root / "parked").glob("*.dcm"))),
                           bytes=self.used_bytes(), parked_reasons=reasons)


def open_spool(root: str | Path) -> Spool:
    """The spool at ``root``; refuses one that others can read (it holds patient data)."""
    path = Path(root)
    if path.exists() and path.stat().st_mode & 0o077:
        raise CxrtuneError(f"the spool {path} can be read by others (mode {path.stat().st_mode & 0o777:o}); "
                           "it holds patient data: chmod 700 it")
    return Spool(path)
