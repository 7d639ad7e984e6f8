"""Load the SQL files shipped with the bridge (importlib.resources) and render their placeholders.

Nothing else lives here: every statement the bridge runs is in a `.sql` file under `sql/`.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _sql_dir() -> Path:
    """The packaged `bridge/sql` (wheel install) or the source tree's `sql/` (editable install)."""
    packaged = resources.files("bridge") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "sql"


@functools.cache
def read(name: str) -> str:
    """The raw text of one SQL file, e.g. ``read("queries.sql")``."""
    return (_sql_dir() / name).read_text(encoding="utf-8")


@functools.cache
def blocks(name: str) -> dict[str, str]:
    """The named blocks (``-- name: foo``) of one SQL file."""
    text = read(name)
    parts = _BLOCK.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {parts[i]: parts[i + 1].strip() + "\n" for i in range(1, len(parts), 2)}


def quote_ident(name: str) -> str:
    """Quote one SQL identifier (any text is safe: embedded quotes are doubled)."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid SQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string literal for standard_conforming_strings = on."""
    if "\x00" in value:
        raise ValueError("NUL byte in SQL literal")
    return "'" + value.replace("'", "''") + "'"


def render(text: str, **values: str) -> str:
    """Replace ``__KEY__`` placeholders; every value must already be quoted by the caller."""
    for key, value in values.items():
        text = text.replace(f"__{key.upper()}__", value)
    leftover = re.search(r"__[A-Z]+__", text)
    if leftover:
        raise KeyError(f"unrendered placeholder {leftover.group(0)}")
    return text


_NAMED = re.compile(r"%\((\w+)\)s")


@functools.cache
def numbered(text: str) -> tuple[str, tuple[str, ...]]:
    """A psycopg statement (``%(name)s`` parameters) as an asyncpg one (``$n``), and the
    parameter names in $n order, so one statement text serves both drivers."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return _NAMED.sub(number, text), tuple(names)


@functools.cache
def queries(schema: str) -> dict[str, str]:
    """The runtime queries of `queries.sql`, rendered for one bridge schema."""
    return {
        name: render(body, schema=quote_ident(schema))
        for name, body in blocks("queries.sql").items()
    }
