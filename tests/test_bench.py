"""The bench's baselines and outputs work end to end (real PostgreSQL, real receiver process).
No timing is asserted: only that every request arrives, nothing fails, and files are written."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import env, run
from bench.scenarios import Figure
from tests.support.server import Db


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[env.Receiver]:
    procs = env.Procs()
    try:
        yield env.start_receiver(procs, tmp_path)
    finally:
        procs.close()


def _body_files(tmp_path: Path) -> tuple[Path, Path]:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"EventType": "license_created", "ActivationKey": "k-1"}))
    headers = tmp_path / "headers.json"
    headers.write_text(json.dumps({"Content-Type": "application/json"}))
    return body, headers


def _run_module(*args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                         timeout=120, check=True, cwd=env.ROOT)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_pgqueuer_peer_delivers_every_job(empty_db: Db, receiver: env.Receiver,
                                         tmp_path: Path) -> None:
    pytest.importorskip("pgqueuer")
    body, headers = _body_files(tmp_path)
    result = _run_module("bench.pgqueuer_peer", empty_db.dsn, receiver.url("/ok/pgq"), "45",
                         "20", "8", str(body), str(headers))
    assert (result["ok"], result["errors"], result["batch"]) == (45, 0, 20)
    assert result["loop"] == "uvloop"
    assert receiver.count("/ok/pgq") == 45
    assert empty_db.scalar("SELECT count(*) FROM pgqueuer") == 0  # every job completed


def test_raw_client_runs_on_the_daemons_loop(receiver: env.Receiver, tmp_path: Path) -> None:
    body, headers = _body_files(tmp_path)
    result = _run_module("bench.rawclient", receiver.url("/ok/raw"), "30", "4", str(body),
                         str(headers))
    assert (result["ok"], result["errors"], result["loop"]) == (30, 0, "uvloop")
    assert receiver.count("/ok/raw") == 30


def test_plots_are_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench import plots
    lat = plots.latency(tmp_path / "lat.png", "t", [10.0, 10.01, 10.02], [2.0, 40.0, 3.0],
                        [0.5, 0.6, 0.7], {"max": 30.0})
    rec = plots.receipts(tmp_path / "rec.png", "t", {"a": [0.01, 0.05, 0.31], "b": []})
    for png in (lat, rec):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_table_shows_ratios_against_ratio_targets() -> None:
    info = {"mode": "quick", "finished": "now", "seconds": 1.0, "command": "python -m bench",
            "plots": ["p3-latency-100.png"],
            "machine": {"nproc": 2, "cpu": "cpu", "postgres": "15", "postgres_kind": "x",
                        "python": "3.11", "kernel": "k", "loadavg_at_end": ["1", "1", "1"],
                        "memory": "", "code": {"commit": "c", "daemon_sha256": "d",
                                               "uncommitted": ""}}}
    table = run.markdown([Figure("P2.raw", "P2 bridge vs raw", 600, "/s", 1200, ">= 0.60x",
                                 False)], info)
    assert "| P2 bridge vs raw | 600 /s | 1200 /s | 0.50x | >= 0.60x | **no** |" in table
    assert "[p3-latency-100.png](p3-latency-100.png)" in table
