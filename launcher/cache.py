"""Build-once caches outside the checkout (converted models, tokenized data sets).

Everything slow to rebuild lives under `$TUNEFLEET_CACHE` (default ~/.cache/tunefleet). Entries
are built in a temporary folder and renamed into place, so a crash never leaves a half-built
entry that a later run would use. A file lock makes other processes on the same machine wait for
the builder: no collective is involved, so a slow build can never trip a distributed timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("TUNEFLEET_CACHE", Path.home() / ".cache" / "tunefleet"))


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` unless `target` exists, then publish it atomically."""
    from filelock import FileLock

    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return target
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
