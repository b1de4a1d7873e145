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


def _readme_commands() -> list[str]:
    """The first two commands of the README, as a new user would copy them."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines[:6] if line.startswith("python3 ")]


def test_readme_opens_with_the_demo_and_the_test_command_in_a_venv() -> None:
    demo, suite = _readme_commands()
    for command in (demo, suite):  # PEP 668 systems refuse pip into the system Python
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install")
    assert demo.endswith(".venv/bin/vesta-demo")
    assert suite.endswith(".venv/bin/tox")


def test_ci_runs_the_readme_test_command() -> None:
    _demo, suite = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert suite in ci
