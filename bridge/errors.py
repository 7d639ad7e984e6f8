"""The bridge's exceptions: one root class, so the CLI can turn every expected failure into a
clear message and a meaningful exit code (2 = configuration or usage, 1 = runtime)."""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every expected failure. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(BridgeError):
    """The configuration file (or a command-line value) is wrong."""

    exit_code = 2


class InstallError(BridgeError):
    """The database cannot take the install as configured (missing table or column, rights)."""

    exit_code = 1


class DatabaseUnavailable(BridgeError):
    """The database cannot be reached."""

    exit_code = 1
