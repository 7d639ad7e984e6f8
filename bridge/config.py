"""YAML -> validated, typed configuration.

Every problem is collected and reported at once, each naming the file and the key path
(``webhooks.max_retries: must be >= 0``). ``${VAR}`` and ``${VAR:-default}`` are expanded in every
string value before validation.
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import psycopg
import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from bridge import signing
from bridge.errors import ConfigError as ConfigError
from bridge.events import ALL_EVENTS
from bridge.signing import GEN_SECRET_HINT, Signer
from bridge.sql import quote_ident

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_IDENT_MAX = 63
CONSOLE_TOKEN_MIN = 16


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_bools(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML's `true` would otherwise pass as 1 for an int field.
        if (isinstance(value, bool) and info.field_name is not None
                and cls.model_fields[info.field_name].annotation in (int, float)):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


def check_url(url: str) -> str:
    """A webhook URL as the bridge accepts it (http/https, a host, no credentials or spaces)."""
    return _check_url(url)


def _check_url(url: str) -> str:
    url = url.strip()
    if not url:
        raise ValueError("empty URL")
    if any(c.isspace() for c in url):
        raise ValueError(f"URL {url!r} contains white space")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"URL {redact_url(url)!r} embeds credentials; they would be logged. "
            "Verify the receiver with the signature instead"
        )
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"URL {url!r} has an invalid port") from exc
    return url


def redact_url(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=f"***@{host}").geturl()


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, for messages: ``host:port database 'x' as 'u'``, never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the configured database"
    host = str(info.get("host") or info.get("hostaddr") or os.environ.get("PGHOST") or "")
    port = str(info.get("port") or os.environ.get("PGPORT") or "5432")
    hosts = host.split(",") if host else ["local socket"]
    ports = port.split(",")
    places = [f"{h}:{ports[i] if i < len(ports) else ports[-1]}" for i, h in enumerate(hosts)]
    # the defaults libpq and asyncpg use when the DSN names no user or database
    user = str(info.get("user") or os.environ.get("PGUSER") or _os_user())
    dbname = str(info.get("dbname") or os.environ.get("PGDATABASE") or user)
    return f"{', '.join(places)} database {dbname!r} as {user!r}"


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid
        return "the current OS user"


def _check_dsn(dsn: str) -> str:
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"is not a valid PostgreSQL connection string ({reason})") from None
    for port in str(info.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"has an invalid port {port!r}")
    return dsn


def _check_event_name(name: str) -> str:
    if name not in ALL_EVENTS:
        close = difflib.get_close_matches(name, ALL_EVENTS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown event {name!r}; {hint}known: {', '.join(ALL_EVENTS)}")
    return name


def _check_kind(kind: str) -> str:
    if kind not in ("license", "customer"):
        raise ValueError(f"must be 'license' or 'customer', not {kind!r}")
    return kind


_UNSIGNED = "remove the key to send unsigned requests, or set a secret"


def _secret_problem(secret: str, standard_webhooks: bool, empty: str = _UNSIGNED) -> str | None:
    """What is wrong with one secret_key entry, if anything (never its value)."""
    if not secret:
        return f"is empty; {empty}"
    if not standard_webhooks:
        return None
    if any(c.isspace() for c in secret):
        return ("contains white space; to sign with several secrets while rotating, give a "
                "YAML list, current secret first")
    try:
        signing.standard_webhooks_key(secret)
    except ValueError as exc:
        return f"cannot be a Standard Webhooks secret: it {exc}"
    return None


def _some_url_unsigned(data: Mapping[str, Any]) -> bool:
    """Without webhooks.secret_key, whether some URL (or, with none yet, any URL) would have
    no secret: every subscribed URL needs webhooks.endpoints.<url>.secret_key then."""
    urls = {u for us in (data.get("events") or {}).values() for u in us}
    endpoints = data.get("endpoints") or {}
    return not urls or any(not getattr(endpoints.get(u), "secret_key", None) for u in urls)


EventName = Annotated[str, AfterValidator(_check_event_name)]
Url = Annotated[str, AfterValidator(_check_url)]


Dsn = Annotated[str, AfterValidator(_check_dsn)]


class DatabaseConfig(_Model):
    dsn: Dsn = Field(min_length=1)
    # LISTEN needs a connection of its own for the daemon's lifetime: a direct or session-mode
    # one. None: the same as dsn.
    listen_dsn: Dsn | None = Field(default=None, min_length=1)
    # false behind a pooler that cannot keep prepared statements (PgBouncer before 1.21, or
    # without max_prepared_statements, in transaction mode)
    prepared_statements: bool = True
    schema_name: str = Field(
        default="qlm_bridge",
        min_length=1,
        max_length=_IDENT_MAX,
        validation_alias=AliasChoices("schema", "schema_name"),
    )
    connect_timeout: float = Field(default=10.0, gt=0)

    @property
    def channel(self) -> str:
        return self.schema_name

    @property
    def listen_target(self) -> str:
        """The DSN the LISTEN connection uses."""
        return self.listen_dsn or self.dsn


_RESERVED_HEADERS = ("content-type", "user-agent")
_RESERVED_PREFIXES = ("x-qlm-", "webhook-")


def _secret_list(value: Any, unset: tuple[str, ...] | None) -> Any:
    """A secret_key as written (a string, or a list while rotating) -> a tuple; `unset` for
    null."""
    if value is None:
        return unset
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        if isinstance(value, list) and not value:
            raise ValueError("is an empty list; remove the key, or list the secrets, current "
                             f"first ({GEN_SECRET_HINT})")
        return value
    got = _TYPE_NAMES.get(type(value).__name__, type(value).__name__)
    raise ValueError("must be a string, or a list of strings (current secret first) "
                     f"while rotating (got {got})")


def _secrets_problems(secrets: tuple[str, ...], standard_webhooks: bool,
                      empty: str = _UNSIGNED) -> str | None:
    """Everything wrong with a secret_key's entries, in one message (never their values)."""
    problems = []
    for i, secret in enumerate(secrets):
        problem = _secret_problem(secret, standard_webhooks, empty)
        if problem is None and secret in secrets[:i]:
            problem = f"is the same as secret {secrets.index(secret) + 1}"
        if problem is not None:
            problems.append(problem if len(secrets) == 1 else
                            f"secret {i + 1} (of {len(secrets)}) {problem}")
    return "; ".join(problems) if problems else None


