"""qlm-webhook-bridge: QLM-compatible webhooks from any PostgreSQL license database."""

from __future__ import annotations

__version__ = "0.1.0"
