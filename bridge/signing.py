"""Request signatures: QLM's X-QLM-Signature and Standard Webhooks. Pure functions and values.

One secret serves both schemes:

- X-QLM-Signature is the lowercase hex SHA-256 of the body bytes followed by the whole secret
  string (UTF-8), as QLM documents it;
- Standard Webhooks signs with an HMAC key derived from the secret exactly as the official
  libraries (``standardwebhooks.Webhook(secret)``) derive it: the ``whsec_`` prefix, when present,
  is stripped and the rest is base64-decoded, padded or not.

A :class:`Signer` is built once per configuration (per endpoint), so the keys are decoded once,
not per request. Nothing here ever puts a secret into a message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets as secrets_mod
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

SW_PREFIX = "whsec_"
SECRET_BYTES = 32  # what `qlm-bridge gen-secret` draws (Standard Webhooks asks for 24 to 64)
GEN_SECRET_HINT = "make a good one with `qlm-bridge gen-secret`"

QLM_SIGNATURE = "X-QLM-Signature"
SW_ID, SW_TIMESTAMP, SW_SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"


def new_secret() -> str:
    """A fresh secret both schemes accept: ``whsec_`` + base64 of 32 random bytes."""
    return SW_PREFIX + base64.b64encode(secrets_mod.token_bytes(SECRET_BYTES)).decode("ascii")


def qlm_signature(body: bytes, secret: str) -> str:
    """QLM's X-QLM-Signature: lowercase hex SHA-256 of the body bytes followed by the secret."""
    return _qlm_hex(body, secret.encode("utf-8"))


def _qlm_hex(body: bytes, secret: bytes) -> str:
    digest = hashlib.sha256(body)
    digest.update(secret)
    return digest.hexdigest()


def standard_webhooks_key(secret: str) -> bytes:
    """The HMAC key the official Standard Webhooks libraries derive from `secret`.

    As ``standardwebhooks.Webhook`` (1.1.0) does: strip a ``whsec_`` prefix, append ``==``
    padding and base64-decode, characters outside the base64 alphabet being skipped. Raises
    ValueError, with a message that never shows the secret, when they cannot use it.
    """
    text = secret[len(SW_PREFIX):] if secret.startswith(SW_PREFIX) else secret
    if not text.isascii():
        raise ValueError("has non-ASCII characters, which Standard Webhooks libraries refuse "
                         f"(they base64-decode the secret); {GEN_SECRET_HINT}")
    try:
        key = base64.b64decode(text + "==")
    except binascii.Error:
        raise ValueError("is not base64, which Standard Webhooks libraries need (they "
                         f"base64-decode the part after whsec_); {GEN_SECRET_HINT}") from None
    if not key:
        raise ValueError("decodes to an empty Standard Webhooks key (base64 after whsec_ is "
                         f"expected); {GEN_SECRET_HINT}")
    return key


def standard_webhooks_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks ``v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>``."""
    return sw_sign(standard_webhooks_key(secret), _sw_content(msg_id, timestamp, body))


def _sw_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def sw_sign(key: bytes, content: bytes) -> str:
    """``v1,<base64 HMAC-SHA256(key, content)>``."""
    return "v1," + base64.b64encode(hmac.digest(key, content, "sha256")).decode("ascii")


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@dataclass(frozen=True, slots=True, repr=False)
class Signer:
    """How requests to one endpoint are signed: the secrets, current first (rotation), and
    whether Standard Webhooks headers are added. Keys are derived once, at construction.

    With no secret, requests go unsigned. ``X-QLM-Signature`` uses the first secret;
    ``webhook-signature`` carries one ``v1,<sig>`` per secret, separated by spaces.
    """

    secrets: tuple[str, ...] = field(compare=True)
    standard_webhooks: bool = False
    _qlm: bytes | None = field(init=False, compare=False)
    _macs: tuple[hmac.HMAC, ...] = field(init=False, compare=False)  # keyed once, copied

    def __post_init__(self) -> None:
        object.__setattr__(self, "_qlm", self.secrets[0].encode("utf-8") if self.secrets
                           else None)
        object.__setattr__(self, "_macs", tuple(
            hmac.new(standard_webhooks_key(s), digestmod=hashlib.sha256) for s in self.secrets)
            if self.standard_webhooks else ())

    def __repr__(self) -> str:  # never the secrets
        return (f"Signer({len(self.secrets)} secret(s), "
                f"standard_webhooks={self.standard_webhooks})")

    def headers(self, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """The signature headers for one request (empty when unsigned). Standard Webhooks
        signs the send time, so a retry carries a fresh timestamp and signature."""
        if self._qlm is None:
            return {}
        out = {QLM_SIGNATURE: _qlm_hex(body, self._qlm)}
        if self._macs:
            sent = int(time.time() if now is None else now)
            content = _sw_content(msg_id, sent, body)
            out[SW_ID] = msg_id
            out[SW_TIMESTAMP] = str(sent)
            out[SW_SIGNATURE] = " ".join(_v1(mac, content) for mac in self._macs)
        return out


def _v1(keyed: hmac.HMAC, content: bytes) -> str:
    mac = keyed.copy()
    mac.update(content)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


@functools.lru_cache(maxsize=256)
def _signer(secrets: tuple[str, ...], standard_webhooks: bool) -> Signer:
    return Signer(secrets, standard_webhooks)


def signer(secrets: Iterable[str], standard_webhooks: bool = False) -> Signer:
    """The Signer for these secrets, built once per distinct configuration (cached)."""
    return _signer(tuple(secrets), standard_webhooks)