class CircuitBreakerConfig(_Model):
    """Open after `failures` consecutive failed attempts; send one probe after `cooldown` s."""

    failures: int = Field(default=5, ge=1, le=10000)
    cooldown: float = Field(default=60.0, gt=0, le=86400)


class EndpointConfig(_Model):
    """Settings of one receiver URL (webhooks.endpoints.<url>); a key left out falls back to
    the global webhooks.* value."""

    # One secret, or several while rotating (current first); None: webhooks.secret_key.
    secret_key: tuple[str, ...] | None = Field(default=None, repr=False)
    timeout: float | None = Field(default=None, gt=0, le=600)
    max_retries: int | None = Field(default=None, ge=0, le=1000)
    retry_interval: float | None = Field(default=None, ge=0, le=7 * 86400)
    retry_policy: Literal["fixed", "exponential"] | None = None
    max_retry_interval: float | None = Field(default=None, gt=0)
    per_url_concurrency: int | None = Field(default=None, ge=1, le=1000)
    rate_limit: float | None = Field(default=None, gt=0, le=100000)  # requests/s, all daemons
    ordering: Literal["none", "per_key"] | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    headers: dict[str, str] = Field(default_factory=dict, repr=False)  # often credentials

    @field_validator("secret_key", mode="before")
    @classmethod
    def _secret_list(cls, value: Any) -> Any:
        return _secret_list(value, None)

    @field_validator("secret_key")
    @classmethod
    def _secrets_valid(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # What Standard Webhooks needs is checked by WebhooksConfig, which knows the flag.
        problem = _secrets_problems(value, False, "remove the key to use webhooks.secret_key") \
            if value else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("headers")
    @classmethod
    def _no_reserved_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            low = name.lower()
            if low in _RESERVED_HEADERS or low.startswith(_RESERVED_PREFIXES):
                raise ValueError(f"{name!r} is set by the bridge itself and cannot be "
                                 "overridden (Content-Type, User-Agent, X-QLM-*, webhook-*)")
            if not name or any(c in name for c in " :\r\n\t") or any(c in text for c in "\r\n"):
                raise ValueError(f"{name!r}: not a valid header name or value")
        return value


class WebhooksConfig(_Model):
    enabled: bool = Field(default=True, validation_alias=AliasChoices("enabled", "webHooksEnabled"))
    # Before secret_key and endpoints: their checks depend on it.
    standard_webhooks: bool = False
    max_retries: int = Field(
        default=5, ge=0, le=1000, validation_alias=AliasChoices("max_retries", "webHookMaxRetries")
    )
    retry_interval: float = Field(
        default=60.0,
        ge=0,
        le=7 * 86400,
        validation_alias=AliasChoices("retry_interval", "webHookRetryInterval"),
    )
    retry_policy: Literal["fixed", "exponential"] = "fixed"
    max_retry_interval: float = Field(default=3600.0, gt=0)
    timeout: float = Field(default=10.0, gt=0, le=600)
    max_concurrency: int = Field(default=128, ge=1, le=10000)
    per_url_concurrency: int = Field(default=32, ge=1, le=1000)
    prefetch: int = Field(default=256, ge=0, le=10000)
    max_response_body: int = Field(default=4096, ge=0, le=1_048_576)
    ca_bundle: str | None = None
    block_private_addresses: bool = False
    events: dict[EventName, tuple[Url, ...]] = Field(default_factory=dict)
    field_names: dict[Annotated[str, AfterValidator(_check_kind)], dict[str, str]] = Field(
        default_factory=dict
    )
    ordering: Literal["none", "per_key"] = "none"
    endpoints: dict[str, EndpointConfig] = Field(default_factory=dict)
    # After events and endpoints (its checks look at them). One secret, or several while
    # rotating (current first); () sends unsigned requests.
    secret_key: tuple[str, ...] = Field(
        default=(), validate_default=True, repr=False,
        validation_alias=AliasChoices("secret_key", "webHookSecretKey"),
    )

    @field_validator("endpoints", mode="before")
    @classmethod
    def _empty_endpoints(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, Mapping):  # `"https://x":` with nothing under it: all defaults
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _endpoints_are_subscribed(self) -> WebhooksConfig:
        known = list(dict.fromkeys(u for _, u in self.subscriptions()))
        for url in self.endpoints:
            if url not in known:
                close = difflib.get_close_matches(url, known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"endpoints: {url!r} is not a URL of webhooks.events; "
                                 f"{hint}every key of endpoints must be one")
        return self

    @field_validator("endpoints")
    @classmethod
    def _endpoint_secrets_usable(cls, value: dict[str, EndpointConfig],
                                 info: ValidationInfo) -> dict[str, EndpointConfig]:
        if not info.data.get("standard_webhooks"):
            return value
        problems = [f"webhooks.endpoints.{url}.secret_key: {problem}"
                    for url, ep in value.items() if ep.secret_key
                    for problem in [_secrets_problems(ep.secret_key, True)] if problem]
        if problems:
            raise ValueError("\n  - ".join(problems))
        return value

    @field_validator("secret_key", mode="before")
    @classmethod
    def _secret_list(cls, value: Any) -> Any:
        return _secret_list(value, ())

    @field_validator("secret_key")
    @classmethod
    def _secrets_usable(cls, value: tuple[str, ...],
                        info: ValidationInfo) -> tuple[str, ...]:
        standard = bool(info.data.get("standard_webhooks"))
        if standard and not value and _some_url_unsigned(info.data):
            raise ValueError("is required with webhooks.standard_webhooks: true (requests "
                             f"would go unsigned); {GEN_SECRET_HINT}")
        problem = _secrets_problems(value, standard)
        if problem is not None:
            raise ValueError(problem)
        return value

    @property
    def signer(self) -> Signer:
        """How requests are signed (built once per distinct secrets/scheme, then cached)."""
        return signing.signer(self.secret_key, self.standard_webhooks)

    @field_validator("events", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            return value
        out: dict[str, Any] = {}
        for event, urls in value.items():
            if isinstance(urls, str):
                out[event] = [u for u in (p.strip() for p in urls.split(";")) if u]
            elif urls is None:
                out[event] = []
            else:
                out[event] = urls
        return out

    @field_validator("events")
    @classmethod
    def _dedup_urls(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        # Names and URLs are checked one by one (EventName, Url), so each error has its path.
        return {event: tuple(dict.fromkeys(urls)) for event, urls in value.items()}

    def subscriptions(self) -> list[tuple[str, str]]:
        """(event_type, url) pairs, in config order."""
        return [(event, url) for event, urls in self.events.items() for url in urls]


class ActivationRule(_Model):
    """When an UPDATE counts as an activation or a release: any listed change matches."""

    increases: tuple[str, ...] = ()
    decreases: tuple[str, ...] = ()
    becomes_set: tuple[str, ...] = ()
    becomes_empty: tuple[str, ...] = ()

    def columns(self) -> set[str]:
        return {*self.increases, *self.decreases, *self.becomes_set, *self.becomes_empty}


class TableConfig(_Model):
    table: str = Field(min_length=1, max_length=_IDENT_MAX)
    table_schema: str = Field(
        default="public",
        min_length=1,
        max_length=_IDENT_MAX,
        validation_alias=AliasChoices("schema", "table_schema"),
    )
    key: tuple[str, ...] = ()

    def qualified(self) -> str:
        """The quoted schema.table name."""
        return f"{quote_ident(self.table_schema)}.{quote_ident(self.table)}"


class LicenseTableConfig(TableConfig):
    table: str = "license_keys"
    key: tuple[str, ...] = ("activation_key",)
    activation: ActivationRule = ActivationRule(
        increases=("activation_count",),
        decreases=("available_licenses",),
        becomes_set=("computer_id",),
    )
    release: ActivationRule = ActivationRule(
        increases=("available_licenses",), becomes_empty=("computer_id",)
    )


class CustomerTableConfig(TableConfig):
    table: str = "customers"
    key: tuple[str, ...] = ("customer_id",)


class CaptureConfig(_Model):
    licenses: LicenseTableConfig = LicenseTableConfig()
    customers: CustomerTableConfig = CustomerTableConfig()


class DaemonConfig(_Model):
    batch_size: int = Field(default=500, ge=1, le=10000)
    poll_interval: float = Field(default=2.0, gt=0, le=3600)
    lease: float = Field(default=60.0, gt=0)
    heartbeat_interval: float = Field(default=1.0, gt=0)
    shutdown_timeout: float = Field(default=10.0, ge=0)
    reconnect_max_delay: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _lease_covers_work(self) -> DaemonConfig:
        return self


class RetentionConfig(_Model):
    delivered_days: float = Field(default=7.0, gt=0)
    log_days: float = Field(default=30.0, gt=0)
    prune_interval: float = Field(default=3600.0, ge=0)  # seconds; 0 disables scheduled prune
    batch_size: int = Field(default=5000, ge=1)


class ObserveConfig(_Model):
    listen: str | None = None  # "127.0.0.1:9187" serves /metrics, /healthz, /readyz
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The web console (bridge/console/) is served on `listen` while a token is set. A secret:
    # never logged, rendered or shown in repr().
    console_token: str | None = Field(default=None, repr=False)
    console_read_only: bool = False

    @field_validator("console_token")
    @classmethod
    def _check_console_token(cls, value: str | None) -> str | None:
        # The message never contains the value.
        if value is not None and len(value) < CONSOLE_TOKEN_MIN:
            raise ValueError(f"is too short ({len(value)} characters); use at least "
                             f"{CONSOLE_TOKEN_MIN} random characters, e.g. from "
                             "`openssl rand -hex 24`, passed as ${VAR}")
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return value
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} must be HOST:PORT, e.g. 127.0.0.1:9187")
        return value

    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return (host.strip("[]") or "127.0.0.1", int(port))


class Config(_Model):
    database: DatabaseConfig
    webhooks: WebhooksConfig = WebhooksConfig()
    capture: CaptureConfig = CaptureConfig()
    daemon: DaemonConfig = DaemonConfig()
    retention: RetentionConfig = RetentionConfig()
    observe: ObserveConfig = ObserveConfig()

    @model_validator(mode="after")
    def _lease_longer_than_timeout(self) -> Config:
        wh = self.webhooks
        timeouts = [("webhooks.timeout", wh.timeout)] + [
            (f"webhooks.endpoints.{url}.timeout", e.timeout)
            for url, e in wh.endpoints.items() if e.timeout is not None]
        key, longest = max(timeouts, key=lambda kv: kv[1])
        if self.daemon.lease <= longest:
            raise ValueError(
                f"daemon.lease ({self.daemon.lease:g} s) must be longer than {key} "
                f"({longest:g} s), or other daemons would redeliver in-flight requests"
            )
        return self

    def fingerprint(self) -> str:
        """A short hash of the effective config (secret included, never shown)."""
        dumped = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(dumped).hexdigest()[:12]

    def subscriptions_fingerprint(self) -> str:
        """A short hash of what every daemon on one bridge schema must agree on: what decides
        fan-out (webhooks.events and enabled; or an event would miss the URLs only another
        daemon knows), which URLs are delivered in order per key and by which key columns, and
        the endpoints' shared rate limits and breakers (or one daemon would send unordered or
        unlimited beside the others)."""
        wh = self.webhooks
        urls = sorted({u for _, u in wh.subscriptions()})

        def ordering(url: str) -> str:
            ep = wh.endpoints.get(url)
            return (ep.ordering if ep is not None and ep.ordering else wh.ordering)

        limits = {url: [ep.rate_limit, ep.circuit_breaker.model_dump()
                        if ep.circuit_breaker is not None else None]
                  for url, ep in sorted(wh.endpoints.items())
                  if ep.rate_limit is not None or ep.circuit_breaker is not None}
        dumped = json.dumps({"events": {k: list(v) for k, v in wh.events.items() if v},
                             "enabled": wh.enabled,
                             "per_key": [u for u in urls if ordering(u) == "per_key"],
                             "keys": [list(self.capture.licenses.key),
                                      list(self.capture.customers.key)],
                             "limits": limits}, sort_keys=True).encode()
        return hashlib.sha256(dumped).hexdigest()[:12]

    def capture_modified(self) -> bool:
        return bool(self.webhooks.events.get("license_modified"))


# --- loading -------------------------------------------------------------------------------


def expand_env(value: Any, env: Mapping[str, str], path: str, errors: list[str],
               failed_paths: set[str] | None = None) -> Any:
    """Expand ${VAR} / ${VAR:-default} in every string of a parsed YAML tree.

    Each unset variable without a default appends ``"path: message"`` to `errors` (and the path
    to `failed_paths`, so validation does not report the same key again).
    """
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            where = path or "<root>"
            errors.append(f"{where}: environment variable ${{{name}}} is not set "
                          "and has no default (write ${" + name + ":-default})")
            if failed_paths is not None:
                failed_paths.add(where)
            return ""

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k), errors, failed_paths)
                for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]", errors, failed_paths)
                for i, v in enumerate(value)]
    return value


