"""Files in the state directory: written atomically with mode 0600, read with clear errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class StateFileError(RuntimeError):
    """A state file that cannot be read or written."""


def write_private_json(path: Path, data: Any) -> None:
    """Write JSON so that a crash at any moment leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise StateFileError(f"{path} is not valid JSON: {exc}") from None


def next_boot(state_dir: str | Path, name: str) -> int:
    """Count this start in the node's boot counter and return it. The counter is on disk (and
    fsynced) before the first beacon, so beacons of a restarted node are newer than any before."""
    path = Path(state_dir) / f"vestad-boot-{name}.json"
    boot = 0
    if path.exists():
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("boot"), int):
            boot = data["boot"]
    write_private_json(path, {"boot": boot + 1})
    return boot + 1
