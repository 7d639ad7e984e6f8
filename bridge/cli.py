"""The operator's CLI: argument parsing only; each command calls one function elsewhere.

Exit codes: 0 success, 1 runtime failure, 2 configuration or usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from bridge import __version__
from bridge import config as config_mod
from bridge.errors import BridgeError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> None:
    click.echo(f"qlm-bridge: error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Expected failures become one clear message and an exit code, never a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BridgeError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config", "-c", "config_path", envvar="QLM_BRIDGE_CONFIG", metavar="FILE",
    type=click.Path(dir_okay=False), help="YAML config file (default: $QLM_BRIDGE_CONFIG).",
)


def load_config(path: str | None) -> config_mod.Config:
    if not path:
        raise config_mod.ConfigError("no configuration: pass --config FILE or set "
                                     "QLM_BRIDGE_CONFIG")
    return config_mod.load(path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qlm-bridge")
def main() -> None:
    """QLM-compatible webhooks from a PostgreSQL license database."""


@main.command()
@config_option
@click.option("--sample-schema", is_flag=True,
              help="Create the sample QLM-style tables (customers, license_keys) when missing.")
@click.option("--print-sql", is_flag=True, help="Print the SQL instead of applying it.")
@handle_errors
def install(config_path: str | None, sample_schema: bool, print_sql: bool) -> None:
    """Install (or upgrade in place) the capture triggers and the bridge schema."""
    from bridge import install as install_mod

    cfg = load_config(config_path)
    if print_sql:
        plan = install_mod.plan(cfg, sample_schema)
        click.echo("BEGIN;\n" + plan.sql + "\nCOMMIT;")
        return
    plan = install_mod.install(cfg, sample_schema)
    schema = cfg.database.schema_name
    if plan.from_version is None:
        click.echo(f"installed bridge schema {schema!r} version {plan.to_version}")
    elif plan.from_version < plan.to_version:
        click.echo(f"upgraded bridge schema {schema!r} from version {plan.from_version} "
                   f"to {plan.to_version}")
    else:
        click.echo(f"bridge schema {schema!r} is at version {plan.to_version}; "
                   "capture triggers refreshed")


@main.command()
@config_option
@click.option("--drop-data", is_flag=True,
              help="Also drop the bridge schema with its events, deliveries and log.")
@click.option("--print-sql", is_flag=True, help="Print the SQL instead of applying it.")
@handle_errors
def uninstall(config_path: str | None, drop_data: bool, print_sql: bool) -> None:
    """Remove the capture triggers and functions (the data tables stay unless --drop-data)."""
    from bridge import install as install_mod

    cfg = load_config(config_path)
    if print_sql:
        click.echo("BEGIN;\n" + install_mod.render_uninstall(cfg, drop_data) + "\nCOMMIT;")
        return
    install_mod.uninstall(cfg, drop_data)
    kept = "" if drop_data else f" (schema {cfg.database.schema_name!r} and its data kept)"
    click.echo(f"uninstalled the capture triggers{kept}")


@main.command()
@config_option
@handle_errors
def run(config_path: str | None) -> None:
    """Run the delivery daemon until SIGTERM/SIGINT (SIGHUP reloads the config)."""
    from bridge import daemon

    cfg = load_config(config_path)
    daemon.main(cfg, config_path)
