"""Tests for vesta.messages: every message type round-trips, and no byte string crashes decode.

Instances are built by hypothesis from each type's own field annotations, so a message type added
later is covered without touching this file; a field type the strategy builder does not know fails
the round-trip test for that type instead of being skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import python_env
from vesta import messages
from vesta.messages import (
    ClientRequest,
    CpuJob,
    DecodeError,
    ExecJob,
    JobDone,
    Message,
    Scope,
    StatusReply,
    StressRequest,
    SubmitRequest,
    TaskDone,
    TaskUnits,
    Tick,
    ToClient,
    WorkerExited,
    decode,
    encode,
)

#: Every scope at once: for tests that show a type, internal ones included, survives the codec.
ANYWHERE = Scope.INTERNAL | Scope.CONTROL | Scope.CLIENT | Scope.PEER

TAGS = sorted(Message.registry)
#: Below this nesting depth a field typed ``Message`` may hold a message that nests further.
OPEN_DEPTH = 2

# -- strategies built from the annotations --------------------------------------------------------

_PLAIN_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
#: What a field typed ``Any`` carries: msgpack's own types, nested.
PLAIN = st.recursive(
    _PLAIN_LEAVES,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)

_SCALARS: dict[Any, st.SearchStrategy[Any]] = {
    int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
    float: st.floats(allow_nan=False),
    str: st.text(max_size=30),
    bytes: st.binary(max_size=64),
    bool: st.booleans(),
    type(None): st.none(),
}


def _opens(cls: type[Message]) -> bool:
    """Whether a field of ``cls`` may hold any message at all (so nesting could go on forever)."""
    return any(hint is Message for hint in messages._field_types(cls).values())


def values_for(hint: Any, depth: int) -> st.SearchStrategy[Any]:
    """Values that fit the type hint ``hint`` of a message field ``depth`` levels down."""
    if hint is Any:
        return PLAIN
    if hint in _SCALARS:
        return _SCALARS[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(values_for(option, depth) for option in typing.get_args(hint)))
    if origin is list:
        (item,) = typing.get_args(hint)
        return st.lists(values_for(item, depth), max_size=3)
    if origin is dict:
        key, item = typing.get_args(hint)
        return st.dictionaries(values_for(key, depth), values_for(item, depth), max_size=3)
    if isinstance(hint, type) and issubclass(hint, Message):
        kinds = [
            cls
            for cls in Message.registry.values()
            if issubclass(cls, hint) and (depth < OPEN_DEPTH or not _opens(cls))
        ]
        assert kinds, f"no registered message fits {hint}"
        return st.one_of(*(st.deferred(lambda c=cls: message_of(c, depth)) for cls in kinds))
    raise AssertionError(f"the test's strategy builder does not know the field type {hint}")


def message_of(cls: type[Message], depth: int = 0) -> st.SearchStrategy[Message]:
    """Instances of ``cls`` with every field drawn from its annotation."""
    hints = messages._field_types(cls)
    return st.builds(cls, **{name: values_for(h, depth + 1) for name, h in hints.items()})


ANY_MESSAGE = st.one_of(*(message_of(Message.registry[tag]) for tag in TAGS))
#: Messages that hold no further open-ended message: cheap to draw as parts of other values.
SHALLOW_MESSAGE = st.one_of(*(message_of(Message.registry[tag], OPEN_DEPTH) for tag in TAGS))


# -- round trip -----------------------------------------------------------------------------------


def test_registry_holds_the_concrete_types_only() -> None:
    assert "Job" not in Message.registry
    assert {"CpuJob", "MemJob", "ExecJob", "SubmitRequest", "JobDone", "NodeInfo"} <= set(TAGS)
    for tag, cls in Message.registry.items():
        assert cls.tag == tag == cls.__name__
        assert set(messages._field_types(cls)) == set(cls.fields)


@pytest.mark.parametrize("tag", TAGS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_type_round_trips(tag: str, data: st.DataObject) -> None:
    msg = data.draw(message_of(Message.registry[tag]), label=tag)
    wire = encode(msg)
    back = decode(wire, ANYWHERE)
    assert type(back) is type(msg)
    assert back == msg
    assert encode(back) == wire


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_MESSAGE)
def test_any_message_round_trips(msg: Message) -> None:
    assert decode(encode(msg), ANYWHERE) == msg


def test_nested_messages_decode_to_their_types() -> None:
    job = ExecJob(["make", "-j4"], timeout=2.5, gpu=True)
    inner = SubmitRequest(job)
    msg = ClientRequest(7, inner)
    back = decode(encode(msg), ANYWHERE)
    assert isinstance(back, ClientRequest)
    assert isinstance(back.request, SubmitRequest)
    assert isinstance(back.request.job, ExecJob)
    assert back.request.job.argv == ["make", "-j4"]


def test_float_fields_accept_whole_numbers_on_the_wire() -> None:
    back = decode(msgpack.packb(["StressRequest", 2, 3]), ANYWHERE)
    assert back == StressRequest(2, 3.0)
    assert isinstance(back, StressRequest) and type(back.seconds) is float


def test_int_keys_survive() -> None:
    msg = TaskUnits("t1", {0: b"\x00" * 32, 41: b"\xff" * 32})
    back = decode(encode(msg), ANYWHERE)
    assert isinstance(back, TaskUnits)
    assert back.units == {0: b"\x00" * 32, 41: b"\xff" * 32}


# -- what decode refuses --------------------------------------------------------------------------


def _wire(*items: Any) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        pytest.param(_wire("Tick"), "takes 1 fields, got 0", id="too-few-fields"),
        pytest.param(_wire("Tick", "a", "b"), "takes 1 fields, got 2", id="too-many-fields"),
        pytest.param(_wire("CpuJob", 1), "takes 2 fields", id="default-not-optional-on-wire"),
        pytest.param(_wire("NoSuchMessage"), "unknown message type", id="unknown-tag"),
        pytest.param(_wire("job"), "unknown message type", id="lowercase-tag"),
        pytest.param(_wire("Job"), "unknown message type", id="abstract-base"),
        pytest.param(_wire(), "starts with its tag", id="empty-list"),
        pytest.param(_wire(3, 1), "starts with its tag", id="tag-not-str"),
        pytest.param(msgpack.packb({"tag": "Tick"}), "starts with its tag", id="map"),
        pytest.param(msgpack.packb("Tick"), "starts with its tag", id="bare-str"),
        pytest.param(_wire("CpuJob", "3", 0), "CpuJob.n", id="str-for-int"),
        pytest.param(_wire("CpuJob", True, 0), "CpuJob.n", id="bool-for-int"),
        pytest.param(_wire("CpuJob", 1.0, 0), "CpuJob.n", id="float-for-int"),
        pytest.param(_wire("StressRequest", 1, "2"), "StressRequest.seconds", id="str-for-float"),
        pytest.param(_wire("StressRequest", 1, False), "StressRequest.seconds", id="bool-float"),
        pytest.param(_wire("Tick", b"x"), "Tick.name", id="bytes-for-str"),
        pytest.param(_wire("JobOutput", "j", "stdout", "x"), "JobOutput.data", id="str-bytes"),
        pytest.param(_wire("ExecJob", ["ls"], None, 1, False), "ExecJob.gpu", id="int-for-bool"),
        pytest.param(_wire("ExecJob", "ls", None, False, False), "ExecJob.argv", id="str-for-list"),
        pytest.param(_wire("ExecJob", ["ls", 1], None, False, False), "ExecJob.argv",
                     id="list-item"),
        pytest.param(_wire("ExecJob", ["ls"], "5", False, False), "ExecJob.timeout", id="optional"),
        pytest.param(_wire("TaskUnits", "t", {"0": b""}), "TaskUnits.units", id="dict-key"),
        pytest.param(_wire("TaskUnits", "t", {0: "x"}), "TaskUnits.units", id="dict-value"),
        pytest.param(_wire("TaskUnits", "t", [[0, b""]]), "TaskUnits.units", id="list-for-dict"),
        pytest.param(_wire("StatusReply", None), "StatusReply.doc", id="none-for-dict"),
        pytest.param(_wire("SubmitRequest", ["CpuJob", 1, 0]), "SubmitRequest.job", id="unwrapped"),
        pytest.param(
            _wire("SubmitRequest", msgpack.ExtType(1, encode(Tick()))),
            "SubmitRequest.job",
            id="wrong-message-type",
        ),
        pytest.param(
            _wire("ClientRequest", 1, msgpack.ExtType(1, b"\xc1")), "not msgpack", id="bad-nested"
        ),
        pytest.param(_wire("Tick", msgpack.ExtType(5, b"")), "extension type 5", id="ext-type"),
        pytest.param(encode(Tick("x"))[:-1], "not msgpack", id="truncated"),
        pytest.param(encode(Tick("x")) + b"\x00", "not msgpack", id="trailing-bytes"),
        pytest.param(b"", "not msgpack", id="empty"),
    ],
)
def test_decode_refuses(data: bytes, says: str) -> None:
    with pytest.raises(DecodeError, match=says):
        decode(data, ANYWHERE)


def test_wrong_message_built_locally_is_refused_on_decode() -> None:
    """The constructor does not type-check, so the decoder is what keeps a bad field out."""
    bad = SubmitRequest(job=Tick("not a job"))
    with pytest.raises(DecodeError, match=r"SubmitRequest\.job"):
        decode(encode(bad), ANYWHERE)


def _chain(levels: int) -> Message:
    msg: Message = Tick("bottom")
    for _ in range(levels):
        msg = ToClient(1, msg)
    return msg


def test_nesting_up_to_the_limit_decodes() -> None:
    msg = _chain(messages._MAX_DEPTH)
    assert decode(encode(msg), ANYWHERE) == msg


@pytest.mark.parametrize("levels", [messages._MAX_DEPTH + 1, 40])
def test_nesting_beyond_the_limit_is_refused(levels: int) -> None:
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode(encode(_chain(levels)), ANYWHERE)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        msg = decode(data, ANYWHERE)
    except DecodeError as exc:
        assert str(exc)
    else:
        assert isinstance(msg, Message)


_WIRE_LEAVES = (
    _PLAIN_LEAVES
    | st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=8))
    | SHALLOW_MESSAGE.map(lambda m: msgpack.ExtType(1, encode(m)))
    | st.binary(max_size=16).map(lambda b: msgpack.ExtType(1, b))
)
#: Any msgpack value, message extensions (good and bad) and foreign extensions among them.
_WIRE = st.recursive(
    _WIRE_LEAVES,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-3, 3)), inner, max_size=3),
    max_leaves=6,
)


def _keep_ext(code: int, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(code, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SHALLOW_MESSAGE, st.data())
def test_well_formed_msgpack_with_a_wrong_value_raises_only_decode_error(
    msg: Message, data: st.DataObject
) -> None:
    """A valid message with one field swapped for any msgpack value reaches the field checks."""
    fields = msgpack.unpackb(encode(msg), ext_hook=_keep_ext, raw=False, strict_map_key=False)
    if len(fields) > 1:
        at = data.draw(st.integers(min_value=1, max_value=len(fields) - 1), label="at")
        fields[at] = data.draw(_WIRE, label="value")
    else:
        fields.append(data.draw(_WIRE, label="value"))
    try:
        back = decode(msgpack.packb(fields, use_bin_type=True), ANYWHERE)
    except DecodeError as exc:
        assert str(exc)
    else:
        assert back.tag == msg.tag


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_MESSAGE, st.data())
def test_damaged_encodings_raise_only_decode_error(msg: Message, data: st.DataObject) -> None:
    wire = bytearray(encode(msg))
    at = data.draw(st.integers(min_value=0, max_value=len(wire) - 1), label="at")
    wire[at] = data.draw(st.integers(min_value=0, max_value=255), label="byte")
    cut = data.draw(st.integers(min_value=0, max_value=len(wire)), label="cut")
    try:
        back = decode(bytes(wire[:cut]), ANYWHERE)
    except DecodeError as exc:
        assert str(exc)
    else:
        assert isinstance(back, Message)


def _plain(value: Any) -> bool:
    """Whether a value is made only of the types the module promises fields hold."""
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, bool | int | float | str | bytes | Message)


def test_any_field_cannot_smuggle_codec_internals() -> None:
    data = _wire("StatusReply", {"job": msgpack.ExtType(1, encode(CpuJob(n=1)))})
    try:
        msg = decode(data, ANYWHERE)
    except DecodeError:
        return  # refusing it is a fix as good as decoding the message
    assert isinstance(msg, StatusReply)
    assert _plain(msg.doc), f"decoded {msg!r}"
    assert decode(encode(msg), ANYWHERE) == msg


# -- scopes ---------------------------------------------------------------------------------------

#: The types every internal actor message, every control request and every reply belong to.
INTERNAL_TYPES = sorted(t for t, c in Message.registry.items() if c.scope == Scope.INTERNAL)
NOT_FROM_PEERS = sorted(t for t, c in Message.registry.items() if not c.scope & Scope.PEER)


def test_every_type_has_a_scope_and_internal_ones_include_the_daemons_own() -> None:
    for name in ("CancelAll", "Drain", "Serve", "CountRunning", "ClientRequest", "ToClient",
                 "Tick", "Ping", "StartStress", "StopStress", "WorkerExited"):
        assert name in INTERNAL_TYPES
    for name in ("StatusRequest", "SubmitRequest", "StressRequest"):
        assert Message.registry[name].scope == Scope.CONTROL
    for name in ("RunTask", "TaskDone", "TaskUnits", "CancelTask"):
        assert Message.registry[name].scope & Scope.PEER


@pytest.mark.parametrize("tag", NOT_FROM_PEERS)
def test_a_peer_decoder_refuses_every_internal_and_control_type(tag: str) -> None:
    msg = _example(Message.registry[tag])
    with pytest.raises(DecodeError, match=f"{tag} may not come from a peer"):
        decode(encode(msg), Scope.PEER)


@pytest.mark.parametrize("tag", INTERNAL_TYPES)
def test_no_socket_decoder_takes_an_internal_type(tag: str) -> None:
    wire = encode(_example(Message.registry[tag]))
    for scope in (Scope.CONTROL, Scope.CLIENT, Scope.PEER):
        with pytest.raises(DecodeError, match="may not come from"):
            decode(wire, scope)


def test_a_nested_message_must_fit_the_scope_too() -> None:
    smuggled = SubmitRequest(job=CpuJob(1))
    assert decode(encode(smuggled), Scope.CONTROL) == smuggled
    inside = ClientRequest(1, smuggled)  # internal wrapper around a control request
    with pytest.raises(DecodeError, match="ClientRequest may not come from a client"):
        decode(encode(inside), Scope.CONTROL)
    wrapped = TaskDone("t", True, 1.0, detail={})
    assert decode(encode(wrapped), Scope.PEER) == wrapped
    with pytest.raises(DecodeError, match="TaskDone may not come from a client"):
        decode(encode(wrapped), Scope.CONTROL)


def _example(cls: type[Message]) -> Message:
    """A message of ``cls`` with the simplest value of each field's type."""
    return cls(**{name: _simplest(hint) for name, hint in messages._field_types(cls).items()})


