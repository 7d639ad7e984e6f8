"""Request signatures: QLM's X-QLM-Signature (and Standard Webhooks). Pure functions."""

from __future__ import annotations

import base64
import hashlib
import hmac


def qlm_signature(body: bytes, secret: str) -> str:
    """QLM's X-QLM-Signature: lowercase hex SHA-256 of the body bytes followed by the secret."""
    return hashlib.sha256(body + secret.encode("utf-8")).hexdigest()


def standard_webhooks_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks ``v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>``.

    The key is the base64-decoded part after ``whsec_`` when the secret has that form, else the
    secret's UTF-8 bytes.
    """
    key = _sw_key(secret)
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _sw_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except ValueError:
            pass
    return secret.encode("utf-8")


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
