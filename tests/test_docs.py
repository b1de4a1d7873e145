"""The documents generated from code have not drifted from it."""

from __future__ import annotations

from pathlib import Path

from vesta.config import markdown_table

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_doc_has_the_schema_table() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown_table() in doc, (
        "docs/configuration.md is out of date: paste `python -m vesta.config markdown` into it"
    )


def test_readme_opens_with_the_demo_and_the_test_command() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in lines[:6] if line.startswith("python3 -m ")]
    assert "vesta.apps.demo" in commands[0]
    assert commands[1].split("#")[0].strip().endswith("python3 -m tox")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m tox" in ci
