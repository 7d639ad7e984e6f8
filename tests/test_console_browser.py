"""Issue 12 (web console) in a real browser: Playwright drives Debian's chromium against a real
`qlm-bridge run` process, real aiohttp receivers and real PostgreSQL.

One browser per module. Without chromium the tests skip, except in CI (CI=true), where they
fail. QLM_BRIDGE_SCREENSHOTS=1 also writes the README's screenshots to docs/."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from tests.support.config import config_data
from tests.support.daemon import DaemonProcess
from tests.support.net import free_port
from tests.support.receiver import Receiver, ok
from tests.support.server import Db

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-console-token-0123456789"
XSS_KEY = "<script>window.__xss=1</script>"
XSS_DATA = '<img src=x onerror="window.__xss=2">'
ANSWER = '{"error": "database is down", "trace": "<script>window.__xss=3</script>"}'
DOCS = Path(__file__).resolve().parent.parent / "docs"
T = TypeVar("T")

playwright_sync = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs it with apt-get")
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}); "
                    "`apt-get install chromium` runs these tests (CI installs it)")
    with playwright_sync.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Background:
    """An event loop in a thread for the receiver and the daemon process, so the browser (sync
    Playwright) keeps the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def answer(code: int, text: str) -> Any:
    async def handler(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=code, text=text, content_type="application/json")
    return handler


class Stack:
    """Receiver + `qlm-bridge run` with the console on a free port."""

    def __init__(self, db: Db, tmp: Path) -> None:
        self.db = db
        self.bg = Background()
        self.rx = self.bg.run(Receiver({"/hook": answer(500, ANSWER)}).start())
        self.port = free_port()
        cfg = config_data(db.dsn, webhooks={
            "events": {"license_created": self.rx.url("/hook"),
                       "customer_created": self.rx.url("/crm"),
                       "customer_modified": self.rx.url("/crm")},
            "max_retries": 0},
            observe={"listen": f"127.0.0.1:{self.port}",
                     "console_token": "${QLM_TEST_CONSOLE_TOKEN}"})
        self.daemon = DaemonProcess(tmp, cfg, name="bridge").start()
        self.bg.run(self.daemon.wait_log("started"))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_db(self, statement: str, want: Any, what: str) -> None:
        async def poll() -> None:
            for _ in range(300):
                if self.db.scalar(statement) == want:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"timed out waiting for {what}")
        self.bg.run(poll())

    def close(self) -> None:
        try:
            self.daemon.kill()
            self.bg.run(self.rx.stop())
        finally:
            self.bg.close()


@pytest.fixture
def stack(db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setenv("QLM_TEST_CONSOLE_TOKEN", TOKEN)  # the config reads ${VAR}
    s = Stack(db, tmp_path)
    try:
        yield s
    finally:
        s.close()


def log_in(page: Any, base: str) -> None:
    page.goto(base + "/console")
    assert "/console/login" in page.url  # sent to the form, no data
    page.fill("#token", TOKEN)
    page.click("button:has-text('Log in')")
    page.wait_for_url(base + "/console")
    playwright_sync.expect(page.locator("h1")).to_have_text("Overview")


def shoot(page: Any, tmp: Path, name: str) -> None:
    path = tmp / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    if os.environ.get("QLM_BRIDGE_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / f"{name}.png")


def seed(stack: Stack) -> None:
    """A failed license (receiver answering 500) with an XSS payload in two columns, and a few
    delivered customer events around it."""
    db = stack.db
    db.execute("INSERT INTO customers (full_name, email, company) VALUES "
               "('Ada Lovelace', 'ada@example.com', 'Analytical Engines'), "
               "('Grace Hopper', 'grace@example.com', 'COBOL Ltd'), "
               "('Alan Turing', 'alan@example.com', 'Bletchley Park')")
    db.execute("UPDATE customers SET email = 'ada@engines.example' "
               "WHERE full_name = 'Ada Lovelace'")
    db.execute("INSERT INTO license_keys (activation_key, customer_id, product_name, user_data) "
               "VALUES (%s, 1, 'Analytical Engine Pro', %s)", (XSS_KEY, XSS_DATA))
    stack.wait_db("SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'failed'", 1,
                  "the failed license delivery")
    stack.wait_db("SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'delivered'", 4,
                  "the customer deliveries")


def test_failed_delivery_replayed_from_the_browser(browser: Any, stack: Stack,
                                                   tmp_path: Path) -> None:
    expect = playwright_sync.expect
    seed(stack)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    log_in(page, stack.base)
    expect(page.locator(".tile.bad .value")).to_have_text("1")
    shoot(page, tmp_path, "console-overview")

    # the list: the failed delivery, its key shown as text
    page.click("nav >> text=Deliveries")
    failed = page.locator("tr[data-state='failed']")
    expect(failed).to_have_count(1)
    expect(failed.locator(".key")).to_have_text(XSS_KEY)
    expect(failed.locator(".answer")).to_contain_text("500")
    shoot(page, tmp_path, "console-deliveries")

    # its event page: the receiver's answer, the payload as text
    failed.locator("a.event").click()
    expect(page.locator("h1 .type")).to_have_text("license_created")
    expect(page.locator("pre.response").last).to_have_text(ANSWER)
    expect(page.locator("#payload")).to_contain_text(XSS_KEY)
    expect(page.locator("#payload")).to_contain_text(XSS_DATA.replace('"', '\\"'))
    expect(page.locator(".facts")).to_contain_text(XSS_KEY)
    assert page.evaluate("window.__xss") is None, "a stored payload ran as script"
    assert page.locator("img[src='x']").count() == 0
    shoot(page, tmp_path, "console-event")

    # the receiver is fixed: replay, and watch the delivery turn delivered
    stack.rx.behaviours["/hook"] = ok
    page.click("#replay")
    page.wait_for_url("**/console/deliveries?event_id=*")
    expect(page.locator(".notice.ok")).to_contain_text("queued again")
    row = page.locator("tr[data-state]")
    expect(row).to_have_count(1)
    expect(row.locator(".pill")).to_have_text("delivered", timeout=15_000)
    assert len(stack.rx.on("/hook")) == 2
    # the event page shows the bytes the receiver got, and now the 200
    row.locator("a.event").click()
    raw = page.locator("pre.raw").text_content()
    assert raw is not None and raw.encode() == stack.rx.on("/hook")[-1].body
    expect(page.locator("tr.delivery .pill")).to_have_text("delivered")
    assert page.evaluate("window.__xss") is None and dialogs == []
    context.close()


def test_live_refresh_and_phone_layout(browser: Any, stack: Stack, tmp_path: Path) -> None:
    expect = playwright_sync.expect
    seed(stack)
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    log_in(page, stack.base)
    # nothing sticks out sideways on a phone
    for path in ("/console", "/console/deliveries"):
        page.goto(stack.base + path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{path} is {width}px wide on a 390px screen"
    shoot(page, tmp_path, "console-phone")
    # a new delivery appears without reloading (live refresh, every 5 s)
    rows = page.locator("tr[data-state]")
    expect(rows).to_have_count(5)
    page.evaluate("window.__marker = 1")  # gone if the page were reloaded
    stack.db.execute("INSERT INTO customers (full_name) VALUES ('Katherine Johnson')")
    expect(rows).to_have_count(6, timeout=15_000)
    expect(page.locator("tr[data-state] .key").first).to_have_text("4")
    assert page.evaluate("window.__marker") == 1
    context.close()
