"""The link handshake, in the spirit of Noise XXpsk: a sans-IO state machine, bytes in, bytes out.

Four messages, each one frame payload (the caller adds the 4-byte length and, until the handshake
is done, refuses frames over :data:`HANDSHAKE_MAX_FRAME`)::

    initiator -> responder  hello    envelope(hello, versions) + e_i + n_i          cleartext
    responder -> initiator  reply    e_r + n_r                                      cleartext
    initiator -> responder  auth     proof of the initiator                         sealed, i->r
    responder -> initiator  confirm  status + proof of the responder                sealed, r->i

``e`` are fresh X25519 public keys and ``n`` 32 fresh random bytes. Both sides hash the two
cleartext messages into the transcript hash ``h`` (so the envelope's version range cannot be
altered) and derive one key per direction from the federation's link key and the X25519 secret,
salted with ``h``. A proof is an Ed25519 public key, a signature over (role, ``h``, that key, the
version range) and the range: the role stops a signature being echoed back, ``h`` ties it to this
connection. A sealed message is the sealed body of a frame whose header is its own length, sealed
with counter 0 of its direction; the session goes on from counter 1.

The responder seals nothing before the initiator's auth has opened, so a node with another
federation key learns nothing. When the version ranges do not overlap, the responder still answers
an authenticated initiator, with a refusal that names its range.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vesta import PROTOCOL_VERSION
from vesta.identity import Identity, fingerprint_of
from vesta.transport.crypto import (
    ENVELOPE_SIZE,
    KEY_SIZE,
    KIND_HELLO,
    PUBLIC_KEY_SIZE,
    SEAL_OVERHEAD,
    SIGNATURE_SIZE,
    BadFrame,
    BadSignature,
    CryptoError,
    FederationKeys,
    FrameOpener,
    FrameSealer,
    Malformed,
    Versions,
    WrongKey,
    common_version,
    describe_versions,
    envelope,
    parse_envelope,
    verify_signature,
)
from vesta.transport.framing import HEADER

#: The largest frame either side accepts before the handshake is done.
HANDSHAKE_MAX_FRAME = 1024
#: The default cap on a sealed frame of an established link: 4 MiB of payload.
LINK_MAX_FRAME = (4 << 20) + SEAL_OVERHEAD

INITIATOR = b"initiator\0"
RESPONDER = b"responder\0"
_TRANSCRIPT_DOMAIN = b"vesta handshake v1\0"
_LINK_INFO = b"vesta link v1"
RANDOM_SIZE = 32
_EPHEMERAL_SIZE = 32
HELLO_SIZE = ENVELOPE_SIZE + _EPHEMERAL_SIZE + RANDOM_SIZE
REPLY_SIZE = _EPHEMERAL_SIZE + RANDOM_SIZE
_RANGE = struct.Struct("!BB")
PROOF_SIZE = PUBLIC_KEY_SIZE + SIGNATURE_SIZE + _RANGE.size
_ACCEPT = 0
_REFUSE = 1


class HandshakeError(CryptoError):
    """A handshake step called out of order, twice, or after a failed step."""


class VersionMismatch(CryptoError):
    """Both nodes hold the federation key, but their protocol version ranges do not overlap."""

    def __init__(self, ours: Versions, theirs: Versions, peer_fingerprint: str,
                 reply: bytes | None = None) -> None:
        super().__init__(f"the peer {peer_fingerprint} speaks protocol "
                         f"{describe_versions(theirs)}, this node speaks {describe_versions(ours)}")
        self.ours = ours
        self.theirs = theirs
        self.peer_fingerprint = peer_fingerprint
        #: On the responder: the sealed refusal to send before closing the connection.
        self.reply = reply


@dataclass(frozen=True)
class Session:
    """An authenticated link: who the peer is, the version spoken, and the two frame ciphers."""

    peer_public_key: bytes
    peer_fingerprint: str
    version: int
    sealer: FrameSealer
    opener: FrameOpener
    initiator: bool


def transcript_hash(hello: bytes, reply: bytes) -> bytes:
    """The hash both sides sign: it covers the envelope, versions, ephemerals and nonces."""
    return hashlib.sha256(_TRANSCRIPT_DOMAIN + hello + reply).digest()


def link_keys(link_key: bytes, shared: bytes, h: bytes) -> tuple[bytes, bytes]:
    """The initiator-to-responder and responder-to-initiator keys of one connection."""
    secret = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_SIZE, salt=h,
                  info=_LINK_INFO).derive(link_key + shared)
    return secret[:KEY_SIZE], secret[KEY_SIZE:]


def signed_data(role: bytes, h: bytes, public_key: bytes, versions: Versions) -> bytes:
    """What a side signs to prove its identity on this connection."""
    return role + h + public_key + _RANGE.pack(*versions)


def make_proof(role: bytes, h: bytes, identity: Identity, versions: Versions) -> bytes:
    """An identity's proof: public key, signature, version range."""
    public_key = identity.public_bytes
    signature = identity.sign(signed_data(role, h, public_key, versions))
    return public_key + signature + _RANGE.pack(*versions)


