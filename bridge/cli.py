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


site_option = click.option(
    "--site", "site", metavar="NAME", envvar="QLM_BRIDGE_SITE",
    help="The site (license database) to work on, from the config's `sites:`; required when "
         "there are several.")


def load_sites(path: str | None) -> config_mod.Sites:
    if not path:
        raise config_mod.ConfigError("no configuration: pass --config FILE or set "
                                     "QLM_BRIDGE_CONFIG")
    return config_mod.load_sites(path)


def load_config(path: str | None, site: str | None = None) -> config_mod.Config:
    return load_sites(path).pick(site)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qlm-bridge")
def main() -> None:
    """QLM-compatible webhooks from a PostgreSQL license database."""


@main.command()
@config_option
@site_option
@click.option("--all-sites", is_flag=True, help="Install every site of the config.")
@click.option("--sample-schema", is_flag=True,
              help="Create the sample QLM-style tables (customers, license_keys) when missing.")
@click.option("--print-sql", is_flag=True, help="Print the SQL instead of applying it.")
@handle_errors
def install(config_path: str | None, site: str | None, all_sites: bool, sample_schema: bool,
            print_sql: bool) -> None:
    """Install (or upgrade in place) the capture triggers and the bridge schema."""
    from bridge import install as install_mod

    sites = load_sites(config_path)
    if all_sites and site is not None:
        raise click.UsageError("give --site NAME or --all-sites, not both")
    chosen = sites.configs if all_sites else {site or "": sites.pick(site)}
    for name, cfg in chosen.items():
        prefix = f"site {name}: " if all_sites and sites.explicit else ""
        if print_sql:
            plan = install_mod.plan(cfg, sample_schema)
            click.echo(f"-- {prefix}\n" if prefix else "", nl=False)
            click.echo("BEGIN;\n" + plan.sql + "\nCOMMIT;")
            continue
        plan = install_mod.install(cfg, sample_schema)
        schema = cfg.database.schema_name
        if plan.from_version is None:
            click.echo(f"{prefix}installed bridge schema {schema!r} version {plan.to_version}")
        elif plan.from_version < plan.to_version:
            click.echo(f"{prefix}upgraded bridge schema {schema!r} from version "
                       f"{plan.from_version} to {plan.to_version}")
        else:
            click.echo(f"{prefix}bridge schema {schema!r} is at version {plan.to_version}; "
                       "capture triggers refreshed")


@main.command()
@config_option
@click.option("--drop-data", is_flag=True,
              help="Also drop the bridge schema with its events, deliveries and log.")
@click.option("--print-sql", is_flag=True, help="Print the SQL instead of applying it.")
@site_option
@handle_errors
def uninstall(config_path: str | None, drop_data: bool, print_sql: bool,
              site: str | None) -> None:
    """Remove the capture triggers and functions (the data tables stay unless --drop-data)."""
    from bridge import install as install_mod

    cfg = load_config(config_path, site)
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

    daemon.main(load_sites(config_path), config_path)


# --- operator commands (status, replay, prune, send-test); the logic is in bridge/ops.py ------


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from bridge import ops

    try:
        return None if value is None else ops.parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from bridge import ops

    try:
        return None if value is None else ops.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _live_counter(label: str) -> Callable[[str], None]:
    """A counter line rewritten in place on a terminal (stderr); silent otherwise."""
    live = sys.stderr.isatty()

    def show(text: str) -> None:
        if live:
            click.echo(f"\r{label}: {text}\x1b[K", err=True, nl=False)

    return show


def _end_counter() -> None:
    if sys.stderr.isatty():
        click.echo("\r\x1b[K", err=True, nl=False)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@site_option
@handle_errors
def status(config_path: str | None, as_json: bool, site: str | None) -> None:
    """Queue counts per URL and event type, the oldest pending age and the daemons seen.

    PENDING counts every delivery still to do; IN-FLIGHT (claimed by a daemon, lease running)
    and RETRYING (waiting for another attempt after a failed one) are parts of it.
    """
    import json as json_mod

    from bridge import ops

    sites = load_sites(config_path)
    names = [site] if site is not None else sites.names()
    reports = {name: ops.status(sites.pick(name).database.dsn, sites.pick(name))
               for name in names}
    if not sites.explicit:
        report = reports[names[0]]
        click.echo(json_mod.dumps(report.to_json(), indent=2) if as_json
                   else ops.format_status(report))
    elif as_json:
        click.echo(json_mod.dumps({"sites": {n: r.to_json() for n, r in reports.items()}},
                                  indent=2))
    else:
        click.echo("\n\n".join(f"== site {n} ==\n{ops.format_status(r)}"
                                for n, r in reports.items()))


@main.command()
@config_option
@click.option("--event-id", "event_ids", type=click.UUID, multiple=True, metavar="UUID",
              help="Replay this event (repeatable); also creates deliveries for URLs "
                   "configured now that the event never had.")
@click.option("--url", "urls", multiple=True, metavar="URL",
              help="Only deliveries to this URL (repeatable).")
@click.option("--event-type", "event_types", multiple=True, metavar="TYPE",
              help="Only events of this type (repeatable).")
@click.option("--failed-since", "since", callback=_since, metavar="TIME",
              help="Only deliveries that failed (were last updated) since TIME: ISO-8601 "
                   "(2026-01-31T12:00:00Z) or a duration ago (30m, 2h, 7d).")
@click.option("--all-states", is_flag=True,
              help="Also replay deliveries that succeeded (default: failed and skipped only).")
@click.option("--all", "everything", is_flag=True,
              help="Replay every failed and skipped delivery (needed when no filter is given).")
