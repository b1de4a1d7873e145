"""Tests for vesta.config: every error names its field, the key's sources, the generated example."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from vesta import config
from vesta.config import (
    FIELDS,
    MIN_KEY_LENGTH,
    MIN_KEY_VARIETY,
    SCHEMA,
    Config,
    ConfigError,
    build_config,
    example_document,
    load_file,
    sanitize_name,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.json"
KEY = "key-0123456789ab"  # exactly MIN_KEY_LENGTH characters
OTHER_KEY = "another-federation-key"
REGENERATE = "regenerate it with `python -m vesta.config example > config.example.json`"
#: Fields whose value build_config derives rather than passes through.
DERIVED = {"name", "key", "state_dir", "socket"}


def build(*layers: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    """build_config with a key, a fixed name and no environment unless the test says otherwise."""
    return build_config({"key": KEY, "name": "desk"}, *layers, env={} if env is None else env)


# -- values per field ---------------------------------------------------------------------------

GOOD: list[tuple[str, Any, Any]] = [
    ("port", 1, 1),
    ("port", 65535, 65535),
    ("dport", 9999, 9999),
    ("bind", "127.0.0.1", "127.0.0.1"),
    ("advertise", "10.0.0.2", "10.0.0.2"),
    ("seed", ["a.example:7778", "10.0.0.9:7778"], ["a.example:7778", "10.0.0.9:7778"]),
    ("seed", [], []),
    ("advertise_spare_ms", 100, 100),
    ("advertise_spare_ms", 60000, 60000),
    ("power", "auto", "auto"),
    ("power", "grid", "grid"),
    ("power", "solar", "solar"),
    ("power", "battery", "battery"),
    ("cpu_offer_pct", 0, 0),
    ("cpu_offer_pct", 100, 100),
    ("mem_offer_mb", 0, 0),
    ("mem_offer_mb", 1 << 22, 1 << 22),
    ("reserve_pct", 100, 100),
    ("spill_cpu_pct", 1, 1),
    ("allow_exec", True, True),
    ("exec_allowlist", ["make", "/usr/bin/python3"], ["make", "/usr/bin/python3"]),
    ("max_borrow_ratio", 0, 0.0),
    ("max_borrow_ratio", 2.5, 2.5),
    ("max_borrow_ratio", 1000, 1000.0),
    ("goodwill_core_s", 1e9, 1e9),
    ("battery_min_pct", 0, 0),
    ("battery_min_pct", 100, 100),
    ("reclaim_s", 0, 0.0),
    ("pause_replace_s", 2.5, 2.5),
    ("thermal_max_c", 70, 70.0),
    ("state_dir", "/var/lib/vesta", "/var/lib/vesta"),
    ("socket", "/run/vesta/ctl.sock", "/run/vesta/ctl.sock"),
    ("log_level", "debug", "debug"),
    ("log_level", "error", "error"),
]


@pytest.mark.parametrize(("field", "value", "expected"), GOOD)
def test_good_value_is_kept(field: str, value: Any, expected: Any) -> None:
    cfg = build({field: value})
    got = getattr(cfg, field)
    assert got == expected
    assert type(got) is type(expected)


def test_float_fields_widen_whole_numbers() -> None:
    cfg = build({"max_borrow_ratio": 3, "goodwill_core_s": 10})
    assert type(cfg.max_borrow_ratio) is float
    assert type(cfg.goodwill_core_s) is float


# (field, value, the repr the message must quote, "range" or "type")
BAD: list[tuple[str, Any, str]] = [
    ("port", 0, "range"),
    ("port", 65536, "range"),
    ("port", "7777", "type"),
    ("port", 7777.0, "type"),
    ("port", True, "type"),
    ("port", None, "type"),
    ("dport", -1, "range"),
    ("bind", 5, "type"),
    ("advertise", ["a"], "type"),
    ("seed", "a:7778", "type"),
    ("seed", ["a:7778", 7778], "type"),
    ("seed", [None], "type"),
    ("advertise_spare_ms", 99, "range"),
    ("advertise_spare_ms", 60001, "range"),
    ("power", "wind", "type"),
    ("power", "Grid", "type"),
    ("power", 1, "type"),
    ("cpu_offer_pct", 101, "range"),
    ("cpu_offer_pct", -1, "range"),
    ("cpu_offer_pct", 50.5, "type"),
    ("mem_offer_mb", (1 << 22) + 1, "range"),
    ("reserve_pct", 101, "range"),
    ("spill_cpu_pct", 0, "range"),
    ("allow_exec", "yes", "type"),
    ("allow_exec", 1, "type"),
    ("allow_exec", None, "type"),
    ("exec_allowlist", "make", "type"),
    ("exec_allowlist", ["make", ["gcc"]], "type"),
    ("max_borrow_ratio", -0.5, "range"),
    ("max_borrow_ratio", 1000.5, "range"),
    ("max_borrow_ratio", math.inf, "range"),
    ("max_borrow_ratio", "5", "type"),
    ("max_borrow_ratio", False, "type"),
    ("goodwill_core_s", 1e9 + 1, "range"),
    ("battery_min_pct", 101, "range"),
    ("battery_min_pct", -5, "range"),
    ("reclaim_s", -1, "range"),
    ("pause_replace_s", "5", "type"),
    ("thermal_max_c", 20, "range"),
    ("state_dir", None, "type"),
    ("socket", 1, "type"),
    ("log_level", "verbose", "type"),
    ("log_level", "INFO", "type"),
    ("name", 5, "type"),
    ("key", 1234567890123456789, "type"),
    ("key_file", ["/etc/vesta.key"], "type"),
]


@pytest.mark.parametrize(("field", "value", "problem"), BAD)
def test_bad_value_names_the_field_value_and_what_is_allowed(
    field: str, value: Any, problem: str
) -> None:
    # the value as written in the JSON file; for a list, the first item that is wrong
    items = value if isinstance(value, list) and any(
        not isinstance(v, str) for v in value) else [value]
    shown = json.dumps(next((v for v in items if not isinstance(v, str)), value))
    with pytest.raises(ConfigError) as caught:
        build({field: value})
    err = caught.value
    text = str(err)
    assert err.field == field
    assert text.startswith(f"{field}: {shown} ")
    assert ("out of range" if problem == "range" else "is not allowed") in text
    assert text.endswith(f"expected {FIELDS[field].allowed()}")


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("seed", ["pi4.local:7778", "nohostport"], '"nohostport"'),
        ("seed", ["pi4:99999"], '"pi4:99999"'),
        ("seed", [":7778"], '":7778"'),
        ("bind", "999.1.1.1", '"999.1.1.1"'),
        ("bind", "pi4.local", '"pi4.local"'),
        ("advertise", "not an address", '"not an address"'),
    ],
)
def test_addresses_must_look_like_addresses(field: str, value: Any, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build({field: value})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: {shown} is not allowed: expected ")


def test_good_addresses() -> None:
    config = build({"seed": ["pi4.local:7778", "10.0.0.7:7778"], "bind": "127.0.0.1",
                    "advertise": "desk.lan"})
    assert config.seed == ["pi4.local:7778", "10.0.0.7:7778"]


def test_every_field_has_a_bad_value_in_the_table() -> None:
    assert {f.name for f in SCHEMA} == {field for field, *_ in BAD}


@pytest.mark.parametrize("field", ["max_borrow_ratio", "goodwill_core_s"])
def test_nan_is_out_of_range(field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build({field: math.nan})
    assert caught.value.field == field


@pytest.mark.parametrize("raw", ["...", "-_-", "///"])
def test_a_name_needs_a_letter_or_digit(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build({"name": raw})
    assert caught.value.field == "name"


def test_a_cut_name_does_not_end_in_a_dash() -> None:
    assert sanitize_name("a" * 63 + " b") == "a" * 63


def test_choices_are_listed_in_the_message() -> None:
    with pytest.raises(ConfigError, match="one of auto, grid, solar, battery"):
        build({"power": "wind"})


def test_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as caught:
        build({"colour": "red"})
    assert caught.value.field == "colour"
    assert str(caught.value).startswith("colour: unknown field; known fields: name, key")
    assert "log_level" in str(caught.value)


def test_later_layers_win() -> None:
    cfg = build({"port": 1000, "power": "solar"}, {"port": 2000})
    assert (cfg.port, cfg.power) == (2000, "solar")


def test_defaults_are_not_shared_between_configs() -> None:
    first, second = build(), build()
    first.seed.append("x:1")
    assert second.seed == []
    assert FIELDS["seed"].default == []


def test_config_is_frozen() -> None:
    cfg = build()
    with pytest.raises(AttributeError):
        cfg.port = 1


# -- the key -----------------------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "vesta.key"
    path.write_text("  file-key-0123456789  \nsecond line is ignored\n")
    return path


def test_key_comes_first(key_file: Path) -> None:
    cfg = build_config({"key": KEY, "key_file": str(key_file)}, env={"VESTA_KEY": OTHER_KEY})
    assert cfg.key == KEY


def test_key_given_does_not_read_the_key_file(tmp_path: Path) -> None:
    cfg = build_config({"key": KEY, "key_file": str(tmp_path / "missing")}, env={})
    assert cfg.key == KEY


def test_key_file_comes_before_the_environment(key_file: Path) -> None:
    cfg = build_config({"key_file": str(key_file)}, env={"VESTA_KEY": OTHER_KEY})
    assert cfg.key == "file-key-0123456789"


def test_key_file_expands_the_home_directory(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(key_file.parent))
    assert build_config({"key_file": "~/vesta.key"}, env={}).key == "file-key-0123456789"


def test_environment_is_the_last_source() -> None:
    assert build_config({}, env={"VESTA_KEY": OTHER_KEY}).key == OTHER_KEY


@pytest.mark.parametrize("env", [{}, {"VESTA_KEY": ""}, {"VESTA_NODE": "x" * 20}])
def test_no_key_at_all_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="a federation key is needed") as caught:
        build_config({}, env=env)
    assert caught.value.field == "key"


def test_missing_key_file_is_refused_naming_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as caught:
        build_config({"key_file": str(tmp_path / "missing")}, env={"VESTA_KEY": OTHER_KEY})
    assert caught.value.field == "key_file"


@pytest.mark.parametrize(
    ("key", "file_text", "env", "source"),
    [
        ("k" * 15, None, {"VESTA_KEY": OTHER_KEY}, "key"),
        ("", None, {"VESTA_KEY": OTHER_KEY}, "key"),
        (None, "fifteen-chars!!\n", {"VESTA_KEY": OTHER_KEY}, "key_file"),
        (None, None, {"VESTA_KEY": "short"}, "VESTA_KEY"),
    ],
)
def test_short_key_is_refused_naming_its_source(
    key: str | None, file_text: str | None, env: dict[str, str], source: str, tmp_path: Path
) -> None:
    layer: dict[str, Any] = {"key": key}
    if file_text is not None:
        (tmp_path / "short.key").write_text(file_text)
        layer["key_file"] = str(tmp_path / "short.key")
    with pytest.raises(ConfigError) as caught:
        build_config(layer, env=env)
    assert caught.value.field == source
    assert str(caught.value).startswith(f"{source}: the key is ")
    assert f"at least {MIN_KEY_LENGTH}" in str(caught.value)


def test_empty_key_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_text("")
    with pytest.raises(ConfigError, match="0 characters long") as caught:
        build_config({"key_file": str(empty)}, env={})
    assert caught.value.field == "key_file"


@pytest.mark.parametrize(
    "key", [" " * 20, "a" * 20, "\t \t " * 4, "abababababababababab", "abcdabcdabcdabcdabcd"]
)
def test_key_with_almost_no_variety_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match="almost no variety") as caught:
        build_config({"key": key}, env={})
    assert caught.value.field == "key"
    assert f"at least {MIN_KEY_VARIETY} different characters" in str(caught.value)


def test_key_file_readable_by_others_is_used_with_a_warning(tmp_path: Path) -> None:
    key_file = tmp_path / "fed.key"
    key_file.write_text(OTHER_KEY + "\n")
    key_file.chmod(0o644)
    config = build_config({"key_file": str(key_file)}, env={})
    assert config.key == OTHER_KEY
    (note,) = config.notes
    assert "can be read by other users (mode 0644)" in note
    assert f"chmod 600 {key_file}" in note
    key_file.chmod(0o600)
    assert build_config({"key_file": str(key_file)}, env={}).notes == ()


def test_config_attributes_are_the_schema_fields() -> None:
    attributes = [f.name for f in dataclasses.fields(Config)]
    assert attributes == [f.name for f in SCHEMA] + ["notes"]


def test_key_of_exactly_the_minimum_length_is_accepted() -> None:
    assert len(KEY) == MIN_KEY_LENGTH
    assert build_config({"key": KEY}, env={}).key == KEY


# -- name and socket ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("desk", "desk"),
        ("Desk-01.lan_a", "Desk-01.lan_a"),
        ("my desk", "my-desk"),
        ("my  desk!!", "my-desk"),
        ("--desk--", "desk"),
        ("/etc/passwd", "etc-passwd"),
        ("bürö", "b-r"),
        ("a" * 100, "a" * 64),
        ("!!!", ""),
        ("", ""),
    ],
)
def test_sanitize_name(raw: str, clean: str) -> None:
    assert sanitize_name(raw) == clean


def test_name_is_sanitised_and_capped() -> None:
    cfg = build({"name": "my laptop" + "x" * 100})
    assert cfg.name == ("my-laptop" + "x" * 100)[:64]
    assert len(cfg.name) == 64


@pytest.mark.parametrize("raw", ["!!!", " ", "ñ", "---"])
def test_name_without_usable_characters_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="no letters or digits") as caught:
        build({"name": raw})
    assert caught.value.field == "name"


def test_name_defaults_to_the_host_name() -> None:
    cfg = build_config({"key": KEY}, env={})
    assert cfg.name == sanitize_name(socket.gethostname())


def test_default_socket_path_carries_the_name() -> None:
    assert build({"name": "my desk"}).socket == "/tmp/vestad-my-desk.sock"


def test_state_dir_expands_the_home_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    assert build().state_dir == "/home/someone/.local/state/vesta"


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/" + "s" * 106, True),  # 107 bytes
        ("/" + "s" * 107, False),  # 108 bytes
        ("/" + "é" * 53, True),  # 107 bytes, 54 characters
        ("/" + "é" * 54, False),  # 109 bytes, 55 characters
    ],
)
def test_socket_path_is_limited_to_107_bytes(path: str, ok: bool) -> None:
    if ok:
        assert build({"socket": path}).socket == path
        return
    with pytest.raises(ConfigError, match="107 bytes") as caught:
        build({"socket": path})
    assert caught.value.field == "socket"


def test_longest_name_gives_a_usable_default_socket() -> None:
    cfg = build({"name": "n" * 200})
    assert cfg.socket == f"/tmp/vestad-{'n' * 64}.sock"
    assert len(os.fsencode(cfg.socket)) <= 107


# -- config files ------------------------------------------------------------------------------


def test_load_file_drops_comment_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"//port": "a comment", "port": 8000, "// x": 1, "/y": 2}))
    assert load_file(path) == {"port": 8000, "/y": 2}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "is not valid JSON"),
        ('{"port": 1,}', "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('"port"', "must hold a JSON object"),
        ("null", "must hold a JSON object"),
    ],
)
def test_load_file_refuses_what_is_not_a_json_object(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says) as caught:
        load_file(path)
    assert caught.value.field == "config"
    assert str(path) in str(caught.value)


def test_load_file_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_file(path)
    assert caught.value.field == "config"
    assert str(path) in str(caught.value)


def test_file_values_are_validated_like_any_other(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"//cpu_offer_pct": "percent", "cpu_offer_pct": 150}')
    with pytest.raises(ConfigError) as caught:
        build(load_file(path))
    assert caught.value.field == "cpu_offer_pct"


# -- the generated example ---------------------------------------------------------------------


def test_committed_example_is_up_to_date() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == example_document(), (
        f"{EXAMPLE.name} differs from the schema; {REGENERATE}"
    )


def test_example_command_prints_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert config.main(["example"]) == 0
    assert capsys.readouterr().out == example_document()


def test_example_is_valid_json_with_a_comment_before_every_field() -> None:
    raw = json.loads(example_document())
    assert list(raw) == [k for f in SCHEMA for k in (f"//{f.name}", f.name)]
    for f in SCHEMA:
        assert f.allowed() in raw[f"//{f.name}"]


def test_example_loads_to_the_defaults() -> None:
    data = load_file(EXAMPLE)
    assert set(data) == set(FIELDS), REGENERATE
    cfg = build_config(data, {"key": KEY}, env={})
    for f in SCHEMA:
        if f.name not in DERIVED:
            assert getattr(cfg, f.name) == f.default, f"{f.name}; {REGENERATE}"
    assert cfg.key == KEY
    assert cfg.name == sanitize_name(socket.gethostname())
    assert cfg.socket == f"/tmp/vestad-{cfg.name}.sock"
    assert cfg.state_dir == os.path.expanduser(FIELDS["state_dir"].default)
    assert cfg == build_config({"key": KEY}, env={})