def check_proof(role: bytes, h: bytes, proof: bytes) -> tuple[bytes, Versions]:
    """The public key and range of a proof; raises Malformed or BadSignature."""
    if len(proof) != PROOF_SIZE:
        raise Malformed(f"a proof of {len(proof)} bytes, not {PROOF_SIZE}")
    public_key = proof[:PUBLIC_KEY_SIZE]
    signature = proof[PUBLIC_KEY_SIZE:PUBLIC_KEY_SIZE + SIGNATURE_SIZE]
    low, high = _RANGE.unpack_from(proof, PUBLIC_KEY_SIZE + SIGNATURE_SIZE)
    if low > high:
        raise Malformed(f"the version range {low} to {high} is empty")
    if not verify_signature(public_key, signature, signed_data(role, h, public_key, (low, high))):
        raise BadSignature("the peer's signature does not prove its identity")
    return public_key, (low, high)


def _exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point: no shared secret
        raise Malformed("the peer's ephemeral key is not usable") from None


def _seal(sealer: FrameSealer, payload: bytes) -> bytes:
    return sealer.seal(payload)[1]


def _open(opener: FrameOpener, payload: bytes) -> bytes:
    if len(payload) > opener.max_frame:
        raise Malformed(f"a handshake message of {len(payload)} bytes")
    return opener.open(HEADER.pack(len(payload)), payload)


class _Steps:
    """Each step runs once, in order; a step that raises ends the handshake."""

    def __init__(self, steps: tuple[str, ...]) -> None:
        self._steps = steps
        self._next = 0

    def enter(self, step: str) -> None:
        if self._next >= len(self._steps) or self._steps[self._next] != step:
            raise HandshakeError(f"the handshake step {step} is out of order, repeated, "
                                 "or follows a failed step")
        self._next = len(self._steps)  # failed until done() says otherwise

    def done(self, step: str) -> None:
        self._next = self._steps.index(step) + 1


class _Side:
    """What both sides of a handshake start with: the keys, this node's identity, the protocol
    versions it speaks, the frame cap of the link, and the steps it must take in order."""

    steps: tuple[str, ...] = ()

    def __init__(self, keys: FederationKeys, identity: Identity,
                 versions: Versions = (PROTOCOL_VERSION, PROTOCOL_VERSION),
                 max_frame: int = LINK_MAX_FRAME) -> None:
        self._keys = keys
        self._identity = identity
        self._versions = versions
        self._max_frame = max_frame
        self._steps = _Steps(self.steps)
        self._h = b""  # the transcript hash
        self._keys_ir = (b"", b"")  # the frame keys, initiator -> responder and back


