"""The body's LicenseInfo / CustomerInfo and Previous, rendered from a captured row. Pure.

The capture triggers store `row_to_json` of the row (and of the old row, for an UPDATE) exactly
as the writer had it; everything else is done here, in the daemon, once per event (it used to be
SQL functions in the claim statement, about 100 us of PostgreSQL CPU per delivery):

* payload field names: `field_map` (QLM's names, then `webhooks.field_names` overrides; a column
  with no row there is named by the schema's naming rule, which the daemon asks the database for:
  `Fields.missing` + `Store.fields`), in table column order (unknown columns last, in row order);
* timestamptz values (and arrays of them) in UTC, in the form of the body's Timestamp
  ("2026-01-15T12:00:00.000000Z"); anything else that a timestamptz column holds (infinity,
  BC or 5-digit years) is left as captured;
* every other value keeps its JSON text: numbers keep every digit (they are never turned into
  floats), strings are escaped once;
* Previous: the old values of the columns an UPDATE changed (old and new values compared as the
  trigger wrote them), rendered the same way.

Events captured before schema version 3 (jsonb in `row_data_v1` / `previous_v1`) render through
the same rules.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PLAIN, TIME, TIME_ARRAY = 0, 1, 2


class Num(str):
    """A JSON number, kept as its text."""

    __slots__ = ()


class Obj(list[tuple[str, Any]]):
    """A JSON object, kept as its (key, value) pairs in order."""

    __slots__ = ()


_DECODER = json.JSONDecoder(object_pairs_hook=Obj, parse_int=Num, parse_float=Num,
                            parse_constant=Num)
_string = json.encoder.encode_basestring  # C; non-ASCII text is not escaped


@dataclass(frozen=True, slots=True)
class Field:
    """How one column appears in the payload."""

    json_name: str  # the payload field name, as JSON text
    rank: int | None  # the column's place in its table (None: unknown, goes last)
    time: int = PLAIN  # PLAIN, TIME (timestamptz) or TIME_ARRAY (timestamptz[])


def field_of(name: str, position: int | None, type_name: str | None) -> Field:
    time = {"timestamp with time zone": TIME,
            "timestamp with time zone[]": TIME_ARRAY}.get(type_name or "", PLAIN)
    return Field(_string(name) + ":", position, time)


_LAST = 1 << 40  # the rank of columns with no known place: after every known one, in row order


@dataclass(frozen=True)
class Fields:
    """The payload field of every known column, per kind ('license', 'customer')."""

    by_kind: Mapping[str, Mapping[str, Field]] = field(default_factory=dict)

    def missing(self, kind: str, rows: Iterable[str | None]) -> set[str]:
        """Columns of these rows (JSON object texts) that have no field yet."""
        known = self.by_kind.get(kind, {})
        return {k for text in rows if text for k, _ in _DECODER.decode(text) if k not in known}

    def with_columns(self, kind: str, named: Mapping[str, str]) -> Fields:
        """These fields plus columns named by the naming rule (`named`: column -> name)."""
        cols = dict(self.by_kind.get(kind, {}))
        cols.update({c: field_of(n, None, None) for c, n in named.items()})
        return Fields({**self.by_kind, kind: cols})


class UnknownColumn(Exception):
    """A captured row has a column the field map does not know (added after it was read)."""


def payload(fields: Fields, kind: str, row: str | None, old: str | None,
            previous_v1: str | None = None) -> tuple[str, str | None]:
    """(LicenseInfo / CustomerInfo, Previous) of one event, its row decoded once."""
    cols = fields.by_kind.get(kind, {})
    pairs = _DECODER.decode(row) if row else Obj()
    return _info(cols, pairs), _previous(cols, pairs, old, previous_v1)


def info(fields: Fields, kind: str, row: str | None) -> str:
    """The row (a JSON object text) as the payload's LicenseInfo / CustomerInfo text."""
    return payload(fields, kind, row, None)[0]


def previous(fields: Fields, kind: str, row: str | None, old: str | None,
             previous_v1: str | None = None) -> str | None:
    """The payload's Previous: old values of the columns an UPDATE changed (`old`: the row
    before it), or of a version-1 event (`previous_v1`); None when there is none."""
    return payload(fields, kind, row, old, previous_v1)[1]


def _info(cols: Mapping[str, Field], pairs: Obj) -> str:
    return _object(cols, ((k, v, n) for n, (k, v) in enumerate(pairs))) if pairs else "{}"


def _previous(cols: Mapping[str, Field], new: Obj, old: str | None,
              previous_v1: str | None) -> str | None:
    if previous_v1:  # already only the changed columns; no column order was kept
        pairs = sorted(_DECODER.decode(previous_v1), key=lambda kv: kv[0])
        return _object(cols, ((k, v, None) for k, v in pairs)) if pairs else None
    if not old:
        return None
    now = dict(new)
    missing = object()
    changed = [(k, v, n) for n, (k, v) in enumerate(_DECODER.decode(old))
               if now.get(k, missing) != v]
    return _object(cols, changed) if changed else None


def _object(cols: Mapping[str, Field], items: Iterable[tuple[str, Any, int | None]]) -> str:
    ranks: list[int] = []
    parts: list[str] = []
    for key, value, n in items:
        f = cols.get(key)
        if f is None:
            raise UnknownColumn(key)
        if f.time:
            text = _utc_value(value)
        elif type(value) is str:
            text = _string(value)
        elif value is None:
            text = "null"
        else:
            text = encode(value)
        ranks.append(f.rank if f.rank is not None else _LAST + (n or 0))
        parts.append(f.json_name + text)
    if any(a > b for a, b in itertools.pairwise(ranks)):  # rows come in table column order
        parts = [p for _, p in sorted(zip(ranks, parts, strict=True), key=lambda rp: rp[0])]
    return "{" + ",".join(parts) + "}"


def encode(value: Any) -> str:
    """A decoded JSON value back to JSON text (numbers as they were written)."""
    t = type(value)
    if t is str:
        return str(_string(value))
    if t is Num:
        return str(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if t is Obj:
        return "{" + ",".join(_string(k) + ":" + encode(v) for k, v in value) + "}"
    return "[" + ",".join(encode(v) for v in value) + "]"


# what PostgreSQL writes for a timestamptz in JSON: ISO 8601 with the session's offset
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?[+-]\d\d(?::\d\d){0,2}")


def _utc_value(value: Any) -> str:
    if type(value) is str:
        return _string(utc(value))
    if type(value) is list:
        return "[" + ",".join(_utc_value(v) for v in value) + "]"
    return encode(value)


def utc(text: str) -> str:
    """A captured timestamptz in UTC, microseconds and 'Z'; any other text as it is."""
    if not _TS.fullmatch(text):
        return text
    if text.endswith(("+00:00", "+00")):  # written in UTC already (a usual server TimeZone)
        fraction = text[20:text.rindex("+")] if text[19] == "." else ""
        return f"{text[:19]}.{fraction:0<6}Z"
    try:
        d = datetime.fromisoformat(text).astimezone(UTC)
    except (ValueError, OverflowError):  # out of Python's range (year 1 east of UTC)
        return text
    return (f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:"
            f"{d.second:02d}.{d.microsecond:06d}Z")
