"""Federation keys and sealing: the cleartext envelope, sealed beacons and sealed link frames.

A federation shares one passphrase. It is stretched once with scrypt (a sniffed beacon must not let
anyone test guesses at HKDF speed) and split with HKDF into a beacon key and a link key; the raw
passphrase is never a cipher key.

Every datagram and the first handshake message start with an envelope that never changes across
protocol versions: a magic and the range of versions the sender speaks. It travels in clear but is
authenticated (AES-GCM associated data for beacons, the transcript hash for the handshake), so a
node on another version is recognised as such, and a range cannot be altered in transit.

Frames of an established link are sealed with AES-256-GCM under a per-direction key, with a
counter nonce that never wraps: a replayed, reordered or foreign frame fails to open.

Every error a peer can cause is a :class:`CryptoError` subclass.
"""

from __future__ import annotations

import base64
import os
import secrets
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vesta import PROTOCOL_VERSION
from vesta.identity import Identity, fingerprint_of, verify
from vesta.transport.framing import HEADER

#: A range of protocol versions, lowest and highest, both included.
Versions = tuple[int, int]

ENVELOPE_MAGIC = b"VSTA"
KIND_BEACON = 1
KIND_HELLO = 2
_ENVELOPE = struct.Struct("!4sBBB")
ENVELOPE_SIZE = _ENVELOPE.size

KEY_SIZE = 32
NONCE_SIZE = 12
#: What sealing adds to a payload: the GCM tag.
SEAL_OVERHEAD = 16
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
#: The largest beacon sealed or opened.
MAX_DATAGRAM = 8192
#: The last counter a frame may be sealed with; the link reconnects before it is used up.
MAX_COUNTER = 2**64 - 1

#: scrypt cost: 32 MiB (128 * r * n bytes) and about 0.1 s on an x86 laptop core.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT = b"vesta federation key v1"
_BEACON_INFO = b"vesta beacon key v1"
_LINK_INFO = b"vesta link key v1"
_BEACON_DOMAIN = b"vesta beacon v1\0"
_BEACON_MIN = ENVELOPE_SIZE + NONCE_SIZE + SEAL_OVERHEAD + PUBLIC_KEY_SIZE + SIGNATURE_SIZE
_COUNTER_NONCE = struct.Struct("!4xQ")
_FIELD_PRIME = 2**255 - 19
#: The y-coordinates of Ed25519's eight points of small order (1, -1, 0 and the order-8 pair):
#: a signature under such a key can be forged by anyone, so it proves no identity.
_SMALL_ORDER_Y = frozenset({
    0, 1, _FIELD_PRIME - 1,
    2707385501144840649318225287225658788936804267575313519463743609750303402022,
    55188659117513257062467267217118295137698188065244968500265048394206261417927,
})


class CryptoError(ValueError):
    """Something received could not be authenticated or understood."""


class NotVesta(CryptoError):
    """The data does not start with vesta's envelope: another program, or noise."""


class Malformed(CryptoError):
    """Vesta's envelope, but a message of the wrong size or layout."""


class WrongKey(CryptoError):
    """It does not open: another federation key, or it was altered in transit."""


class BadSignature(CryptoError):
    """It opens, but the sender's signature does not verify."""


class TooLarge(CryptoError):
    """Over the size limit: refused before anything is allocated for it."""


class BadFrame(CryptoError):
    """A link frame that does not open: altered, replayed, reordered, or from another link."""


class CounterExhausted(CryptoError):
    """The frame counter is used up: the link must reconnect to get fresh keys."""


def envelope(kind: int, versions: Versions) -> bytes:
    """The 7-byte cleartext envelope: magic, message kind, lowest and highest version."""
    low, high = versions
    if not 0 <= low <= high <= 255:
        raise ValueError(f"{versions} is not a range of protocol versions")
    return _ENVELOPE.pack(ENVELOPE_MAGIC, kind, low, high)


def parse_envelope(data: bytes | memoryview) -> tuple[int, Versions]:
    """The kind and version range at the start of ``data``; raises NotVesta or Malformed."""
    if len(data) < ENVELOPE_SIZE:
        raise NotVesta(f"{len(data)} bytes are too short for a vesta envelope")
    magic, kind, low, high = _ENVELOPE.unpack_from(data)
    if magic != ENVELOPE_MAGIC:
        raise NotVesta("no vesta envelope")
    if low > high:
        raise Malformed(f"the version range {low} to {high} is empty")
    return kind, (low, high)


