"""Files every part of the project writes: whole or not at all (a reader never sees half a file), strict JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and os.replace, so readers never see half a file. The
    file gets the mode a plain open() would give it (0666 less the umask: 0644 by default), not mkstemp's 0600,
    so a team on shared storage can read each other's records."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def finite_or_none(obj: Any) -> Any:
    """Strict JSON has no NaN/inf: a non-finite number is written as null (a diverged run says so itself)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
