"""Per-device bearer tokens: issuing, storing hashed, and checking them on every call.

A token looks like ``cmgs1.<token id>.<secret>``: the id (16 hex digits) finds the device row with one
indexed lookup, the secret (256 random bits, base64url) is never stored, only
``sha256("comigs-sync-token\\0" || salt || secret)`` with a per-token random salt. Because secrets are
random, not passwords, a fast hash is enough (a slow KDF would only cost CPU on every call); the salt
keeps equal secrets from having equal hashes. Comparison is constant-time.

Who is calling is decided by the token alone. A `device_id` in a request or ``x-comigs-device-id``
metadata only states whom the caller *means* to act as, and must match: a valid token acting as
another device, or a revoked device's token, is PERMISSION_DENIED; a missing, malformed or wrong token
is UNAUTHENTICATED (without saying which part was wrong).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sync_service.errors import permission_denied, unauthenticated
from sync_service.store import Store

TOKEN_PREFIX = "cmgs1"
DEVICE_METADATA_KEY = "x-comigs-device-id"
AUTHORIZATION_KEY = "authorization"
#: Device names become file names and metric/log values: keep them short and plain.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOKEN_PATTERN = re.compile(r"^cmgs1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
_DUMMY_SALT = b"\0" * 16


@dataclass(frozen=True)
class IssuedToken:
    device_id: str
    token: str
    token_id: str
    salt: bytes
    token_hash: bytes


def validate_device_id(device_id: str) -> str:
    if not DEVICE_ID_PATTERN.match(device_id or ""):
        raise ValueError(
            f"invalid device name {device_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return device_id


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(b"comigs-sync-token\0" + salt + secret.encode("ascii")).digest()


def issue_token(device_id: str) -> IssuedToken:
    """A fresh token for `device_id` (the plaintext is shown once, then only its hash exists)."""
    validate_device_id(device_id)
    token_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    salt = secrets.token_bytes(16)
    return IssuedToken(
        device_id, f"{TOKEN_PREFIX}.{token_id}.{secret}", token_id, salt, hash_secret(salt, secret)
    )


def add_device(store: Store, device_id: str, *, rotate: bool = False) -> str:
    """Enrol a device (or, with `rotate`, replace its token and reinstate it); returns the new token."""
    issued = issue_token(device_id)
    store.add_device(device_id, issued.token_id, issued.salt, issued.token_hash, rotate=rotate)
    return issued.token


def parse_token(token: str) -> tuple[str, str] | None:
    match = _TOKEN_PATTERN.match(token)
    return (match.group(1), match.group(2)) if match else None


class Authenticator:
    """Maps call metadata to the calling device's id, or raises the right SyncError.

    Looks the token up in the store on every call (one indexed SELECT) instead of caching, so that
    `comigs sync revoke-device`, run from another process, takes effect on the very next call.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        pairs = [(key.lower(), value) for key, value in (metadata or ())]
        values = [value for key, value in pairs if key == AUTHORIZATION_KEY]
        if not values:
            raise unauthenticated(
                "missing credentials: send 'authorization: Bearer <token>' metadata "
                "(tokens come from `comigs sync add-device NAME`)",
                "no_token",
            )
        if len(values) > 1:
            raise unauthenticated("more than one authorization metadata entry", "bad_token")
        value = values[0]
        if isinstance(value, bytes):
            raise unauthenticated("authorization metadata must be text", "bad_token")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthenticated("authorization metadata must be 'Bearer <token>'", "bad_token")
        parsed = parse_token(token)
        if parsed is None:
            raise unauthenticated(
                "malformed token: expected cmgs1.<id>.<secret> as printed by add-device", "bad_token"
            )
        token_id, secret = parsed
        device = self._store.device_by_token_id(token_id)
        salt = device.token_salt if device else _DUMMY_SALT
        computed = hash_secret(salt, secret)
        if device is None or not hmac.compare_digest(computed, device.token_hash):
            raise unauthenticated("invalid token (unknown, rotated or mistyped)", "bad_token")
        if device.revoked:
            raise permission_denied(f"device {device.device_id!r} has been revoked", "revoked")
        claimed = [value for key, value in pairs if key == DEVICE_METADATA_KEY]
        for name in claimed:
            self.check_acting_as(
                device.device_id, name if isinstance(name, str) else "<binary>", DEVICE_METADATA_KEY
            )
        return device.device_id

    @staticmethod
    def check_acting_as(principal: str, claimed: str, where: str = "device_id") -> None:
        """A request naming a device (in `where`) may only name the caller's own device."""
        if claimed and claimed != principal:
            raise permission_denied(
                f"this token belongs to device {principal!r}; it cannot act as {claimed!r} ({where})",
                "impersonation",
            )
