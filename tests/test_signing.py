"""Issue 10: signatures every receiver accepts.

Receivers here are written as their users would write them, not with bridge.verify: the
official `standardwebhooks` package (``Webhook(secret).verify(body, headers)``, 401 when it
raises) and QLM's documented check (hashlib: SHA-256 of body + secret, hex). They answer real
deliveries from a running daemon and from `qlm-bridge send-test`: padded, unpadded and plain
secrets, and a two-secret rotation applied with SIGHUP, no restart.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import signal
import string
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from bridge import config as config_mod
from bridge import ops, payload, signing
from bridge.signing import Signer
from bridge.verify import verify_signature, verify_standard_webhook
from tests.support.config import config_data
from tests.support.daemon import DaemonProcess, running
from tests.support.net import free_port
from tests.support.receiver import Behaviour, Receiver
from tests.support.server import Db, states
from tests.test_delivery import QLM_SEVEN, _seven_changes
from tests.test_ops import run_cli


def _b64(seed: bytes) -> str:
    return base64.b64encode(hashlib.sha256(seed).digest()).decode("ascii")


PADDED = "whsec_" + _b64(b"padded")             # 32 bytes: 43 characters and one '='
UNPADDED = "whsec_" + _b64(b"unpadded").rstrip("=")
PLAIN = "plain-ascii-secret-for-qlm"            # no whsec_: the library base64-decodes it too
NON_ASCII = "sécret-ключ"                       # fine for X-QLM-Signature only
OLD, NEW = "whsec_" + _b64(b"old"), "whsec_" + _b64(b"new")
BAD = "whsec_not-base64-at-all-é"                # refused with standard_webhooks

# The Standard Webhooks specification's test vector.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID, SPEC_TIMESTAMP = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


# --- receivers as their users write them --------------------------------------------------------

Verdicts = dict[tuple[str, str], int]  # (path, event id) -> the status the receiver answered


def official(secret: str, verdicts: Verdicts) -> Behaviour:
    """A Standard Webhooks receiver as the standardwebhooks README shows it."""
    wh = Webhook(secret)

    async def handler(request: web.Request, _: int) -> web.StreamResponse:
        body = await request.read()
        try:
            wh.verify(body, request.headers)
            code = 204
        except WebhookVerificationError:
            code = 401
        verdicts[(request.path, request.headers.get("X-QLM-Event-Id", ""))] = code
        return web.Response(status=code)
    return handler


def qlm_style(secret: str, verdicts: Verdicts) -> Behaviour:
    """The PHP receiver's check, ``hash('sha256', $body . $secret) === $signature``."""
    async def handler(request: web.Request, _: int) -> web.StreamResponse:
        body = await request.read()
        expected = hashlib.sha256(body + secret.encode("utf-8")).hexdigest()
        code = 204 if request.headers.get("X-QLM-Signature") == expected else 401
        verdicts[(request.path, request.headers.get("X-QLM-Event-Id", ""))] = code
        return web.Response(status=code)
    return handler


# --- the specification and the library, without the network --------------------------------------


def test_spec_test_vector() -> None:
    assert signing.standard_webhooks_signature(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP,
                                               SPEC_BODY) == SPEC_SIGNATURE
    signed = Signer((SPEC_SECRET,), standard_webhooks=True).headers(SPEC_ID, SPEC_BODY,
                                                                     now=SPEC_TIMESTAMP)
    assert signed["webhook-signature"] == SPEC_SIGNATURE
    assert signed["webhook-timestamp"] == str(SPEC_TIMESTAMP)
    official_sig = Webhook(SPEC_SECRET).sign(SPEC_ID, datetime.fromtimestamp(SPEC_TIMESTAMP, UTC),
                                             SPEC_BODY.decode())
    assert official_sig == SPEC_SIGNATURE
    assert verify_standard_webhook(SPEC_BODY, SPEC_SECRET, signed, now=SPEC_TIMESTAMP + 10)


def _random_secrets(count: int) -> list[str]:
    rnd = random.Random(10)
    alphabet = string.ascii_letters + string.digits + "+/=-_. !é"
    out = []
    for _ in range(count):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 50)))
        out.append(text if rnd.random() < 0.5 else "whsec_" + text)
    return out


def _same_as_the_library(secret: str) -> bool:
    """A secret the library accepts signs as the library signs; one it refuses, the bridge
    refuses too, with a message that does not show it."""
    try:
        wh = Webhook(secret)
    except Exception:
        try:
            signing.standard_webhooks_key(secret)
        except ValueError as exc:
            return len(secret) < 8 or secret not in str(exc)
        return False
    when = datetime(2026, 1, 15, 12, tzinfo=UTC)
    ours = signing.standard_webhooks_signature(secret, "msg_1", int(when.timestamp()), b"{}")
    return ours == wh.sign("msg_1", when, "{}")