def _keys_of(name: str, field: FieldInfo) -> list[str]:
    """The YAML keys a field accepts: its name and its aliases (QLM's setting names)."""
    keys = [name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        keys += [c for c in alias.choices if isinstance(c, str) and c not in keys]
    elif isinstance(alias, str) and alias not in keys:
        keys.append(alias)
    return keys


def _section_model(annotation: Any) -> type[_Model] | None:
    if isinstance(annotation, type) and issubclass(annotation, _Model):
        return annotation
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, _Model):
            return arg
    return None


def _prepare(model: type[_Model], data: Any, path: str, errors: list[str]) -> Any:
    """Before validation: an empty section (``webhooks:``) means defaults, and a key set both
    under its name and under its QLM alias is an error rather than a silent pick."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in model.model_fields.items():
        present = [k for k in _keys_of(name, field) if k in out]
        if len(present) > 1:
            errors.append(f"{path}{present[1]}: the same setting as {path}{present[0]}; "
                          "keep one of them")
            for key in present[1:]:
                del out[key]
        section = _section_model(field.annotation)
        if present and section is not None:
            key = present[0]
            if out[key] is None:
                out[key] = {}
            out[key] = _prepare(section, out[key], f"{path}{key}.", errors)
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[_Model] | None:
    """The config model a validation error's location points into (for spelling hints)."""
    model: type[_Model] | None = Config
    keyed = False  # the part before was a mapping of sections (webhooks.endpoints): a key
    for part in loc:
        if model is None or not isinstance(part, str):
            return None
        if keyed:
            keyed = False
            continue
        found = None
        for name, field in model.model_fields.items():
            if part in _keys_of(name, field):
                found = _section_model(field.annotation)
                keyed = get_origin(field.annotation) is dict and found is not None
                break
        model = found
    return model


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            out += ("." if out else "") + str(part)
    return out or "<root>"


