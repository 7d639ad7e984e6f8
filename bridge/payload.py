"""The webhook body and headers for one delivery. Pure functions.

The body embeds the event's row as PostgreSQL rendered it (jsonb text, already renamed to
payload field names by the claim query), so numbers keep every digit and text is escaped once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bridge import __version__
from bridge.events import INFO_KEY, kind_of
from bridge.signing import Signer

USER_AGENT = f"qlm-webhook-bridge/{__version__}"


@dataclass(frozen=True, slots=True)
class Event:
    """What a delivery sends: identity, type, capture time and the row (as JSON text)."""

    event_id: str
    event_type: str
    created_at: datetime
    info: str  # JSON object text
    previous: str | None = None  # JSON object text: old values of changed fields
    # created_at as the body's Timestamp and X-QLM-Timestamp write it (once per event)
    timestamp: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timestamp", iso_utc(self.created_at))


def iso_utc(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def body(event: Event) -> bytes:
    head = (
        '{"EventType":' + json.dumps(event.event_type)
        + ',"EventId":' + json.dumps(event.event_id)
        + ',"Timestamp":"' + event.timestamp + '"'
        + ',"' + INFO_KEY[kind_of(event.event_type)] + '":' + (event.info or "{}")
    )
    if event.previous:
        head += ',"Previous":' + event.previous
    return (head + "}").encode("utf-8")


def headers(event: Event, body_bytes: bytes, signer: Signer,
            now: float | None = None) -> dict[str, str]:
    """QLM's headers, signed by `signer` (X-QLM-Signature; with Standard Webhooks also
    webhook-id / webhook-timestamp / webhook-signature, signed at send time so receivers'
    5-minute tolerance holds on retries)."""
    out = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-QLM-Event": event.event_type,
        "X-QLM-Event-Id": event.event_id,
        "X-QLM-Timestamp": event.timestamp,
    }
    out.update(signer.headers(event.event_id, body_bytes, now))
    return out