@site_option
@handle_errors
def replay(config_path: str | None, event_ids: tuple[Any, ...], urls: tuple[str, ...],
           event_types: tuple[str, ...], since: Any, all_states: bool, everything: bool,
           site: str | None) -> None:
    """Re-queue failed and skipped deliveries (due now, attempts reset) for the daemon."""
    from bridge import ops

    selection = ops.ReplayFilter(tuple(event_ids), urls, event_types, since, all_states)
    if selection.is_empty() and not everything:
        raise click.UsageError("say what to replay: --event-id, --url, --event-type, "
                               "--failed-since, or --all for every failed/skipped delivery")
    cfg = load_config(config_path, site)
    show = _live_counter("queued")
    seen = 0

    def progress(n: int) -> None:
        nonlocal seen
        seen += n
        show(str(seen))

    result = ops.replay(cfg.database.dsn, cfg, selection, progress=progress)
    _end_counter()
    for missing in result.unknown_event_ids:
        click.echo(f"warning: no event with id {missing}", err=True)
    if result.queued and not cfg.webhooks.enabled:
        click.echo("note: webhooks.enabled is false in this config; a daemon running with it "
                   "sends nothing", err=True)
    extra = (f" ({result.created} new for URLs configured now)" if result.created else "")
    click.echo(f"queued {result.queued} deliver{'y' if result.queued == 1 else 'ies'}{extra}")


@main.command()
@config_option
@click.option("--older-than", callback=_duration, metavar="DURATION",
              help="Delete settled events older than this (e.g. 7d; default "
                   "retention.delivered_days).")
@click.option("--logs-older-than", callback=_duration, metavar="DURATION",
              help="Delete attempt_log rows older than this (default retention.log_days).")
@site_option
@handle_errors
def prune(config_path: str | None, older_than: float | None,
          logs_older_than: float | None, site: str | None) -> None:
    """Delete delivered/skipped events and old log rows, in small batches (writers never wait).

    Events with a pending or failed delivery are kept, whatever their age.
    """
    from bridge import ops

    cfg = load_config(config_path, site)
    show = _live_counter("pruned")

    def progress(p: ops.PruneProgress) -> None:
        show(f"{p.events} events, {p.logs} log rows")

    events, logs = ops.prune_once(cfg.database.dsn, cfg, older_than=older_than,
                                  logs_older_than=logs_older_than, progress=progress)
    _end_counter()
    click.echo(f"pruned {events} event{'s' if events != 1 else ''} and {logs} log "
               f"row{'s' if logs != 1 else ''}")


@main.command("send-test")
@config_option
@click.argument("url", required=False)
@click.option("--event", "event_type", metavar="TYPE",
              help="Event type of the sample (default license_activated); without URL, send to "
                   "every URL configured for it.")
@site_option
@handle_errors
def send_test(config_path: str | None, url: str | None, event_type: str | None,
              site: str | None) -> None:
    """POST a signed sample event to URL and print status, latency and response.

    Checks a receiver before going live: exit 0 when every answer is 2xx, else 1. Signed and
    sent exactly as the daemon does (webhooks.secret_key, standard_webhooks, the endpoint's
    settings, timeout, ca_bundle, block_private_addresses; redirects not followed), with the
    header X-QLM-Test: 1.
    """
    from bridge import ops

    if url is None and event_type is None:
        raise click.UsageError("give a URL, or --event TYPE to test the URLs configured for it")
    cfg = load_config(config_path, site)
    kind = event_type or "license_activated"
    urls: tuple[str, ...] = (url,) if url else ops.targets_for(cfg, kind)
    if not urls:
        raise config_mod.ConfigError(f"no URL is configured for {kind!r} (webhooks.events)")
    unsigned = [u for u in urls if not ops.signed(cfg, u)]
    if unsigned:
        click.echo(f"note: no secret_key for {', '.join(unsigned)}; unsigned", err=True)
    results = ops.send_test(urls, kind, cfg)
    for result in results:
        click.echo(ops.format_send_result(result))
    if not all(r.ok for r in results):
        sys.exit(1)


@main.command("gen-secret")
def gen_secret() -> None:
    """Print a new random secret for webhooks.secret_key (whsec_ + base64 of 32 bytes).

    Works for X-QLM-Signature and for Standard Webhooks receivers alike. To rotate, list it
    second under webhooks.secret_key, update the receivers, then move it first (README).
    """
    from bridge.signing import new_secret

    click.echo(new_secret())


@main.command()
@click.option("--dsn", metavar="DSN", envvar="QLM_BRIDGE_DEMO_DSN",
              help="Run against this existing database instead of an embedded PostgreSQL (the "
                   "demo works in schemas qlm_bridge_demo and qlm_bridge_demo_data there and "
                   "drops them afterwards).")
@click.option("--keep", is_flag=True,
              help="Leave the database, receiver and daemon running until Ctrl-C.")
@click.option("--bodies", "show_bodies", is_flag=True, help="Also print each request body.")
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              metavar="SECONDS", help="Give up (exit 1) if the demo has not finished by then.")
@handle_errors
def demo(dsn: str | None, keep: bool, show_bodies: bool, timeout: float) -> None:
    """Run the whole bridge locally: database, receiver, daemon, seven events.

    Needs no database server: an embedded PostgreSQL is started and removed afterwards. Exit 0
    when every event was delivered with a valid X-QLM-Signature, else 1.
    """
    from bridge import demo as demo_mod

    demo_mod.run(demo_mod.Options(dsn, keep, timeout, show_bodies), click.echo)