def common_version(ours: Versions, theirs: Versions) -> int | None:
    """The highest version in both ranges, or None when they do not overlap."""
    high = min(ours[1], theirs[1])
    return high if high >= max(ours[0], theirs[0]) else None


def describe_versions(versions: Versions) -> str:
    """A range for people: "version 1" or "versions 1 to 3"."""
    low, high = versions
    return f"version {low}" if low == high else f"versions {low} to {high}"


def is_weak_public_key(public_key: bytes) -> bool:
    """Whether an Ed25519 public key has small order, so that anyone can forge its signatures."""
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    return y % _FIELD_PRIME in _SMALL_ORDER_Y


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``data`` signed by ``public_key``, a key that proves an identity."""
    return not is_weak_public_key(public_key) and verify(public_key, signature, data)


def stretch(passphrase: str) -> bytes:
    """The federation passphrase stretched with scrypt: costly on purpose, done once at start."""
    if not passphrase:
        raise ValueError("the federation key is empty")
    kdf = Scrypt(salt=SCRYPT_SALT, length=KEY_SIZE, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(passphrase.encode())


def _expand(stretched: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(stretched)


@dataclass(frozen=True, repr=False)
class FederationKeys:
    """The two keys every member of a federation derives from its passphrase."""

    beacon_key: bytes
    link_key: bytes
    _beacon_aead: AESGCM = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.beacon_key) != KEY_SIZE or len(self.link_key) != KEY_SIZE:
            raise ValueError(f"federation keys are {KEY_SIZE} bytes each")
        object.__setattr__(self, "_beacon_aead", AESGCM(self.beacon_key))

    @classmethod
    def derive(cls, passphrase: str) -> FederationKeys:
        """The keys of the federation whose passphrase is ``passphrase`` (about 0.1 s)."""
        return cls.from_stretched(stretch(passphrase))

    @classmethod
    def from_stretched(cls, stretched: bytes) -> FederationKeys:
        """The keys from an already stretched passphrase (see :func:`stretch`)."""
        return cls(_expand(stretched, _BEACON_INFO), _expand(stretched, _LINK_INFO))

    def __repr__(self) -> str:
        return "FederationKeys(<secret>)"


def generate_key() -> str:
    """A random 256-bit federation key as text: 43 characters of unpadded base64url."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_SIZE)).rstrip(b"=").decode()


@dataclass(frozen=True)
class OpenedBeacon:
    """A beacon that opened with our key and carries a valid signature of its sender."""

    public_key: bytes
    fingerprint: str
    payload: bytes
    versions: Versions
    #: Whether the sender's range overlaps ours; a node on another version is still listed.
    compatible: bool


def seal_beacon(keys: FederationKeys, identity: Identity, payload: bytes,
                versions: Versions = (PROTOCOL_VERSION, PROTOCOL_VERSION)) -> bytes:
    """One beacon datagram: envelope, random nonce, then sealed (sender key, signature, payload)."""
    head = envelope(KIND_BEACON, versions)
    signature = identity.sign(_BEACON_DOMAIN + head + payload)
    nonce = os.urandom(NONCE_SIZE)
    sealed = keys._beacon_aead.encrypt(nonce, identity.public_bytes + signature + payload, head)
    datagram = head + nonce + sealed
    if len(datagram) > MAX_DATAGRAM:
        raise TooLarge(f"a beacon of {len(datagram)} bytes is over {MAX_DATAGRAM}")
    return datagram


