"""``vestad``: parse the command line, build the configuration, then run the daemon.

Every flag comes from :data:`vesta.config.SCHEMA`, in the seed's single-dash spelling (``-name``)
and the usual double-dash one (``--name``). This module imports nothing heavy at its top: job
processes start from a fork server that imports the main module once, and it should stay small.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vesta import __version__
from vesta.config import SCHEMA, ConfigError, Field, build_config, load_file

EXIT_CONFIG = 2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vestad",
        description="The vesta daemon: one per machine. Nodes started with the same key find "
        "each other and share their spare CPU and memory.",
        epilog="Every setting can also come from -config FILE (JSON; see config.example.json). "
        "Flags override the file. The key may come from -key, -key-file or VESTA_KEY.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("-config", "--config", metavar="PATH",
                        help="a JSON configuration file")
    parser.add_argument("-version", "--version", action="version",
                        version=f"vestad {__version__}")
    for f in SCHEMA:
        _add_flag(parser, f)
    return parser


def _add_flag(parser: argparse.ArgumentParser, f: Field) -> None:
    names = [f"-{f.flag_name}", f"--{f.flag_name}"]
    text = f.help + _default_note(f)
    if f.kind is bool:
        parser.add_argument(*names, dest=f.name, action="store_true", help=text)
    elif f.kind is list:
        parser.add_argument(*names, dest=f.name, type=_comma_list, metavar=f.metavar or "A,B,...",
                            help=text)
    else:
        metavar = "|".join(f.choices) if f.choices else f.metavar or f.name.upper()
        kind: Any = f.kind
        parser.add_argument(*names, dest=f.name, type=kind, metavar=metavar, help=text)


def _default_note(f: Field) -> str:
    """`` (default: X)`` for a field whose default is a value worth showing."""
    if f.default in (None, "", []) or f.kind is bool or "default" in f.help:
        return ""
    shown = f.default if f.kind is not float else f"{f.default:g}"
    return f" (default: {shown})"


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    args = vars(make_parser().parse_args(argv))
    config_path = args.pop("config", None)
    try:
        from_file = load_file(config_path) if config_path else {}
        config = build_config(from_file, args)
    except ConfigError as exc:
        print(f"vestad: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    asked = args.get("name", from_file.get("name"))
    if asked and asked != config.name:
        print(f"vestad: note: the node name {asked!r} is used as {config.name!r} (letters, digits, "
              "'-', '_' and '.', at most 64 characters)", file=sys.stderr)
    for note in config.notes:
        print(f"vestad: warning: {note}", file=sys.stderr)

    from vesta.daemon import run  # the heavy imports start here

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