def _simplest(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _simplest(typing.get_args(hint)[0])
    if isinstance(hint, type) and issubclass(hint, Message):
        return Tick() if hint is Message else _example(hint)
    plain = {int: 0, float: 0.0, str: "", bytes: b"", bool: False, type(None): None}
    if hint in plain:
        return plain[hint]
    return {list: [], dict: {}}.get(typing.get_origin(hint) or hint)


# -- the records themselves -----------------------------------------------------------------------


def test_messages_are_immutable() -> None:
    msg = JobDone("j1", True, {"digest": "ab"})
    with pytest.raises(AttributeError, match="immutable"):
        msg.ok = False  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        msg.new_field = 1  # type: ignore[attr-defined]
    assert msg.ok is True
    assert not hasattr(msg, "new_field")


def test_fields_cannot_be_deleted() -> None:
    msg = JobDone("j1", True, {})
    with pytest.raises(AttributeError):
        del msg.ok  # type: ignore[misc]
    assert msg.ok is True


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: TaskDone("t", True, 1.0), "detail"),
        (lambda: WorkerExited("w", 0), "detail"),
    ],
)
def test_mutable_defaults_are_not_shared(make: Any, field: str) -> None:
    first, second = make(), make()
    getattr(first, field)["touched"] = True
    assert getattr(second, field) == {}
    assert getattr(make(), field) == {}
    assert type(first).defaults[field] == {}


