"""Who may call the scorer: API keys (two live at once during a rotation, each with an id that the
audit line records), compared in constant time on bytes, and a limit on failed attempts per client.
Also what ``/v1/models`` may show: no storage location of any kind."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field

from ..config_files import read_private_file
from ..errors import CxrtuneError

log = logging.getLogger(__name__)
MAX_KEYS = 2  # the live key and its successor, during a rotation
MIN_KEY_CHARS = 16
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what an ID of ID:KEY may be (not secret: it is logged)


@dataclass(frozen=True)
class ApiKeys:
    """The live API keys as ``(id, key bytes)``.

    Written in the environment variable as ``KEY`` (its id: ``key-`` and the first 8 hex digits of
    its SHA-256) or ``ID:KEY,ID:KEY`` (a rotation: both are accepted until the old one is
    removed). Ids are not secret: they name the key in the audit log."""
    keys: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "ApiKeys":
        """Raises CxrtuneError for more than two keys, an empty or short key, or a repeated id,
        without quoting any key, or any part of one: an entry whose text before a ``:`` is not an
        id (letters, digits, ``._-``) is a key holding a colon, and a short key is named by its
        place in the list, since the text taken for its id may be a secret split in two."""
        entries = [e.strip() for e in text.split(",") if e.strip()]
        if len(entries) > MAX_KEYS:
            raise CxrtuneError(f"{len(entries)} API keys given; at most {MAX_KEYS} are live at once (a rotation)")
        keys = []
        for place, entry in enumerate(entries, 1):
            key_id, sep, key = entry.partition(":")
            if sep and not KEY_ID.fullmatch(key_id):  # said, so that an ID:KEY written so is not a silent 401
                log.warning("API key %d of %d holds a ':' after text that is not an id (letters, digits, ._-): "
                            "the whole of it is the key", place, len(entries))
                sep = ""
            if not sep:
                key_id, key = "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
            if len(key) < MIN_KEY_CHARS:
                raise CxrtuneError(f"API key {place} of {len(entries)} is shorter than {MIN_KEY_CHARS} characters "
                                   "(written ID:KEY, the KEY)")
            keys.append((key_id, key.encode()))
        if len({k for k, _ in keys}) != len(keys):
            raise CxrtuneError("two API keys share an id")
        return cls(tuple(keys))

    def __bool__(self) -> bool:
        return bool(self.keys)

    def match(self, presented: str | None) -> str | None:
        """The id of the key ``presented`` (an HTTP header as Starlette decodes it, latin-1), or
        None. Every key is compared, in constant time on bytes, so neither the timing nor a
        non-ASCII header (which broke ``compare_digest`` on str: a 500) tells anything."""
        if presented is None:
            return None
        given = presented.encode("latin-1", errors="replace")
        found = None
        for key_id, key in self.keys:
            if hmac.compare_digest(given, key):
                found = key_id
        return found


@dataclass
class FailedAttempts:
    """Failed key checks per client address in a sliding window: past ``limit`` in ``window_s``
    seconds a client is refused (429) until its oldest failure leaves the window. One ingress
    replica's event loop owns it: no lock."""
    limit: int = 20
    window_s: float = 60.0
    _seen: dict[str, deque] = field(default_factory=dict)
    _last_sweep: float = float("-inf")

    def _forget_idle(self, now: float) -> None:
        """Drop every client without a failure in the window, once a window at most: a client
        that never comes back would otherwise be kept for ever (many addresses, many entries)."""
        if now - self._last_sweep >= self.window_s:
            self._last_sweep = now
            for client in [c for c, seen in self._seen.items() if not seen or now - seen[-1] > self.window_s]:
                del self._seen[client]

    def _recent(self, client: str, now: float) -> deque:
        self._forget_idle(now)
        seen = self._seen.setdefault(client, deque())
        while seen and now - seen[0] > self.window_s:
            seen.popleft()
        if not seen:
            self._seen.pop(client, None)
        return seen

    def blocked_for(self, client: str, now: float | None = None) -> float:
        """Seconds until ``client`` may try again (0: it may)."""
        now = time.monotonic() if now is None else now
        seen = self._recent(client, now)
        return max(0.0, self.window_s - (now - seen[0])) if len(seen) >= self.limit else 0.0

    def failed(self, client: str, now: float | None = None) -> int:
        """Record one failure; returns the client's failures in the window."""
        now = time.monotonic() if now is None else now
        seen = self._recent(client, now)
        seen.append(now)
        self._seen[client] = seen
        return len(seen)


def key_text(settings) -> str:
    """The ingress's key list as written: the contents of ``api_key_file`` when the settings name
    one (it must be readable by its owner only), else the ``api_key_env`` variable.

    Raises:
        CxrtuneError: the file is missing, or others may read it."""
    if not settings.api_key_file:
        return os.environ.get(settings.api_key_env, "")
    return read_private_file(settings.api_key_file, "API key")


def require_keys(settings, env_value: str) -> ApiKeys:
    """The ingress's keys from ``env_value`` (:func:`key_text`). Secure by default:
    with ``auth: key`` (the default) an ingress without a key refuses to start; ``auth: none``
    serves without one, on purpose, and says so in the log (and /healthz).

    Raises:
        CxrtuneError: no key under ``auth: key``, or a malformed key list."""
    keys = ApiKeys.parse(env_value)
    if settings.auth == "none":
        if keys:
            raise CxrtuneError(f"auth: none, but {settings.api_key_file or settings.api_key_env} holds a key: choose one")
        log.warning("authentication is off (auth: none): every /v1 route is open to anyone who reaches it")
        return keys
    if not keys:
        raise CxrtuneError(f"no API key: set {settings.api_key_env} on the ingress replicas, or api_key_file (one key of 16+ "
                           "characters, or ID:KEY,ID:KEY during a rotation; docs/serving.md), or set auth: none "
                           "in the app's args to serve without one")
    return keys


LOCATION = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|/|~/|[A-Za-z]:[\\/]|\.{1,2}/)")


def without_locations(value):
    """``value`` with every string that is a URI or a file path left out (dict entries dropped,
    list items removed): what ``/v1/models`` may show a client (names, hashes, thresholds,
    calibration figures and the model card stay; training-run URIs, manifests and bundle paths do
    not)."""
    if isinstance(value, dict):
        return {k: without_locations(v) for k, v in value.items() if not (isinstance(v, str) and LOCATION.match(v))}
    if isinstance(value, list):
        return [without_locations(v) for v in value if not (isinstance(v, str) and LOCATION.match(v))]
    return value


def _inline_hash(page: str, tag: str) -> str:
    """CSP's ``'sha256-...'`` of the one inline ``<tag>`` of ``page``."""
    body = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


def security_headers(viewer_page: str) -> dict[str, str]:
    """Headers for every response: a Content-Security-Policy that lets the viewer page run only its
    own inline script and style (by hash), load nothing from another host and be framed by no one;
    no MIME sniffing; no referrer."""
    csp = ("default-src 'none'; "
           f"script-src {_inline_hash(viewer_page, 'script')}; style-src {_inline_hash(viewer_page, 'style')}; "
           "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY"}
