"""The daemon's configuration: one schema table for validation, the example file and the docs.

Every setting is a :class:`Field` in :data:`SCHEMA`. The JSON config file, the command-line flags
and the defaults all pass through :func:`build_config`, which checks each value against its field
and raises :class:`ConfigError` naming the field, the value and what is allowed.
``config.example.json`` and the table in ``docs/configuration.md`` are generated from the same table
(``python -m vesta.config example|markdown``), and a test checks they have not drifted.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import socket
import stat
import string
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vesta.names import sanitize_name

#: Keys of a config file that start with this are comments.
COMMENT_PREFIX = "//"
MIN_KEY_LENGTH = 16
#: Different characters (whitespace aside) a key must have at least.
MIN_KEY_VARIETY = 5
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")


class ConfigError(ValueError):
    """A setting that is missing, unknown, of the wrong type or out of range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting: its type, default, the allowed values and a line of help."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    item: type | None = None  # the type of a list's items
    optional: bool = False  # may be null
    flag: str = ""  # the command-line flag, without dashes; "" = the name with '-' for '_'
    metavar: str = ""  # what the flag's value is called in --help; "" = from the field's name
    rule: Callable[[Any], str] | None = None  # a further check: "" or what is wrong

    @property
    def flag_name(self) -> str:
        return self.flag or self.name.replace("_", "-")

    def allowed(self) -> str:
        """What this field accepts, in words."""
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        elif self.kind is list:
            words: dict[type | None, str] = {int: "whole numbers", float: "numbers"}
            text = "a list of " + words.get(self.item, "strings")
        elif self.low is not None and self.high is not None:
            text = f"{_type_word(self.kind)} from {_num(self.low)} to {_num(self.high)}"
        elif self.low is not None:
            text = f"{_type_word(self.kind)} of at least {_num(self.low)}"
        else:
            text = _type_word(self.kind)
        return text + (" or null" if self.optional else "")

    def refuse(self, value: Any) -> ConfigError:
        return ConfigError(self.name, f"{_show(value)} is not allowed: expected {self.allowed()}")

    def check(self, value: Any) -> Any:
        """Return the value if it is allowed here (ints widened to floats), else raise."""
        if value is None and self.optional:
            return None
        if not _is(value, self.kind):
            raise self.refuse(value)
        if self.kind is list:
            bad = [v for v in value if not _is(v, self.item or str)]
            if bad:
                raise self.refuse(bad[0])
        if self.choices and value not in self.choices:
            raise self.refuse(value)
        too_low = self.low is not None and value < self.low
        too_high = self.high is not None and value > self.high
        if too_low or too_high or (self.kind is float and not math.isfinite(value)):
            raise ConfigError(self.name, f"{_show(value)} is out of range: expected "
                              f"{self.allowed()}")
        for item in value if self.kind is list else [value]:
            problem = self.rule(item) if self.rule else ""
            if problem:
                raise ConfigError(self.name, f"{_show(item)} is not allowed: {problem}")
        return float(value) if self.kind is float else (list(value) if self.kind is list else value)


