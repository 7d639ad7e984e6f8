"""Config validation: every bad configuration gets a clear message naming the file and the key
path, all problems at once, exit code 2 from the CLI and never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_origin

import pytest

from bridge import config
from bridge.errors import ConfigError
from bridge.events import ALL_EVENTS

CLI = str(Path(sys.executable).parent / "qlm-bridge")
GOOD_DSN = "postgresql://bridge@db.example/qlm"


def write(tmp_path: Path, text: str, name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path, env=env or {})
    message = str(info.value)
    assert str(path) in message, message
    assert info.value.exit_code == 2
    return message


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("QLM_", "PG"))}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


# --- each bad config, via config.load -------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    msg = problems(tmp_path, """\
        database:
          dsn: x
         webhooks: [
        """)
    assert "YAML syntax error" in msg
    assert "line 3" in msg


def test_duplicate_key_is_reported_with_both_lines(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          max_retries: 3
          max_retries: 4
        """)
    assert "line 4" in msg and "'max_retries' appears twice" in msg and "line 3" in msg


def test_unknown_key_suggests_the_spelling(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          max_retires: 3
        webhook: {{}}
        """)
    assert "webhooks.max_retires: unknown key; did you mean 'max_retries'?" in msg
    assert "webhook: unknown key; did you mean 'webhooks'?" in msg


def test_unknown_event_name(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          events:
            license_activatd: https://a.example/hook
            license_exploded: https://a.example/hook
        """)
    assert "webhooks.events.license_activatd: unknown event 'license_activatd'; " \
           "did you mean 'license_activated'?" in msg
    assert "webhooks.events.license_exploded: unknown event" in msg
    assert "(2 problems)" in msg


@pytest.mark.parametrize(("url", "complaint"), [
    ("ftp//nope", "must start with http:// or https://"),
    ("ftp://files.example/x", "must start with http:// or https://"),
    ("https://", "has no host"),
    ("http://a b.example/hook", "contains white space"),
    ("https://host.example:99999/x", "has an invalid port"),
])
def test_malformed_url(tmp_path: Path, url: str, complaint: str) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          events:
            license_created: ["https://ok.example/hook", "{url}"]
        """)
    assert f"webhooks.events.license_created[1]: URL {url!r} {complaint}" in msg


def test_url_with_credentials_is_rejected_without_echoing_them(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          events:
            customer_created: "https://user:hunter2@crm.example/qlm"
        """)
    assert "webhooks.events.customer_created[0]" in msg
    assert "embeds credentials" in msg
    assert "hunter2" not in msg and "user:" not in msg


def test_every_url_problem_is_reported_at_once(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          events:
            license_activated: "ftp//nope;https://ok.example/;http://a b/"
            customer_deleted: ["https://x:y@h.example/"]
        """)
    assert "license_activated[0]" in msg and "license_activated[2]" in msg
    assert "customer_deleted[0]" in msg
    assert "(3 problems)" in msg


@pytest.mark.parametrize(("key", "value", "complaint"), [
    ("max_retries", "-1", "greater than or equal to 0"),
    ("max_retries", "abc", "valid integer"),
    ("max_retries", "2.5", "valid integer"),
    ("max_retries", "true", "must be a number, not true"),
    ("retry_interval", "-5", "greater than or equal to 0"),
    ("retry_interval", "soon", "valid number"),
    ("retry_interval", ".nan", "finite number"),
    ("timeout", "0", "greater than 0"),
    ("webHookMaxRetries", "-3", "greater than or equal to 0"),
])
def test_bad_numbers(tmp_path: Path, key: str, value: str, complaint: str) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          {key}: {value}
        """)
    assert f"webhooks.{key}: " in msg and complaint in msg, msg