def test_replace_copies_and_keeps_the_original() -> None:
    msg = CpuJob(n=4, seed=9)
    changed = msg.replace(seed=1)
    assert changed == CpuJob(4, 1)
    assert msg == CpuJob(4, 9)


def test_equality_is_by_type_and_values() -> None:
    assert Tick("a") == Tick(name="a")
    assert Tick("a") != Tick("b")
    assert CpuJob(1) != Tick("1")
    assert CpuJob(1).values() == [1, 0]


@pytest.mark.parametrize(
    ("args", "kwargs", "says"),
    [
        ((1, 2, 3), {}, "takes 2 fields, got 3"),
        ((), {}, "missing field 'n'"),
        ((1,), {"n": 2}, "repeated field 'n'"),
        ((1,), {"colour": "red"}, "unexpected or repeated field 'colour'"),
    ],
)
def test_constructor_refuses_wrong_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], says: str
) -> None:
    with pytest.raises(TypeError, match=says):
        CpuJob(*args, **kwargs)


def test_importing_messages_stays_light() -> None:
    """The CLI imports this module; it must not drag in the daemon's heavy dependencies."""
    heavy = ["dataclasses", "pykka", "psutil", "cryptography", "blessed"]
    code = (
        "import json, sys, vesta.messages\n"
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))\n"
        "print(vesta.messages.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=python_env(),
        timeout=30, cwd="/", check=False,
    )
    assert proc.returncode == 0, proc.stderr
    loaded, path = proc.stdout.splitlines()
    assert path.startswith(str(messages.__file__).rsplit("/vesta/", 1)[0])
    assert json.loads(loaded) == []