def open_beacon(keys: FederationKeys, datagram: bytes | memoryview,
                ours: Versions = (PROTOCOL_VERSION, PROTOCOL_VERSION)) -> OpenedBeacon:
    """Open and verify a beacon; raises TooLarge, NotVesta, Malformed, WrongKey or BadSignature."""
    if len(datagram) > MAX_DATAGRAM:
        raise TooLarge(f"a datagram of {len(datagram)} bytes is over {MAX_DATAGRAM}")
    kind, versions = parse_envelope(datagram)
    if kind != KIND_BEACON:
        raise Malformed(f"a message of kind {kind} where a beacon was expected")
    if len(datagram) < _BEACON_MIN:
        raise Malformed(f"{len(datagram)} bytes are too short for a beacon")
    view = memoryview(datagram)
    head = view[:ENVELOPE_SIZE]
    nonce = view[ENVELOPE_SIZE:ENVELOPE_SIZE + NONCE_SIZE]
    try:
        inner = keys._beacon_aead.decrypt(nonce, view[ENVELOPE_SIZE + NONCE_SIZE:], head)
    except InvalidTag:
        raise WrongKey("the beacon does not open: another federation key, or altered") from None
    public_key = inner[:PUBLIC_KEY_SIZE]
    signature = inner[PUBLIC_KEY_SIZE:PUBLIC_KEY_SIZE + SIGNATURE_SIZE]
    payload = inner[PUBLIC_KEY_SIZE + SIGNATURE_SIZE:]
    if not verify_signature(public_key, signature, _BEACON_DOMAIN + bytes(head) + payload):
        raise BadSignature("the beacon's signature does not match its sender")
    return OpenedBeacon(public_key, fingerprint_of(public_key), payload, versions,
                        common_version(ours, versions) is not None)


class FrameSealer:
    """Seals the frames of one direction of a link, each under the next counter nonce."""

    __slots__ = ("_aead", "_counter")

    def __init__(self, key: bytes, counter: int = 0) -> None:
        self._aead = AESGCM(key)
        self._counter = counter

    @property
    def counter(self) -> int:
        """The counter the next frame is sealed with."""
        return self._counter

    def seal(self, payload: bytes | memoryview) -> tuple[bytes, bytes]:
        """The frame header (the sealed length, also the associated data) and the sealed body.

        Ready for one ``sock.sendmsg([header, body])``.
        """
        counter = self._counter
        if counter > MAX_COUNTER:
            raise CounterExhausted("this link sealed 2**64 frames: reconnect for fresh keys")
        size = len(payload) + SEAL_OVERHEAD
        if size > 0xFFFFFFFF:
            raise TooLarge(f"a frame of {size} bytes does not fit a 4-byte length")
        header = HEADER.pack(size)
        body = self._aead.encrypt(_COUNTER_NONCE.pack(counter), payload, header)
        self._counter = counter + 1
        return header, body


class FrameOpener:
    """Opens the frames of one direction of a link, in order; the first failure ends it."""

    __slots__ = ("_aead", "_counter", "_failed", "max_frame")

    def __init__(self, key: bytes, max_frame: int, counter: int = 0) -> None:
        self._aead = AESGCM(key)
        self.max_frame = max_frame
        self._counter = counter
        self._failed = False

    @property
    def counter(self) -> int:
        """The counter the next frame must have been sealed with."""
        return self._counter

    def body_size(self, header: bytes | memoryview) -> int:
        """The body length a header announces; raises TooLarge over ``max_frame``."""
        if len(header) != HEADER.size:
            raise Malformed(f"a frame header is {HEADER.size} bytes, not {len(header)}")
        (size,) = HEADER.unpack(header)
        if size > self.max_frame:
            raise TooLarge(f"a frame of {size} bytes is over the {self.max_frame}-byte limit")
        return size

    def open(self, header: bytes | memoryview, body: bytes | memoryview) -> bytes:
        """The payload of the next frame; raises BadFrame, and every later call does too."""
        if self._failed:
            raise BadFrame("an earlier frame of this link failed to open")
        self._failed = True
        try:
            size = self.body_size(header)
        except CryptoError as exc:
            raise BadFrame(str(exc)) from None
        if len(body) != size or size < SEAL_OVERHEAD:
            raise BadFrame(f"a frame body of {len(body)} bytes under a header of {size}")
        if self._counter > MAX_COUNTER:
            raise BadFrame("the frame counter is used up")
        try:
            payload = self._aead.decrypt(_COUNTER_NONCE.pack(self._counter), body, header)
        except InvalidTag:
            raise BadFrame("a frame does not open: altered, replayed, reordered or "
                           "from another link") from None
        self._counter += 1
        self._failed = False
        return payload