def test_bad_intervals_in_other_sections(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}", connect_timeout: -1}}
        daemon: {{poll_interval: often, batch_size: 0}}
        retention: {{delivered_days: -7, batch_size: many}}
        observe: {{listen: "nowhere"}}
        """)
    for path in ("database.connect_timeout", "daemon.poll_interval", "daemon.batch_size",
                 "retention.delivered_days", "retention.batch_size", "observe.listen"):
        assert f"  - {path}: " in msg, (path, msg)
    assert "(6 problems)" in msg


def test_unset_variable_without_default(tmp_path: Path) -> None:
    msg = problems(tmp_path, """\
        database: {dsn: "${QLMB_TEST_DSN}"}
        webhooks: {secret_key: "${QLMB_TEST_SECRET}"}
        """)
    assert "database.dsn: environment variable ${QLMB_TEST_DSN} is not set and has no " \
           "default" in msg
    assert "webhooks.secret_key: environment variable ${QLMB_TEST_SECRET}" in msg
    assert "(2 problems)" in msg  # not also "dsn is empty"


def test_variables_and_defaults_expand(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        database:
          dsn: "postgresql://${DB_USER:-bridge}@${DB_HOST}/qlm"
        webhooks:
          secret_key: "${SECRET}"
          max_retries: ${RETRIES:-7}
          events:
            license_created: "${HOOK:-https://default.example/hook}"
        """)
    cfg = config.load(path, env={"DB_HOST": "db.internal", "SECRET": "s3cr3t"})
    assert cfg.database.dsn == "postgresql://bridge@db.internal/qlm"
    assert cfg.webhooks.secret_key == ("s3cr3t",)
    assert cfg.webhooks.max_retries == 7
    assert cfg.webhooks.events["license_created"] == ("https://default.example/hook",)
    cfg = config.load(path, env={"DB_HOST": "h", "SECRET": "s", "DB_USER": "u", "RETRIES": "0"})
    assert cfg.database.dsn == "postgresql://u@h/qlm" and cfg.webhooks.max_retries == 0


def test_qlm_alias_names(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          webHooksEnabled: false
          webHookSecretKey: qlm-secret
          webHookMaxRetries: 3
          webHookRetryInterval: 30
        """)
    hooks = config.load(path, env={}).webhooks
    assert (hooks.enabled, hooks.secret_key, hooks.max_retries, hooks.retry_interval) == (
        False, ("qlm-secret",), 3, 30.0)


def test_name_and_alias_together_is_an_error(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks: {{max_retries: 3, webHookMaxRetries: 4}}
        """)
    assert "webhooks.webHookMaxRetries: the same setting as webhooks.max_retries" in msg


def test_semicolon_and_list_url_forms(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          events:
            license_activated: "https://a.example/hook; https://b.example/hook;"
            customer_created: ["https://crm.example/qlm", "https://crm.example/qlm"]
            license_deleted:
        """)
    events = config.load(path, env={}).webhooks.events
    assert events["license_activated"] == ("https://a.example/hook", "https://b.example/hook")
    assert events["customer_created"] == ("https://crm.example/qlm",)  # de-duplicated
    assert events["license_deleted"] == ()


def test_wrong_url_value_type(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          events:
            license_created: 42
        """)
    assert "webhooks.events.license_created: must be a URL, URLs separated by ';', or a list " \
           "of URLs (got integer)" in msg


def test_empty_secret_is_rejected(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks: {{secret_key: ""}}
        """)
    assert "webhooks.secret_key: is empty" in msg


def test_empty_secret_from_environment_is_rejected_and_never_shown(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks: {{secret_key: "${{SECRET}}", max_retries: "${{SECRET}}"}}
        """)
    with pytest.raises(ConfigError) as info:
        config.load(path, env={"SECRET": "do-not-print-me"})
    assert "webhooks.max_retries" in str(info.value)
    assert "do-not-print-me" not in str(info.value)
    with pytest.raises(ConfigError, match=r"webhooks\.secret_key: is empty"):
        config.load(path, env={"SECRET": ""})


