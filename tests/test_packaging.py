"""The wheel ships the SQL files, and `bridge.sql` finds them when installed from it (not only
from the source tree)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # hatchling is in the dev venv: no build isolation, so no network is needed
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    [built] = out.glob("qlm_webhook_bridge-*.whl")
    return built


def test_wheel_contains_every_sql_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("bridge/sql/") for n in names
               if n.startswith("bridge/sql/") and n.endswith(".sql")}
    expected = {p.name for p in (ROOT / "sql").glob("*.sql")}
    assert "queries.sql" in expected and "capture_v1.sql" in expected
    assert shipped == expected
    assert "bridge/sql.py" in names and "bridge/__main__.py" in names
    # the console's templates and assets (no CDN, no build step)
    console = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bridge" / "console").rglob("*")
               if p.is_file() and p.suffix in (".html", ".css", ".js", ".svg")}
    assert {"bridge/console/static/console.css", "bridge/console/static/console.js",
            "bridge/console/templates/base.html"} <= console
    assert console <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "qlm-bridge = bridge.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


PROBE = """
import sys
from pathlib import Path
import bridge, bridge.sql as s
target = Path(sys.argv[1]).resolve()
assert Path(bridge.__file__).resolve().is_relative_to(target), bridge.__file__
d = s._sql_dir().resolve()
assert d == target / "bridge" / "sql", d
queries = s.queries("qlm_bridge")
assert "produce" in queries and '"qlm_bridge".event' in queries["produce"], sorted(queries)
assert "license_function" in s.blocks("capture_v1.sql")
from bridge.console import web
assert web._package_dir("static").resolve().is_relative_to(target)
assert "pill" in (web._package_dir("static") / "console.css").read_text()
web._environment().get_template("overview.html")
print(d)
"""


def test_installed_wheel_finds_its_sql(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    # the source tree's sql/ is not next to the installed package: only bridge/sql can serve
    assert not (target / "sql").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run([sys.executable, "-c", PROBE, str(target)], capture_output=True,
                           text=True, timeout=60, check=False, cwd=tmp_path, env=env)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str((target / "bridge" / "sql").resolve())
    # and `python -m bridge` runs from the installed copy
    helped = subprocess.run([sys.executable, "-m", "bridge", "install", "--help"],
                            capture_output=True, text=True, timeout=60, check=False,
                            cwd=tmp_path, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "--print-sql" in helped.stdout
