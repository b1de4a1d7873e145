"""Node names: the one rule the daemon and the CLI share (standard library only)."""

from __future__ import annotations

import re

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 64


def sanitize_name(raw: str) -> str:
    """A node name made of letters, digits, '-', '_' and '.', at most 64 characters."""
    return _NAME_OK.sub("-", raw).strip("-")[:MAX_NAME].rstrip("-")
