"""The one base config for tests, the campaign and the benchmark: short intervals so tests run
fast; any section can be overridden (merged one level deep)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from bridge import config as config_mod

SECRET = "test-secret"

BASE: dict[str, dict[str, Any]] = {
    "webhooks": {"secret_key": SECRET, "retry_interval": 0.2, "timeout": 2, "max_retries": 2},
    "daemon": {"poll_interval": 0.5, "lease": 5, "heartbeat_interval": 0.5,
               "shutdown_timeout": 2, "reconnect_max_delay": 0.5},
}


def config_data(dsn: str, **sections: Any) -> dict[str, Any]:
    """The base config as plain data for `dsn`; a dict section is merged into the base one,
    anything else replaces it."""
    data: dict[str, Any] = {"database": {"dsn": dsn}, **{k: dict(v) for k, v in BASE.items()}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def base_config(dsn: str, **sections: Any) -> config_mod.Config:
    """The base config, parsed (no environment overrides)."""
    return config_mod.parse(config_data(dsn, **sections), "<test config>", env={})


def write_config(path: Path, data: dict[str, Any] | str) -> Path:
    """Write a config atomically (a reload never reads half a file)."""
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
