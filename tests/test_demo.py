"""`qlm-bridge demo`: run as a user would, as a subprocess, embedded and against a server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bridge import demo
from bridge.errors import BridgeError
from bridge.events import QLM_EVENTS
from tests.support.server import Db

LINE = re.compile(r"^\s+(\w+)\s+-> (http://127\.0\.0\.1:\d+/qlm-webhook)\s+HTTP (\d+)\s+"
                  r"([\d.]+) ms\s+(signature valid|SIGNATURE INVALID)", re.MULTILINE)


def _qlm_bridge(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "qlm-bridge"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "bridge"]
    return subprocess.run([*cmd, "demo", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def _check_output(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    deliveries = LINE.findall(result.stdout)
    assert sorted(d[0] for d in deliveries) == sorted(QLM_EVENTS), result.stdout
    assert [d[0] for d in deliveries] == [s.event_type for s in demo.STEPS]
    assert {d[2] for d in deliveries} == {"200"}
    assert {d[4] for d in deliveries} == {"signature valid"}
    assert "summary: 7/7 events delivered, 7/7 signatures valid" in result.stdout


def test_demo_without_a_server() -> None:
    result = _qlm_bridge("--timeout", "90")
    _check_output(result)
    data_dir = re.search(r"data in (\S+),", result.stdout)
    assert data_dir is not None
    assert not Path(data_dir.group(1)).exists()  # cleaned up


def test_demo_against_a_database_leaves_user_data_alone(empty_db: Db) -> None:
    # The user's own tables, with the sample's names, in the default schema.
    empty_db.execute("CREATE TABLE customers (customer_id int PRIMARY KEY, full_name text)")
    empty_db.execute("INSERT INTO customers VALUES (1, 'A real customer')")
    result = _qlm_bridge("--dsn", empty_db.dsn, "--timeout", "90")
    _check_output(result)
    assert empty_db.query("SELECT * FROM customers") == [(1, "A real customer")]
    assert empty_db.scalar("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0
    assert empty_db.query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'qlm%'") == []


def test_demo_refuses_a_schema_it_did_not_create(empty_db: Db) -> None:
    empty_db.execute("CREATE SCHEMA qlm_bridge_demo_data")
    empty_db.execute("CREATE TABLE qlm_bridge_demo_data.mine (x int)")
    result = _qlm_bridge("--dsn", empty_db.dsn)
    assert result.returncode == 1
    assert "'qlm_bridge_demo_data' already exists" in result.stderr
    assert "Traceback" not in result.stderr
    assert empty_db.scalar("SELECT count(*) FROM qlm_bridge_demo_data.mine") == 0


def _qlm_signature(body: bytes, secret: str) -> str:
    """QLM's X-QLM-Signature as the README defines it, computed here independently."""
    return hashlib.sha256(body + secret.encode()).hexdigest()


async def _post_to_demo(rx: demo.DemoReceiver, event_type: str, body: bytes,
                        signature: str | None) -> int:
    headers = {"Content-Type": "application/json", "X-QLM-Event": event_type,
               "X-QLM-Event-Id": event_type}
    if signature is not None:
        headers["X-QLM-Signature"] = signature
    async with aiohttp.ClientSession() as session, \
            session.post(rx.url, data=body, headers=headers) as resp:
        return resp.status


def test_the_demo_receiver_checks_signatures() -> None:
    """Real requests to the demo's receiver: only a correct signature of the exact bytes passes."""
    body = b'{"EventType":"license_created"}'
    good = _qlm_signature(body, "s3cret")
    sent = [(body, good), (body + b" ", good), (body, _qlm_signature(body, "other")),
            (body, None), (body, good.upper())]

    async def run() -> tuple[list[int], list[bool]]:
        rx = await demo.DemoReceiver("s3cret", lambda _: None).start()
        try:
            codes = [await _post_to_demo(rx, "license_created", b, sig) for b, sig in sent]
        finally:
            await rx.stop()
        return codes, [a.signature_ok for a in rx.arrivals]

    codes, verdicts = asyncio.run(run())
    assert codes == [200, 401, 401, 401, 200]  # hex is case-insensitive
    assert verdicts == [True, False, False, False, True]


def test_a_forged_signature_fails_the_demo() -> None:
    """Every event arrives, one of them forged: the demo's verdict names the forgery."""
    lines: list[str] = []

    async def run() -> demo.DemoReceiver:
        rx = await demo.DemoReceiver("s3cret", lines.append).start()
        try:
            for step in demo.STEPS:
                body = json.dumps({"EventType": step.event_type}).encode()
                secret = "forger" if step.event_type == "license_deleted" else "s3cret"
                await _post_to_demo(rx, step.event_type, body, _qlm_signature(body, secret))
        finally:
            await rx.stop()
        return rx

    rx = asyncio.run(run())
    assert [a.status for a in rx.arrivals] == [
        401 if s.event_type == "license_deleted" else 200 for s in demo.STEPS]
    with pytest.raises(BridgeError, match="invalid X-QLM-Signature"):
        demo._summary(rx, lines.append)
    assert lines[-1].startswith("summary: 6/7 events delivered, 6/7 signatures valid")
