"""Tests for vesta.transport.crypto: envelope, key derivation, beacons and link frames."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from hypothesis import given, settings
from hypothesis import strategies as st

from vesta import PROTOCOL_VERSION
from vesta.identity import Identity
from vesta.transport.crypto import (
    ENVELOPE_MAGIC,
    ENVELOPE_SIZE,
    KIND_BEACON,
    KIND_HELLO,
    MAX_COUNTER,
    MAX_DATAGRAM,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    SEAL_OVERHEAD,
    BadFrame,
    BadSignature,
    CounterExhausted,
    CryptoError,
    FederationKeys,
    FrameOpener,
    FrameSealer,
    Malformed,
    NotVesta,
    TooLarge,
    WrongKey,
    common_version,
    describe_versions,
    envelope,
    generate_key,
    is_weak_public_key,
    open_beacon,
    parse_envelope,
    seal_beacon,
)

pytestmark = pytest.mark.timeout(20)

PASSPHRASE = "correct horse battery staple"
OURS = (PROTOCOL_VERSION, PROTOCOL_VERSION)


@pytest.fixture(scope="module")
def keys() -> FederationKeys:
    return FederationKeys.derive(PASSPHRASE)


@pytest.fixture(scope="module")
def other_keys() -> FederationKeys:
    return FederationKeys.from_stretched(os.urandom(32))


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def seal_inner(keys: FederationKeys, versions: tuple[int, int], inner: bytes) -> bytes:
    """A beacon built by a holder of the federation key, with any inner bytes."""
    head = envelope(KIND_BEACON, versions)
    nonce = os.urandom(12)
    return head + nonce + AESGCM(keys.beacon_key).encrypt(nonce, inner, head)


# -- the envelope


def test_envelope_is_magic_kind_and_range() -> None:
    assert ENVELOPE_MAGIC == b"VSTA"
    assert envelope(KIND_HELLO, (1, 3)) == b"VSTA\x02\x01\x03"
    assert ENVELOPE_SIZE == 7


def test_parse_envelope_reads_the_prefix() -> None:
    assert parse_envelope(envelope(KIND_BEACON, (2, 5)) + b"rest") == (KIND_BEACON, (2, 5))


@pytest.mark.parametrize("data", [b"", b"VSTA\x01\x01", b"XSTA\x01\x01\x01", b"GET / HTTP/1.1"])
def test_parse_envelope_without_magic_is_not_vesta(data: bytes) -> None:
    with pytest.raises(NotVesta):
        parse_envelope(data)


def test_parse_envelope_refuses_an_empty_range() -> None:
    with pytest.raises(Malformed):
        parse_envelope(b"VSTA\x01\x03\x02")


@pytest.mark.parametrize("versions", [(2, 1), (-1, 1), (1, 256)])
def test_envelope_refuses_a_bad_range(versions: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="range"):
        envelope(KIND_BEACON, versions)


@pytest.mark.parametrize(("ours", "theirs", "common"), [
    ((1, 1), (1, 1), 1),
    ((1, 3), (2, 5), 3),
    ((2, 5), (1, 3), 3),
    ((1, 1), (2, 2), None),
    ((3, 4), (1, 2), None),
    ((1, 9), (4, 4), 4),
])
def test_common_version_is_the_highest_in_both(ours: tuple[int, int], theirs: tuple[int, int],
                                               common: int | None) -> None:
    assert common_version(ours, theirs) == common


def test_describe_versions() -> None:
    assert describe_versions((2, 2)) == "version 2"
    assert describe_versions((1, 3)) == "versions 1 to 3"


# -- keys


def test_derive_is_scrypt_then_hkdf_with_two_labels(keys: FederationKeys) -> None:
    stretched = Scrypt(salt=b"vesta federation key v1", length=32, n=SCRYPT_N, r=SCRYPT_R,
                       p=SCRYPT_P).derive(PASSPHRASE.encode())
    assert keys == FederationKeys.from_stretched(stretched)
    assert len(keys.beacon_key) == len(keys.link_key) == 32
    assert keys.beacon_key != keys.link_key
    assert PASSPHRASE.encode()[:32] not in (keys.beacon_key, keys.link_key)
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"vesta beacon key v1").derive(stretched)
    assert keys.beacon_key == expected


def test_derive_depends_on_the_passphrase(keys: FederationKeys) -> None:
    other = FederationKeys.derive(PASSPHRASE + "!")
    assert other.beacon_key != keys.beacon_key
    assert other.link_key != keys.link_key


def test_scrypt_cost_fits_a_small_machine() -> None:
    assert SCRYPT_N & (SCRYPT_N - 1) == 0
    assert 128 * SCRYPT_R * SCRYPT_N * SCRYPT_P <= 32 << 20


def test_derive_refuses_an_empty_passphrase() -> None:
    with pytest.raises(ValueError, match="empty"):
        FederationKeys.derive("")


def test_repr_does_not_show_the_keys(keys: FederationKeys) -> None:
    text = repr(keys) + str(keys)
    for key in (keys.beacon_key, keys.link_key):
        assert key.hex() not in text
        assert repr(key) not in text


def test_generate_key_is_256_random_bits() -> None:
    key = generate_key()
    assert len(key) == 43
    assert len(base64.urlsafe_b64decode(key + "=")) == 32
    assert generate_key() != key


# -- beacons


def test_beacon_round_trip(keys: FederationKeys, alice: Identity) -> None:
    datagram = seal_beacon(keys, alice, b"spare cpu: 3")
    assert datagram.startswith(envelope(KIND_BEACON, OURS))
    opened = open_beacon(keys, datagram)
    assert opened.payload == b"spare cpu: 3"
    assert opened.public_key == alice.public_bytes
    assert opened.fingerprint == alice.fingerprint
    assert opened.versions == OURS
    assert opened.compatible


def test_beacons_use_fresh_nonces(keys: FederationKeys, alice: Identity) -> None:
    assert seal_beacon(keys, alice, b"x") != seal_beacon(keys, alice, b"x")


def test_beacon_opens_from_a_memoryview(keys: FederationKeys, alice: Identity) -> None:
    datagram = bytearray(seal_beacon(keys, alice, b"payload"))
    assert open_beacon(keys, memoryview(datagram)).payload == b"payload"


def test_beacon_with_another_key_is_wrong_key(keys: FederationKeys, other_keys: FederationKeys,
                                              alice: Identity) -> None:
    with pytest.raises(WrongKey):
        open_beacon(keys, seal_beacon(other_keys, alice, b"hello"))


def test_beacon_of_an_incompatible_version_opens_as_incompatible(keys: FederationKeys,
                                                                 alice: Identity) -> None:
    opened = open_beacon(keys, seal_beacon(keys, alice, b"v2", versions=(2, 3)), ours=(1, 1))
    assert opened.versions == (2, 3)
    assert not opened.compatible
    assert opened.fingerprint == alice.fingerprint


def test_every_flipped_bit_of_a_beacon_fails(keys: FederationKeys, alice: Identity) -> None:
    datagram = seal_beacon(keys, alice, b"load 0.5")
    for bit in range(len(datagram) * 8):
        with pytest.raises(CryptoError):
            open_beacon(keys, flip(datagram, bit))


def test_a_flipped_version_is_caught_by_the_tag(keys: FederationKeys, alice: Identity) -> None:
    datagram = seal_beacon(keys, alice, b"x", versions=(1, 1))
    with pytest.raises(WrongKey):
        open_beacon(keys, datagram[:6] + b"\x02" + datagram[7:])


def test_beacon_resigned_by_another_identity_fails(keys: FederationKeys, alice: Identity,
                                                   mallory: Identity) -> None:
    opened = open_beacon(keys, seal_beacon(keys, alice, b"boot 3 seq 9"))
    head = envelope(KIND_BEACON, OURS)
    signature = mallory.sign(b"vesta beacon v1\0" + head + opened.payload)
    with pytest.raises(BadSignature):
        open_beacon(keys, seal_inner(keys, OURS, alice.public_bytes + signature + opened.payload))


def test_beacon_signed_for_other_versions_fails(keys: FederationKeys, alice: Identity) -> None:
    signature = alice.sign(b"vesta beacon v1\0" + envelope(KIND_BEACON, (1, 1)) + b"p")
    with pytest.raises(BadSignature):
        open_beacon(keys, seal_inner(keys, (1, 2), alice.public_bytes + signature + b"p"))


def test_beacon_with_a_short_inner_is_malformed(keys: FederationKeys) -> None:
    for size in (0, 31, 95):
        with pytest.raises(Malformed):
            open_beacon(keys, seal_inner(keys, OURS, bytes(size)))


def test_beacon_under_a_small_order_key_fails(keys: FederationKeys) -> None:
    # An all-zero key and signature pass a plain Ed25519 check for this message: anyone could
    # "sign" as that key, so it must prove nothing.
    with pytest.raises(BadSignature):
        open_beacon(keys, seal_inner(keys, OURS, bytes(96)))


P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2
    return ((x1 * y2 + y1 * x2) * pow(1 + t, -1, P) % P,
            (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P)


def _point(y: int) -> tuple[int, int]:
    xx = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    assert (x * x - xx) % P == 0
    return x, y


def test_weak_keys_are_exactly_the_small_order_points(alice: Identity) -> None:
    weak = [(y + (1 << 255) * sign).to_bytes(32, "little")
            for y in (0, 1, P - 1) for sign in (0, 1)]
    for y in (0, 1, P - 1, *(
            2707385501144840649318225287225658788936804267575313519463743609750303402022,
            55188659117513257062467267217118295137698188065244968500265048394206261417927)):
        point = _point(y)
        for _ in range(3):
            point = _add(point, point)
        assert point == (0, 1), y  # [8]P is the neutral element
        weak.append(y.to_bytes(32, "little"))
    weak += [P.to_bytes(32, "little"), (P + 1).to_bytes(32, "little")]  # non-canonical 0 and 1
    assert all(is_weak_public_key(key) for key in weak)
    assert not is_weak_public_key(alice.public_bytes)


def test_beacon_size_limits(keys: FederationKeys, alice: Identity) -> None:
    with pytest.raises(TooLarge):
        seal_beacon(keys, alice, bytes(MAX_DATAGRAM))
    with pytest.raises(TooLarge):
        open_beacon(keys, envelope(KIND_BEACON, OURS) + bytes(MAX_DATAGRAM))
    with pytest.raises(NotVesta):
        open_beacon(keys, b"VST")
    with pytest.raises(Malformed):
        open_beacon(keys, envelope(KIND_BEACON, OURS) + bytes(20))
    with pytest.raises(Malformed):
        open_beacon(keys, envelope(KIND_HELLO, OURS) + bytes(200))


# -- frames


KEY = bytes(range(32))


def test_frames_round_trip_in_order() -> None:
    sealer, opener = FrameSealer(KEY), FrameOpener(KEY, max_frame=1 << 20)
    for payload in (b"", b"a", os.urandom(70000)):
        header, body = sealer.seal(payload)
        assert len(header) == 4
        assert int.from_bytes(header, "big") == len(body) == len(payload) + SEAL_OVERHEAD
        assert opener.body_size(header) == len(body)
        assert opener.open(header, memoryview(bytearray(body))) == payload
    assert sealer.counter == opener.counter == 3


def test_frame_nonce_is_a_counter_and_the_header_is_associated_data() -> None:
    header, body = FrameSealer(KEY, counter=258).seal(b"payload")
    nonce = bytes(4) + (258).to_bytes(8, "big")
    assert AESGCM(KEY).decrypt(nonce, body, header) == b"payload"


def test_replayed_frame_fails() -> None:
    sealer, opener = FrameSealer(KEY), FrameOpener(KEY, max_frame=1024)
    frame = sealer.seal(b"pay 10 credits")
    assert opener.open(*frame) == b"pay 10 credits"
    with pytest.raises(BadFrame):
        opener.open(*frame)


def test_reordered_frame_fails() -> None:
    sealer, opener = FrameSealer(KEY), FrameOpener(KEY, max_frame=1024)
    first, second = sealer.seal(b"one"), sealer.seal(b"two")
    with pytest.raises(BadFrame):
        opener.open(*second)
    with pytest.raises(BadFrame):  # a failed link stays failed
        opener.open(*first)


@pytest.mark.parametrize("part", ["header", "body"])
def test_altered_frame_fails(part: str) -> None:
    header, body = FrameSealer(KEY).seal(b"data")
    for bit in range(8 * len(header if part == "header" else body)):
        opener = FrameOpener(KEY, max_frame=1024)
        with pytest.raises(CryptoError):
            if part == "header":
                opener.open(flip(header, bit), body)
            else:
                opener.open(header, flip(body, bit))


def test_frame_opens_only_under_its_key_and_counter() -> None:
    frame = FrameSealer(KEY, counter=5).seal(b"x")
    assert FrameOpener(KEY, 1024, counter=5).open(*frame) == b"x"
    with pytest.raises(BadFrame):
        FrameOpener(KEY, 1024, counter=4).open(*frame)
    with pytest.raises(BadFrame):
        FrameOpener(bytes(32), 1024, counter=5).open(*frame)


def test_body_size_refuses_before_allocating() -> None:
    opener = FrameOpener(KEY, max_frame=1000)
    assert opener.body_size(b"\x00\x00\x03\xe8") == 1000
    with pytest.raises(TooLarge):
        opener.body_size(b"\x00\x00\x03\xe9")
    with pytest.raises(TooLarge):
        opener.body_size(b"\xff\xff\xff\xff")
    with pytest.raises(Malformed):
        opener.body_size(b"\x00\x01")


def test_frame_body_must_match_its_header() -> None:
    header, body = FrameSealer(KEY).seal(b"abc")
    with pytest.raises(BadFrame):
        FrameOpener(KEY, 1024).open(header, body[:-1])
    with pytest.raises(BadFrame):
        FrameOpener(KEY, 1024).open(b"\x00\x00\x00\x05", b"short")


def test_the_counter_never_wraps() -> None:
    sealer = FrameSealer(KEY, counter=MAX_COUNTER)
    last = sealer.seal(b"last")
    with pytest.raises(CounterExhausted):
        sealer.seal(b"one too many")
    assert FrameOpener(KEY, 1024, counter=MAX_COUNTER).open(*last) == b"last"
    with pytest.raises(BadFrame):
        FrameOpener(KEY, 1024, counter=MAX_COUNTER + 1).open(*last)


# -- no input makes them raise anything but CryptoError


ANY_BYTES = st.binary(max_size=300)
ENVELOPED = st.builds(lambda kind, low, high, rest: bytes([*b"VSTA", kind, low, high]) + rest,
                      st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
                      st.binary(max_size=300))


@settings(max_examples=200, deadline=None)
@given(st.one_of(ANY_BYTES, ENVELOPED))
def test_parse_envelope_raises_only_crypto_errors(data: bytes) -> None:
    try:
        _kind, (low, high) = parse_envelope(data)
    except CryptoError:
        return
    assert data[:4] == ENVELOPE_MAGIC
    assert low <= high


@settings(max_examples=200, deadline=None)
@given(st.one_of(ANY_BYTES, ENVELOPED, st.binary(min_size=8000, max_size=9000)))
def test_open_beacon_raises_only_crypto_errors(keys: FederationKeys, data: bytes) -> None:
    with pytest.raises(CryptoError):
        open_beacon(keys, data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_a_key_holders_garbage_beacon_raises_only_crypto_errors(keys: FederationKeys,
                                                                 inner: bytes) -> None:
    with pytest.raises(CryptoError):
        open_beacon(keys, seal_inner(keys, OURS, inner))


@settings(max_examples=200, deadline=None)
@given(ANY_BYTES, ANY_BYTES, st.booleans())
def test_frame_opener_raises_only_crypto_errors(header: bytes, body: bytes,
                                                matching: bool) -> None:
    if matching:
        header = len(body).to_bytes(4, "big")
    with pytest.raises(CryptoError):
        FrameOpener(KEY, max_frame=256).open(header, body)