def test_secret_key_list_for_rotation(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          standard_webhooks: true
          secret_key:
            - whsec_bmV3LW5ldy1uZXctbmV3LW5ldy1uZXctbmV3LW5ldw
            - "${{OLD_SECRET}}"
        """)
    hooks = config.load(path, env={"OLD_SECRET": "whsec_b2xkLW9sZC1vbGQtb2xkLW9sZA=="}).webhooks
    assert hooks.secret_key == ("whsec_bmV3LW5ldy1uZXctbmV3LW5ldy1uZXctbmV3LW5ldw",
                                "whsec_b2xkLW9sZC1vbGQtb2xkLW9sZA==")
    assert len(hooks.signer.headers("m", b"{}")["webhook-signature"].split(" ")) == 2


@pytest.mark.parametrize(("secret_key", "expected"), [
    ('"sécret-ключ"', "webhooks.secret_key: cannot be a Standard Webhooks secret: it has "
                      "non-ASCII characters"),
    ("whsec_abcde", "webhooks.secret_key: cannot be a Standard Webhooks secret: it is not base64"),
    ("whsec_", "decodes to an empty Standard Webhooks key"),
    ('"whsec_bmV3LW5ldw== whsec_b2xkLW9sZA=="', "webhooks.secret_key: contains white space; to "
                                                "sign with several secrets while rotating, give "
                                                "a YAML list"),
    ("[whsec_bmV3LW5ldw==, whsec_abcde]", "webhooks.secret_key: secret 2 (of 2) cannot be a "
                                          "Standard Webhooks secret: it is not base64"),
    ("[whsec_bmV3LW5ldw==, whsec_bmV3LW5ldw==]", "secret 2 (of 2) is the same as secret 1"),
    ("null", "webhooks.secret_key: is required with webhooks.standard_webhooks: true"),
    ("[]", "webhooks.secret_key: is an empty list"),
    ("[whsec_bmV3LW5ldw==, 5]", "webhooks.secret_key[1]: must be a string (got integer)"),
    ("{a: b}", "webhooks.secret_key: must be a string, or a list of strings"),
])
def test_secrets_standard_webhooks_cannot_use(tmp_path: Path, secret_key: str,
                                              expected: str) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          standard_webhooks: true
          secret_key: {secret_key}
        """)
    assert expected in msg
    if "required" in expected or "cannot be" in expected:
        assert "qlm-bridge gen-secret" in msg
    for value in ("sécret", "abcde", "bmV3LW5ldw"):
        assert value not in msg


