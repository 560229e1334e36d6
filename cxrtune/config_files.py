"""Reading the YAML files users write (training and classification recipes, search spaces, warm
starts, Serve and cluster configs): one strict loader, so that every one refuses the same things
the same way, naming the file and the key. Bundle and run metadata (JSON that cxrtune writes) have
their own versioned, migrating readers in :mod:`cxrtune.model.artifacts`."""

from __future__ import annotations

import contextlib
from dataclasses import fields
from pathlib import Path
from types import UnionType
from typing import Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from . import storage
from .errors import CxrtuneError


def load_yaml(uri: str, expect: type | None = dict):
    """The parsed content of the YAML file at ``uri`` (local or s3://).

    Args:
        expect: the type the top level must have (a mapping by default; an empty file is an empty
            one); None accepts anything, an empty file as None.

    Raises:
        CxrtuneError: unreadable, not YAML, or not of the expected shape (naming ``uri``)."""
    try:
        data = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as exc:
        raise CxrtuneError(f"{uri}: not valid YAML ({exc})") from None
    if expect is None:
        return data
    if data is None:
        data = expect()
    if not isinstance(data, expect):
        shape = {"dict": "a mapping of settings", "list": "a list"}.get(expect.__name__, expect.__name__)
        raise CxrtuneError(f"{uri}: expected {shape}, got {type(data).__name__}")
    return data


def known_settings(cls, data, what: str) -> dict:
    """``data`` checked against the fields of dataclass ``cls``: a mapping whose every key is a
    field, else a :class:`CxrtuneError` naming the unknown keys and the known ones; and each value
    of a plain str, int, float or bool field (or one of these or None) of that type
    (:func:`typed_value`). Returns a copy, its numbers converted."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CxrtuneError(f"{what} settings must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CxrtuneError(f"unknown {what} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = get_type_hints(cls)  # an annotation that cannot be resolved is a bug, not a reason to skip the checks
    return {key: typed_value(value, hints.get(key), f"{what} setting {key}") for key, value in data.items()}


SCALARS = (str, int, float, bool)


def typed_value(value, hint, what: str):
    """``value`` as the scalar type ``hint`` declares (str, int, float, bool, optionally None), or
    unchanged where ``hint`` is another type. YAML 1.1, which PyYAML reads, takes ``1e-4`` (no
    dot) for a string: for a float, a string that reads as a number is taken as that number; for
    an int, ``1.0`` is taken as 1; anything else of the wrong type is refused.

    Raises:
        CxrtuneError: naming ``what``, the type wanted and the value given."""
    args = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    wanted = [a for a in args if a is not type(None)]
    if value is None and type(None) in args or len(wanted) != 1 or wanted[0] not in SCALARS:
        return value
    kind = wanted[0]
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    name = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}[kind]
    raise CxrtuneError(f"{what} must be {name}, got {value!r}")


def with_overrides(settings: dict, pairs: Sequence[str]) -> dict:
    """``settings`` with command-line ``key=value`` pairs applied (``model.arch=Unet`` for a nested
    key), each value parsed as YAML (``lr=3.0e-4``, ``flip=true``). Returns a new mapping.

    Raises:
        CxrtuneError: a pair without ``=`` or a value that is not YAML, naming the pair."""
    out = dict(settings)
    for pair in pairs:
        if "=" not in pair:
            raise CxrtuneError(f"--set {pair!r}: expected key=value")
        key, text = pair.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CxrtuneError(f"--set {pair!r}: the value is not valid YAML ({exc})") from None
        *parents, leaf = key.strip().split(".")
        out = _set_nested(out, parents, leaf, value)
    return out


def _set_nested(settings: dict, parents: list[str], leaf: str, value) -> dict:
    if not parents:
        return {**settings, leaf: value}
    inner = settings.get(parents[0]) or {}
    if not isinstance(inner, dict):
        raise CxrtuneError(f"--set {'.'.join([*parents, leaf])}: {parents[0]} is not a mapping of settings")
    return {**settings, parents[0]: _set_nested(inner, parents[1:], leaf, value)}


def read_private_file(path: str, what: str) -> str:
    """The stripped text of a secret's file (an API key, a database password), which only its
    owner may read: a file others can read has already leaked, so it is refused.

    Raises:
        CxrtuneError: missing, unreadable, or readable by group or others (never quoting it)."""
    file = Path(path).expanduser()
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CxrtuneError(f"cannot read the {what} file {file}: {getattr(exc, 'strerror', None) or 'not text'}") from None
    if mode & 0o077:
        raise CxrtuneError(f"the {what} file {file} may be read by others (mode {mode & 0o777:o}): chmod 600 it")
    return text.strip()
