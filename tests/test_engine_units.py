"""Unit tests of the engine's pure decision logic, with a fake clock (no database, no I/O):
per-URL slots and the global in-flight bound, the NOTIFY gate, breaker outcomes, endpoint
policies. The services around them are tested against real PostgreSQL elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import pytest

from bridge import config as config_mod
from bridge.clock import FakeClock
from bridge.engine.completer import breaker_outcomes
from bridge.engine.flag import Flag, wait_any
from bridge.engine.gate import NotifyGate, snapshot_has_writers
from bridge.engine.policy import Policies
from bridge.engine.slots import Slots
from bridge.payload import Event
from bridge.store import Claimed, Result

NOW = datetime(2026, 1, 1, tzinfo=UTC)
A, B = "https://a.example/hook", "https://b.example/hook"


def claimed(i: int, url: str = A, attempt: int = 1) -> Claimed:
    return Claimed(i, url, attempt, Event(f"e{i}", "license_created", NOW, "{}"))


def result(c: Claimed, ok: bool) -> Result:
    return Result(c, "delivered" if ok else "pending", None if ok else 1.0,
                  200 if ok else 500, None if ok else "HTTP 500", NOW, 1.0, None)


# --- slots ---------------------------------------------------------------------------------


def test_room_is_concurrency_plus_prefetch_minus_held() -> None:
    clock = FakeClock()
    slots = Slots(lambda url: 2, prefetch=3, max_concurrency=100, clock=clock)
    assert slots.room([A, B]) == {A: 5, B: 5}
    for i in range(4):
        slots.add(claimed(i), start_by=clock.now + 10)
    assert slots.room([A, B]) == {A: 1, B: 5}


def test_startable_respects_per_url_limit_and_global_bound() -> None:
    clock = FakeClock()
    slots = Slots(lambda url: 3, prefetch=10, max_concurrency=4, clock=clock)
    for i in range(5):
        slots.add(claimed(i, A), clock.now + 10)
        slots.add(claimed(100 + i, B), clock.now + 10)
    start, expired = slots.startable()
    assert expired == []
    assert len(start) == 4  # the global bound, across URLs
    assert sum(c.url == A for c in start) <= 3 and sum(c.url == B for c in start) <= 3
    # a finished request frees its URL slot, but not the global one until acknowledged
    slots.request_done(start[0])
    assert slots.startable() == ([], [])
    slots.acked(start[0])
    more, _ = slots.startable()
    assert len(more) == 1


def test_a_row_whose_lease_would_run_out_is_given_back_not_started() -> None:
    clock = FakeClock()
    slots = Slots(lambda url: 1, prefetch=5, max_concurrency=10, clock=clock)
    first, late = claimed(1), claimed(2)
    slots.add(first, clock.now + 10)
    slots.add(late, clock.now + 5)
    assert slots.startable() == ([first], [])
    clock.advance(6)
    slots.request_done(first)
    start, expired = slots.startable()
    assert start == [] and expired == [late]
    assert (late.id, late.attempt) not in slots.held  # forgotten: the caller releases it


def test_pause_returns_queued_rows_and_blocks_room_until_resumed() -> None:
    clock = FakeClock()
    slots = Slots(lambda url: 1, prefetch=5, max_concurrency=10, clock=clock)
    rows = [claimed(i) for i in range(3)]
    for c in rows:
        slots.add(c, clock.now + 100)
    running, _ = slots.startable()
    given_back = slots.pause(A, clock.now + 5)
    assert given_back == rows[1:]
    assert slots.room([A]) == {} and slots.paused_until(A) == clock.now + 5
    clock.advance(6)
    assert slots.paused_until(A) is None and A in slots.room([A])
    slots.resume(A)
    assert slots.paused_until(A) is None
    assert running == rows[:1]


# --- NOTIFY gate ---------------------------------------------------------------------------


def test_gate_flips_only_at_transitions_not_per_event() -> None:
    clock = FakeClock()
    gate = NotifyGate(poll_interval=2.0, clock=clock)
    assert gate.idle()  # unknown at start: set the flag
    assert gate.flag_set("10:12:") is True  # fresh: poll once more
    assert gate.snapshot is None  # no writer was in progress
    for _ in range(100):  # light load: one event per wake, never a backlog
        clock.advance(0.01)
        assert not gate.idle()
    clock.advance(2.0)
    assert gate.idle()  # renewal due once per poll interval
    assert gate.flag_set("20:20:") is False  # a renewal: no extra poll
    assert gate.backlog() is True  # draining: turn it off once
    assert gate.backlog() is False
    assert gate.idle()
    assert gate.flag_set("30:35:31,33") is True
    assert gate.snapshot == "30:35:31,33"  # wait for those writers, then poll once more
    gate.settled()
    assert gate.snapshot is None


def test_gate_unknown_after_errors_reasserts() -> None:
    clock = FakeClock()
    gate = NotifyGate(poll_interval=1.0, clock=clock)
    gate.flag_set("1:1:")
    assert not gate.idle()
    gate.unknown()
    assert gate.idle()
    assert gate.backlog() is True  # unknown counts as possibly on


@pytest.mark.parametrize(("text", "writers"), [("5:9:", False), ("5:9:6", True), ("x", False)])
def test_snapshot_has_writers(text: str, writers: bool) -> None:
    assert snapshot_has_writers(text) is writers


# --- breaker outcomes and policies -----------------------------------------------------------


def _config(**webhooks: object) -> config_mod.Config:
    data = {"database": {"dsn": "postgresql://u@h/db"},
            "webhooks": {"secret_key": "s", "events": {"license_created": [A, B]}, **webhooks}}
    return config_mod.parse(data, "<test>", env={})


def test_breaker_outcomes_count_failures_after_the_last_success() -> None:
    pol = Policies(_config(endpoints={A: {"circuit_breaker": {"failures": 3, "cooldown": 5}}})
                   .webhooks)
    batch = [result(claimed(1), False), result(claimed(2), True), result(claimed(3), False),
             result(claimed(4), False), result(claimed(5, B), False)]
    (out,) = breaker_outcomes(batch, pol)  # B has no breaker
    assert (out.url, out.ok, out.tail, out.threshold, out.cooldown) == (A, True, 2, 3, 5.0)
    (only_failures,) = breaker_outcomes(batch[2:4], pol)
    assert (only_failures.ok, only_failures.tail) == (False, 2)


def test_endpoint_policy_falls_back_key_by_key() -> None:
    pol = Policies(_config(timeout=7, max_retries=4, ordering="per_key", endpoints={
        A: {"secret_key": "other", "timeout": 2, "rate_limit": 50, "ordering": "none",
            "headers": {"Authorization": "Bearer x"}}}).webhooks)
    a, b = pol(A), pol(B)
    assert (a.signer.secrets, a.timeout, a.retry.max_retries, a.per_key) == (("other",), 2, 4,
                                                                             False)
    assert a.rate_limit == 50 and a.burst == 5 and a.shared_state
    assert a.headers == (("Authorization", "Bearer x"),)
    assert (b.signer.secrets, b.timeout, b.per_key, b.shared_state) == (("s",), 7, True, False)
    assert pol.per_key_urls() == [B]
    leftover = pol("https://old.example/x")  # a URL no longer configured: the global settings
    assert leftover.timeout == 7 and leftover.breaker is None


@pytest.mark.parametrize(("endpoints", "message"), [
    ({"https://c.example/x": {}}, "is not a URL of webhooks.events"),
    ({A: {"headers": {"Content-Type": "text/plain"}}}, "set by the bridge itself"),
    ({A: {"headers": {"webhook-id": "x"}}}, "set by the bridge itself"),
    ({A: {"timeot": 3}}, "did you mean 'timeout'"),
    ({A: {"circuit_breaker": {"failures": 0}}}, "circuit_breaker.failures"),
])
def test_endpoint_config_errors_name_the_key(endpoints: dict[str, object], message: str) -> None:
    with pytest.raises(config_mod.ConfigError, match=message):
        _config(endpoints=endpoints)


# --- Flag / wait_any (bridge/engine/flag.py) ---------------------------------------------------

def test_wait_any_returns_on_a_set_flag_and_leaves_no_waiter_behind() -> None:
    async def case() -> None:
        a, b = Flag(), Flag()
        assert await wait_any((a, b), 0.01) is False  # nothing set: the timeout
        asyncio.get_running_loop().call_later(0.01, b.set)
        assert await wait_any((a, b), 5) is True
        assert b.is_set() and not a.is_set()
        assert not a._waiters and not b._waiters  # nothing left registered
        assert await wait_any((a, b), 5) is True  # already set: at once
        b.clear()
        waiter = asyncio.ensure_future(a.wait())
        await asyncio.sleep(0)
        a.set()
        assert await waiter is True

    asyncio.run(case())


def test_a_cancelled_wait_any_unregisters() -> None:
    async def case() -> None:
        a = Flag()
        task = asyncio.ensure_future(wait_any((a,), 5))
        await asyncio.sleep(0)
        assert len(a._waiters) == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not a._waiters
        a.set()  # no error from a cancelled waiter

    asyncio.run(case())