_TYPE_NAMES = {"dict": "mapping", "list": "list", "str": "string", "int": "integer",
               "float": "number", "bool": "boolean", "NoneType": "nothing (null)"}


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    known: list[str] = []
    model = _model_at(loc[:-1])
    if model is not None:
        for name, field in model.model_fields.items():
            known += _keys_of(name, field)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6) if loc else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}see config.example.yaml"


def _message(err: Any, loc: tuple[int | str, ...]) -> str:
    kind, msg = str(err["type"]), str(err["msg"])
    got = _TYPE_NAMES.get(type(err.get("input")).__name__, type(err.get("input")).__name__)
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return "is required"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a mapping of keys (got {got})"
    if kind in ("tuple_type", "list_type") and loc[:2] == ("webhooks", "events"):
        return f"must be a URL, URLs separated by ';', or a list of URLs (got {got})"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list (got {got})"
    if kind == "string_type":
        return f"must be a string (got {got})"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg.replace("Input should be", "must be").replace("Input", "value")


def _format_validation(exc: ValidationError, skip: set[str] | None = None) -> list[str]:
    lines = []
    # The input is used for its type name only: values (the secret!) never reach a message.
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
        where = _loc(loc)
        if skip and where in skip:
            continue
        msg = _message(err, loc)
        # A check on a section that names its own key path (webhooks.endpoints.<url>...).
        own = msg.startswith(where + ".")
        lines.append(msg if not loc or own else f"{where}: {msg}")
    return lines