def _show(value: Any) -> str:
    """A value as the user wrote it: JSON's spelling (true, null) where it has one."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _ipv4_or_empty(text: str) -> str:
    if not text:
        return ""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return "expected an IPv4 address of this machine, such as 192.168.1.20, or empty"
    return ""


def _host_or_empty(text: str) -> str:
    if not text or _HOST.fullmatch(text):
        return ""
    return "expected an IPv4 address or a host name, or empty"


def _host_port(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not _HOST.fullmatch(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        return "expected host:port, such as pi4.local:7778 or 10.0.0.7:7778"
    return ""


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_word(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(
        kind, kind.__name__
    )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


SCHEMA: tuple[Field, ...] = (
    Field("name", str, None, "node name; letters, digits, '-', '_' and '.', at most 64 "
          "characters (others are replaced); default: the host name", optional=True,
          metavar="NAME"),
    Field("key", str, None, "the federation key shared by every node, at least 16 characters; "
          "prefer -key-file (key_file) or VESTA_KEY, which keep it out of `ps`", optional=True,
          metavar="SECRET"),
    Field("key_file", str, None, "a file whose first line is the federation key", optional=True,
          metavar="PATH"),
    Field("port", int, 7777, "TCP port of the peer protocol", low=1, high=65535, metavar="PORT"),
    Field("dport", int, 7778, "UDP port of discovery beacons", low=1, high=65535, metavar="PORT"),
    Field("bind", str, "", "listen on this address only; empty: every address", metavar="ADDR",
          rule=_ipv4_or_empty),
    Field("advertise", str, "", "the address peers are told to connect to; empty: the address "
          "the beacon leaves from", metavar="ADDR", rule=_host_or_empty),
    Field("seed", list, [], "peers beyond the subnet, as host:port of their discovery port",
          item=str, metavar="HOST:PORT,...", rule=_host_port),
    Field("advertise_spare_ms", int, 1000, "how often the node announces its spare capacity, "
          "in milliseconds", low=100, high=60000, flag="advertise-spare", metavar="MS"),
    Field("power", str, "auto", "power mode: auto reads /sys/class/power_supply; grid, solar or "
          "battery force one", choices=("auto", "grid", "solar", "battery")),
    Field("cpu_offer_pct", int, 75, "share of the cores offered for lending, percent",
          low=0, high=100, metavar="PCT"),
    Field("mem_offer_mb", int, 1024, "hard cap on the memory offered for lending, MiB",
          low=0, high=1 << 22, metavar="MB"),
    Field("reserve_pct", int, 20, "share of the cores kept for local use and never lent, percent",
          low=0, high=100, metavar="PCT"),
    Field("spill_cpu_pct", int, 80, "local CPU load, percent, at which new work spills to peers",
          low=1, high=100, metavar="PCT"),
    Field("allow_exec", bool, False, "let peers run commands on this node"),
    Field("exec_allowlist", list, [], "if not empty, the only commands peers may run here; "
          "matches the basename or the full path of the command", item=str, metavar="CMD,..."),
    Field("max_borrow_ratio", float, 5.0, "leeching cap: how much a peer may borrow beyond what "
          "it contributed", low=0, high=1000, metavar="RATIO"),
    Field("goodwill_core_s", float, 120.0, "core-seconds of credit every new peer starts with",
          low=0, high=1e9, metavar="CORE_S"),
    Field("battery_min_pct", int, 15, "stop lending below this battery charge, percent",
          low=0, high=100, metavar="PCT"),
    Field("reclaim_s", float, 10.0, "seconds the owner's load must stay below spill_cpu_pct "
          "before paused lent work resumes", low=0, high=86400, metavar="S"),
    Field("pause_replace_s", float, 5.0, "lent work paused for its owner longer than this is "
          "placed elsewhere by its submitter, seconds", low=0, high=86400, metavar="S"),
    Field("thermal_max_c", float, 85.0, "CPU temperature at which the node offers nothing and "
          "pauses lent work; its offer shrinks over the 10 degrees below", low=30, high=150,
          metavar="C"),
    Field("state_dir", str, "~/.local/state/vesta", "where the identity, the ledger and the boot "
          "counter live", metavar="DIR"),
    Field("socket", str, "", "control socket path; empty: /tmp/vestad-NAME.sock", metavar="PATH"),
    Field("log_level", str, "info", "how much the daemon logs",
          choices=("debug", "info", "warning", "error")),
)

FIELDS: dict[str, Field] = {f.name: f for f in SCHEMA}

@dataclasses.dataclass(frozen=True)
class Config:
    """A validated configuration: one attribute per field of :data:`SCHEMA`, resolved.

    ``name`` is sanitized, ``key`` resolved from -key, -key-file or VESTA_KEY, ``state_dir``
    expanded and ``socket`` filled in. ``notes`` are warnings for the operator (a key file others
    can read, say) that the launcher prints at start. A test checks that the attributes and
    SCHEMA name the same fields.
    """

    name: str
    key: str
    key_file: str | None
    port: int
    dport: int
    bind: str
    advertise: str
    seed: list[str]
    advertise_spare_ms: int
    power: str
    cpu_offer_pct: int
    mem_offer_mb: int
    reserve_pct: int
    spill_cpu_pct: int
    allow_exec: bool
    exec_allowlist: list[str]
    max_borrow_ratio: float
    goodwill_core_s: float
    battery_min_pct: int
    reclaim_s: float
    pause_replace_s: float
    thermal_max_c: float
    state_dir: str
    socket: str
    log_level: str
    notes: tuple[str, ...] = ()


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON config file; comment keys (starting with ``//``) are dropped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a JSON object")
    return {k: v for k, v in data.items() if not k.startswith(COMMENT_PREFIX)}


def build_config(
    *layers: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> Config:
    """Merge the layers (later ones win), check every value and resolve the key.

    Unknown fields are refused. The key comes from ``key``, then ``key_file``, then ``VESTA_KEY``.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.items():
            if name not in FIELDS:
                raise ConfigError(name, "unknown field; known fields: " + ", ".join(FIELDS))
            merged[name] = value
    values = {
        f.name: f.check(merged[f.name]) if f.name in merged else _copy(f.default) for f in SCHEMA
    }
    name = values["name"] if values["name"] is not None else socket.gethostname()
    values["name"] = sanitize_name(name)
    if not re.search(r"[A-Za-z0-9]", values["name"]):
        raise ConfigError("name", f"{name!r} has no letters or digits to make a node name of")
    notes: list[str] = []
    values["key"] = _resolve_key(values, env, notes)
    values["state_dir"] = str(Path(values["state_dir"]).expanduser())
    for field in ("state_dir", "socket", "key_file"):
        if values[field] and "\0" in values[field]:
            raise ConfigError(field, "a path cannot hold a NUL character")
    if not values["socket"]:
        values["socket"] = f"/tmp/vestad-{values['name']}.sock"
    if len(os.fsencode(values["socket"])) > 107:
        raise ConfigError("socket", f"{values['socket']!r} is longer than the 107 bytes "
                          "a Unix socket path may have")
    return Config(**values, notes=tuple(notes))


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _resolve_key(values: dict[str, Any], env: Mapping[str, str], notes: list[str]) -> str:
    key = values["key"]
    source = "key"
    if key is None and values["key_file"]:
        source = "key_file"
        key = _read_key_file(values["key_file"], notes)
    if key is None and env.get("VESTA_KEY"):
        source, key = "VESTA_KEY", env["VESTA_KEY"]
    if key is None:
        raise ConfigError("key", "a federation key is needed: give -key, -key-file or VESTA_KEY")
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(
            source, f"the key is {len(key)} characters long; at least {MIN_KEY_LENGTH} are needed"
        )
    if len(set(key) - set(string.whitespace)) < MIN_KEY_VARIETY:
        raise ConfigError(source, "the key has almost no variety (it is whitespace or repeats a "
                          f"few characters); use at least {MIN_KEY_VARIETY} different characters, "
                          "or a random key from `vesta keygen`")
    return key