def test_key_derivation_is_the_official_librarys() -> None:
    named = [PADDED, UNPADDED, PLAIN, SPEC_SECRET, NON_ASCII, "abcde", "whsec_", "whsec_===="]
    rnd = random.Random(10)
    alphabet = string.ascii_letters + string.digits + "+/=-_. !é"
    generated = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 50)))
                 for _ in range(500)]
    generated += ["whsec_" + s for s in generated]
    assert [s for s in named + generated if not _same_as_the_library(s)] == []
    accepted = sum(1 for s in generated if _library_accepts(s))
    assert 0.2 < accepted / len(generated) < 0.8  # both kinds were tried


def _library_accepts(secret: str) -> bool:
    try:
        Webhook(secret)
    except Exception:
        return False
    return True


def test_rotation_signs_with_every_secret_and_qlm_with_the_first() -> None:
    body = b'{"EventType":"customer_created"}'
    signer = Signer((NEW, OLD), standard_webhooks=True)
    sent = signer.headers("evt-1", body)
    assert len(sent["webhook-signature"].split(" ")) == 2
    for secret in (NEW, OLD):
        assert Webhook(secret).verify(body, sent) == json.loads(body)
        assert verify_standard_webhook(body, secret, sent)
    with pytest.raises(WebhookVerificationError):
        Webhook(PADDED).verify(body, sent)
    assert sent["X-QLM-Signature"] == hashlib.sha256(body + NEW.encode()).hexdigest()
    # the receivers' helper: one secret or several, for both schemes
    assert verify_signature(body, [PADDED, NEW], sent["X-QLM-Signature"])
    assert not verify_signature(body, [PADDED, OLD], sent["X-QLM-Signature"])
    assert verify_standard_webhook(body, [PADDED, OLD], sent)
    assert not verify_standard_webhook(body, [PADDED, UNPADDED], sent)
    assert not verify_standard_webhook(body + b" ", [NEW, OLD], sent)
    with pytest.raises(ValueError):
        verify_standard_webhook(body, NON_ASCII, sent)
    # never shown
    for text in (repr(signer), str(signer)):
        assert NEW not in text and OLD not in text and NEW[6:] not in text


def test_unsigned_and_qlm_only() -> None:
    assert Signer(()).headers("e", b"{}") == {}
    qlm_only = Signer((NON_ASCII,)).headers("e", b"{}")
    assert qlm_only == {"X-QLM-Signature": hashlib.sha256(b"{}" + NON_ASCII.encode()).hexdigest()}


def test_headers_from_config_use_the_cached_signer() -> None:
    cfg = config_mod.parse({"database": {"dsn": "postgresql://u@h/d"},
                            "webhooks": {"secret_key": [UNPADDED, PADDED],
                                         "standard_webhooks": True}}, env={})
    assert cfg.webhooks.signer is cfg.webhooks.signer  # keys decoded once
    event = payload.Event("e-1", "customer_created", datetime(2026, 1, 15, tzinfo=UTC), "{}")
    body = payload.body(event)
    sent = payload.headers(event, body, cfg.webhooks.signer)
    assert Webhook(UNPADDED).verify(body, sent) and Webhook(PADDED).verify(body, sent)
    assert "secret_key" not in repr(cfg) and UNPADDED not in repr(cfg)


def test_gen_secret() -> None:
    cli = str(Path(sys.executable).parent / "qlm-bridge")
    made = [subprocess.run([cli, "gen-secret"], capture_output=True, text=True, timeout=60,
                           check=True).stdout for _ in range(2)]
    assert made[0] != made[1]
    for out in made:
        secret = out.strip()
        assert out == secret + "\n" and re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", secret)
        assert len(base64.b64decode(secret[6:])) == 32
        body = b"{}"
        sent = Signer((secret,), standard_webhooks=True).headers("m", body)
        Webhook(secret).verify(body, sent)
        config_mod.parse({"database": {"dsn": "postgresql://u@h/d"},
                          "webhooks": {"secret_key": secret, "standard_webhooks": True}}, env={})


# --- real deliveries from a daemon --------------------------------------------------------------