def parse(data: Any, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML document; every problem is reported in one ConfigError."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty; it needs at least database.dsn")
    if not isinstance(data, dict):
        got = _TYPE_NAMES.get(type(data).__name__, type(data).__name__)
        raise ConfigError(f"{source}: the top level must be a mapping of keys "
                          f"(database:, webhooks:, ...), not a {got}")
    errors: list[str] = []
    env_failed: set[str] = set()
    expanded = expand_env(data, os.environ if env is None else env, "", errors, env_failed)
    prepared = _prepare(Config, expanded, "", errors)
    try:
        config = Config.model_validate(prepared)
    except ValidationError as exc:
        errors.extend(_format_validation(exc, env_failed))
        config = None
    if errors or config is None:
        detail = "\n".join(f"  - {e}" for e in errors)
        count = f"{len(errors)} problem{'s' if len(errors) != 1 else ''}"
        raise ConfigError(f"{source}: invalid configuration ({count}):\n{detail}")
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if first != key_node.start_mark.line:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {first + 1})",
                key_node.start_mark)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


# --- sites ---------------------------------------------------------------------------------

DEFAULT_SITE = "default"
# What a site may set; top-level webhooks, capture and retention are every site's defaults.
SITE_KEYS = ("database", "webhooks", "capture", "retention")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Sites:
    """Every site of one config file, each as a complete Config (top-level defaults merged
    in); `explicit` when the file has a `sites:` section (else one site named "default")."""

    configs: dict[str, Config]
    explicit: bool = False

    def names(self) -> list[str]:
        return list(self.configs)

    def first(self) -> Config:
        """The config whose daemon and observe sections the process uses (shared by all)."""
        return next(iter(self.configs.values()))

    def pick(self, name: str | None) -> Config:
        """One site's config: `name` must be given when there are several."""
        known = ", ".join(self.configs)
        if name is None:
            if len(self.configs) == 1:
                return self.first()
            raise ConfigError(f"this config has {len(self.configs)} sites ({known}): "
                              "choose one with --site NAME")
        if name not in self.configs:
            close = difflib.get_close_matches(name, list(self.configs), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"--site: no site {name!r}; {hint}known sites: {known}")
        return self.configs[name]


