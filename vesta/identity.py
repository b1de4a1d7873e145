"""The node's identity: an Ed25519 key pair kept in the state directory, and its fingerprint.

The fingerprint is what peers key their ledgers by, so it must survive restarts: the key pair is
created once, written atomically with mode 0600, and read back on every later start.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vesta.statefiles import read_json, write_private_json

logger = logging.getLogger(__name__)


class IdentityError(RuntimeError):
    """The identity file exists but cannot be used."""


@dataclass(frozen=True)
class Identity:
    """A node's key pair."""

    private_key: Ed25519PrivateKey

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def fingerprint_of(public_bytes: bytes) -> str:
    """The first 16 bytes of the SHA-256 of a raw public key, in hex."""
    return hashlib.sha256(public_bytes).hexdigest()[:32]


def verify(public_bytes: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``data`` signed by the key ``public_bytes``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_bytes).verify(signature, data)
    except Exception:  # InvalidSignature, or a malformed key
        return False
    return True


def identity_path(state_dir: str | Path, name: str) -> Path:
    return Path(state_dir) / f"vestad-identity-{name}.json"


def load_or_create(state_dir: str | Path, name: str) -> Identity:
    """Read the node's identity, creating it on first start."""
    path = identity_path(state_dir, name)
    if path.exists() and path.stat().st_mode & 0o077:
        logger.warning("%s was readable by others; it holds the node's private key: "
                       "set it back to mode 0600", path)
        path.chmod(0o600)
    if path.exists():
        data = read_json(path)
        try:
            raw = base64.b64decode(data["private_key"], validate=True)
            return Identity(Ed25519PrivateKey.from_private_bytes(raw))
        except (KeyError, TypeError, ValueError) as exc:
            raise IdentityError(f"{path} is not a vesta identity file ({exc}); move it away "
                                "to create a new identity") from None
    identity = Identity(Ed25519PrivateKey.generate())
    write_private_json(path, {
        "name": name,
        "fingerprint": identity.fingerprint,
        "public_key": base64.b64encode(identity.public_bytes).decode(),
        "private_key": base64.b64encode(identity.private_key.private_bytes_raw()).decode(),
    })
    logger.info("created identity %s in %s", identity.fingerprint, path)
    return identity
