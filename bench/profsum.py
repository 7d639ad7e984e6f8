"""Summarise a py-spy raw (collapsed-stack) profile: `python -m bench.profsum FILE [TOP]`.

Prints the share of samples by leaf function (self time), by function anywhere on the stack
(inclusive time) and by library (the file of the innermost frame)."""

from __future__ import annotations

import gzip
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _lib(path: str) -> str:
    for key in ("asyncpg", "aiohttp", "yarl", "multidict", "asyncio", "logging", "json",
                "prometheus_client", "bridge/", "ssl", "selectors", "socket"):
        if key in path:
            return key.rstrip("/")
    return Path(path).name


def summarise(text: str, top: int = 25) -> str:
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [f for f in stack.split(";") if f]
        names = []
        for f in frames:
            m = _FRAME.match(f)
            names.append((m.group("func"), _lib(m.group("file"))) if m else (f, "?"))
        if names:
            leaf[f"{names[-1][0]} [{names[-1][1]}]"] += count
            libs[names[-1][1]] += count
        for name in {f"{a} [{b}]" for a, b in names}:
            incl[name] += count
    out = [f"samples: {total}", "", "by library (innermost frame):"]
    out += [f"  {100 * c / total:5.1f}%  {k}" for k, c in libs.most_common(top)]
    out += ["", "self (leaf function):"]
    out += [f"  {100 * c / total:5.1f}%  {k}" for k, c in leaf.most_common(top)]
    out += ["", "inclusive (anywhere on the stack):"]
    out += [f"  {100 * c / total:5.1f}%  {k}" for k, c in incl.most_common(top)]
    return "\n".join(out) + "\n"


def read(path: str) -> str:
    if path.endswith(".gz"):
        return gzip.decompress(Path(path).read_bytes()).decode()
    return Path(path).read_text()


if __name__ == "__main__":
    print(summarise(read(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