def test_standard_webhooks_without_secret_key(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks: {{standard_webhooks: true}}
        """)
    assert "webhooks.secret_key: is required with webhooks.standard_webhooks: true" in msg
    assert "`qlm-bridge gen-secret`" in msg


def test_endpoint_secrets(tmp_path: Path) -> None:
    a, b = "https://a.example/hook", "https://b.example/hook"
    good = "whsec_bmV3LW5ldw=="
    base = f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
          standard_webhooks: true
          events: {{license_created: ["{a}", "{b}"]}}
        """.rstrip(" ")
    # every URL has its own secret: no global one needed
    path = write(tmp_path, base + f"""\
          endpoints:
            "{a}": {{secret_key: [{good}, whsec_b2xkLW9sZA]}}
            "{b}": {{secret_key: {good}}}
        """)
    assert config.load(path, env={}).webhooks.endpoints[a].secret_key == (
        good, "whsec_b2xkLW9sZA")
    msg = problems(tmp_path, base + f"""\
          endpoints:
            "{a}": {{secret_key: [{good}, "sécret"]}}
        """)
    assert (f"webhooks.endpoints.{a}.secret_key: secret 2 (of 2) cannot be a Standard "
            "Webhooks secret: it has non-ASCII characters") in msg
    assert "webhooks.secret_key: is required with webhooks.standard_webhooks: true" in msg  # b
    assert "sécret" not in msg and "bmV3" not in msg
    msg = problems(tmp_path, base.replace("standard_webhooks: true", "secret_key: s") + f"""\
          endpoints:
            "{a}": {{secret_key: ["", s]}}
        """)
    assert (f"webhooks.endpoints.{a}.secret_key: secret 1 (of 2) is empty; remove the key to "
            "use webhooks.secret_key") in msg


def test_any_secret_serves_x_qlm_signature_alone(tmp_path: Path) -> None:
    """Without standard_webhooks, X-QLM-Signature takes any non-empty string, as QLM does."""
    for value in ('"sécret-ключ"', "whsec_abcde", '"two words"'):
        path = write(tmp_path, f"""\
            database: {{dsn: "{GOOD_DSN}"}}
            webhooks: {{secret_key: {value}}}
            """)
        assert len(config.load(path, env={}).webhooks.secret_key) == 1


def test_wrong_types_for_every_section(tmp_path: Path) -> None:
    msg = problems(tmp_path, """\
        database: 3
        webhooks: "yes"
        capture: []
        daemon: fast
        retention: 1
        observe: [1]
        """)
    for section, got in (("database", "integer"), ("webhooks", "string"), ("capture", "list"),
                         ("daemon", "string"), ("retention", "integer"), ("observe", "list")):
        assert f"  - {section}: must be a mapping of keys (got {got})" in msg
    assert "(6 problems)" in msg


def test_wrong_types_inside_sections(tmp_path: Path) -> None:
    msg = problems(tmp_path, """\
        database: {dsn: [a, b], schema: {x: 1}}
        webhooks: {events: [license_created], enabled: maybe, retry_policy: random}
        capture: {licenses: {table: 5, key: oops}}
        """)
    for path in ("database.dsn", "database.schema", "webhooks.events", "webhooks.enabled",
                 "webhooks.retry_policy", "capture.licenses.table"):
        assert f"  - {path}: " in msg, (path, msg)


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks:
        daemon:
        """)
    cfg = config.load(path, env={})
    assert cfg.webhooks.max_retries == 5 and cfg.daemon.batch_size == 500


def test_missing_database_and_dsn(tmp_path: Path) -> None:
    assert "  - database: is required" in problems(tmp_path, "webhooks: {}\n")
    assert "  - database.dsn: is required" in problems(tmp_path, "database: {}\n")
    assert "  - database.dsn: is required" in problems(tmp_path, "database:\n")


def test_malformed_dsn(tmp_path: Path) -> None:
    msg = problems(tmp_path, "database: {dsn: not a dsn}\n")
    assert "database.dsn: is not a valid PostgreSQL connection string" in msg
    msg = problems(tmp_path, "database: {dsn: 'postgresql://u@h:http/db'}\n")
    assert "database.dsn: has an invalid port 'http'" in msg


def test_listen_dsn_and_prepared_statements(tmp_path: Path) -> None:
    """listen_dsn is checked, expanded and kept secret like dsn; both keys default sensibly."""
    cfg = config.load(write(tmp_path, f'database: {{dsn: "{GOOD_DSN}"}}\n'), env={})
    assert cfg.database.listen_dsn is None and cfg.database.listen_target == GOOD_DSN
    assert cfg.database.prepared_statements is True
    path = write(tmp_path, """\
        database:
          dsn: "postgresql://bridge@pgbouncer:6432/qlm"
          listen_dsn: "postgresql://bridge:${DB_PASSWORD}@${DB_HOST:-db}:5432/qlm"
          prepared_statements: false
        """)
    cfg = config.load(path, env={"DB_PASSWORD": "pw-s3cret"})
    assert cfg.database.listen_target == "postgresql://bridge:pw-s3cret@db:5432/qlm"
    assert cfg.database.prepared_statements is False
    assert "s3cret" not in config.describe_dsn(cfg.database.listen_target)

    msg = problems(tmp_path, f"""\
        database:
          dsn: "{GOOD_DSN}"
          listen_dsn: "postgresql://bridge:pw-s3cret@db:http/qlm"
          prepared_statments: false
        """)
    assert "database.listen_dsn: has an invalid port 'http'" in msg
    assert "database.prepared_statments: unknown key; did you mean 'prepared_statements'?" in msg
    assert "s3cret" not in msg
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}", listen_dsn: "${{LISTEN}}", prepared_statements: maybe}}
        """)
    assert "database.listen_dsn: environment variable ${LISTEN} is not set" in msg
    assert "database.prepared_statements: " in msg and "(2 problems)" in msg
    assert "database.listen_dsn: is not a valid PostgreSQL connection string" in problems(
        tmp_path, f'database: {{dsn: "{GOOD_DSN}", listen_dsn: "not a dsn"}}\n')


