"""YAML -> validated, typed configuration.

Every problem is collected and reported at once, each naming the file and the key path
(``webhooks.max_retries: must be >= 0``). ``${VAR}`` and ``${VAR:-default}`` are expanded in every
string value before validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigError
from bridge.events import ALL_EVENTS

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_IDENT_MAX = 63


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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


class DatabaseConfig(_Model):
    dsn: str = Field(min_length=1)
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


class WebhooksConfig(_Model):
    enabled: bool = Field(default=True, validation_alias=AliasChoices("enabled", "webHooksEnabled"))
    secret_key: str | None = Field(
        default=None, validation_alias=AliasChoices("secret_key", "webHookSecretKey")
    )
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
    max_concurrency: int = Field(default=64, ge=1, le=10000)
    per_url_concurrency: int = Field(default=8, ge=1, le=1000)
    max_response_body: int = Field(default=4096, ge=0, le=1_048_576)
    ca_bundle: str | None = None
    block_private_addresses: bool = False
    events: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    field_names: dict[Literal["license", "customer"], dict[str, str]] = Field(
        default_factory=dict
    )

    @field_validator("secret_key")
    @classmethod
    def _secret_not_empty(cls, value: str | None) -> str | None:
        if value is not None and value == "":
            raise ValueError("is empty; remove the key to send unsigned requests, or set a secret")
        return value

    @field_validator("events", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
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
    def _check_events(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        errors = []
        checked: dict[str, tuple[str, ...]] = {}
        for event, urls in value.items():
            if event not in ALL_EVENTS:
                errors.append(
                    f"unknown event {event!r} (known: {', '.join(ALL_EVENTS)})"
                )
                continue
            good = []
            for url in urls:
                try:
                    good.append(_check_url(url))
                except ValueError as exc:
                    errors.append(f"{event}: {exc}")
            checked[event] = tuple(dict.fromkeys(good))
        if errors:
            raise ValueError("; ".join(errors))
        return checked

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
    batch_size: int = Field(default=200, ge=1, le=10000)
    poll_interval: float = Field(default=2.0, gt=0, le=3600)
    lease: float = Field(default=60.0, gt=0)
    heartbeat_interval: float = Field(default=5.0, gt=0)
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

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} must be HOST:PORT, e.g. 127.0.0.1:9187")
        return value

    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return (host.strip("[]") or "0.0.0.0", int(port))


class Config(_Model):
    database: DatabaseConfig
    webhooks: WebhooksConfig = WebhooksConfig()
    capture: CaptureConfig = CaptureConfig()
    daemon: DaemonConfig = DaemonConfig()
    retention: RetentionConfig = RetentionConfig()
    observe: ObserveConfig = ObserveConfig()

    @model_validator(mode="after")
    def _lease_longer_than_timeout(self) -> Config:
        if self.daemon.lease <= self.webhooks.timeout:
            raise ValueError(
                f"daemon.lease ({self.daemon.lease:g} s) must be longer than webhooks.timeout "
                f"({self.webhooks.timeout:g} s), or other daemons would redeliver in-flight requests"
            )
        return self

    def fingerprint(self) -> str:
        """A short hash of the effective config (secret included, never shown)."""
        dumped = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(dumped).hexdigest()[:12]

    def capture_modified(self) -> bool:
        return bool(self.webhooks.events.get("license_modified"))


# --- loading -------------------------------------------------------------------------------


def expand_env(value: Any, env: Mapping[str, str], path: str, errors: list[str]) -> Any:
    """Expand ${VAR} / ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append(f"{path or '<root>'}: environment variable ${{{name}}} is not set "
                          "and has no default (write ${" + name + ":-default})")
            return ""

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k), errors)
                for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _format_validation(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see config.example.yaml)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{_loc(loc)}: {msg}")
    return lines


def parse(data: Any, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML document."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty; it needs at least database.dsn")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, not "
                          f"{type(data).__name__}")
    errors: list[str] = []
    expanded = expand_env(data, os.environ if env is None else env, "", errors)
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        errors.extend(_format_validation(exc))
        config = None
    if errors or config is None:
        detail = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"{source}: invalid configuration:\n{detail}")
    return config


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate one YAML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{p}:{where}: YAML syntax error: {problem}") from None
    return parse(data, str(p), env)