async def _seven(db: Db, secret: str, standard: bool) -> Verdicts:
    verdicts: Verdicts = {}
    behaviours = {"/qlm": qlm_style(secret, verdicts)}
    if standard:
        behaviours["/sw"] = official(secret, verdicts)
    rx = await Receiver(behaviours=behaviours).start()
    urls = [rx.url(p) for p in behaviours]
    cfg = db.config(webhooks={"secret_key": secret, "standard_webhooks": standard,
                              "max_retries": 0, "events": {e: urls for e in QLM_SEVEN}})
    async with running(cfg):
        _seven_changes(db)
        await rx.wait_for(lambda: len(verdicts) == 7 * len(urls))
    await rx.stop()
    return verdicts


@pytest.mark.parametrize(("secret", "standard"), [
    (PADDED, True), (UNPADDED, True), (PLAIN, True), (NON_ASCII, False)],
    ids=["padded-whsec", "unpadded-whsec", "plain-ascii", "non-ascii-qlm-only"])
def test_daemon_deliveries_verify_with_the_official_library(db: Db, secret: str,
                                                            standard: bool) -> None:
    verdicts = asyncio.run(_seven(db, secret, standard))
    assert set(verdicts.values()) == {204}
    assert len(verdicts) == (14 if standard else 7)
    assert states(db) == {"delivered": len(verdicts)}


# --- rotation with SIGHUP, no restart; send-test at every step ------------------------------------

# (secret_key at this step, the paths that must accept it)
STEPS: list[tuple[list[str], set[str]]] = [
    ([OLD], {"/sw-old", "/qlm-old"}),
    ([OLD, NEW], {"/sw-old", "/sw-new", "/qlm-old"}),
    ([NEW, OLD], {"/sw-old", "/sw-new", "/qlm-new"}),
    ([NEW], {"/sw-new", "/qlm-new"}),
]
PATHS = ("/sw-old", "/sw-new", "/qlm-old", "/qlm-new")


def _send_test(config_path: Path) -> dict[str, int]:
    """`qlm-bridge send-test --event customer_created`: the status each URL answered."""
    result = run_cli("send-test", "--config", str(config_path), "--event", "customer_created")
    assert "Traceback" not in result.stderr and result.returncode in (0, 1), result.stderr
    found = re.findall(r"POST http://127\.0\.0\.1:\d+(/\S+) .*\n  -> HTTP (\d+)", result.stdout)
    assert len(found) == len(PATHS), result.stdout
    return {path: int(code) for path, code in found}


async def _rotation(db: Db, tmp_path: Path) -> tuple[list[Verdicts], list[dict[str, int]],
                                                     str, dict[str, str]]:
    verdicts: Verdicts = {}
    rx = await Receiver(behaviours={
        "/sw-old": official(OLD, verdicts), "/sw-new": official(NEW, verdicts),
        "/qlm-old": qlm_style(OLD, verdicts), "/qlm-new": qlm_style(NEW, verdicts)}).start()
    port = free_port()
    data = config_data(db.dsn, webhooks={
        "secret_key": STEPS[0][0], "standard_webhooks": True, "max_retries": 0,
        "events": {"customer_created": [rx.url(p) for p in PATHS]}},
        observe={"listen": f"127.0.0.1:{port}", "log_level": "debug"})
    proc = DaemonProcess(tmp_path, data).start()
    per_step: list[Verdicts] = []
    send_tests: list[dict[str, int]] = []
    pages: dict[str, str] = {}
    try:
        await proc.wait_log("started")
        pid = proc.proc.pid if proc.proc else None
        # The four steps, then a secret Standard Webhooks cannot use: that reload is refused
        # and the running secrets stay (the last step's verdicts again).
        for n, secrets in enumerate([s for s, _ in STEPS] + [[BAD, NEW]]):
            if n:
                data["webhooks"]["secret_key"] = secrets
                proc.write_config(data)
                proc.signal(signal.SIGHUP)
                if secrets[0] == BAD:
                    await proc.wait_log("reload failed, keeping the running config")
                else:
                    await proc.wait_log("config reloaded", occurrences=n)
            before = dict(verdicts)
            db.execute("INSERT INTO customers (full_name) VALUES (%s)", (f"step {n}",))
            want = len(before) + len(PATHS)
            await rx.wait_for(lambda want=want: len(verdicts) == want)
            per_step.append({k: v for k, v in verdicts.items() if k not in before})
            if secrets[0] != BAD:
                send_tests.append(await asyncio.to_thread(_send_test, proc.config_path))
        assert proc.proc is not None and proc.proc.pid == pid and proc.proc.returncode is None
        async with aiohttp.ClientSession() as session:
            for page in ("/metrics", "/healthz", "/readyz"):
                async with session.get(f"http://127.0.0.1:{port}{page}") as resp:
                    pages[page] = await resp.text()
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        proc.kill()
        await rx.stop()
    return per_step, send_tests, proc.log(), pages


