"""An Optuna study in a database without its password in the URL, the records or Ray's pickles.

A sweep records its options in ``cxrtune.json``, hands them to every trial, and Ray pickles the
searcher (Optuna storage included) into the experiment folder; Optuna's ``RDBStorage`` pickles its
URL and engine arguments whole. So the URL given to ``--optuna-storage`` must hold no password:
it is read when the storage is built or unpickled, from ``CXRTUNE_OPTUNA_PASSWORD`` or the owner-only file
that ``CXRTUNE_OPTUNA_PASSWORD_FILE`` names (PostgreSQL's own ``PGPASSWORD`` and ``~/.pgpass``
work too, read by libpq). Written by hand: Optuna has no way to keep a secret out of its pickle.
"""

from __future__ import annotations

import os
from typing import Any

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ..config_files import read_private_file
from ..errors import CxrtuneError

PASSWORD_ENV = "CXRTUNE_OPTUNA_PASSWORD"
PASSWORD_FILE_ENV = "CXRTUNE_OPTUNA_PASSWORD_FILE"


def check_storage_url(url: str) -> None:
    """Refuse a storage URL that holds a password (it would be recorded, sent to trials and
    pickled), without quoting it.

    Raises:
        CxrtuneError: not a database URL, or one with a password."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise CxrtuneError("--optuna-storage is not a database URL (e.g. postgresql://USER@HOST:5432/DB)") from None
    if parsed.password or any(_secret(key) for key in parsed.query):
        shown = parsed.set(query={k: v for k, v in parsed.query.items() if not _secret(k)})
        raise CxrtuneError(f"--optuna-storage holds a password: give the URL without it "
                           f"({shown.render_as_string(hide_password=True)}) and the password in {PASSWORD_ENV} "
                           f"or a file named by {PASSWORD_FILE_ENV} (docs/cluster.md)")


def _secret(query_key: str) -> bool:
    """A URL query key that names a secret: password, passwd, sslpassword (a client key's
    passphrase), or any other holding one of them."""
    return any(word in query_key.lower() for word in ("password", "passwd"))


def database_password() -> str | None:
    """The study database's password: ``CXRTUNE_OPTUNA_PASSWORD``, else the file named by
    ``CXRTUNE_OPTUNA_PASSWORD_FILE``, else None (the driver's own, e.g. libpq's ``.pgpass``)."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    path = os.environ.get(PASSWORD_FILE_ENV)
    return read_private_file(path, "database password") if path else None


def _connection_args() -> dict[str, Any]:
    password = database_password()
    return {"connect_args": {"password": password}} if password else {}


class DatabaseStorage(optuna.storages.RDBStorage):
    """Optuna's database storage whose URL, and pickled state, hold no password: it is read from
    the environment (or its file) when the storage is built or unpickled."""

    def __init__(self, url: str):
        check_storage_url(url)
        try:
            super().__init__(url, engine_kwargs=_connection_args())
        except SQLAlchemyError as exc:  # the database's own words (the URL holds no password), no traceback
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise CxrtuneError(f"cannot open the Optuna storage {url}: {reason}") from None

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["engine_kwargs"] = {}  # the password lives there
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__({**state, "engine_kwargs": _connection_args()})
