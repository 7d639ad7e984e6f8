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
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
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

from bridge.errors import ConfigError as ConfigError
from bridge.events import ALL_EVENTS
from bridge.sql import quote_ident

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_IDENT_MAX = 63


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
    prefetch: int = Field(default=32, ge=0, le=10000)
    max_response_body: int = Field(default=4096, ge=0, le=1_048_576)
    ca_bundle: str | None = None
    block_private_addresses: bool = False
    standard_webhooks: bool = False
    events: dict[EventName, tuple[Url, ...]] = Field(default_factory=dict)
    field_names: dict[Annotated[str, AfterValidator(_check_kind)], dict[str, str]] = Field(
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
        _host, sep, port = value.rpartition(":")
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
                f"({self.webhooks.timeout:g} s), or other daemons would redeliver in-flight "
                "requests"
            )
        return self

    def fingerprint(self) -> str:
        """A short hash of the effective config (secret included, never shown)."""
        dumped = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(dumped).hexdigest()[:12]

    def subscriptions_fingerprint(self) -> str:
        """A short hash of what decides fan-out (webhooks.events and enabled): every daemon on
        one bridge schema must agree on it, or an event would miss the URLs only another
        daemon knows."""
        wh = self.webhooks
        dumped = json.dumps({"events": {k: list(v) for k, v in wh.events.items() if v},
                             "enabled": wh.enabled}, sort_keys=True).encode()
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
    for part in loc:
        if model is None or not isinstance(part, str):
            return None
        found = None
        for name, field in model.model_fields.items():
            if part in _keys_of(name, field):
                found = _section_model(field.annotation)
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
        lines.append(msg if not loc else f"{where}: {msg}")
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


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate one YAML config file."""
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
    return parse(data, str(p), env)
