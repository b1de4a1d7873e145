"""Tests for vesta.transport.handshake: the sessions it yields and every attack it must stop."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from vesta import PROTOCOL_VERSION
from vesta.identity import Identity
from vesta.transport.crypto import (
    KIND_BEACON,
    KIND_HELLO,
    BadFrame,
    BadSignature,
    CryptoError,
    FederationKeys,
    FrameOpener,
    FrameSealer,
    Malformed,
    NotVesta,
    Versions,
    WrongKey,
    envelope,
)
from vesta.transport.handshake import (
    HANDSHAKE_MAX_FRAME,
    HELLO_SIZE,
    INITIATOR,
    REPLY_SIZE,
    RESPONDER,
    HandshakeError,
    Initiator,
    Responder,
    Session,
    VersionMismatch,
    link_keys,
    make_proof,
    transcript_hash,
)

pytestmark = pytest.mark.timeout(20)

OURS = (PROTOCOL_VERSION, PROTOCOL_VERSION)


@pytest.fixture(scope="module")
def keys() -> FederationKeys:
    return FederationKeys.derive("a federation passphrase")


@pytest.fixture(scope="module")
def other_keys() -> FederationKeys:
    return FederationKeys.from_stretched(os.urandom(32))


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


def seal(key: bytes, payload: bytes) -> bytes:
    """A handshake message sealed with counter 0, as a key holder would seal anything."""
    return FrameSealer(key).seal(payload)[1]


def unseal(key: bytes, sealed: bytes) -> bytes:
    """A handshake message opened with counter 0, as its rightful receiver would."""
    return FrameOpener(key, HANDSHAKE_MAX_FRAME).open(len(sealed).to_bytes(4, "big"), sealed)


def handshake(initiator: Initiator, responder: Responder) -> tuple[Session, Session]:
    reply = responder.on_hello(initiator.hello())
    confirm, r_session = responder.on_auth(initiator.on_reply(reply))
    return initiator.on_confirm(confirm), r_session


def send(sender: Session, receiver: Session, payload: bytes) -> bytes:
    return receiver.opener.open(*sender.sealer.seal(payload))


class ManualResponder:
    """A responder that holds the federation key but builds its messages by hand."""

    def __init__(self, keys: FederationKeys, hello: bytes) -> None:
        ephemeral = X25519PrivateKey.generate()
        self.reply = ephemeral.public_key().public_bytes_raw() + os.urandom(32)
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(hello[7:39]))
        self.h = transcript_hash(hello, self.reply)
        self.i_to_r, self.r_to_i = link_keys(keys.link_key, shared, self.h)


class ManualInitiator:
    """An initiator that holds the federation key but builds its messages by hand."""

    def __init__(self, keys: FederationKeys, versions: Versions = OURS) -> None:
        self.keys = keys
        self.ephemeral = X25519PrivateKey.generate()
        self.hello = (envelope(KIND_HELLO, versions)
                      + self.ephemeral.public_key().public_bytes_raw() + os.urandom(32))

    def on_reply(self, reply: bytes) -> None:
        shared = self.ephemeral.exchange(X25519PublicKey.from_public_bytes(reply[:32]))
        self.h = transcript_hash(self.hello, reply)
        self.i_to_r, self.r_to_i = link_keys(self.keys.link_key, shared, self.h)


# -- what a handshake yields


def test_handshake_yields_matching_sessions(keys: FederationKeys, alice: Identity,
                                            bob: Identity) -> None:
    i_session, r_session = handshake(Initiator(keys, alice), Responder(keys, bob))
    assert i_session.peer_fingerprint == bob.fingerprint
    assert i_session.peer_public_key == bob.public_bytes
    assert r_session.peer_fingerprint == alice.fingerprint
    assert r_session.peer_public_key == alice.public_bytes
    assert i_session.initiator and not r_session.initiator
    assert i_session.version == r_session.version == PROTOCOL_VERSION
    assert i_session.sealer.counter == r_session.opener.counter == 1
    assert send(i_session, r_session, b"ping") == b"ping"
    assert send(r_session, i_session, b"pong") == b"pong"
    for n in range(5):
        assert send(i_session, r_session, bytes(n)) == bytes(n)


def test_the_two_directions_have_different_keys(keys: FederationKeys, alice: Identity,
                                                bob: Identity) -> None:
    i_session, _ = handshake(Initiator(keys, alice), Responder(keys, bob))
    frame = i_session.sealer.seal(b"to the responder")
    with pytest.raises(BadFrame):
        i_session.opener.open(*frame)  # reflected back at its sender


def test_highest_common_version_is_chosen(keys: FederationKeys, alice: Identity,
                                          bob: Identity) -> None:
    i_session, r_session = handshake(Initiator(keys, alice, versions=(1, 3)),
                                     Responder(keys, bob, versions=(2, 5)))
    assert i_session.version == r_session.version == 3


def test_messages_have_fixed_sizes_under_the_cap(keys: FederationKeys, alice: Identity,
                                                 bob: Identity) -> None:
    initiator, responder = Initiator(keys, alice), Responder(keys, bob)
    hello = initiator.hello()
    reply = responder.on_hello(hello)
    auth = initiator.on_reply(reply)
    confirm, _ = responder.on_auth(auth)
    assert (len(hello), len(reply)) == (HELLO_SIZE, REPLY_SIZE)
    assert hello.startswith(envelope(KIND_HELLO, OURS))
    assert max(len(hello), len(reply), len(auth), len(confirm)) <= HANDSHAKE_MAX_FRAME


# -- frames are bound to one connection and one order


def test_frame_from_another_connection_fails(keys: FederationKeys, alice: Identity,
                                             bob: Identity) -> None:
    first_i, first_r = handshake(Initiator(keys, alice), Responder(keys, bob))
    second_i, second_r = handshake(Initiator(keys, alice), Responder(keys, bob))
    with pytest.raises(BadFrame):
        second_r.opener.open(*first_i.sealer.seal(b"from the first connection"))
    with pytest.raises(BadFrame):
        first_i.opener.open(*second_r.sealer.seal(b"from the second connection"))
    with pytest.raises(BadFrame):
        first_r.opener.open(*second_i.sealer.seal(b"at the same counter, on the other link"))


def test_reordered_frame_fails(keys: FederationKeys, alice: Identity, bob: Identity) -> None:
    i_session, r_session = handshake(Initiator(keys, alice), Responder(keys, bob))
    i_session.sealer.seal(b"first, never delivered")
    with pytest.raises(BadFrame):
        r_session.opener.open(*i_session.sealer.seal(b"second"))


def test_replayed_frame_fails(keys: FederationKeys, alice: Identity, bob: Identity) -> None:
    i_session, r_session = handshake(Initiator(keys, alice), Responder(keys, bob))
    frame = i_session.sealer.seal(b"lend me a core")
    assert r_session.opener.open(*frame) == b"lend me a core"
    with pytest.raises(BadFrame):
        r_session.opener.open(*frame)


def test_handshake_messages_cannot_be_replayed_as_frames(keys: FederationKeys, alice: Identity,
                                                          bob: Identity) -> None:
    initiator, responder = Initiator(keys, alice), Responder(keys, bob)
    auth = initiator.on_reply(responder.on_hello(initiator.hello()))
    _, r_session = responder.on_auth(auth)
    with pytest.raises(BadFrame):  # the session starts at counter 1; the auth was counter 0
        r_session.opener.open(len(auth).to_bytes(4, "big"), auth)


# -- replays and reflections


def test_replayed_hello_gets_a_fresh_reply_and_old_auth_fails(keys: FederationKeys,
                                                              alice: Identity,
                                                              bob: Identity) -> None:
    initiator, responder = Initiator(keys, alice), Responder(keys, bob)
    hello = initiator.hello()
    reply = responder.on_hello(hello)
    auth = initiator.on_reply(reply)
    responder.on_auth(auth)
    replayed = Responder(keys, bob)
    assert replayed.on_hello(hello) != reply
    with pytest.raises(WrongKey):
        replayed.on_auth(auth)


def test_initiator_signature_echoed_as_responder_fails(keys: FederationKeys, alice: Identity,
                                                       bob: Identity) -> None:
    initiator = Initiator(keys, alice)
    hello = initiator.hello()
    mallory = ManualResponder(keys, hello)
    auth = initiator.on_reply(mallory.reply)
    proof = unseal(mallory.i_to_r, auth)  # alice's own proof, signed as the initiator
    with pytest.raises(BadSignature):
        initiator.on_confirm(seal(mallory.r_to_i, b"\x00" + proof))


def test_responder_signature_echoed_as_initiator_fails(keys: FederationKeys, alice: Identity,
                                                       bob: Identity) -> None:
    mallory = ManualInitiator(keys)
    responder = Responder(keys, bob)
    mallory.on_reply(responder.on_hello(mallory.hello))
    forged = make_proof(RESPONDER, mallory.h, alice, OURS)  # right hash, wrong role
    with pytest.raises(BadSignature):
        responder.on_auth(seal(mallory.i_to_r, forged))


def test_proof_from_another_connection_fails(keys: FederationKeys, alice: Identity,
                                             bob: Identity) -> None:
    mallory = ManualInitiator(keys)
    responder = Responder(keys, bob)
    mallory.on_reply(responder.on_hello(mallory.hello))
    stale = make_proof(INITIATOR, os.urandom(32), alice, OURS)  # signed for another transcript
    with pytest.raises(BadSignature):
        responder.on_auth(seal(mallory.i_to_r, stale))


def test_auth_signing_another_range_than_the_hello_is_malformed(keys: FederationKeys,
                                                                alice: Identity,
                                                                bob: Identity) -> None:
    mallory = ManualInitiator(keys, versions=(1, 1))
    responder = Responder(keys, bob, versions=(1, 2))
    mallory.on_reply(responder.on_hello(mallory.hello))
    with pytest.raises(Malformed):
        responder.on_auth(seal(mallory.i_to_r, make_proof(INITIATOR, mallory.h, alice, (1, 2))))


# -- the federation key


def test_wrong_key_gets_wrong_key_and_nothing_sealed(keys: FederationKeys,
                                                     other_keys: FederationKeys,
                                                     alice: Identity, bob: Identity) -> None:
    initiator, responder = Initiator(other_keys, alice), Responder(keys, bob)
    reply = responder.on_hello(initiator.hello())
    assert len(reply) == REPLY_SIZE  # an ephemeral key and random bytes, nothing sealed
    auth = initiator.on_reply(reply)
    with pytest.raises(WrongKey):
        responder.on_auth(auth)
    with pytest.raises(HandshakeError):
        responder.on_auth(auth)


def test_confirm_under_another_key_is_wrong_key(keys: FederationKeys,
                                                other_keys: FederationKeys,
                                                alice: Identity) -> None:
    initiator = Initiator(keys, alice)
    mallory = ManualResponder(other_keys, initiator.hello())
    initiator.on_reply(mallory.reply)
    with pytest.raises(WrongKey):
        initiator.on_confirm(seal(mallory.r_to_i, bytes(100)))


# -- tampering


def test_tampering_with_any_byte_of_hello_fails(keys: FederationKeys, alice: Identity,
                                                bob: Identity) -> None:
    for index in range(HELLO_SIZE):
        initiator, responder = Initiator(keys, alice), Responder(keys, bob)
        hello = bytearray(initiator.hello())
        hello[index] ^= 0x01
        with pytest.raises(CryptoError):
            handshake_from(initiator, responder, bytes(hello))


def handshake_from(initiator: Initiator, responder: Responder, hello: bytes) -> None:
    confirm, _ = responder.on_auth(initiator.on_reply(responder.on_hello(hello)))
    initiator.on_confirm(confirm)


def test_a_widened_version_range_in_hello_fails(keys: FederationKeys, alice: Identity,
                                                bob: Identity) -> None:
    initiator, responder = Initiator(keys, alice, versions=(2, 2)), Responder(keys, bob)
    hello = initiator.hello()
    downgraded = envelope(KIND_HELLO, (1, 2)) + hello[7:]
    auth = initiator.on_reply(responder.on_hello(downgraded))
    with pytest.raises(WrongKey):
        responder.on_auth(auth)


def test_tampering_with_the_reply_fails(keys: FederationKeys, alice: Identity,
                                        bob: Identity) -> None:
    for index in (0, 31, 32, 63):
        initiator, responder = Initiator(keys, alice), Responder(keys, bob)
        reply = bytearray(responder.on_hello(initiator.hello()))
        reply[index] ^= 0x80
        with pytest.raises(CryptoError):
            responder.on_auth(initiator.on_reply(bytes(reply)))


@pytest.mark.parametrize("message", ["auth", "confirm"])
def test_tampering_with_a_sealed_message_fails(keys: FederationKeys, alice: Identity,
                                               bob: Identity, message: str) -> None:
    initiator, responder = Initiator(keys, alice), Responder(keys, bob)
    auth = bytearray(initiator.on_reply(responder.on_hello(initiator.hello())))
    if message == "auth":
        auth[len(auth) // 2] ^= 0x04
        with pytest.raises(WrongKey):
            responder.on_auth(bytes(auth))
        return
    confirm = bytearray(responder.on_auth(bytes(auth))[0])
    confirm[-1] ^= 0x04
    with pytest.raises(WrongKey):
        initiator.on_confirm(bytes(confirm))


# -- versions


def test_version_mismatch_is_named_on_both_sides(keys: FederationKeys, alice: Identity,
                                                 bob: Identity) -> None:
    initiator = Initiator(keys, alice, versions=(2, 2))
    responder = Responder(keys, bob, versions=(1, 1))
    auth = initiator.on_reply(responder.on_hello(initiator.hello()))
    with pytest.raises(VersionMismatch) as at_responder:
        responder.on_auth(auth)
    refusal = at_responder.value.reply
    assert refusal is not None
    with pytest.raises(VersionMismatch) as at_initiator:
        initiator.on_confirm(refusal)
    assert str(at_responder.value) == (f"the peer {alice.fingerprint} speaks protocol version 2, "
                                       "this node speaks version 1")
    assert str(at_initiator.value) == (f"the peer {bob.fingerprint} speaks protocol version 1, "
                                       "this node speaks version 2")
    assert (at_responder.value.ours, at_responder.value.theirs) == ((1, 1), (2, 2))
    assert (at_initiator.value.ours, at_initiator.value.theirs) == ((2, 2), (1, 1))
    assert at_initiator.value.reply is None


def test_version_ranges_are_described(keys: FederationKeys, alice: Identity,
                                      bob: Identity) -> None:
    initiator = Initiator(keys, alice, versions=(4, 6))
    responder = Responder(keys, bob, versions=(1, 3))
    auth = initiator.on_reply(responder.on_hello(initiator.hello()))
    with pytest.raises(VersionMismatch, match="versions 4 to 6, this node speaks versions 1 to 3"):
        responder.on_auth(auth)


def test_refusal_of_shared_versions_is_malformed(keys: FederationKeys, alice: Identity,
                                                 bob: Identity) -> None:
    initiator = Initiator(keys, alice)
    mallory = ManualResponder(keys, initiator.hello())
    initiator.on_reply(mallory.reply)
    refusal = b"\x01" + make_proof(RESPONDER, mallory.h, bob, OURS)
    with pytest.raises(Malformed):
        initiator.on_confirm(seal(mallory.r_to_i, refusal))


# -- malformed input and order


def test_hello_without_magic_is_not_vesta(keys: FederationKeys, bob: Identity) -> None:
    with pytest.raises(NotVesta):
        Responder(keys, bob).on_hello(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n" + bytes(40))


@pytest.mark.parametrize("hello", [
    envelope(KIND_BEACON, OURS) + bytes(64),
    envelope(KIND_HELLO, OURS) + bytes(63),
    envelope(KIND_HELLO, OURS) + bytes(65),
    envelope(KIND_HELLO, OURS) + bytes(64),  # an all-zero ephemeral has small order
])
def test_malformed_hello(keys: FederationKeys, bob: Identity, hello: bytes) -> None:
    with pytest.raises(Malformed):
        Responder(keys, bob).on_hello(hello)


@pytest.mark.parametrize("reply", [bytes(63), bytes(65), bytes(64)])
def test_malformed_reply(keys: FederationKeys, alice: Identity, reply: bytes) -> None:
    initiator = Initiator(keys, alice)
    initiator.hello()
    with pytest.raises(Malformed):
        initiator.on_reply(reply)


def test_steps_run_once_and_in_order(keys: FederationKeys, alice: Identity,
                                     bob: Identity) -> None:
    initiator, responder = Initiator(keys, alice), Responder(keys, bob)
    with pytest.raises(HandshakeError):
        initiator.on_reply(bytes(64))
    with pytest.raises(HandshakeError):
        responder.on_auth(b"")
    hello = initiator.hello()
    with pytest.raises(HandshakeError):
        initiator.hello()
    with pytest.raises(HandshakeError):
        initiator.on_confirm(b"")
    reply = responder.on_hello(hello)
    with pytest.raises(HandshakeError):
        responder.on_hello(hello)
    confirm, _ = responder.on_auth(initiator.on_reply(reply))
    initiator.on_confirm(confirm)
    with pytest.raises(HandshakeError):
        initiator.on_confirm(confirm)


def test_a_failed_step_ends_the_handshake(keys: FederationKeys, alice: Identity) -> None:
    initiator = Initiator(keys, alice)
    initiator.hello()
    with pytest.raises(Malformed):
        initiator.on_reply(b"short")
    with pytest.raises(HandshakeError):
        initiator.on_reply(bytes(64))


# -- no input makes them raise anything but CryptoError


ANY_BYTES = st.binary(max_size=200)
HELLO_LIKE = st.builds(lambda kind, low, high, rest: bytes([*b"VSTA", kind, low, high]) + rest,
                       st.sampled_from([KIND_HELLO, KIND_BEACON, 0, 255]), st.integers(0, 255),
                       st.integers(0, 255), st.binary(min_size=60, max_size=70))


@settings(max_examples=150, deadline=None)
@given(st.one_of(ANY_BYTES, HELLO_LIKE))
def test_on_hello_raises_only_crypto_errors(keys: FederationKeys, bob: Identity,
                                            hello: bytes) -> None:
    try:
        reply = Responder(keys, bob).on_hello(hello)
    except CryptoError:
        return
    assert len(reply) == REPLY_SIZE


@settings(max_examples=150, deadline=None)
@given(ANY_BYTES)
def test_on_reply_raises_only_crypto_errors(keys: FederationKeys, alice: Identity,
                                            reply: bytes) -> None:
    initiator = Initiator(keys, alice)
    initiator.hello()
    try:
        initiator.on_reply(reply)
    except CryptoError:
        return
    assert len(reply) == REPLY_SIZE


@settings(max_examples=150, deadline=None)
@given(st.one_of(ANY_BYTES, st.binary(min_size=1000, max_size=1100)), st.booleans())
def test_on_auth_raises_only_crypto_errors(keys: FederationKeys, alice: Identity, bob: Identity,
                                           data: bytes, sealed: bool) -> None:
    mallory = ManualInitiator(keys)
    responder = Responder(keys, bob)
    mallory.on_reply(responder.on_hello(mallory.hello))
    with pytest.raises(CryptoError):
        responder.on_auth(seal(mallory.i_to_r, data) if sealed else data)


@settings(max_examples=150, deadline=None)
@given(ANY_BYTES, st.booleans())
def test_on_confirm_raises_only_crypto_errors(keys: FederationKeys, alice: Identity,
                                              data: bytes, sealed: bool) -> None:
    initiator = Initiator(keys, alice)
    mallory = ManualResponder(keys, initiator.hello())
    initiator.on_reply(mallory.reply)
    with pytest.raises(CryptoError):
        initiator.on_confirm(seal(mallory.r_to_i, data) if sealed else data)
