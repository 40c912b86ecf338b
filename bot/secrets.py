"""Encryption of users' API keys at rest, and masking them for display.

The encryption key never lives in the database: it comes from `DRAWBRIDGE_SECRET_KEY` or
from `secret.key` in the data directory, so a copied database file alone reveals no key.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, MultiFernet

log = logging.getLogger(__name__)

SECRET_FILE = "secret.key"


class KeyBox:
    """Fernet (AES-128-CBC + HMAC-SHA256) encryption of users' API keys.

    Holds a `MultiFernet`: the first key encrypts, every key decrypts, so a secret can be
    rotated by putting the new key first and keeping the old one after it.
    """

    __slots__ = ("_fernet",)

    def __init__(self, fernet: MultiFernet) -> None:
        self._fernet = fernet

    @classmethod
    def load(cls, data_dir: Path, secret: str = "") -> KeyBox:
        """Build the box from `DRAWBRIDGE_SECRET_KEY`, or from (or into) `data_dir/secret.key`.

        `secret` may be one Fernet key, several comma-separated Fernet keys (rotation), or any
        other non-empty passphrase (a Fernet key is derived from it with SHA-256). Empty: the
        key file is read, or generated with mode 0600 on first start.
        """
        secret = secret.strip()
        if secret:
            return cls(MultiFernet(_fernets_from_secret(secret)))
        return cls(MultiFernet([Fernet(_read_or_create_key_file(Path(data_dir)))]))

    def encrypt(self, plaintext: str) -> bytes:
        """Encrypt with the first (current) key."""
        return self._fernet.encrypt(plaintext.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        """Decrypt with any configured key; raises `cryptography.fernet.InvalidToken`."""
        return self._fernet.decrypt(bytes(token)).decode("utf-8")

    def __repr__(self) -> str:
        # Never let a key reach a log line through repr().
        return "KeyBox(<hidden>)"


def _fernets_from_secret(secret: str) -> list[Fernet]:
    parts = [part.strip() for part in secret.split(",") if part.strip()]
    try:
        return [Fernet(part) for part in parts]
    except ValueError:
        pass
    if len(parts) > 1:
        # A typo in one key of a rotation list would otherwise silently switch to a derived key
        # and make every stored key unreadable; say so without printing the secret.
        log.warning(
            "DRAWBRIDGE_SECRET_KEY has commas but is not a list of Fernet keys; "
            "deriving one key from the whole string"
        )
    digest = hashlib.sha256(secret.encode("utf-8")).digest()
    return [Fernet(base64.urlsafe_b64encode(digest))]


def _read_or_create_key_file(data_dir: Path) -> bytes:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    key = Fernet.generate_key()
    try:
        # O_EXCL: two processes starting at once must not both write (and one lose) a key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    with os.fdopen(fd, "wb") as file:
        file.write(key + b"\n")
    log.info("generated a new secret key file at %s", path)
    return key


def _read_key_file(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; chmod 600 it", path)
    key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError:
        raise ValueError(f"{path} does not hold a Fernet key") from None
    return key


def mask_key(key: str) -> str:
    """A recognisable but harmless form of an API key: `sk-...a1b2`; short keys give `****`.

    Keeps the prefix up to the first `-` when it is at most 3 characters long (`sk-`), and the
    last 4 characters.
    """
    key = key.strip()
    dash = key.find("-")
    prefix = key[: dash + 1] if 0 < dash <= 3 else ""
    # Reveal at most a small part: the hidden middle must stay at least 8 characters long.
    if len(key) < len(prefix) + 4 + 8:
        return "****"
    return f"{prefix}...{key[-4:]}"