class Initiator(_Side):
    """The side that connects: hello(), on_reply(reply) -> auth, on_confirm(confirm) -> Session."""

    steps = ("hello", "reply", "confirm")

    def __init__(self, keys: FederationKeys, identity: Identity,
                 versions: Versions = (PROTOCOL_VERSION, PROTOCOL_VERSION),
                 max_frame: int = LINK_MAX_FRAME) -> None:
        super().__init__(keys, identity, versions, max_frame)
        self._ephemeral = X25519PrivateKey.generate()
        self._hello = b""

    def hello(self) -> bytes:
        """The first message, in clear."""
        self._steps.enter("hello")
        self._hello = (envelope(KIND_HELLO, self._versions)
                       + self._ephemeral.public_key().public_bytes_raw() + os.urandom(RANDOM_SIZE))
        self._steps.done("hello")
        return self._hello

    def on_reply(self, reply: bytes) -> bytes:
        """The sealed auth to send in answer to the responder's reply."""
        self._steps.enter("reply")
        if len(reply) != REPLY_SIZE:
            raise Malformed(f"a handshake reply of {len(reply)} bytes, not {REPLY_SIZE}")
        shared = _exchange(self._ephemeral, reply[:_EPHEMERAL_SIZE])
        self._h = transcript_hash(self._hello, reply)
        self._keys_ir = link_keys(self._keys.link_key, shared, self._h)
        proof = make_proof(INITIATOR, self._h, self._identity, self._versions)
        auth = _seal(FrameSealer(self._keys_ir[0]), proof)
        self._steps.done("reply")
        return auth

    def on_confirm(self, confirm: bytes) -> Session:
        """The session, once the responder proved its identity; VersionMismatch on a refusal."""
        self._steps.enter("confirm")
        try:
            opened = _open(FrameOpener(self._keys_ir[1], HANDSHAKE_MAX_FRAME), confirm)
        except BadFrame:
            raise WrongKey("the responder's confirmation does not open") from None
        if len(opened) != 1 + PROOF_SIZE or opened[0] not in (_ACCEPT, _REFUSE):
            raise Malformed("not a handshake confirmation")
        public_key, theirs = check_proof(RESPONDER, self._h, opened[1:])
        version = common_version(self._versions, theirs)
        if version is None:
            raise VersionMismatch(self._versions, theirs, fingerprint_of(public_key))
        if opened[0] == _REFUSE:
            raise Malformed("the responder refused versions it speaks")
        session = _session(public_key, version, self._keys_ir, self._max_frame, initiator=True)
        self._steps.done("confirm")
        return session


class Responder(_Side):
    """The side that accepts: on_hello(hello) -> reply, on_auth(auth) -> (confirm, Session)."""

    steps = ("hello", "auth")

    def __init__(self, keys: FederationKeys, identity: Identity,
                 versions: Versions = (PROTOCOL_VERSION, PROTOCOL_VERSION),
                 max_frame: int = LINK_MAX_FRAME) -> None:
        super().__init__(keys, identity, versions, max_frame)
        self._their_versions = versions

    def on_hello(self, hello: bytes) -> bytes:
        """The cleartext reply to an initiator's hello; raises NotVesta without the envelope."""
        self._steps.enter("hello")
        kind, self._their_versions = parse_envelope(hello)
        if kind != KIND_HELLO or len(hello) != HELLO_SIZE:
            raise Malformed(f"not a handshake hello (kind {kind}, {len(hello)} bytes)")
        ephemeral = X25519PrivateKey.generate()
        shared = _exchange(ephemeral, hello[ENVELOPE_SIZE:ENVELOPE_SIZE + _EPHEMERAL_SIZE])
        reply = ephemeral.public_key().public_bytes_raw() + os.urandom(RANDOM_SIZE)
        self._h = transcript_hash(hello, reply)
        self._keys_ir = link_keys(self._keys.link_key, shared, self._h)
        self._steps.done("hello")
        return reply

    def on_auth(self, auth: bytes) -> tuple[bytes, Session]:
        """The sealed confirmation to send, and the session.

        When the version ranges do not overlap, raises VersionMismatch whose ``reply`` is the
        sealed refusal to send before closing.
        """
        self._steps.enter("auth")
        try:
            proof = _open(FrameOpener(self._keys_ir[0], HANDSHAKE_MAX_FRAME), auth)
        except BadFrame:
            raise WrongKey("the initiator's auth does not open: another federation key, "
                           "or the handshake was altered in transit") from None
        public_key, theirs = check_proof(INITIATOR, self._h, proof)
        if theirs != self._their_versions:
            raise Malformed("the initiator signed another version range than its hello's")
        version = common_version(self._versions, theirs)
        status = _REFUSE if version is None else _ACCEPT
        proof = make_proof(RESPONDER, self._h, self._identity, self._versions)
        confirm = _seal(FrameSealer(self._keys_ir[1]), bytes([status]) + proof)
        if version is None:
            raise VersionMismatch(self._versions, theirs, fingerprint_of(public_key), confirm)
        session = _session(public_key, version, self._keys_ir, self._max_frame, initiator=False)
        self._steps.done("auth")
        return confirm, session


def _session(peer_public_key: bytes, version: int, keys_ir: tuple[bytes, bytes], max_frame: int,
             *, initiator: bool) -> Session:
    send_key, receive_key = keys_ir if initiator else keys_ir[::-1]
    return Session(peer_public_key, fingerprint_of(peer_public_key), version,
                   FrameSealer(send_key, counter=1), FrameOpener(receive_key, max_frame, counter=1),
                   initiator)