def test_empty_file_and_top_level_list(tmp_path: Path) -> None:
    assert "the file is empty" in problems(tmp_path, "")
    assert "the file is empty" in problems(tmp_path, "# only a comment\n")
    assert "top level must be a mapping" in problems(tmp_path, "- database\n- webhooks\n")
    assert "not a string" in problems(tmp_path, "just words\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


def test_lease_must_exceed_timeout(tmp_path: Path) -> None:
    msg = problems(tmp_path, f"""\
        database: {{dsn: "{GOOD_DSN}"}}
        webhooks: {{timeout: 30}}
        daemon: {{lease: 10}}
        """)
    assert "daemon.lease (10 s) must be longer than webhooks.timeout (30 s)" in msg


def test_describe_dsn_never_shows_the_password() -> None:
    where = config.describe_dsn("postgresql://bob:hunter2@db.example:6543/lic")
    assert where == "db.example:6543 database 'lic' as 'bob'"
    assert config.describe_dsn("host=a,b port=1,2 dbname=x user=u") == \
        "a:1, b:2 database 'x' as 'u'"


def test_describe_dsn_names_the_default_user_and_database(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A DSN without user or database still says which ones libpq and asyncpg will use."""
    monkeypatch.setenv("PGUSER", "carol")
    monkeypatch.delenv("PGDATABASE", raising=False)
    assert config.describe_dsn("postgresql://db.example/") == \
        "db.example:5432 database 'carol' as 'carol'"
    monkeypatch.setenv("PGDATABASE", "lic")
    assert config.describe_dsn("host=db.example") == "db.example:5432 database 'lic' as 'carol'"


# --- the same through the CLI: exit 2, the message on stderr, no traceback ------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("database:\n  dsn: x\n webhooks: [\n", "line 3"),
    (f"database: {{dsn: '{GOOD_DSN}'}}\nwebhooks: {{max_retires: 3}}\n",
     "webhooks.max_retires: unknown key"),
    (f"database: {{dsn: '{GOOD_DSN}'}}\nwebhooks: {{events: {{license_created: 'ftp//nope'}}}}\n",
     "webhooks.events.license_created[0]: URL 'ftp//nope'"),
    ("database: {dsn: '${QLMB_UNSET_VAR}'}\n", "${QLMB_UNSET_VAR} is not set"),
    ("", "the file is empty"),
    ("- a\n", "top level must be a mapping"),
])
def test_cli_reports_config_errors_with_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    result = run_cli("install", "--config", str(path))
    assert result.returncode == 2, result
    assert expected in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_cli_takes_config_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "webhooks: {}\n")
    result = run_cli("install", env={"QLM_BRIDGE_CONFIG": str(path)})
    assert result.returncode == 2 and "database: is required" in result.stderr


def test_cli_without_config_is_a_usage_error() -> None:
    result = run_cli("install")
    assert result.returncode == 2 and "no configuration" in result.stderr


def test_unreachable_database_names_host_and_port(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        database:
          dsn: "postgresql://bob:hunter2@127.0.0.1:1/licenses"
          connect_timeout: 2
        """)
    result = run_cli("install", "--config", str(path))
    assert result.returncode == 1, result
    assert "cannot connect to the database at 127.0.0.1:1 database 'licenses'" in result.stderr
    assert "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


# --- config.example.yaml ---------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"


def _model_keys(model: type[config._Model], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        key = config._keys_of(name, field)[-1] if name in ("schema_name", "table_schema") \
            else name
        section = config._section_model(field.annotation)
        keys.add(prefix + key)
        if section is not None and get_origin(field.annotation) is not dict:
            keys |= _model_keys(section, f"{prefix}{key}.")
    return keys


def _yaml_keys(data: object, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return set()
    keys = set()
    for key, value in data.items():
        keys.add(prefix + key)
        if key not in ("events", "field_names"):
            keys |= _yaml_keys(value, f"{prefix}{key}.")
    return keys


def test_example_config_loads() -> None:
    cfg = config.load(EXAMPLE, env={"QLM_WEBHOOK_SECRET": "from-env"})
    assert cfg.webhooks.secret_key == ("from-env",)
    assert cfg.database.dsn == "postgresql://qlm_bridge_daemon@localhost/qlm"
    assert set(cfg.webhooks.events) == {e for e in ALL_EVENTS if e != "license_modified"}
    assert len(cfg.webhooks.events["license_activated"]) == 2
    with pytest.raises(ConfigError, match=r"\$\{QLM_WEBHOOK_SECRET\} is not set"):
        config.load(EXAMPLE, env={})


def test_example_config_documents_every_key_with_its_default() -> None:
    import yaml

    text = EXAMPLE.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert _yaml_keys(data) == _model_keys(config.Config)
    # webhooks.endpoints is a mapping of URLs: its keys are documented in the comment above it
    for key in _model_keys(config.EndpointConfig):
        assert key.rsplit(".", 1)[-1] in text, key
    example = config.load(EXAMPLE, env={"QLM_WEBHOOK_SECRET": "x"}).model_dump()
    defaults = config.Config(database=config.DatabaseConfig(dsn="host=h")).model_dump()
    for section, keys in (("database", ("dsn",)), ("webhooks", ("secret_key", "events"))):
        for key in keys:
            example[section].pop(key)
            defaults[section].pop(key)
    assert example == defaults


def test_cli_help_on_every_command() -> None:
    for command in ("install", "uninstall", "run", "status", "replay", "prune", "send-test"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "--config" in result.stdout, command
