"""Per-endpoint policies: the global webhooks.* settings overridden by webhooks.endpoints.<url>.

A URL that is not configured (a leftover of an older config with deliveries still pending) gets
the global settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from bridge import payload, signing
from bridge.config import EndpointConfig, WebhooksConfig
from bridge.payload import Event
from bridge.retry import RetryPolicy
from bridge.signing import Signer

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Breaker:
    failures: int
    cooldown: float


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    url: str
    signer: Signer  # the endpoint's secrets, else webhooks.secret_key; built once per config
    timeout: float
    retry: RetryPolicy
    concurrency: int
    rate_limit: float | None  # requests per second across every daemon
    per_key: bool
    breaker: Breaker | None
    headers: tuple[tuple[str, str], ...]

    def request(self, event: Event) -> tuple[bytes, dict[str, str]]:
        """The body and headers of a request to this endpoint: signed, with the endpoint's
        extra headers. The daemon and `send-test` both send exactly this."""
        body = payload.body(event)
        headers = payload.headers(event, body, self.signer)
        if self.headers:
            headers.update(self.headers)
        return body, headers

    @property
    def shared_state(self) -> bool:
        """Whether the endpoint's rate or breaker lives in the shared `endpoint` table."""
        return self.rate_limit is not None or self.breaker is not None

    @property
    def burst(self) -> float:
        """Token bucket size: a tenth of a second's worth, at least one request."""
        return max(1.0, (self.rate_limit or 0.0) / 10.0)


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def policy_for(wh: WebhooksConfig, url: str) -> EndpointPolicy:
    ep = wh.endpoints.get(url) or EndpointConfig()
    retry = RetryPolicy(_or(ep.retry_policy, wh.retry_policy),
                        _or(ep.retry_interval, wh.retry_interval),
                        _or(ep.max_retries, wh.max_retries),
                        _or(ep.max_retry_interval, wh.max_retry_interval))
    cb = ep.circuit_breaker
    return EndpointPolicy(
        url=url,
        signer=signing.signer(ep.secret_key, wh.standard_webhooks) if ep.secret_key
        else wh.signer,
        timeout=_or(ep.timeout, wh.timeout),
        retry=retry,
        concurrency=_or(ep.per_url_concurrency, wh.per_url_concurrency),
        rate_limit=ep.rate_limit,
        per_key=_or(ep.ordering, wh.ordering) == "per_key",
        breaker=Breaker(cb.failures, cb.cooldown) if cb is not None else None,
        headers=tuple(ep.headers.items()),
    )


class Policies:
    """Every URL's policy for one config, built once (the hot path only looks them up)."""

    def __init__(self, wh: WebhooksConfig) -> None:
        self.webhooks = wh
        self._by_url: dict[str, EndpointPolicy] = {}
        for _, url in wh.subscriptions():
            self._by_url.setdefault(url, policy_for(wh, url))

    def __call__(self, url: str) -> EndpointPolicy:
        found = self._by_url.get(url)
        if found is None:
            found = self._by_url[url] = policy_for(self.webhooks, url)
        return found

    def per_key_urls(self) -> list[str]:
        return [u for u, p in self._by_url.items() if p.per_key]

    def shared(self) -> list[EndpointPolicy]:
        return [p for p in self._by_url.values() if p.shared_state]