def _read_key_file(path: str, notes: list[str]) -> str:
    """The first line of the key file; a note if others can read it (as ssh warns)."""
    file = Path(path).expanduser()
    try:
        mode = file.stat().st_mode
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError("key_file", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("key_file", f"{path} is not UTF-8 text") from None
    if mode & 0o077:
        notes.append(f"the key file {path} can be read by other users (mode "
                     f"{stat.S_IMODE(mode):04o}); anyone who reads it can join the federation: "
                     f"chmod 600 {path}")
    return lines[0].strip() if lines else ""


# -- generated documents ---------------------------------------------------------------------------


def example_document() -> str:
    """The text of ``config.example.json``: every field, each after a comment key explaining it."""
    lines = ["{"]
    entries = []
    for f in SCHEMA:
        comment = f"{f.help} ({f.allowed()}; flag -{f.flag_name})"
        entries.append(f"  {json.dumps(COMMENT_PREFIX + f.name)}: {json.dumps(comment)},\n"
                       f"  {json.dumps(f.name)}: {json.dumps(f.default)}")
    lines.append(",\n".join(entries))
    lines.append("}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The field table of ``docs/configuration.md``."""
    rows = ["| field | flag | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in SCHEMA:
        default = "—" if f.default is None else f"`{json.dumps(f.default)}`"
        rows.append(f"| `{f.name}` | `-{f.flag_name}` | {default} | {f.allowed()} | {f.help} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m vesta.config example|markdown``: print a generated document."""
    args = sys.argv[1:] if argv is None else argv
    makers: dict[str, Callable[[], str]] = {"example": example_document, "markdown": markdown_table}
    if len(args) != 1 or args[0] not in makers:
        print("usage: python -m vesta.config example|markdown", file=sys.stderr)
        return 2
    sys.stdout.write(makers[args[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