def test_rotation_with_sighup_and_send_test(db: Db, tmp_path: Path) -> None:
    per_step, send_tests, log, pages = asyncio.run(_rotation(db, tmp_path))
    refused_reload = per_step.pop()  # the running secrets ([new]) still sign
    assert {p: c for (p, _), c in refused_reload.items()} == \
        {p: 204 if p in STEPS[-1][1] else 401 for p in PATHS}
    assert "webhooks.secret_key: secret 1 (of 2) cannot be a Standard Webhooks secret" in log
    for (secrets, accepting), step, tested in zip(STEPS, per_step, send_tests, strict=True):
        answered = {p: code for (p, _), code in step.items()}
        expected = {p: 204 if p in accepting else 401 for p in PATHS}
        assert answered == expected, (len(secrets), answered)
        assert tested == expected, (len(secrets), tested)
    assert log.count("config reloaded") == 3 and log.count("started") == 1
    # Nothing shows a secret: the daemon's log (debug), attempt_log, the tables, status, metrics.
    tables = " ".join(str(r) for r in db.query("SELECT t::text FROM qlm_bridge.attempt_log t"))
    assert tables.count("HTTP 401") >= 6  # the receivers' refusals were recorded
    tables += " ".join(str(r) for r in db.query("SELECT t::text FROM qlm_bridge.delivery t"))
    tables += " ".join(str(r) for r in db.query("SELECT t::text FROM qlm_bridge.daemon t"))
    cfg = db.config(webhooks={"secret_key": [NEW, OLD], "standard_webhooks": True})
    report = ops.status(db.dsn, cfg)
    shown = ops.format_status(report) + json.dumps(report.to_json())
    for where, text in (("log", log), ("tables", tables), ("status", shown), *pages.items()):
        for secret in (OLD, NEW, BAD):
            assert secret[6:] not in text, where


# --- send-test is the daemon's code path ----------------------------------------------------------


def _verdicts_of(behaviours: Callable[[Verdicts], dict[str, Behaviour]],
                 run: Callable[[Receiver], Any]) -> tuple[Verdicts, Any]:
    async def go() -> tuple[Verdicts, Any]:
        verdicts: Verdicts = {}
        rx = await Receiver(behaviours=behaviours(verdicts)).start()
        try:
            result = await asyncio.to_thread(run, rx)
        finally:
            await rx.stop()
        return verdicts, result
    return asyncio.run(go())


def test_send_test_with_an_unpadded_secret(db: Db) -> None:
    cfg = db.config(webhooks={"secret_key": UNPADDED, "standard_webhooks": True})
    verdicts, results = _verdicts_of(
        lambda v: {"/sw": official(UNPADDED, v), "/qlm": qlm_style(UNPADDED, v),
                   "/other": official(PADDED, v)},
        lambda rx: ops.send_test([rx.url("/sw"), rx.url("/qlm"), rx.url("/other")],
                                 "license_activated", cfg))
    assert [r.status for r in results] == [204, 204, 401]
    assert sorted(verdicts.values()) == [204, 204, 401]


# --- per-endpoint secrets (webhooks.endpoints.<url>.secret_key) -----------------------------------


async def _per_endpoint(db: Db) -> tuple[Verdicts, list[ops.SendResult], dict[str, str]]:
    verdicts: Verdicts = {}
    seen: dict[str, str] = {}
    rx = await Receiver(behaviours={"/a": official(PADDED, verdicts),
                                    "/b": official(PLAIN, verdicts)}).start()
    a, b = rx.url("/a"), rx.url("/b")
    cfg = db.config(webhooks={
        "secret_key": PLAIN, "standard_webhooks": True, "max_retries": 0,
        "events": {"customer_created": [a, b]},
        "endpoints": {a: {"secret_key": [UNPADDED, PADDED], "headers": {"X-Tenant": "t-1"}}}})
    async with running(cfg):
        db.execute("INSERT INTO customers (full_name) VALUES ('endpoint')")
        await rx.wait_for(lambda: len(verdicts) == 2)
    results = await asyncio.to_thread(ops.send_test, [a, b], "customer_created", cfg)
    for r in rx.on("/a"):
        seen[r.headers["X-QLM-Event-Id"]] = r.headers.get("X-Tenant", "")
    await rx.stop()
    return verdicts, results, seen


def test_endpoint_secrets_for_daemon_and_send_test(db: Db) -> None:
    verdicts, results, tenant = asyncio.run(_per_endpoint(db))
    assert set(verdicts.values()) == {204}  # the daemon's two deliveries
    assert [r.status for r in results] == [204, 204]  # send-test: the same policies
    assert list(tenant.values()) == ["t-1", "t-1"]  # the endpoint's header, both times