def _merge_section(top: Any, site: Any) -> Any:
    """A site's section over the top-level one, key by key."""
    if isinstance(top, dict) and isinstance(site, dict):
        return {**top, **site}
    return site if site is not None else top


def _database_identity(dsn: str) -> tuple[str, str, str]:
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return (dsn, "", "")
    return (str(info.get("host") or "local"), str(info.get("port") or "5432"),
            str(info.get("dbname") or info.get("user") or ""))


def parse_sites(data: Any, source: str = "<config>",
                env: Mapping[str, str] | None = None) -> Sites:
    """Validate a document that may have `sites:`; every problem is reported at once."""
    if not isinstance(data, dict) or "sites" not in data:
        return Sites({DEFAULT_SITE: parse(data, source, env)})
    sites, top = data["sites"], {k: v for k, v in data.items() if k != "sites"}
    errors: list[str] = []
    if not isinstance(sites, dict) or not sites:
        raise ConfigError(f"{source}: sites: must be a mapping of site names to their "
                          "database, webhooks, capture and retention")
    if "database" in top:
        errors.append("database: with sites:, every site names its own database "
                      "(sites.<name>.database); move it under a site")
    configs: dict[str, Config] = {}
    for name, section in sites.items():
        where = f"sites.{name}"
        if not isinstance(name, str) or not _SITE_NAME.match(name):
            errors.append(f"{where}: a site name is letters, digits, '_', '-' or '.'")
            continue
        section = {} if section is None else section
        if not isinstance(section, dict):
            errors.append(f"{where}: must be a mapping (database:, webhooks:, ...)")
            continue
        for key in section:
            if key not in SITE_KEYS:
                close = difflib.get_close_matches(str(key), SITE_KEYS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                errors.append(f"{where}.{key}: a site may set only {', '.join(SITE_KEYS)}; "
                              f"{hint}daemon and observe are shared by every site")
        merged = dict(top)
        for key in SITE_KEYS:
            merged[key] = _merge_section(top.get(key), section.get(key))
        try:
            configs[name] = parse(merged, f"{source}: {where}", env)
        except ConfigError as exc:
            errors.append(str(exc).replace(f"{source}: {where}: ", f"{where}: ", 1))
    seen: dict[tuple[tuple[str, str, str], str], str] = {}
    for name, cfg in configs.items():
        key = (_database_identity(cfg.database.dsn), cfg.database.schema_name)
        if key in seen:
            errors.append(f"sites.{seen[key]} and sites.{name}: the same database and bridge "
                          f"schema ({describe_dsn(cfg.database.dsn)}, schema "
                          f"{cfg.database.schema_name!r}); give one of them its own "
                          "database.schema")
        seen.setdefault(key, name)
    if errors:
        detail = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"{source}: invalid configuration ({len(errors)} problem"
                          f"{'s' if len(errors) != 1 else ''}):\n{detail}")
    return Sites(configs, explicit=True)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None,
         site: str | None = None) -> Config:
    """Read, expand and validate one YAML config file; with several sites, `site` picks one."""
    return load_sites(path, env).pick(site)


def load_sites(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Sites:
    """Read, expand and validate one YAML config file, with every site it has."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        ctx_mark = getattr(exc, "context_mark", None)
        if context and ctx_mark is not None:
            problem += f" ({context} started on line {ctx_mark.line + 1})"
        raise ConfigError(f"{p}:{where} YAML syntax error: {problem}") from None
    return parse_sites(data, str(p), env)
